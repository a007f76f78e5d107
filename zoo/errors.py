"""Errors caused by what the user asked for, as opposed to bugs in the zoo."""


class UserError(Exception):
    """A bad config value, a missing file, an unusable checkpoint: reported as one line, no traceback."""


class TrainingDiverged(UserError):
    """A loss or a weight became NaN or infinite: the run stops and keeps only the checkpoints written before."""


def check_split_fractions(val_fraction: object, test_fraction: object) -> None:
    """The held-out shares of a dataset, checked where the config names them rather than deep in a splitter."""
    for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            raise UserError(f"data.{key}: expected a number in [0, 1), got {value!r}")
    if val_fraction + test_fraction >= 1:  # type: ignore[operator]
        raise UserError(f"data.val_fraction + data.test_fraction must be < 1, got {val_fraction + test_fraction}")  # type: ignore[operator]


def check_holdout_fraction(holdout_fraction: object, folds: object) -> None:
    """The outer test split of k-fold cross-validation (`cv.ensemble`): a share of all rows cut before the folds."""
    value = holdout_fraction
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UserError(f"data.holdout_fraction: expected a number in [0, 1), got {value!r}")
    if value > 0 and (not isinstance(folds, int) or folds < 2):
        raise UserError(
            f"data.holdout_fraction: an outer test split is cut before the folds of k-fold cross-validation; "
            f"it needs data.folds >= 2, got {folds!r}"
        )
