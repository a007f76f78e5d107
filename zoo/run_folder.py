"""Every run gets a folder of its own, claimed with one atomic `os.mkdir` before Hydra writes into it.

Hydra makes `hydra.run.dir` (or `hydra.sweep.dir`) with `mkdir(exist_ok=True)` and then writes `.hydra/` into it,
so two runs that resolve the same folder would share it, and a run pointed at an old folder would overwrite that
run's files before anything could refuse it. Here the folder is resolved from the composed config and created
first; `os.mkdir` fails if the folder exists, so of two runs racing for one folder exactly one gets it. The folder
then goes to Hydra as an override, and Hydra's own `mkdir(exist_ok=True)` finds it made.

Processes of one distributed run share the folder: Lightning's DDP child processes get the parent's folder on
their command line, and under torchrun rank 0 claims it and hands it to the other ranks through the TCPStore at
MASTER_ADDR:MASTER_PORT. torch is imported only on that path, so `--help` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from zoo.errors import UserError

RUN_KEY, SWEEP_KEY = "hydra.run.dir", "hydra.sweep.dir"
MAX_SUFFIX = 100  # a timestamped folder taken by another run gets `-1`, `-2`, ... up to this
# what a run leaves that is worth keeping even when it then stops on a user error
RESULTS = ("*.ckpt", "model.json")
# ranks > 0 wait this long for rank 0's folder; rank 0, after a failed start, this long for the others to stop
RANK_TIMEOUT = timedelta(minutes=5)
STOP_TIMEOUT_S = 30.0


@dataclass
class Claim:
    """The command line to give Hydra, and what this process made so that it can take it back on a user error."""

    args: list[str]
    created: Path | None = None  # None: nothing claimed here (Hydra's own modes, or the folder is another process's)
    ranks: _Ranks | None = None

    @contextlib.contextmanager
    def removed_on_failure(self) -> Iterator[None]:
        """Remove the claimed folder when the run stops on a user error before writing results.

        A user error ends in `SystemExit(2)` (the one-line errors of zoo.cli), or is a UserError when
        HYDRA_FULL_ERROR=1 shows tracebacks; a folder still empty after any failure goes as well. A bug keeps
        its folder, since the log file there helps to find it.
        """
        try:
            yield
        except BaseException as error:
            if self.created is not None and _worth_removing(error, self.created):
                if self.ranks is not None:
                    self.ranks.wait_for_others_to_stop()  # a later rank may still be writing into the folder
                shutil.rmtree(self.created, ignore_errors=True)
            raise
        finally:
            if self.ranks is not None:
                self.ranks.stopped()


def claim(config_dir: Path, config_name: str, args: list[str], job_name: str) -> Claim:
    """Claim the run (or sweep) folder that `args` resolve to, or join the one a parent process claimed.

    `job_name` is Hydra's `hydra.job.name` (the stem of the file whose function `hydra.main` wraps), which a
    folder name may use.
    """
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return Claim(args)  # --cfg, --info, -cn ...: Hydra's own modes, which run no job or compose another config
    lightning_child = "LOCAL_RANK" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ
    if lightning_child and any(_key(a) == RUN_KEY for a in args):
        return Claim(args)  # a DDP process launched by Lightning, pointed at its parent's folder
    if "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ:
        return _claim_for_all_ranks(config_dir, config_name, args, job_name)
    key, folder = _claim_here(config_dir, config_name, args, job_name)
    return Claim(with_folder(args, key, folder), created=Path(os.path.abspath(folder)))  # the same after a chdir


def with_folder(args: list[str], key: str, folder: str) -> list[str]:
    """`args` with `key` (hydra.run.dir or hydra.sweep.dir) set to `folder`, replacing the user's value."""
    return [a for a in args if _key(a) != key] + [f"{key}={hydra_quote(folder)}"]


def hydra_quote(value: str) -> str:
    """`value` as a quoted Hydra override value that reads back unchanged, whatever characters a path holds.

    In a quoted value a backslash escapes only a quote or the end, and `${` starts an interpolation.
    """
    escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'").replace("${", "\\${")
    return f"'{escaped}'"


def make_folder(path: str, key: str, explicit: bool, log_dir: str | None = None) -> str:
    """Create `path` with one `os.mkdir`, parents first; return the folder made.

    A folder the user named (`explicit`) must be new; a default (timestamped) name taken by another run gets
    a suffix. A failure inside `log_dir` is reported against `paths.log_dir`, the key the user would change.
    """
    inside_log_dir = log_dir is not None and Path(os.path.abspath(path)).is_relative_to(os.path.abspath(log_dir))
    blamed = "paths.log_dir" if inside_log_dir else key
    try:
        os.makedirs(os.path.dirname(path) or os.curdir, exist_ok=True)  # an error names the path as the user gave it
        for n in range(MAX_SUFFIX + 1):
            candidate = f"{path}-{n}" if n else path
            try:
                os.mkdir(candidate)
                return candidate
            except FileExistsError:
                if explicit:
                    raise UserError(f"{key}: '{path}' exists and may hold another run; choose a new folder") from None
    except OSError as error:
        raise UserError(f"{blamed}: cannot create '{error.filename or path}' ({error.strerror or error})") from error
    raise UserError(f"{key}: '{path}' and {MAX_SUFFIX} suffixed names exist; choose a new folder")


