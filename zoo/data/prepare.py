"""`python -m zoo.data.prepare <source> <out>`: a dataset written once as LitData chunks for `data=streaming`.

This module stays light (no torch, no Lightning) because `configs/data/streaming.yaml` reads the prepared data's
`zoo.json` through it while the config is composed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from zoo.errors import UserError

META = "zoo.json"


def read_meta(path: str) -> dict[str, Any]:
    """The description `prepare` wrote beside the chunks; a remote path needs its keys set by hand."""
    if "://" in path:
        raise UserError(
            f"data.path: '{path}' is remote; set data.input_shape and data.num_classes (from its {META}) yourself"
        )
    meta = Path(path).expanduser() / META
    if not meta.is_file():
        raise UserError(f"data.path: no {META} in '{path}'; make it with python -m zoo.data.prepare <source> {path}")
    return json.loads(meta.read_text())


def prepared_value(path: str, key: str) -> Any:
    """The `${zoo_prepared:${data.path},input_shape}` resolver of configs/data/streaming*.yaml."""
    meta = read_meta(str(path))
    if key not in meta:  # e.g. a text's vocab asked of prepared images
        raise UserError(
            f"data.{key}: '{path}' holds '{meta.get('format')}' data, whose {META} has no {key}; "
            f"this data config reads python -m zoo.data.prepare --format {'text' if key == 'vocab' else 'image_folder'}"
        )
    return meta[key]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zoo.data.prepare", description=__doc__.splitlines()[0])
    parser.add_argument(
        "source", help="an image folder (<class>/<image>, or train/val/test/<class>/<image>), a .pt, a .csv or a .txt"
    )
    parser.add_argument("out", help="a new, empty folder for the chunks and zoo.json")
    formats = ["image_folder", "tensor", "csv", "text"]
    parser.add_argument("--format", dest="data_format", default="image_folder", choices=formats)
    parser.add_argument("--target", default=None, help="csv: the column to predict (classes, or a number to regress)")
    parser.add_argument("--image-size", type=int, default=64, help="image_folder: images resized to this square")
    parser.add_argument("--channels", type=int, default=3, choices=[1, 3], help="image_folder: 1 grayscale, 3 RGB")
    parser.add_argument("--block-size", type=int, default=128, help="text: characters of context in each window")
    parser.add_argument("--val-fraction", type=float, default=None, help="default 0.1 (text: 0.05, its end)")
    parser.add_argument("--test-fraction", type=float, default=None, help="default 0.2 (text: 0.05, its end)")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--chunk-bytes", default="64MB", help="size of one chunk file, e.g. 64MB")
    parser.add_argument("--compression", default=None, choices=[None, "zstd"], help="zstd: smaller chunks")
    parser.add_argument("--num-workers", type=int, default=1, help="processes writing chunks")
    args = parser.parse_args(argv)
    from zoo.data.streaming import prepare

    try:
        meta = prepare(**{k: v for k, v in vars(args).items()})
    except UserError as error:
        parser.exit(2, f"error: {error}\n")
    what = "a regression target" if meta.get("target_scale") else f"{meta['num_classes']} classes"
    what = f"{len(meta['vocab'])} characters" if meta["format"] == "text" else what
    counts = ", ".join(f"{split} {count}" for split, count in meta["samples"].items())
    total = sum(meta["samples"].values())
    print(f"{args.out}: {total} samples ({counts}) of shape {meta['input_shape']}, {what}")


if __name__ == "__main__":
    main()
