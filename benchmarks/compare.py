"""Models of one sweep side by side: the cross-validation mean ± std of each metric, one column per job.

Why: `python train.py -m experiment=xgb_breast_cancer,mlp_breast_cancer cv.folds=5` writes each job under its own
task folder (logs/<task_name>/multiruns/<timestamp>/<job>/cv.json); this gathers the jobs that share the sweep's
timestamp, checks that they were cut into the same folds, and prints them next to the reference figures.

    python benchmarks/compare.py                           # the newest sweep under ./logs
    python benchmarks/compare.py logs/train/multiruns/<timestamp>
    python benchmarks/compare.py <folder> --metrics test/acc test/roc_auc --all
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# design.md, section 4: XGBoost on scikit-learn's bundled tables, 5-fold CV
REFERENCES = {("breast_cancer", "test/acc"): 0.97, ("digits", "test/acc"): 0.97}


@dataclass
class Job:
    folder: Path
    mean: dict[str, float]
    std: dict[str, float] = field(default_factory=dict)
    folds: int = 1
    config: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)

    @property
    def split(self) -> tuple[Any, ...]:
        """What decides the rows of each fold: the table, the split seed and fractions, the number of folds."""
        data = self.config.get("data", {})
        keys = ("dataset", "path", "target", "split_seed", "val_fraction", "test_fraction")
        return (data.get("_target_"), *(data.get(k) for k in keys), self.folds)


def load_job(folder: Path) -> Job | None:
    """A job folder with cv.json (mean ± std) or, for a run without CV, metrics.json (one value, no spread)."""
    from omegaconf import OmegaConf

    config = (
        OmegaConf.to_container(OmegaConf.load(folder / "config.yaml")) if (folder / "config.yaml").is_file() else {}
    )
    overrides_file = folder / ".hydra" / "overrides.yaml"
    overrides = (
        [str(o) for o in OmegaConf.to_container(OmegaConf.load(overrides_file))] if overrides_file.is_file() else []
    )
    if (folder / "cv.json").is_file():
        report = json.loads((folder / "cv.json").read_text())
        return Job(folder, report["mean"], report["std"], int(report["folds"]), config, overrides)
    if (folder / "metrics.json").is_file():
        return Job(folder, json.loads((folder / "metrics.json").read_text()), {}, 1, config, overrides)
    return None


def find_jobs(paths: list[Path]) -> list[Job]:
    """Jobs under the given folders; a sweep folder also pulls in its siblings under other task names."""
    folders: set[Path] = set()
    for path in paths:
        sweeps = [path]
        if path.parent.name == "multiruns":  # logs/<task>/multiruns/<timestamp>: the same sweep under every task
            sweeps = sorted(path.parent.parent.parent.glob(f"*/multiruns/{path.name}"))
        for sweep in sweeps:
            for marker in [*sweep.rglob("cv.json"), *sweep.rglob("metrics.json")]:
                if not marker.parent.name.startswith("fold_"):
                    folders.add(marker.parent)
    jobs = [job for job in (load_job(f) for f in sorted(folders)) if job is not None]
    return sorted(jobs, key=lambda job: (int(job.folder.name) if job.folder.name.isdigit() else -1, str(job.folder)))


def newest_sweep(log_dir: Path) -> Path:
    sweeps = sorted(log_dir.glob("*/multiruns/*"), key=lambda p: p.name)
    if not sweeps:
        raise SystemExit(f"error: no sweep under {log_dir}/*/multiruns; run train.py -m ... first")
    return sweeps[-1]


def labels(jobs: list[Job]) -> list[str]:
    """Name each job by the overrides that differ between jobs (`experiment=` dropped), else by its task name."""
    shared = set.intersection(*(set(job.overrides) for job in jobs)) if jobs else set()
    names = []
    for job in jobs:
        own = [o.removeprefix("experiment=") for o in job.overrides if o not in shared]
        names.append(" ".join(own) or str(job.config.get("task_name") or job.folder.name))
    return names


def table(jobs: list[Job], metrics: list[str] | None = None, include_val: bool = False) -> str:
    """Rows are metrics, columns are jobs, cells `mean ± std`; a reference column where design.md has one."""
    prefixes = ("test/", "val/") if include_val else ("test/",)
    names = metrics or sorted({m for job in jobs for m in job.mean if m.startswith(prefixes)})
    datasets = {job.config.get("data", {}).get("dataset") for job in jobs}
    dataset = datasets.pop() if len(datasets) == 1 else None
    headers = ["metric", *labels(jobs)]
    has_reference = any((dataset, name) in REFERENCES for name in names)
    if has_reference:
        headers.append("reference")
    rows = []
    for name in names:
        row = [name]
        for job in jobs:
            if name not in job.mean:
                row.append("-")
            elif name in job.std:
                row.append(f"{job.mean[name]:.4f} ± {job.std[name]:.4f}")
            else:
                row.append(f"{job.mean[name]:.4f}")
        if has_reference:
            reference = REFERENCES.get((dataset, name))
            row.append("-" if reference is None else f"{reference:.2f}")
        rows.append(row)
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip() for r in [headers, *rows]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, help="sweep or run folders (default: newest sweep in ./logs)")
    parser.add_argument("--log-dir", type=Path, default=Path("logs"))
    parser.add_argument("--metrics", nargs="+", help="metrics to show (default: every test/ metric)")
    parser.add_argument("--all", action="store_true", help="also show val/ metrics")
    args = parser.parse_args(argv)
    paths = args.paths or [newest_sweep(args.log_dir)]
    jobs = find_jobs(paths)
    if not jobs:
        raise SystemExit(f"error: no cv.json or metrics.json under {', '.join(map(str, paths))}")
    lines = []
    folds = {job.folds for job in jobs}
    cv = f"{folds.pop()}-fold cross-validation, mean ± std over folds" if len(folds) == 1 else "runs"
    lines.append(f"{len(jobs)} jobs, {cv}")
    if len({job.split for job in jobs}) > 1:
        lines.append(
            "warning: the jobs were not cut into the same splits (data, split_seed, fractions or folds differ)"
        )
    lines.append(table(jobs, args.metrics, args.all))
    report = "\n".join(lines)
    print(report)
    return report


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
