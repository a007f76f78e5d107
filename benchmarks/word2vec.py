"""word2vec beside gensim's Word2Vec on the same words with the same settings: training speed, word analogies, and
how far the two agree on nearest neighbours.

Why: a word2vec is only as good as it is next to the reference implementation run on the same text; and analogy
accuracy means little without the floor (random vectors score about 0).

    python scripts/fetch_word2vec_data.py                      # data/word2vec (from gensim's wheel, not in git)
    pip install -e ".[bench]"                                  # gensim 4.4.0 beside the zoo
    python benchmarks/word2vec.py                              # skip-gram, 5 epochs, seeds 1,2,3, one thread each
    python benchmarks/word2vec.py --mode cbow --lr 0.05 --seeds 1
    python benchmarks/word2vec.py --threads 1,2                # also gensim workers=2 beside torch on 2 threads

Protocol: the zoo's datamodule reads the corpus, holds out its last 4% and builds the vocabulary (min_count); gensim
trains on exactly the zoo's training words (its sentences with the out-of-vocabulary words removed, so the two
vocabularies are the same). Both use dim, window, negatives, sample, min_count, epochs, the start learning rate and
its linear decay to lr * 1e-4. Speed is training words (in the vocabulary, before sub-sampling) times epochs over
the seconds of training alone: gensim's train(); the zoo's Lightning fit from the first training batch to the last
(validation, checkpoints and logging off), drawing its examples in the same process. Both get the same number of
threads: for each count t in --threads, gensim runs with workers=t (its worker threads; one more thread only hands
them sentences) and the zoo with torch.set_num_threads(t). The two run alternately, seed by seed, so that the load
of a shared machine falls on both; words per CPU-second (process CPU time, all threads) is printed beside words per
wall-clock second, since it moves less with that load. Analogy accuracy is
on questions-words.txt, restricted to the questions whose four words are in both vocabularies, answered by cosine
to b - a + c of unit vectors leaving out a, b and c (gensim's evaluate_word_analogies), by the same code for
every row (gensim's own evaluate_word_analogies figure is printed beside, as a check). Overlap@10 is the share of
the 10 nearest neighbours of the 100 most frequent words that a model has in common with gensim of the same seed;
the ceiling row is gensim against gensim of the next seed, the floor random vectors.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import QUIET, ROOT, compose_config, environment, mean_std, quiet_lightning, table

DATA = ROOT / "data" / "word2vec"


def zoo_run(
    args: argparse.Namespace, seed: int, threads: int, folder: Path
) -> tuple[Any, list[str], tuple[float, float], int]:
    """Train the zoo's word2vec; its vectors, words, training (wall, CPU) seconds and training words (in the
    vocabulary)."""
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import Callback

    from zoo.run import build_model, build_trainer

    class TrainingClock(Callback):
        """Seconds inside training epochs (no validation runs: limit_val_batches=0)."""

        def __init__(self) -> None:
            self.seconds, self.cpu_seconds, self.start, self.cpu_start = 0.0, 0.0, 0.0, 0.0

        def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            self.seconds += time.perf_counter() - self.start
            self.cpu_seconds += time.process_time() - self.cpu_start

    overrides = [
        *QUIET,
        "experiment=word2vec_enwiki",
        f"data.path={args.corpus}",
        f"data.analogy_path={args.questions}",
        f"data.min_count={args.min_count}",
        f"model.mode={args.mode}",
        f"model.window={args.window}",
        f"model.negatives={args.negatives}",
        f"model.sample={args.sample}",
        f"model.net.dim={args.dim}",
        f"optimizer.lr={args.lr}",
        f"trainer.max_epochs={args.epochs}",
        f"seed={seed}",
        *([f"data.batch_size={args.batch_size}"] if args.batch_size else []),
        *([f"model.sgd_chunk={args.sgd_chunk}"] if args.sgd_chunk else []),
        "trainer.accelerator=cpu",
        "trainer.limit_val_batches=0",
        "trainer.num_sanity_val_steps=0",
        "logger=none",
        "callbacks.model_checkpoint=null",
        "callbacks.last_checkpoint=null",
        "callbacks.early_stopping=null",
        *args.extra,
    ]
    cfg = compose_config(overrides, folder, run=f"zoo_{seed}_{threads}")
    torch.set_num_threads(threads)
    L.seed_everything(seed, workers=True)
    data = instantiate(cfg.data)
    model = build_model(cfg, data)
    clock = TrainingClock()
    trainer = build_trainer(cfg, extra_callbacks=(clock,))
    trainer.fit(model, datamodule=data)
    seconds = (clock.seconds, clock.cpu_seconds)
    return model.net.vectors().detach().float().cpu().numpy(), list(data.words), seconds, data.train_words


def gensim_run(
    args: argparse.Namespace, sentences: list[list[str]], seed: int, workers: int
) -> tuple[Any, list[str], tuple[float, float], Any]:
    """gensim's Word2Vec on the same sentences; its vectors, words, training (wall, CPU) seconds and the model."""
    from gensim.models import Word2Vec

    model = Word2Vec(
        vector_size=args.dim,
        window=args.window,
        negative=args.negatives,
        sample=args.sample,
        min_count=args.min_count,
        sg=1 if args.mode == "skipgram" else 0,
        alpha=args.lr,
        min_alpha=args.lr * 1e-4,
        workers=workers,
        seed=seed,
    )
    model.build_vocab(sentences)
    start, cpu_start = time.perf_counter(), time.process_time()
    model.train(sentences, total_examples=len(sentences), epochs=args.epochs)
    seconds = (time.perf_counter() - start, time.process_time() - cpu_start)
    return model.wv.vectors.copy(), list(model.wv.index_to_key), seconds, model


