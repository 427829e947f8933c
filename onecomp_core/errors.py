"""User-facing errors: one line that says what to change."""


class OnecompError(Exception):
    """An error caused by input (config, paths, data); printed as one line, no traceback."""


class UnknownNameError(OnecompError):
    """A component name that no installed plugin registers."""
