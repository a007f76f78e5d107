"""How cost grows: training steps/s and peak memory as the dataset and the model grow (x1, x2, x4).

Why: the in-memory datamodules are fastest while the data fits, and a user needs to see where memory, not speed,
decides. Each case trains in a fresh process (so its peak resident memory is its own) through the zoo's own trainer,
as `benchmarks/overhead.py` builds it, for one warm-up and one timed epoch of `--steps` steps:

- classification (the CNN on random 3x32x32 images): the data in memory (`TensorDataModule`) and streamed from
  LitData chunks (`data=streaming`), at x1/x2/x4 samples with the model at x1, and x1/x2/x4 channels at x1 data;
- character LM (`experiment=char_lm`): the text repeated x1/x2/x4 with the model at x1, and x1/x2/x4 width.

    python benchmarks/scaling.py                   # base 4,000 images; about 5 min on 2 cores
    python benchmarks/scaling.py --base 20000 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, environment, table

BENCHMARKS = Path(__file__).resolve().parent
SCALES = (1, 2, 4)

# one fit in a process of its own: steps/s of the timed epoch and the process's peak resident memory
FIT = r"""
import json, resource, sys
from pathlib import Path
import torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
import overhead
from common import quiet_lightning
quiet_lightning()
overrides, data, folder = json.loads(sys.argv[2]), json.loads(sys.argv[3]), Path(sys.argv[4])
cfg = overhead.case_config([*overhead.COMMON, *overhead.LEAN, *overrides], folder, data)
timing = overhead.zoo_fit(cfg, torch.device("cpu"))
print(json.dumps({"rate": timing.rate, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def fit(overrides: list[str], data: dict | None, folder: Path) -> tuple[float, float]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-c", FIT, str(BENCHMARKS), json.dumps(overrides), json.dumps(data), str(folder)]
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{overrides} failed:\n{result.stderr[-2000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return measured["rate"], measured["peak"]


def random_images(samples: int) -> dict:
    """The overhead benchmark's seeded random 3x32x32 images, `samples` of them, as a zoo datamodule config."""
    return {
        "_target_": "overhead.random_cifar",
        "input_shape": [3, 32, 32],
        "num_classes": 10,
        "batch_size": 64,
        "eval_batch_size": 1000,
        "val_fraction": 0.1,
        "samples": samples,
        "shuffle_seed": 0,
    }


def classification_rows(base: int, steps: int, tmp: Path) -> list[list[str]]:
    import torch

    from zoo.data.streaming import prepare

    common = ["model=cnn", f"trainer.limit_train_batches={steps}", "trainer.max_epochs=2"]
    rows = []
    for scale in SCALES:
        samples = base * scale
        generator = torch.Generator().manual_seed(0)
        images = (torch.rand(samples, 3, 32, 32, generator=generator) * 255).to(torch.uint8)
        torch.save({"x": images, "y": torch.arange(samples) % 10}, tmp / f"images_{scale}.pt")
        chunks = tmp / f"chunks_{scale}"
        prepare(str(tmp / f"images_{scale}.pt"), str(chunks), data_format="tensor")
        memory = fit(common, random_images(samples), tmp / f"memory_{scale}")
        streamed = fit(
            [*common, "data=streaming", f"data.path={chunks}", "data.num_workers=0"], None, tmp / f"stream_{scale}"
        )
        rows.append([f"CNN, data x{scale} ({samples:,} images)", *_cells(memory), *_cells(streamed)])
    for scale in SCALES[1:]:
        channels = f"model.net.channels=[{32 * scale},{64 * scale}]"
        memory = fit([*common, channels], random_images(base), tmp / f"wide_{scale}")
        rows.append([f"CNN, channels x{scale}", *_cells(memory), "-", "-"])
    return rows


def language_rows(steps: int, tmp: Path) -> list[list[str]]:
    import pydoc_data.topics

    text = "".join(pydoc_data.topics.topics.values())
    common = ["experiment=char_lm", f"trainer.limit_train_batches={steps}", "trainer.max_epochs=2"]
    rows = []
    for scale in SCALES:
        path = tmp / f"text_{scale}.txt"
        path.write_text(text * scale)
        chars = len(text) * scale
        measured = fit([*common, f"data.path={path}"], None, tmp / f"lm_{scale}")
        rows.append([f"char LM, text x{scale} ({chars / 1e6:.1f}M characters)", *_cells(measured), "-", "-"])
    for scale in SCALES[1:]:
        width = f"model.net.d_model={128 * scale}"
        rows.append([f"char LM, width x{scale}", *_cells(fit([*common, width], None, tmp / f"lm_w{scale}")), "-", "-"])
    return rows


def _cells(result: tuple[float, float]) -> list[str]:
    return [f"{result[0]:.1f}", f"{result[1]:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=4000, help="images at x1")
    parser.add_argument("--steps", type=int, default=30, help="training steps in each of the two epochs")
    parser.add_argument("--families", default="classification,lm")
    args = parser.parse_args()
    print(environment(), flush=True)
    families = args.families.split(",")
    header = ["case", "in memory steps/s", "in memory peak MiB", "streamed steps/s", "streamed peak MiB"]
    rows = [header]
    with tempfile.TemporaryDirectory(prefix="scaling_") as tmp:
        if "classification" in families:
            rows += classification_rows(args.base, args.steps, Path(tmp))
        if "lm" in families:
            rows += language_rows(args.steps, Path(tmp))
    print(f"\none timed epoch of {args.steps} steps after a warm-up one, 1 torch thread, a fresh process per row")
    print(f"(peak: resident memory of that process; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print(table(rows, right={1, 2, 3, 4}))


if __name__ == "__main__":
    main()
