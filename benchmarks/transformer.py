"""Quality and speed of the transformer recipes: MNIST-1D accuracy, seq2seq exact match, char LM perplexity.

Why: the slow tests only check each recipe's bound with one seed; this prints the mean over seeds beside the
MNIST-1D paper's table, greedy and beam-search exact match of the seq2seq tasks, and the char LM's test
perplexity with its training throughput (tokens per second and, on a GPU, model FLOPs utilization). Runs go
through `zoo.run.train` with configs composed as `train.py` composes them, so what is measured is what a user gets.

    python benchmarks/transformer.py                                  # everything, 3 seeds of MNIST-1D
    python benchmarks/transformer.py --parts lm --device cuda --precision bf16-mixed
    python benchmarks/transformer.py --parts seq2seq --seeds 1 --max-epochs 2    # a quick check that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from common import QUIET as COMMON_QUIET
from common import compose_config, environment
from omegaconf import open_dict

QUIET = [*COMMON_QUIET, "logger=none"]
# MNIST-1D paper (Greydanus 2020), test accuracy
PAPER = {"logistic regression": 0.32, "MLP": 0.68, "CNN": 0.94, "GRU": 0.91}
SEQ2SEQ = ("seq2seq_reverse", "seq2seq_sort", "seq2seq_addition")
# dense bf16 peak FLOP/s by device name (vendor data sheets, SXM parts)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "V100": 125e12}


class Throughput:
    """Times the training batches (forward, backward, optimizer step) of every epoch after the first.

    `throughput()` builds it as a Lightning callback.
    """

    def __init__(self, path: str) -> None:
        self.path, self.seconds, self.tokens, self.start = Path(path), 0.0, 0, 0.0

    def _sync(self, trainer: Any) -> None:
        import torch

        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch > 0:
            self._sync(trainer)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch > 0:
            self._sync(trainer)
            self.seconds += time.perf_counter() - self.start
            self.tokens += batch[0][:, :-1].numel()

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        import torch

        net = pl_module.net
        embedding = sum(p.numel() for n, p in net.named_parameters() if n.startswith(("embed", "positions")))
        info = {
            "seconds": self.seconds,
            "tokens": self.tokens,
            "non_embedding_params": sum(p.numel() for p in net.parameters()) - embedding,
            "layers": len(net.blocks),
            "d_model": net.embed.embedding_dim,
            "context": net.block_size,
            "device": torch.cuda.get_device_name() if trainer.strategy.root_device.type == "cuda" else "cpu",
        }
        self.path.write_text(json.dumps(info))


@functools.cache
def _callback_class() -> type[Throughput]:
    from lightning.pytorch.callbacks import Callback

    return type("Throughput", (Throughput, Callback), {})


def throughput(path: str) -> Throughput:
    """A Throughput callback writing to `path` (the `_target_` of `callbacks.throughput`)."""
    return _callback_class()(path)


def run(experiment: str, seed: int, args: argparse.Namespace, folder: Path) -> tuple[dict[str, float], float, Path]:
    from zoo.run import train

    overrides = [f"experiment={experiment}", f"seed={seed}", *QUIET, f"trainer.accelerator={args.device}"]
    if args.max_epochs is not None:
        overrides.append(f"trainer.max_epochs={args.max_epochs}")
    if args.precision:
        overrides.append(f"trainer.precision={args.precision}")
    cfg = compose_config(overrides, folder, f"{experiment}/seed_{seed}")
    output_dir = Path(cfg.paths.output_dir)
    with open_dict(cfg):
        if experiment == "char_lm":
            cfg.callbacks.throughput = {"_target_": f"{__name__}.throughput", "path": str(output_dir / "speed.json")}
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (output_dir / "stdout.txt").open("w") as log, contextlib.redirect_stdout(log):
        train(cfg)
    seconds = time.perf_counter() - start
    return json.loads((output_dir / "metrics.json").read_text()), seconds, output_dir


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    line = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths))  # noqa: E731
    return "\n".join([line(rows[0]), "  ".join("-" * w for w in widths), *(line(r) for r in rows[1:])])


def mean_std(values: list[float]) -> str:
    std = f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.4f}{std}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="mnist1d,seq2seq,lm", help="comma-separated: mnist1d, seq2seq, lm")
    parser.add_argument("--seeds", default="1,2,3", help="training seeds of the MNIST-1D recipe")
    parser.add_argument("--seq2seq-seeds", default="1", help="training seeds of each seq2seq task")
    parser.add_argument("--max-epochs", type=int, default=None, help="override trainer.max_epochs (quick checks)")
    parser.add_argument("--device", default="cpu", help="trainer.accelerator: cpu, gpu or auto")
    parser.add_argument("--precision", default=None, help="trainer.precision, e.g. bf16-mixed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--output-dir", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    print(environment(), flush=True)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if parts - {"mnist1d", "seq2seq", "lm"}:
        parser.error(f"--parts: unknown {', '.join(sorted(parts - {'mnist1d', 'seq2seq', 'lm'}))}")

    import torch

    torch.set_num_threads(torch.get_num_threads() if args.threads is None else args.threads)
    importlib.import_module("lightning.pytorch")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")

    with contextlib.ExitStack() as stack:
        folder = Path(args.output_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="transformer_")))
        if "mnist1d" in parts:
            seeds = [int(s) for s in args.seeds.split(",")]
            accuracies, times = [], []
            for seed in seeds:
                metrics, seconds, _ = run("transformer_mnist1d", seed, args, folder)
                accuracies.append(metrics["test/acc"])
                times.append(seconds)
                print(f"  transformer_mnist1d seed {seed}: test/acc {metrics['test/acc']:.4f} in {seconds:.0f} s")
            rows = [["model", "MNIST-1D test accuracy", "source"]]
            rows += [[name, f"{value:.2f}", "paper"] for name, value in PAPER.items()]
            rows.append(
                ["transformer (zoo)", mean_std(accuracies), f"seeds {args.seeds}, {statistics.fmean(times):.0f} s/run"]
            )
            print("\nMNIST-1D\n" + table(rows) + "\n")
        if "seq2seq" in parts:
            rows = [["task", "exact match greedy", "exact match beam", "token acc", "wall/run"]]
            for experiment in SEQ2SEQ:
                greedy, beam, token, times = [], [], [], []
                for seed in (int(s) for s in args.seq2seq_seeds.split(",")):
                    metrics, seconds, _ = run(experiment, seed, args, folder)
                    greedy.append(metrics["test/exact_match_greedy"])
                    beam.append(metrics.get("test/exact_match_beam", metrics["test/exact_match_greedy"]))
                    token.append(metrics["test/token_acc"])
                    times.append(seconds)
                    print(
                        f"  {experiment} seed {seed}: exact match {metrics['test/exact_match']:.4f} in {seconds:.0f} s"
                    )
                rows.append(
                    [experiment, mean_std(greedy), mean_std(beam), mean_std(token), f"{statistics.fmean(times):.0f} s"]
                )
            print("\nseq2seq (held-out test sequences)\n" + table(rows) + "\n")
        if "lm" in parts:
            metrics, seconds, output_dir = run("char_lm", 1, args, folder)
            speed = json.loads((output_dir / "speed.json").read_text())
            rate = speed["tokens"] / max(speed["seconds"], 1e-9)
            n, layers, d, context = (speed[k] for k in ("non_embedding_params", "layers", "d_model", "context"))
            flops_per_token = 6 * n + 12 * layers * d * context
            peak = next((v for k, v in PEAK_FLOPS.items() if k in speed["device"]), None)
            mfu = f"{flops_per_token * rate / peak:.1%}" if peak else "- (CPU or unknown peak)"
            rows = [
                ["test perplexity", f"{metrics['test/ppl']:.3f}"],
                ["test bits per character", f"{metrics['test/bpc']:.3f}"],
                ["training tokens / s", f"{rate:,.0f}"],
                ["FLOPs / token (6N + 12·L·d·T)", f"{flops_per_token:,.0f}"],
                [f"MFU on {speed['device']}", mfu],
                ["wall time of the run", f"{seconds:.0f} s"],
            ]
            print("\nchar LM (Python docs corpus)\n" + table([["figure", "value"], *rows]))


if __name__ == "__main__":
    main()
