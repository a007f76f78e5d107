"""What a run leaves on disk, written so that a kill never tears it and read so that a file never runs code.

Checkpoints and run folders are passed around (a colleague's run, a paper's release, a download), so the zoo
treats them as data: checkpoints load with `torch.load(weights_only=True)`, and a run folder's `config.yaml` may
name only `_target_`s inside an allow-list before anything is built from it. Writes go to a temporary file in
the target's own folder and are renamed over it, which is atomic on every local filesystem.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from zoo.errors import UserError

# Modules whose classes and functions a saved run config may instantiate: the zoo's own, optimizers and their
# schedules, and Lightning's callbacks, loggers and profilers. Checked on the name before anything is imported,
# and again on the object it resolves to, so that `zoo.x.torch.load` (a module attribute) cannot pass.
ALLOWED_TARGET_MODULES = (
    "zoo",
    "torch.optim",
    "lightning.pytorch.callbacks",
    "lightning.pytorch.loggers",
    "lightning.pytorch.profilers",
    "lightning.pytorch.trainer",
    "functools.partial",
)
ALLOWED_TARGET_NAMES = ("lightning.pytorch.Trainer",)


def load_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """A checkpoint as plain tensors and containers; anything that would need code to unpickle is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{key}: no file at '{path}'")
    return load_checkpoint_bytes(path.read_bytes(), path, key)


def load_checkpoint_bytes(raw: bytes, path: str | Path, key: str) -> Any:
    """`load_checkpoint` of bytes already read (so that a digest and the load see the same file)."""
    import pickle

    import torch

    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(error))
        if found is None:  # no code named: the bytes are not a checkpoint at all
            raise UserError(f"{key}: '{path}' is not a readable checkpoint (UnpicklingError)") from None
        raise UserError(
            f"{key}: refused to load '{path}': it needs {found.group(1)}, which only code could rebuild; "
            "a zoo checkpoint holds tensors and plain values only"
        ) from None
    except Exception as error:  # noqa: BLE001 - a truncated or foreign file means the same to the user
        raise UserError(f"{key}: '{path}' is not a readable checkpoint ({type(error).__name__})") from None


def load_lightning_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    checkpoint = load_checkpoint(path, key)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(f"{key}: '{path}' is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint


def saved_run_config(ckpt_path: Path, trust: bool = False, key: str = "ckpt_path") -> DictConfig:
    """The config saved with a run: `<run>/checkpoints/x.ckpt` -> `<run>/config.yaml` (or `.hydra/config.yaml`).

    Its `_target_`s are checked against the allow-list unless `trust` is set.
    """
    if not ckpt_path.is_file():
        raise UserError(f"{key}: no file at '{ckpt_path}'")
    for folder in list(ckpt_path.resolve().parents)[:3]:
        for candidate in (folder / "config.yaml", folder / ".hydra" / "config.yaml"):
            if candidate.is_file():
                cfg = OmegaConf.load(candidate)
                if not isinstance(cfg, DictConfig):
                    raise UserError(f"{key}: '{candidate}' is not a run config")
                if not trust:
                    check_targets(cfg, candidate)
                return cfg
    raise UserError(
        f"{key}: found no config.yaml or .hydra/config.yaml in the run folder of '{ckpt_path}'; "
        "evaluate needs the config the checkpoint was trained with"
    )


def check_targets(cfg: DictConfig, source: Path | str) -> None:
    """Refuse a config whose `_target_`s reach outside the allow-list, before any of them is imported."""
    from hydra._internal.utils import _locate

    for key, target in _targets(OmegaConf.to_container(cfg, resolve=False), ""):
        refusal = (
            f"{key}: the run config '{source}' names _target_ '{target}', which is outside the zoo's allow-list "
            f"({', '.join(ALLOWED_TARGET_MODULES)}); pass trust_config=true only for a run folder you trust"
        )
        if not isinstance(target, str) or not _allowed_name(target):
            raise UserError(refusal)
        try:
            found = _locate(target)
        except Exception:  # noqa: BLE001 - an unknown name is refused like a foreign one
            raise UserError(refusal) from None
        module = getattr(found, "__module__", None) or ""
        if not (isinstance(found, type) or callable(found)) or not _allowed_name(f"{module}.x"):
            raise UserError(refusal)


def _allowed_name(name: str) -> bool:
    if name in ALLOWED_TARGET_NAMES:
        return True
    return any(name == m or name.startswith(m + ".") for m in ALLOWED_TARGET_MODULES) and "._" not in name


def _targets(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for name, child in node.items():
            path = f"{prefix}.{name}" if prefix else str(name)
            if name == "_target_":
                yield path, child
            else:
                yield from _targets(child, path)
    elif isinstance(node, list):
        for index, item in enumerate(node):
            yield from _targets(item, f"{prefix}[{index}]")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk and rename it over `path`.

    A kill at any instant leaves the old file or the new one, never half of one, and no stray file in the system
    temp folder; the rename stays on one filesystem because the temporary file is in the same folder.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Strict JSON: a NaN or infinite value is written as null, and its reason is listed under `non_finite`."""
    non_finite = {k: str(v) for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)}
    write_json(path, {**metrics, "non_finite": non_finite} if non_finite else metrics)


def write_json(path: Path, data: Any) -> None:
    """Strict JSON (NaN and infinities as null, which every parser reads), written atomically."""
    text = json.dumps(_finite(data), indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def format_table(rows: dict[str, str]) -> str:
    width = max((len(k) for k in rows), default=6)
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
    lines += [f"{k:<{width}}  {v}" for k, v in sorted(rows.items())]
    return "\n".join(lines)


def flat_hparams(cfg: DictConfig) -> dict[str, Any]:
    """The config keys that define the experiment, flattened to `a.b.c` with TensorBoard-friendly values."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    chosen = {k: resolved[k] for k in ("data", "model", "optimizer", "scheduler", "trainer", "seed") if k in resolved}
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else str(key), value)
        else:
            flat[prefix] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", chosen)
    return flat
