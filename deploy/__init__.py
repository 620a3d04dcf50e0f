"""Serving: a Ray Serve application that loads a model folder. Never imports training/."""
