"""Recurrent recipes beside the transformer ones: MNIST-1D accuracy, char LM perplexity, seq2seq exact match.

Why: each recipe's slow test checks its bound with one seed; this prints the GRU (and LSTM) on MNIST-1D as mean ±
std over seeds beside the transformer and the MNIST-1D paper, the LSTM language model beside the transformer one
(parameters, test perplexity, wall time on the same text and windows; then the LSTM again for as many epochs as
fit in the transformer's wall time), and the encoder-decoder RNNs' exact match beside the transformer's. Test
figures are those of the validation-selected checkpoint (what `train.py` tests), never a pick by test score. Runs
go through `zoo.run.train` with configs composed as `train.py` composes them.

    python benchmarks/rnn.py                                   # everything: 3 seeds of MNIST-1D, 1 of the rest
    python benchmarks/rnn.py --parts mnist1d --lstm            # GRU, LSTM and transformer on MNIST-1D
    python benchmarks/rnn.py --parts seq2seq --seq2seq-seeds 1,2
    python benchmarks/rnn.py --quick                           # two batches an epoch: a check that it runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import QUIET as COMMON_QUIET
from common import compose_config, environment, mean_std, quiet_lightning, table

QUIET = [*COMMON_QUIET, "logger=none"]
# MNIST-1D paper (Greydanus 2020), test accuracy
PAPER = {"CNN": 0.94, "GRU": 0.91}
SEQ2SEQ = ("reverse", "sort", "addition")


def run(experiment: str, seed: int, args: argparse.Namespace, folder: Path, *extra: str) -> dict[str, Any]:
    """Train and test one recipe; its metrics.json plus the wall time, the run folder and the config."""
    from zoo.run import train

    overrides = [f"experiment={experiment}", f"seed={seed}", *QUIET, f"trainer.accelerator={args.device}", *extra]
    if args.max_epochs is not None:
        overrides.append(f"trainer.max_epochs={args.max_epochs}")
    if args.quick:
        overrides += ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
    name = "_".join([experiment, *(e.replace("=", "-").replace("/", "-") for e in extra), f"seed_{seed}"])
    cfg = compose_config(overrides, folder, name)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (output_dir / "stdout.txt").open("w") as log, contextlib.redirect_stdout(log):
        train(cfg)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    return {**metrics, "seconds": time.perf_counter() - start, "output_dir": output_dir, "cfg": cfg}


def lm_parameters(result: dict[str, Any]) -> int:
    """Distinct parameters of a run's LM network (a tied head counts once), rebuilt from its config."""
    from hydra.utils import instantiate

    cfg = result["cfg"]
    vocab = json.loads((result["output_dir"] / "vocab.json").read_text())["chars"]
    net = instantiate(cfg.model.net)(vocab_size=len(vocab), block_size=cfg.data.block_size)
    return sum(p.numel() for p in net.parameters())


def mnist1d(args: argparse.Namespace, folder: Path) -> str:
    seeds = [int(s) for s in args.seeds.split(",")]
    recipes = [("GRU (zoo, gru_mnist1d)", "gru_mnist1d", [])]
    if args.lstm:
        recipes.append(("LSTM (zoo, lstm_mnist1d)", "lstm_mnist1d", []))
    recipes.append(("transformer (zoo, transformer_mnist1d)", "transformer_mnist1d", []))
    rows = [["model", "MNIST-1D test accuracy", "source"]]
    rows += [[name, f"{value:.2f}", "paper"] for name, value in PAPER.items()]
    for label, experiment, extra in recipes:
        accuracies, times = [], []
        for seed in seeds:
            result = run(experiment, seed, args, folder, *extra)
            accuracies.append(result["test/acc"])
            times.append(result["seconds"])
            print(f"  {label} seed {seed}: test/acc {result['test/acc']:.4f} in {result['seconds']:.0f} s", flush=True)
        rows.append([label, mean_std(accuracies), f"seeds {args.seeds}, {statistics.fmean(times):.0f} s/run"])
    return "MNIST-1D (validation-selected checkpoint)\n" + table(rows, right={1})


