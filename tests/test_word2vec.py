"""word2vec: the negative-sampling loss, the noise and sub-sampling distributions, windows, neighbours of a planted
structure, analogy arithmetic, resume, evaluate modes, the experiment on a small file, the data script, bad input."""

from __future__ import annotations

import json
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import assert_same_final_weights, compose_config, interrupted_and_resumed, run_script
from zoo.data.word2vec import (
    AliasSampler,
    WordCorpusDataModule,
    cbow_examples,
    keep_probabilities,
    noise_distribution,
    skipgram_pairs,
)
from zoo.errors import UserError
from zoo.nn.word2vec import Word2Vec, analogy, negative_sampling_loss, unit_rows
from zoo.run import evaluate, train

CLUSTERS = (
    ("red", "green", "blue", "yellow", "purple", "orange", "pink", "brown", "black", "white", "grey", "violet"),
    ("cat", "dog", "horse", "cow", "sheep", "goat", "pig", "duck", "hen", "mouse", "rabbit", "donkey"),
)


def write_clusters(path: Path, sentences: int = 300, seed: int = 0) -> Path:
    """Sentences of 8 words drawn from one of two word clusters: words co-occur only within their cluster."""
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(CLUSTERS[k % 2], 8)) for k in range(sentences)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_questions(path: Path) -> Path:
    path.write_text(": colours\nred green blue yellow\nblue yellow red green\n: animals\ncat dog cow sheep\n")
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Runs compute as on one core: two threads on a busy 2-core machine take three times as long."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clusters(tmp_path_factory.mktemp("w2v") / "clusters.txt")


TINY = [
    "model=word2vec",
    "data=word_corpus",
    "data.analogy_path=null",
    "data.min_count=1",
    "data.batch_size=128",
    "data.val_fraction=0.05",
    "data.test_fraction=0.05",
    "model.net.dim=16",
    "model.sample=0",
    "model.projector_words=20",
    "trainer.max_epochs=3",
]


# ---------------------------------------------------------------- the network


def test_negative_sampling_loss_of_a_hand_computed_case() -> None:
    net = Word2Vec(vocab_size=4, dim=2)
    with torch.no_grad():
        net.input.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
        net.output.weight.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0], [-1.0, 0.0], [0.5, 3.0]]))
    # centre 0 (h = (1, 0)): target 1 scores 2, negatives 2 and 3 score -1 and 0.5
    loss = net(torch.tensor([0]), torch.tensor([1]), torch.tensor([[2, 3]]))
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = -math.log(sigmoid(2.0)) - math.log(sigmoid(1.0)) - math.log(sigmoid(-0.5))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert negative_sampling_loss(torch.zeros(3, 6)).tolist() == pytest.approx([6 * math.log(2)] * 3)


def test_embeddings_are_sparse_and_start_as_word2vec_c() -> None:
    net = Word2Vec(vocab_size=50, dim=8)
    assert net.input.sparse and net.output.sparse
    assert net.output.weight.abs().sum() == 0 and net.input.weight.abs().max() <= 0.5 / 8
    net(torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([[5], [6]])).sum().backward()
    assert net.input.weight.grad.is_sparse


def test_cbow_gives_each_context_word_the_whole_gradient_of_the_mean() -> None:
    net = Word2Vec(vocab_size=6, dim=3, mode="cbow")
    inputs, mask = torch.tensor([[1, 2, 0]]), torch.tensor([[True, True, False]])
    hidden = net.hidden(inputs, mask)
    assert torch.allclose(hidden, net.input.weight[[1, 2]].mean(0, keepdim=True))
    hidden.sum().backward()
    grad = net.input.weight.grad.to_dense()
    assert grad[1].tolist() == [1.0] * 3 and grad[2].tolist() == [1.0] * 3 and grad[0].abs().sum() == 0


