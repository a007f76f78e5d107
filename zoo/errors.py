"""Errors caused by what the user asked for, as opposed to bugs in the zoo."""


class UserError(Exception):
    """A bad config value, a missing file, an unusable checkpoint: reported as one line, no traceback."""


class TrainingDiverged(UserError):
    """A loss or a weight became NaN or infinite: the run stops and keeps only the checkpoints written before."""