def unit(vectors: Any, words: list[str], order: list[str]) -> Any:
    """Unit-length rows of `vectors` in the word order `order` (a torch tensor)."""
    import torch

    from zoo.nn.word2vec import unit_rows

    row = {w: k for k, w in enumerate(words)}
    return unit_rows(torch.as_tensor(vectors)[[row[w] for w in order]].float())


def analogy_accuracy(vectors: Any, words: list[str], questions: list[tuple[str, ...]]) -> float:
    """Share answered right, by zoo.nn.word2vec.analogy (b - a + c, cosine, a b c left out)."""
    import torch

    from zoo.nn.word2vec import analogy

    index = {w: k for k, w in enumerate(words)}
    ids = torch.tensor([[index[w] for w in q] for q in questions], dtype=torch.long)
    correct = 0
    for start in range(0, len(ids), 1024):
        q = ids[start : start + 1024]
        correct += int((analogy(vectors, q[:, 0], q[:, 1], q[:, 2])[:, 0] == q[:, 3]).sum())
    return correct / max(1, len(ids))


def neighbour_sets(vectors: Any, probes: Any, k: int = 10) -> list[set[int]]:
    from zoo.nn.word2vec import nearest

    indices, _ = nearest(vectors, vectors[probes], k, probes[:, None])
    return [set(row) for row in indices.tolist()]


def overlap(a: list[set[int]], b: list[set[int]]) -> float:
    return statistics.fmean(len(x & y) / len(x) for x, y in zip(a, b))


def gensim_name(workers: int) -> str:
    return f"gensim 4.4.0, workers={workers}"