def language_models(args: argparse.Namespace, folder: Path) -> str:
    """The LSTM recipe, the transformer recipe, then the LSTM again for the transformer's wall time."""
    rows = [["model", "parameters", "epochs", "test perplexity", "test bits/char", "wall/run"]]
    runs = [("LSTM (lstm_char_lm)", "lstm_char_lm", []), ("transformer (char_lm)", "char_lm", [])]
    results = []
    for _, experiment, extra in runs:
        results.append(run(experiment, args.lm_seed, args, folder, *extra))
    lstm, transformer = results
    if not args.quick:  # as many LSTM epochs as fit in the transformer's wall time
        epochs = max(1, round(lstm["cfg"].trainer.max_epochs * transformer["seconds"] / lstm["seconds"]))
        runs.append(("LSTM, equal wall time", "lstm_char_lm", [f"trainer.max_epochs={epochs}"]))
        results.append(run("lstm_char_lm", args.lm_seed, args, folder, f"trainer.max_epochs={epochs}"))
    for (label, _, _), result in zip(runs, results):
        print(f"  {label}: test/ppl {result['test/ppl']:.3f} in {result['seconds']:.0f} s", flush=True)
        rows.append(
            [
                label,
                f"{lm_parameters(result):,}",
                str(result["cfg"].trainer.max_epochs),
                f"{result['test/ppl']:.3f}",
                f"{result['test/bpc']:.3f}",
                f"{result['seconds']:.0f} s",
            ]
        )
    title = "char LM (Python docs corpus, windows of 64, validation-selected checkpoint)\n"
    return title + table(rows, right={1, 2, 3, 4, 5})


def seq2seq(args: argparse.Namespace, folder: Path) -> str:
    seeds = [int(s) for s in args.seq2seq_seeds.split(",")]
    rows = [["task", "model", "exact match greedy", "exact match beam", "wall/run"]]
    for task in SEQ2SEQ:
        for label, experiment in (("RNN + attention", f"seq2seq_rnn_{task}"), ("transformer", f"seq2seq_{task}")):
            greedy, beam, times = [], [], []
            for seed in seeds:
                result = run(experiment, seed, args, folder)
                greedy.append(result["test/exact_match_greedy"])
                beam.append(result.get("test/exact_match_beam", result["test/exact_match_greedy"]))
                times.append(result["seconds"])
                print(f"  {experiment} seed {seed}: exact match {result['test/exact_match']:.4f}", flush=True)
            rows.append([task, label, mean_std(greedy), mean_std(beam), f"{statistics.fmean(times):.0f} s"])
    return "seq2seq (1,000 held-out test sequences)\n" + table(rows, right={2, 3, 4})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="mnist1d,lm,seq2seq", help="comma-separated: mnist1d, lm, seq2seq")
    parser.add_argument("--seeds", default="1,2,3", help="training seeds of the MNIST-1D recipes")
    parser.add_argument("--lstm", action="store_true", help="also the LSTM on MNIST-1D (experiment=lstm_mnist1d)")
    parser.add_argument("--seq2seq-seeds", default="1", help="training seeds of each seq2seq task")
    parser.add_argument("--lm-seed", type=int, default=1, help="training seed of both language models")
    parser.add_argument("--max-epochs", type=int, default=None, help="override trainer.max_epochs of every run")
    parser.add_argument("--quick", action="store_true", help="1 epoch of 2 batches per run: a check that it runs")
    parser.add_argument("--device", default="cpu", help="trainer.accelerator: cpu, gpu or auto")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the README's figures: 1)")
    parser.add_argument("--output-dir", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    print(environment(), flush=True)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - {"mnist1d", "lm", "seq2seq"}
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}")

    import torch

    torch.set_num_threads(args.threads)
    quiet_lightning()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    sections = {"mnist1d": mnist1d, "lm": language_models, "seq2seq": seq2seq}
    with contextlib.ExitStack() as stack:
        folder = Path(args.output_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="rnn_")))
        for part in parts:
            print("\n" + sections[part](args, folder) + "\n", flush=True)


if __name__ == "__main__":
    main()
