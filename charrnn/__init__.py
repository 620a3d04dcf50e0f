"""The `charrnn` command line: one entry point over pipeline/, training/ and deploy/."""