def zoo_name(threads: int) -> str:
    return f"zoo, {threads} torch thread{'s' if threads > 1 else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=DATA / "enwiki.txt")
    parser.add_argument("--questions", type=Path, default=DATA / "questions-words.txt")
    parser.add_argument("--mode", choices=("skipgram", "cbow"), default="skipgram")
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--negatives", type=int, default=5)
    parser.add_argument("--sample", type=float, default=1e-3)
    parser.add_argument("--min-count", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.025, help="start learning rate (gensim's alpha)")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument(
        "--threads", default="1", help="thread counts: gensim's workers and the zoo's torch threads, the same in a pair"
    )
    parser.add_argument("--batch-size", type=int, default=None, help="data.batch_size (default: the experiment's)")
    parser.add_argument("--sgd-chunk", type=int, default=None, help="model.sgd_chunk (default: the model's)")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides of the zoo's run (ablations)")
    args = parser.parse_args(argv)
    print(environment(), flush=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    thread_counts = [int(t) for t in args.threads.split(",")]
    for path in (args.corpus, args.questions):
        if not path.is_file():
            print(f"error: no file {path}; run python scripts/fetch_word2vec_data.py", file=sys.stderr)
            return 1
    try:
        import gensim
        from gensim.models.word2vec import FAST_VERSION
    except ImportError:
        print('error: gensim is not installed; pip install -e ".[bench]"', file=sys.stderr)
        return 1

    import numpy as np
    import torch

    from zoo.data.word2vec import WordCorpusDataModule, read_analogies

    quiet_lightning()
    reference = WordCorpusDataModule(path=str(args.corpus), min_count=args.min_count, max_vocab=100_000)
    sentences = reference.train_sentences()
    words = list(reference.words)
    _, all_questions, _ = read_analogies(args.questions)
    print(f"corpus {args.corpus}: {reference.train_words:,} training words in a vocabulary of {len(words):,}")
    print(f"gensim {gensim.__version__} (FAST_VERSION {FAST_VERSION}), torch {torch.__version__}")
    print(
        f"load average at the start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (others' work slows every row)"
    )

    results: dict[str, dict[str, list[float]]] = {}
    vectors: dict[tuple[str, int], Any] = {}

    def record(name: str, key: str, value: float) -> None:
        results.setdefault(name, {}).setdefault(key, []).append(value)

    def record_speed(name: str, train_words: int, seconds: tuple[float, float]) -> None:
        record(name, "words/s", train_words * args.epochs / seconds[0])
        record(name, "words/cpu-s", train_words * args.epochs / seconds[1])

    gensim_check = []
    with tempfile.TemporaryDirectory(prefix="w2v_bench_") as tmp:
        for seed in seeds:  # gensim and the zoo alternate, so that a change in the machine's load meets both
            for threads in thread_counts:
                found, found_words, seconds, model = gensim_run(args, sentences, seed, threads)
                if set(found_words) != set(words):
                    print(f"note: gensim's vocabulary has {len(found_words)} words, the zoo's {len(words)}")
                if threads == thread_counts[0]:
                    vectors[("gensim", seed)] = (found, found_words)
                    gensim_check.append(model.wv.evaluate_word_analogies(str(args.questions))[0])
                record_speed(gensim_name(threads), reference.train_words, seconds)
                found, found_words, seconds, train_words = zoo_run(args, seed, threads, Path(tmp))
                vectors[(f"zoo{threads}", seed)] = (found, found_words)
                record_speed(zoo_name(threads), train_words, seconds)
    shared = set(words)
    for _, found_words in vectors.values():
        shared &= set(found_words)
    questions = [q for q in all_questions if all(w in shared for w in q)]
    order = sorted(shared, key=words.index)
    probes = torch.arange(min(100, len(order)))
    for seed_index, seed in enumerate(seeds):
        ref_unit = unit(*vectors[("gensim", seed)], order)
        ref_sets = neighbour_sets(ref_unit, probes)
        rows = [(gensim_name(thread_counts[0]), ref_unit)]
        rows += [(zoo_name(t), unit(*vectors[(f"zoo{t}", seed)], order)) for t in thread_counts]
        generator = np.random.default_rng(seed)
        rows.append(("random vectors (floor)", unit(generator.normal(size=(len(order), args.dim)), order, order)))
        for name, unit_vectors in rows:
            record(name, "analogy", analogy_accuracy(unit_vectors, order, questions))
            record(name, "overlap", overlap(neighbour_sets(unit_vectors, probes), ref_sets))
        if len(seeds) > 1:
            other = unit(*vectors[("gensim", seeds[(seed_index + 1) % len(seeds)])], order)
            record("gensim, next seed (ceiling)", "overlap", overlap(neighbour_sets(other, probes), ref_sets))

    header = ["", "training words/s", "words/CPU-s", "analogy accuracy", "overlap@10 with gensim"]
    lines = [header]
    for name, values in results.items():
        speed = mean_std(values["words/s"], 0) if "words/s" in values else "—"
        cpu_speed = mean_std(values["words/cpu-s"], 0) if "words/cpu-s" in values else "—"
        accuracy = mean_std(values["analogy"], 3) if "analogy" in values else "—"
        overlap_cell = mean_std(values["overlap"], 3) if "overlap" in values else "—"
        lines.append([name, speed, cpu_speed, accuracy, overlap_cell])
    print(
        f"\n{args.mode}, dim {args.dim}, window {args.window}, negatives {args.negatives}, sample {args.sample}, "
        f"min_count {args.min_count}, {args.epochs} epochs, lr {args.lr} -> {args.lr * 1e-4:g}; seeds {args.seeds}; "
        f"{len(questions)} of {len(all_questions)} analogy questions in both vocabularies"
    )
    print(table(lines, right={1, 2, 3, 4}))
    reference_accuracy = statistics.fmean(results[gensim_name(thread_counts[0])]["analogy"])
    for threads in thread_counts:
        zoo, ref = results[zoo_name(threads)], results[gensim_name(threads)]
        ratio = statistics.fmean(zoo["words/s"]) / statistics.fmean(ref["words/s"])
        cpu_ratio = statistics.fmean(zoo["words/cpu-s"]) / statistics.fmean(ref["words/cpu-s"])
        gap = 100 * (statistics.fmean(zoo["analogy"]) - reference_accuracy)
        print(
            f"{zoo_name(threads)}: {ratio:.2f}x the words/s of {gensim_name(threads)} "
            f"({cpu_ratio:.2f}x per CPU-second; target >= 0.5x), analogy {gap:+.1f} points (target within 5)"
        )
    print(f"gensim's own evaluate_word_analogies (all its in-vocabulary questions): {mean_std(gensim_check, 3)}")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
