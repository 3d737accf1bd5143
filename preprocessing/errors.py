"""Errors that stop a data build on the user's input, apart from the modules that raise them (the pipeline, its
steps, the report), so that none of those has to import another for them."""


class BuildError(Exception):
    """The user's input or settings stop the build: the command line prints the message, not a traceback."""


class NoDocuments(BuildError):
    """A source has no document left after a stage."""