def test_analogy_arithmetic_on_hand_set_vectors() -> None:
    words = ["man", "woman", "king", "queen", "apple"]
    vectors = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.6, 0.6, 0.8]])
    unit = unit_rows(vectors)
    a, b, c = (torch.tensor([words.index(w)]) for w in ("man", "king", "woman"))
    answers = analogy(unit, a, b, c, k=2)[0].tolist()  # two words are left
    assert words[answers[0]] == "queen"
    assert not {words.index("man"), words.index("king"), words.index("woman")} & set(answers)  # left out


# ---------------------------------------------------------------- the data


def test_noise_is_unigram_to_the_three_quarters(tmp_path: Path) -> None:
    counts = np.array([1000, 100, 10, 1])
    assert noise_distribution(counts) == pytest.approx(counts**0.75 / (counts**0.75).sum())
    text = " ".join(["a"] * 800 + ["b"] * 150 + ["c"] * 50)
    data = WordCorpusDataModule(path=str(write_text(tmp_path / "c.txt", text)), min_count=1)
    data.configure("skipgram", 2, 0.0, 5)
    draws = data.draw_negatives(np.random.default_rng(0), 40_000).flatten()
    share = torch.bincount(draws, minlength=3).double() / len(draws)
    expected = torch.from_numpy(data.counts**0.75 / (data.counts**0.75).sum())
    assert torch.allclose(share, expected, atol=0.01)


def test_the_alias_sampler_holds_the_exact_noise_probabilities() -> None:
    probabilities = noise_distribution(np.array([50_000, 3_000, 3_000, 200, 7, 1, 1]))
    sampler = AliasSampler(probabilities)
    # a draw picks a cell uniformly, then the cell's own word with chance accept, else its alias
    implied = sampler.accept.copy()
    np.add.at(implied, sampler.alias, 1.0 - sampler.accept)
    assert implied / len(probabilities) == pytest.approx(probabilities, rel=1e-9, abs=1e-15)
    draws = sampler.draw(np.random.default_rng(0), (200_000,))
    share = np.bincount(draws, minlength=len(probabilities)) / len(draws)
    assert share == pytest.approx(probabilities, abs=0.005)


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_subsampling_keeps_rare_words_and_drops_frequent_ones_at_the_formula_rate(tmp_path: Path) -> None:
    words = ["the"] * 60_000 + [f"w{k}" for k in range(500) for _ in range(2)]
    rng = np.random.default_rng(0)
    text = " ".join(rng.permutation(words))
    data = WordCorpusDataModule(
        path=str(write_text(tmp_path / "s.txt", text)), min_count=1, val_fraction=0.01, test_fraction=0.01
    )
    sample = 1e-3
    data.configure("skipgram", 2, sample, 1)
    the = data.index["the"]
    frequency = data.counts[the] / data.counts.sum()
    formula = (math.sqrt(frequency / sample) + 1) * sample / frequency
    assert keep_probabilities(data.counts, sample)[the] == pytest.approx(formula)
    ids, _ = data.subsampled(np.random.default_rng(1))
    kept = np.bincount(ids, minlength=len(data.words))
    assert kept[the] / data.counts[the] == pytest.approx(formula, abs=0.01)
    rare = [data.index[f"w{k}"] for k in range(500) if f"w{k}" in data.index]
    assert np.array_equal(kept[rare], data.counts[rare])  # rarer than the threshold: always kept
    assert keep_probabilities(data.counts, 0.0).min() == 1.0


def test_windows_stay_in_their_sentence_and_within_each_centre_words_size() -> None:
    ids = np.arange(6)
    sentence = np.array([0, 0, 0, 0, 1, 1])
    centres, contexts = skipgram_pairs(ids, sentence, np.array([1, 2, 1, 3, 1, 1]), 3)
    pairs = set(zip(centres.tolist(), contexts.tolist()))
    assert pairs == {(0, 1), (1, 0), (1, 2), (1, 3), (2, 1), (2, 3), (3, 0), (3, 1), (3, 2), (4, 5), (5, 4)}
    inputs, mask, targets = cbow_examples(ids, sentence, np.array([1, 2, 1, 3, 1, 1]), 3)
    assert targets.tolist() == list(range(6))
    assert sorted(inputs[3][mask[3]].tolist()) == [0, 1, 2]


