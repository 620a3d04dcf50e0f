"""A mistake that is the user's to fix, found by a command itself (not by argparse): cli.main prints
`charrnn COMMAND: error: MESSAGE`, one line, and exits 2."""


class CommandError(ValueError):
    pass
