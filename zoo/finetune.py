"""Starting a run from another run's weights, and freezing parts of a model.

`init_from=<ckpt>` copies every tensor whose name and shape match into the new model (a new head for another
number of classes stays as initialised) and nothing else: the optimizer, schedule, epoch and step counters start
afresh, which is what `ckpt_path` (resume) would carry over instead. `freeze=[<patterns>]` stops the gradients of
the parameters whose names match (fnmatch patterns, e.g. `net.features_net.*`); batch-norm layers whose
parameters are all frozen also keep their running statistics (they stay in eval mode while training), until
`unfreeze_at_epoch`, if given, lets all of them train. `head=[<patterns>] head_lr_mult=<m>` trains the matching
parameters at m times the optimizer's learning rate (a new head fast, the pre-trained body slowly).
"""

from __future__ import annotations

import fnmatch
import logging
from pathlib import Path
from typing import Any

from zoo.errors import UserError

log = logging.getLogger(__name__)


def init_from(model: Any, path: str | Path) -> dict[str, list[str]]:
    """Load matching tensors non-strictly; returns the names loaded, newly initialised (`new`) and `ignored`."""
    from torchmetrics import Metric

    from zoo.records import load_lightning_checkpoint

    source = load_lightning_checkpoint(path, key="init_from")["state_dict"]
    # a metric's state (val/acc_best) belongs to the run that measured it, not to the weights
    metrics = tuple(f"{name}." for name, module in model.named_modules() if name and isinstance(module, Metric))
    target = {k: v for k, v in model.state_dict().items() if not k.startswith(metrics)}
    loaded = [k for k, v in target.items() if k in source and tuple(source[k].shape) == tuple(v.shape)]
    if not any(name in loaded for name, _ in model.named_parameters()):
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(source.items())[:3])
        raise UserError(
            f"init_from: no tensor of '{path}' matches this model by name and shape (it holds {shapes}, ...); "
            "it was written by another kind of model"
        )
    model.load_state_dict({k: source[k] for k in loaded}, strict=False)
    report = {
        "loaded": loaded,
        "new": [k for k in target if k not in loaded],
        "ignored": [k for k in source if k not in loaded and not k.startswith(metrics)],
    }
    return report


def describe(report: dict[str, list[str]], shown: int = 4) -> str:
    """`loaded 12, new 2 (net.head.1.weight, ...), ignored 2 (...)`: a line that says what changed hands."""
    parts = []
    for name, keys in report.items():
        listed = ""
        if keys and name != "loaded":
            listed = f" ({', '.join(keys[:shown])}{', ...' if len(keys) > shown else ''})"
        parts.append(f"{name} {len(keys)}{listed}")
    return ", ".join(parts)


def matching(model: Any, patterns: list[str], key: str) -> list[Any]:
    """The parameters whose names match any of the fnmatch patterns; a pattern that matches nothing is an error."""
    names = [name for name, _ in model.named_parameters()]
    chosen = set()
    for pattern in patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            examples = ", ".join(names[:4])
            raise UserError(f"{key}: '{pattern}' matches no parameter; names look like {examples}, ...")
        chosen.update(matched)
    return [parameter for name, parameter in model.named_parameters() if name in chosen]


def freeze(model: Any, patterns: list[str]) -> list[str]:
    """Turn off the gradients of the parameters matching any pattern; each pattern must match something."""
    names = [name for name, _ in model.named_parameters()]
    chosen = {id(p) for p in matching(model, patterns, key="freeze")}
    frozen = {name for name, parameter in model.named_parameters() if id(parameter) in chosen}
    for name, parameter in model.named_parameters():
        if name in frozen:
            parameter.requires_grad_(False)
    log.info("froze %d of %d parameter tensors", len(frozen), len(names))
    return sorted(frozen)


def frozen_norms(model: Any) -> list[Any]:
    """Batch-norm layers whose parameters are all frozen: their running statistics must stay as loaded."""
    from zoo.internals import is_batch_norm

    return [
        module
        for module in model.modules()
        if is_batch_norm(module) and all(not p.requires_grad for p in module.parameters(recurse=False))
    ]