def test_epochs_are_drawn_from_seed_and_epoch(corpus: Path) -> None:
    data = WordCorpusDataModule(path=str(corpus), min_count=1, shuffle_seed=3)
    data.configure("skipgram", 5, 1e-3, 5)
    a, b, c = data.epoch_examples(1), data.epoch_examples(1), data.epoch_examples(2)
    assert torch.equal(a.targets, b.targets) and torch.equal(a.negatives, b.negatives)
    assert not torch.equal(a.targets[:100], c.targets[:100])
    batches = list(data.train_dataloader())
    assert len(batches) == data.batches_per_epoch and all(len(batch) == 4 for batch in batches)


def test_prefetched_epochs_are_the_epochs_drawn_in_turn(corpus: Path) -> None:
    """The background draw of epoch e + 1 hands over the very examples drawing it in turn gives, also when epochs
    are skipped or repeated (a resume sets another epoch than the one drawn ahead)."""
    loaders = []
    for prefetch in (True, False):
        data = WordCorpusDataModule(path=str(corpus), min_count=1, shuffle_seed=3, batch_size=512, prefetch=prefetch)
        data.configure("skipgram", 5, 1e-3, 5)
        loaders.append(data.train_dataloader())
    for epoch in (0, 1, 2, 2, 5, 6):
        drawn = []
        for loader in loaders:
            loader.set_epoch(epoch)
            drawn.append(torch.cat([torch.cat([t.reshape(len(t), -1) for t in batch], 1) for batch in loader]))
        assert torch.equal(drawn[0], drawn[1]), epoch
    assert loaders[0]._next is not None and loaders[0]._next[0] == 7 and loaders[1]._next is None


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(corpus: Path, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("w2v_run")
    cfg = compose_config("train", [*TINY_QUICK, f"data.path={corpus}", "trainer.max_epochs=4"], folder)
    train(cfg)
    return cfg, folder


TINY_QUICK = [
    "extras.print_config=false",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    *TINY,
]


def test_neighbours_of_a_planted_structure_and_the_outputs(trained) -> None:
    cfg, _ = trained
    run = Path(cfg.paths.output_dir)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/loss"] < metrics.get("val/loss_best", 10) + 0.5 and metrics["test/loss"] < 4 * math.log(2)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    vectors = unit_rows(ckpt["state_dict"]["net.input.weight"])
    words = [line.split("\t")[0] for line in (run / "vocab.tsv").read_text().splitlines()]
    for cluster in CLUSTERS:
        for word in cluster:
            similarity = vectors @ vectors[words.index(word)]
            similarity[words.index(word)] = -2
            top = {words[k] for k in torch.topk(similarity, 5).indices.tolist()}
            assert top <= set(cluster) - {word}, (word, top)
    assert (run / "word2vec_pca.png").stat().st_size > 1000
    events = list((run / "tensorboard").rglob("projector_config.pbtxt"))
    assert events and list((run / "tensorboard").rglob("metadata.tsv"))


@pytest.mark.parametrize("mode", ["neighbors", "analogy"])
def test_evaluate_modes_print_words_and_refuse_unknown_ones(trained, mode: str, capsys) -> None:
    cfg, folder = trained
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    words = ["word=red"] if mode == "neighbors" else ["a=red", "b=green", "c=cat"]
    eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", f"mode={mode}", "top_k=3", *words], folder)
    eval_cfg.paths.output_dir = str(folder / f"eval_{mode}")
    capsys.readouterr()
    evaluate(eval_cfg)
    out = capsys.readouterr().out.splitlines()
    ranked = [line.split()[1] for line in out if line.strip()[:1].isdigit()]
    assert len(ranked) == 3
    if mode == "neighbors":
        assert set(ranked) <= set(CLUSTERS[0]) - {"red"}
    else:
        assert not {"red", "green", "cat"} & set(ranked)
    key = "word" if mode == "neighbors" else "b"
    bad = [f"{key}=zebra" if k.startswith(f"{key}=") else k for k in words]
    eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", f"mode={mode}", *bad], folder)
    with pytest.raises(UserError, match=rf"^{key}: 'zebra' is not in the model's vocabulary"):
        evaluate(eval_cfg)


def test_evaluate_reproduces_the_logged_test_metrics(trained) -> None:
    cfg, folder = trained
    logged = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    ckpt = next((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch_*.ckpt"))
    eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", "extras.print_config=false"], folder)
    eval_cfg.paths.output_dir = str(folder / "eval_score")
    scored = evaluate(eval_cfg)
    assert scored["test/loss"] == pytest.approx(logged["test/loss"], abs=1e-5)
    assert (folder / "eval_score" / "word2vec_pca.png").is_file()  # in evaluate's folder, not where it ran from


def test_resume_ends_with_the_uninterrupted_weights(train_config, corpus: Path) -> None:
    settings = [*TINY, f"data.path={corpus}", "callbacks.model_checkpoint.save_top_k=-1", "logger=none"]
    full, resumed = interrupted_and_resumed(train_config, *settings)
    assert_same_final_weights(full, resumed)


def test_cbow_and_the_experiment_run_with_analogies(train_config, corpus: Path, tmp_path: Path) -> None:
    questions = write_questions(tmp_path / "questions.txt")
    cfg = train_config(
        "experiment=word2vec_enwiki",
        f"data.path={corpus}",
        f"data.analogy_path={questions}",
        "data.min_count=1",
        "model.mode=cbow",
        "model.net.dim=16",
        "debug=fdr",
    )
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert {"test/analogy_acc", "test/analogy_acc_all", "test/loss"} <= set(metrics)
    assert metrics["test/analogy_questions"] == 1  # questions 1 and 3 validate, 2 tests


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.mode=glove", r"^model.mode: unknown 'glove'; allowed: skipgram, cbow$"),
        ("model.negatives=0", r"^model.negatives: expected an integer >= 1, got 0$"),
        ("model.window=0", r"^model.window: expected an integer >= 1"),
        ("model.sample=2", r"^model.sample: expected a number in \[0, 1\)"),
        ("data.min_count=100000", r"^data.min_count: 100000 leaves no word"),
        ("data.path=/no/such/file.txt", r"^data.path: no file at '/no/such/file.txt'"),
        ("data.analogy_path=/no/questions.txt", r"^data.analogy_path: no file at"),
        ("optimizer.momentum=0.9", r"^optimizer.momentum: 0.9 with sparse embedding gradients"),
        ("model.sgd_chunk=0", r"^model.sgd_chunk: expected an integer >= 1, got 0$"),
    ],
)
def test_bad_values_are_one_line_user_errors(train_config, corpus: Path, override: str, message: str) -> None:
    cfg = train_config(*TINY, f"data.path={corpus}", *override.split())
    with pytest.raises(Exception) as error:  # noqa: PT011 - Hydra wraps what a constructor raises; the CLI unwraps
        train(cfg)
    cause = error.value
    while not isinstance(cause, UserError) and cause.__cause__ is not None:
        cause = cause.__cause__
    assert isinstance(cause, UserError), repr(error.value)
    assert re.match(message, str(cause)) and "\n" not in str(cause), str(cause)


def test_bad_eval_words_are_refused_before_loading(tmp_path: Path) -> None:
    eval_cfg = compose_config("eval", ["ckpt_path=/nowhere.ckpt", "mode=analogy", "a=[1,2]"], tmp_path)
    with pytest.raises(UserError, match=r"^a: expected a word"):
        evaluate(eval_cfg)


@pytest.mark.slow  # a fresh interpreter loads torch and Lightning: 10-20 s on a busy 2-core machine
def test_train_py_with_a_bad_mode_ends_in_one_line(tmp_path: Path, corpus: Path) -> None:
    result = run_script(
        "train.py",
        "model=word2vec",
        "data=word_corpus",
        f"data.path={corpus}",
        "model.mode=bow",
        "data.analogy_path=null",
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: model.mode: unknown 'bow'; allowed: skipgram, cbow"


# ---------------------------------------------------------------- the data script


def test_fetch_script_cleans_wikipedia_and_refuses_a_changed_wheel(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fetch", Path(__file__).parent.parent / "scripts/fetch_word2vec_data.py"
    )
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    markup = "The [[Paris|capital]] of {{cite|x}}France<ref>a note</ref> is [[Paris]].\n{| table |}"
    assert fetch.clean_article(markup) == "the capital of france is paris"
    wheel = tmp_path / "gensim-4.4.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in fetch.MEMBER_SHA256:
            archive.writestr(fetch.WHEEL_FOLDER + name, b"not the real file")
    with pytest.raises(fetch.FetchError, match="SHA-256"):
        fetch.extract(wheel, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mode", ["skipgram", "cbow"])
def test_the_fused_sgd_step_is_autograd_and_torch_sgd(mode: str) -> None:
    torch.manual_seed(0)
    a, b = Word2Vec(30, 8, mode=mode), Word2Vec(30, 8, mode=mode)
    with torch.no_grad():
        a.output.weight.normal_()
        b.load_state_dict(a.state_dict())
    inputs = torch.randint(0, 30, (64,)) if mode == "skipgram" else torch.randint(0, 30, (64, 4))
    mask = None if mode == "skipgram" else torch.rand(64, 4) > 0.3
    targets, negatives = torch.randint(0, 30, (64,)), torch.randint(0, 30, (64, 5))
    negatives[0, 0] = targets[0]  # a noise word equal to the target counts for nothing
    optimizer = torch.optim.SGD(a.parameters(), lr=0.1)
    scores = a.scores(a.hidden(inputs, mask), targets, negatives)
    same = torch.cat([torch.zeros(64, 1, dtype=torch.bool), negatives == targets[:, None]], 1)
    expected = negative_sampling_loss(scores.masked_fill(same, -math.inf))
    expected.sum().backward()
    optimizer.step()
    losses = b.sgd_step(inputs, mask, targets, negatives, lr=0.1)
    assert torch.allclose(losses, expected.detach(), atol=1e-6)
    for name, value in a.state_dict().items():
        assert torch.allclose(value, b.state_dict()[name], atol=1e-6), name


@pytest.mark.parametrize("mode", ["skipgram", "cbow"])
def test_a_chunked_fused_step_is_one_step_per_chunk(mode: str) -> None:
    """sgd_step(chunk=32) on 70 examples takes three SGD steps, on examples 0-31, 32-63 and 64-69, in order."""
    torch.manual_seed(1)
    nets = [Word2Vec(20, 8, mode=mode) for _ in range(3)]
    with torch.no_grad():
        nets[0].output.weight.normal_()
        for net in nets[1:]:
            net.load_state_dict(nets[0].state_dict())
    inputs = torch.randint(0, 20, (70,)) if mode == "skipgram" else torch.randint(0, 20, (70, 4))
    mask = None if mode == "skipgram" else torch.rand(70, 4) > 0.3
    targets, negatives = torch.randint(0, 20, (70,)), torch.randint(0, 20, (70, 5))
    negatives[40, 2] = targets[40]  # skipped in the second chunk as in one step
    chunked = nets[0].sgd_step(inputs, mask, targets, negatives, lr=0.5, chunk=32)
    parts = [slice(0, 32), slice(32, 64), slice(64, 70)]
    one_by_one = [
        nets[1].sgd_step(inputs[p], None if mask is None else mask[p], targets[p], negatives[p], lr=0.5) for p in parts
    ]
    assert torch.allclose(chunked, torch.cat(one_by_one), atol=1e-6)
    for name, value in nets[0].state_dict().items():
        assert torch.allclose(value, nets[1].state_dict()[name], atol=1e-6), name
    nets[2].sgd_step(inputs, mask, targets, negatives, lr=0.5)  # one step of all 70: later chunks see moved rows
    assert not torch.allclose(nets[2].input.weight, nets[0].input.weight, atol=1e-4)


def test_the_training_loss_is_logged_once_an_epoch(trained) -> None:
    cfg, _ = trained
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert 0 < metrics["train/loss"] < 6 * math.log(2)  # below the loss of untrained tables (1 + 5 words)
