class CorpusError(ValueError):
    """Bad input or a bad dataset: the message is one line that names what and where."""
