class CompressError(ValueError):
    """A problem with the user's input or files, reported as one line without a traceback."""