def _claim_here(config_dir: Path, config_name: str, args: list[str], job_name: str) -> tuple[str, str]:
    """Resolve the folder this run or multirun writes to, as Hydra would, and create it."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    overrides = [a for a in args if a not in ("-m", "--multirun")]
    with initialize_config_dir(str(config_dir), version_base="1.3", job_name=job_name):
        # as Hydra decides between run and multirun: composed in multirun mode, sweeps allowed
        cfg = GlobalHydra.instance().hydra.compose_config(
            config_name, overrides, run_mode=RunMode.MULTIRUN, validate_sweep_overrides=False
        )
    HydraConfig.instance().set_config(cfg)  # for `${hydra:...}` in the folder's name
    multirun = "-m" in args or "--multirun" in args or cfg.hydra.mode == RunMode.MULTIRUN
    key = SWEEP_KEY if multirun else RUN_KEY
    path = OmegaConf.select(cfg, key)
    if not path:
        raise UserError(f"{key}: empty; give the folder of the run")
    log_dir = OmegaConf.select(cfg, "paths.log_dir", default=None)
    explicit = any(_key(a) == key for a in overrides)
    return key, make_folder(str(path), key, explicit, str(log_dir) if log_dir is not None else None)


def _claim_for_all_ranks(config_dir: Path, config_name: str, args: list[str], job_name: str) -> Claim:
    """Under torchrun: rank 0 claims the folder, every other rank writes into it (without its own `.hydra/`).

    When rank 0 cannot claim it, every rank stops with rank 0's message; rank 0 waits for them to read it,
    since the store may live in its process.
    """
    ranks = _Ranks()
    if ranks.rank == 0:
        try:
            key, folder = _claim_here(config_dir, config_name, args, job_name)
        except Exception as error:
            ranks.publish({"error": str(error).splitlines()[0] if str(error) else type(error).__name__})
            ranks.wait_for_others_to_stop()
            raise
        ranks.publish({"key": key, "folder": folder})
        return Claim(with_folder(args, key, folder), created=Path(os.path.abspath(folder)), ranks=ranks)
    message = ranks.receive()
    if "error" in message:
        ranks.stopped()
        raise UserError(message["error"])
    return Claim([*with_folder(args, message["key"], message["folder"]), "hydra.output_subdir=null"], ranks=ranks)


@dataclass
class _Ranks:
    """The ranks of one torchrun launch, talking through the store that torchrun serves (or rank 0 hosts)."""

    rank: int = field(default_factory=lambda: int(os.environ["RANK"]))
    world_size: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", "1")))
    prefix: str = field(default_factory=lambda: f"zoo/run_folder/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")
    store: Any = None

    def __post_init__(self) -> None:
        from torch.distributed import TCPStore

        # torch.distributed connects the same way: to the agent's store where torchrun serves one, else rank 0
        # hosts it, shared (multi_tenant) with the process group that Lightning starts later on that port
        agent_serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        self.store = TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=not agent_serves and self.rank == 0,
            timeout=RANK_TIMEOUT,
            wait_for_workers=False,
            multi_tenant=True,
        )

    def publish(self, message: dict[str, str]) -> None:
        self.store.set(f"{self.prefix}/folder", json.dumps(message))

    def receive(self) -> dict[str, str]:
        return json.loads(self.store.get(f"{self.prefix}/folder"))  # blocks until rank 0 has published

    def stopped(self) -> None:
        """Tell rank 0 that this rank is done with the folder; the store may be gone when rank 0 ended first."""
        if self.rank != 0:
            with contextlib.suppress(Exception):
                self.store.add(f"{self.prefix}/stopped", 1)

    def wait_for_others_to_stop(self) -> None:
        deadline = time.monotonic() + STOP_TIMEOUT_S
        with contextlib.suppress(Exception):
            while self.store.add(f"{self.prefix}/stopped", 0) < self.world_size - 1 and time.monotonic() < deadline:
                time.sleep(0.05)


def _worth_removing(error: BaseException, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    if not any(folder.iterdir()):
        return True
    user_error = isinstance(error, UserError) or (isinstance(error, SystemExit) and error.code == 2)
    return user_error and not any(next(folder.rglob(pattern), None) for pattern in RESULTS)


def _key(arg: str) -> str:
    return arg.lstrip("+~").partition("=")[0]
