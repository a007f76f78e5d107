"""Errors caused by what the user asked for, as opposed to bugs in the zoo."""


class UserError(Exception):
    """A bad config value, a missing file, an unusable checkpoint: reported as one line, no traceback."""
