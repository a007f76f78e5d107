"""Samples/s and peak memory of one training epoch as the dataset grows: in memory, from files, and streamed.

Why: the in-memory datamodules hold the whole dataset in RAM, which is fastest while it fits and impossible once it
does not. This generates a synthetic image folder at 1x, 2x and 4x a base size, prepares each with
`python -m zoo.data.prepare`, and trains a small CNN for one epoch in a fresh process per case, reading the data
(a) into one tensor, as the bundled datasets do, (b) from the image files per batch (`data=image_folder`) and
(c) from LitData chunks (`data=streaming`). The table shows the rate and the peak resident memory of each process:
the in-memory column grows with the data, the streamed one stays flat.

    python benchmarks/streaming.py                         # 2,000 / 4,000 / 8,000 RGB images of 32x32
    python benchmarks/streaming.py --base 20000 --image-size 64 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import environment, table

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 10

# one epoch in a process of its own, so that its peak memory is the case's alone
EPOCH = r"""
import json, resource, sys, time, torch
from torch import nn
from torch.nn import functional as F
kind, path, size, batch, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
torch.set_num_threads(1)
if kind == "streaming":
    from zoo.data.streaming import StreamingDataModule
    data = StreamingDataModule(path, [3, size, size], 10, batch_size=batch, num_workers=workers)
    loader = data.train_dataloader()
else:
    from zoo.data.vision import ImageFolderDataModule
    data = ImageFolderDataModule(path, [3, size, size], 10, batch_size=batch, num_workers=workers)
    data.setup()
    loader = data.train_dataloader()
    if kind == "memory":  # every training image decoded once into one tensor, as the bundled datasets are held
        xs, ys = zip(*((x, y) for x, y in loader))
        x, y = torch.cat(xs), torch.cat(ys)
        loader = [(x[index], y[index]) for index in torch.randperm(len(x)).split(batch)]
net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                    nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
optimizer = torch.optim.AdamW(net.parameters(), 1e-3)
start, samples = time.perf_counter(), 0
for x, y in loader:
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    samples += len(y)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"samples": samples, "seconds": seconds, "peak_mib": peak}))
"""


def make_folder(root: Path, images: int, size: int, seed: int = 0) -> None:
    """Noise images with a class-coloured square, PNG files in one folder per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        c = i % CLASSES
        pixels = (rng.random((size, size, 3)) * 120).astype(np.uint8)
        pixels[c : c + size // 4, c : c + size // 4, c % 3] = 255
        Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")


def run_epoch(kind: str, path: Path, size: int, batch: int, workers: int) -> tuple[float, float]:
    """(samples/s, peak resident MiB of the process, its loader workers not counted)."""
    command = [sys.executable, "-c", EPOCH, kind, str(path), str(size), str(batch), str(workers)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{kind} on {path} failed:\n{result.stderr[-2000:]}")
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    return measured["samples"] / measured["seconds"], measured["peak_mib"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=int, default=2000, help="images at 1x")
    parser.add_argument("--scales", default="1,2,4")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes (their memory not counted)")
    parser.add_argument("--kinds", default="memory,files,streaming")
    args = parser.parse_args()
    print(environment(), flush=True)
    from zoo.data.streaming import prepare

    kinds = args.kinds.split(",")
    rows = [["images", "folder MiB", "chunks MiB", "prepare s"] + [f"{k} samples/s" for k in kinds]]
    rows[0] += [f"{k} peak MiB" for k in kinds]
    with tempfile.TemporaryDirectory(prefix="streaming_") as tmp:
        for scale in (int(s) for s in args.scales.split(",")):
            images = args.base * scale
            folder, chunks = Path(tmp) / f"folder_{scale}", Path(tmp) / f"chunks_{scale}"
            make_folder(folder, images, args.image_size)
            start = time.perf_counter()
            prepare(str(folder), str(chunks), image_size=args.image_size, channels=3)
            prepared = time.perf_counter() - start
            results = {}
            for kind in kinds:
                path = chunks if kind == "streaming" else folder
                results[kind] = run_epoch(kind, path, args.image_size, args.batch_size, args.workers)
                print(f"  {images} images, {kind}: {results[kind][0]:.0f} samples/s, {results[kind][1]:.0f} MiB")
            rows.append(
                [str(images), f"{_mib(folder):.0f}", f"{_mib(chunks):.0f}", f"{prepared:.1f}"]
                + [f"{results[k][0]:.0f}" for k in kinds]
                + [f"{results[k][1]:.0f}" for k in kinds]
            )
    print(f"\none epoch of a small CNN on {args.image_size}x{args.image_size} RGB images, batch {args.batch_size}, ")
    print(f"{args.workers} loader workers, 1 torch thread; peak = resident memory of the training process")
    print(table(rows, right=set(range(len(rows[0])))))


def _mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


if __name__ == "__main__":
    main()
