"""One Optuna study filled by several sweeper processes, on one machine or many, through a shared storage.

`hydra.sweeper.storage=sqlite:///<file>` (or a PostgreSQL URL) makes each `train.py -m hparams_search=...` process
load the same study (Hydra's Optuna sweeper opens it with `load_if_exists`). Processes started together would race
to create the storage's tables, and one that finds them half made stops with an assertion deep inside Optuna; so
the tables are made here first, once: under a file lock for SQLite, by retrying for a database server.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from pathlib import Path

from zoo.errors import UserError

STORAGE_KEY = "hydra.sweeper.storage"
ATTEMPTS = 20


def storage_override(overrides: list[str]) -> str | None:
    """The storage URL given on the command line, if any (`null` is none)."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key == STORAGE_KEY and value not in ("", "null"):
            return value.strip("'\"")
    return None


def prepare_storage(url: str) -> None:
    """Create the study storage's tables, or find them made, before the sweeper opens the study."""
    try:
        import optuna
    except ImportError as error:  # pragma: no cover - the sweeper plugin depends on optuna
        raise UserError(f"{STORAGE_KEY}: optuna is not installed ({error})") from error
    from sqlalchemy.exc import ArgumentError

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    last: Exception | None = None
    with _sqlite_lock(url):
        for attempt in range(ATTEMPTS):
            try:
                optuna.storages.RDBStorage(url)
                return
            # not a database URL, or a driver that is not installed: retrying cannot help
            except (ArgumentError, ImportError, ValueError) as error:
                reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                raise UserError(f"{STORAGE_KEY}: cannot open '{url}': {reason}") from error
            except Exception as error:  # another process is creating the tables right now, or the server is down
                last = error
                time.sleep(0.2 * (attempt + 1) * random.uniform(0.5, 1.5))
    reason = str(last).splitlines()[0] if last is not None and str(last) else type(last).__name__
    raise UserError(f"{STORAGE_KEY}: cannot open '{url}' after {ATTEMPTS} attempts: {reason}")


@contextlib.contextmanager
def _sqlite_lock(url: str) -> Iterator[None]:
    """An exclusive lock on `<file>.lock` beside a SQLite file, so that one process at a time creates tables."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url[len(prefix) :] in ("", ":memory:"):
        yield
        return
    import fcntl

    path = Path(url[len(prefix) :])
    if not path.parent.is_dir():
        raise UserError(f"{STORAGE_KEY}: the folder of '{path}' does not exist")
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
