"""Transformers: attention and its masks by behaviour, KV cache, decoding, the three tasks' training, resume,
evaluate, sampling, and the errors a user can cause."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from tests.conftest import assert_same_final_weights, compose_config, interrupted_and_resumed, run_script
from zoo.cli import describe
from zoo.data.char_lm import CharTextDataModule, CharVocab, default_corpus
from zoo.data.seq2seq import Seq2SeqDataModule
from zoo.errors import UserError
from zoo.nn.attention import KVCache, MultiHeadAttention
from zoo.nn.transformer import DecoderLM, Seq2SeqTransformer, TransformerClassifier
from zoo.run import evaluate, train

TEXT = "the quick brown fox jumps over the lazy dog. " * 40 + "pack my box with five dozen liquor jugs!\n" * 40
TINY_LM = [
    "experiment=char_lm",
    "data.block_size=16",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "model.net.d_model=32",
    "model.net.n_layers=2",
    "model.sample_tokens=20",
]
TINY_S2S = [
    "experiment=seq2seq_reverse",
    "data.max_len=5",
    "data.num_train=512",
    "data.num_val=64",
    "data.num_test=64",
    "data.batch_size=64",
    "model.net.d_model=32",
    "model.net.encoder_layers=1",
    "model.net.decoder_layers=1",
    "model.beam_size=2",
]


def metrics_of(cfg) -> dict[str, float]:
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


# ---------------------------------------------------------------- attention and masks


def test_attention_equals_the_softmax_reference() -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(d_model=16, n_heads=4).eval()
    x = torch.randn(2, 7, 16)
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    out = attn(x, causal=True, key_padding_mask=padding)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 7, 4, 4).transpose(1, 2)

    q, k, v = heads(attn.query(x)), heads(attn.key(x)), heads(attn.value(x))
    scores = q @ k.transpose(-1, -2) / math.sqrt(4)
    allowed = torch.ones(7, 7).tril().bool()[None, None] & ~padding[:, None, None, :]
    weights = scores.masked_fill(~allowed, -math.inf).softmax(dim=-1)
    reference = attn.out((weights @ v).transpose(1, 2).reshape(2, 7, 16))
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)


def test_causal_outputs_do_not_see_the_future() -> None:
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=11, block_size=12, d_model=32, n_heads=4, n_layers=2).eval()
    idx = torch.randint(0, 11, (1, 12))
    changed = idx.clone()
    changed[0, 8] = (idx[0, 8] + 1) % 11
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


@pytest.mark.parametrize("causal", [True, False])
def test_a_window_hides_tokens_further_back_than_w(causal: bool) -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(d_model=16, n_heads=2).eval()
    x = torch.randn(1, 10, 16)
    changed = x.clone()
    changed[0, 2] += 1.0
    a, b = attn(x, causal=causal, window=3), attn(changed, causal=causal, window=3)
    affected = (a - b).abs().amax(dim=-1)[0] > 1e-6
    # query i sees i-2..i (and i..i+2 without causality): token 2 reaches queries 2..4 (0..4)
    expected = [2, 3, 4] if causal else [0, 1, 2, 3, 4]
    assert affected.nonzero().flatten().tolist() == expected


def test_padded_positions_do_not_change_the_result() -> None:
    torch.manual_seed(0)
    model = Seq2SeqTransformer(vocab_size=14, max_len=16, d_model=32, n_heads=4, encoder_layers=2, decoder_layers=2)
    model.eval()
    src = torch.tensor([[5, 6, 7, 8]])
    tgt = torch.tensor([[1, 9, 10]])
    padded_src = torch.tensor([[5, 6, 7, 8, 0, 0, 0]])
    padded_tgt = torch.tensor([[1, 9, 10, 0, 0]])
    torch.testing.assert_close(model(padded_src, padded_tgt)[:, :3], model(src, tgt), rtol=1e-5, atol=1e-5)


def test_key_padding_hides_what_padded_keys_hold() -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(d_model=16, n_heads=4).eval()
    x = torch.randn(1, 6, 16)
    padding = torch.tensor([[False, False, False, False, True, True]])
    changed = x.clone()
    changed[0, 4:] = torch.randn(2, 16)
    torch.testing.assert_close(attn(x, key_padding_mask=padding)[:, :4], attn(changed, key_padding_mask=padding)[:, :4])


def test_d_model_not_divisible_by_heads_is_one_line() -> None:
    with pytest.raises(ValueError) as error:
        MultiHeadAttention(d_model=30, n_heads=4)
    assert "\n" not in str(error.value) and "model.net.d_model" in str(error.value) and "n_heads" in str(error.value)


# ---------------------------------------------------------------- generation and decoding


def test_kv_cache_logits_equal_the_full_forward() -> None:
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=20, block_size=16, d_model=32, n_heads=4, n_layers=3, window=5).eval()
    idx = torch.randint(0, 20, (2, 12))
    full = model(idx)
    caches = [KVCache() for _ in model.blocks]
    steps = [model(idx[:, :4], caches)] + [model(idx[:, t : t + 1], caches) for t in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_with_cache_equals_generation_without(temperature: float) -> None:
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=20, block_size=8, d_model=32, n_heads=4, n_layers=2).eval()
    prompt = torch.randint(0, 20, (2, 3))
    runs = [
        model.generate(prompt, 20, temperature, top_k=5, use_cache=cache, generator=torch.Generator().manual_seed(1))
        for cache in (True, False)
    ]
    assert runs[0].shape == (2, 23)  # 20 new tokens: past the context of 8, where the window slides
    assert torch.equal(runs[0], runs[1])


def test_top_k_1_and_temperature_0_pick_the_most_likely_token() -> None:
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=20, block_size=8, d_model=32, n_heads=4, n_layers=2).eval()
    prompt = torch.randint(0, 20, (2, 3))
    assert torch.equal(model.generate(prompt, 6, 1.0, top_k=1), model.generate(prompt, 6, 0.0))


def test_beam_search_with_one_beam_equals_greedy() -> None:
    torch.manual_seed(0)
    model = Seq2SeqTransformer(vocab_size=14, max_len=16, d_model=32, n_heads=4, encoder_layers=2, decoder_layers=2)
    model.eval()
    src = torch.randint(3, 13, (16, 6))
    src[::3, 4:] = 0
    greedy = model.greedy(src, bos_id=1, eos_id=2, max_len=10)
    beam = model.beam_search(src, bos_id=1, eos_id=2, max_len=10, beam_size=1)
    assert torch.equal(beam[:, : greedy.shape[1]], greedy)


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy() -> None:
    torch.manual_seed(1)
    model = Seq2SeqTransformer(vocab_size=14, max_len=16, d_model=32, n_heads=4, encoder_layers=1, decoder_layers=1)
    model.eval()
    src = torch.randint(3, 13, (32, 5))

    def logprob(rows: torch.Tensor) -> torch.Tensor:
        """Sum of log-probabilities up to and including the end token; -inf for a row that never ends."""
        logits = model(src, rows[:, :-1]).log_softmax(dim=-1)
        token = logits.gather(2, rows[:, 1:, None])[..., 0]
        ended = (rows[:, 1:] == 2).long().cumsum(dim=1)
        keep = (ended - (rows[:, 1:] == 2).long()) == 0
        total = (token * keep).sum(dim=1)
        return torch.where(ended[:, -1] > 0, total, torch.full_like(total, -math.inf))

    greedy = model.greedy(src, 1, 2, 8)
    beam = model.beam_search(src, 1, 2, 8, beam_size=4)
    width = max(greedy.shape[1], beam.shape[1])
    pad = lambda t: F.pad(t, (0, width - t.shape[1]))  # noqa: E731
    assert (logprob(pad(beam)) >= logprob(pad(greedy)) - 1e-4).all()


def test_a_tiny_batch_is_overfit_to_near_zero_loss() -> None:
    torch.manual_seed(0)
    model = DecoderLM(vocab_size=12, block_size=16, d_model=32, n_heads=4, n_layers=2, dropout=0.0)
    batch = torch.randint(0, 12, (4, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, 12), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_encoder_classifier_shapes_and_choices() -> None:
    for pool in ("cls", "mean"):
        for positions in ("learned", "sinusoidal"):
            net = TransformerClassifier([1, 40], 10, patch_size=4, d_model=16, n_heads=2, n_layers=1, pool=pool)
            assert net(torch.randn(3, 1, 40)).shape == (3, 10), (pool, positions)
    with pytest.raises(ValueError, match="patch_size"):
        TransformerClassifier([1, 40], 10, patch_size=3)
    with pytest.raises(ValueError, match="allowed: cls, mean"):
        TransformerClassifier([1, 40], 10, pool="max")


# ---------------------------------------------------------------- data


def test_default_corpus_ships_with_python() -> None:
    text = default_corpus()
    assert len(text) > 200_000 and text == default_corpus()


def test_char_data_splits_in_order_and_keeps_every_character(corpus: Path) -> None:
    data = CharTextDataModule(path=str(corpus), block_size=16)
    assert sum(len(p) for p in data.text_parts.values()) == len(TEXT)
    assert data.vocab.decode(data.text_parts["train"].tolist()) == TEXT[: len(data.text_parts["train"])]
    assert data.splits["train"].shape[1] == 17 and set(data.vocab.chars) == set(TEXT)
    windows = data.splits["val"]
    assert torch.equal(windows[0, -1], windows[1, 0]) or windows[0, 16] == data.text_parts["val"][16]


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"caf\xe9 au lait", "is not UTF-8")],
)
def test_bad_corpus_files_are_one_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(UserError) as error:
        CharTextDataModule(path=str(path))
    assert message in str(error.value) and "data.path" in str(error.value) and "\n" not in str(error.value)


def test_vocab_round_trip_and_unknown_characters(tmp_path: Path) -> None:
    vocab = CharVocab.from_text("hello world\n")
    vocab.save(tmp_path / "vocab.json")
    again = CharVocab.load(tmp_path / "vocab.json")
    assert again.chars == vocab.chars and again.decode(again.encode("low")) == "low"
    with pytest.raises(UserError, match="prompt: characters not in the model's vocabulary: 'z'"):
        vocab.encode("zoo")


@pytest.mark.parametrize("task", ["reverse", "sort", "addition"])
def test_generated_tasks_are_right_and_held_out(task: str) -> None:
    data = Seq2SeqDataModule(task=task, max_len=4, num_train=2000, num_val=100, num_test=100)
    for source, target in data.examples["train"][:200]:
        if task == "reverse":
            assert target == source[::-1]
        elif task == "sort":
            assert target == "".join(sorted(source))
        else:
            a, b = source.split("+")
            assert int(target) == int(a) + int(b)
    held_out = {s for s, _ in data.examples["val"] + data.examples["test"]}
    assert not held_out & {s for s, _ in data.examples["train"]}
    src, tgt = data.splits["test"]
    assert data.decode(tgt[0].tolist()) == data.examples["test"][0][1]
    assert tgt[:, 0].eq(data.bos_id).all() and (tgt == data.eos_id).sum() == len(tgt)


def test_bad_task_is_one_line() -> None:
    with pytest.raises(UserError, match="data.task: unknown 'copy'; allowed: reverse, sort, addition"):
        Seq2SeqDataModule(task="copy")


# ---------------------------------------------------------------- training, resume, evaluate, sample


def test_char_lm_learns_and_writes_its_vocabulary(train_config, corpus: Path) -> None:
    cfg = train_config(*TINY_LM, f"data.path={corpus}", "trainer.max_epochs=6", "optimizer.lr=3e-3", "logger=csv")
    train(cfg)
    metrics = metrics_of(cfg)
    assert metrics["test/ppl"] < 8 < len(set(TEXT))  # far below guessing among the characters
    assert metrics["test/bpc"] == pytest.approx(metrics["test/loss"] / math.log(2), rel=1e-5)
    assert metrics["val/ppl_best"] <= metrics["val/ppl"] + 1e-6
    saved = CharVocab.load(Path(cfg.paths.output_dir) / "vocab.json")
    assert saved.chars == sorted(set(TEXT))


def test_seq2seq_loss_falls(train_config) -> None:
    cfg = train_config(
        *TINY_S2S, "trainer.max_epochs=5", "optimizer.lr=3e-3", "scheduler=none", "logger=csv", "test=false"
    )
    train(cfg)
    rows = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    column = header.index("train/loss")
    losses = [float(r.split(",")[column]) for r in rows[1:] if r.split(",")[column]]
    assert len(losses) == 5 and all(a > b for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
def test_resume_equals_the_uninterrupted_run(train_config, corpus: Path, family: str) -> None:
    settings = [
        *(TINY_LM + [f"data.path={corpus}"] if family == "lm" else TINY_S2S),
        "trainer.limit_train_batches=4",
        "trainer.max_epochs=4",
        "callbacks.model_checkpoint.save_top_k=-1",
        "test=false",
    ]
    full, resumed = interrupted_and_resumed(train_config, *settings)
    assert_same_final_weights(full, resumed)


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
def test_evaluate_reproduces_the_logged_test_metrics(train_config, corpus: Path, tmp_path: Path, family: str) -> None:
    settings = TINY_LM + [f"data.path={corpus}"] if family == "lm" else TINY_S2S
    cfg = train_config(*settings, "trainer.max_epochs=2", "trainer.limit_train_batches=4")
    train(cfg)
    logged = metrics_of(cfg)
    ckpt = next((Path(cfg.paths.output_dir) / "checkpoints").glob("epoch_*.ckpt"))
    eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", "extras.print_config=false"], tmp_path)
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    scored = evaluate(eval_cfg)
    assert {"test/loss"} <= set(scored)
    for name, value in scored.items():
        assert value == pytest.approx(logged[name], abs=1e-5), name


def test_sample_mode_continues_a_prompt_and_refuses_bad_prompts(train_config, corpus: Path, tmp_path: Path, capsys):
    cfg = train_config(*TINY_LM, f"data.path={corpus}", "trainer.max_epochs=2", "trainer.limit_train_batches=8")
    train(cfg)
    ckpt = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    base = [f"ckpt_path={ckpt}", "extras.print_config=false", "mode=sample", "max_new_tokens=30"]

    def run(*overrides: str) -> None:
        eval_cfg = compose_config("eval", [*base, *overrides], tmp_path)
        eval_cfg.paths.output_dir = str(tmp_path / "eval")
        evaluate(eval_cfg)

    capsys.readouterr()
    run("prompt=the quick", "temperature=0.8", "top_k=5")
    printed = capsys.readouterr().out.rstrip("\n")
    assert printed.startswith("the quick") and len(printed) == len("the quick") + 30
    assert set(printed) <= set(TEXT)
    with pytest.raises(UserError, match="longer than the model's context of 16"):
        run("prompt=" + "a" * 17)
    with pytest.raises(UserError, match="not in the model's vocabulary: 'Z'"):
        run("prompt=Zebra")


@pytest.mark.slow  # train.py processes, about 15 s
def test_train_py_runs_and_bad_input_ends_in_one_line(tmp_path: Path, corpus: Path) -> None:
    ok = run_script("train.py", *TINY_LM, f"data.path={corpus}", "debug=fdr", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad = run_script("train.py", "experiment=char_lm", f"data.path={empty}", "debug=fdr", cwd=tmp_path)
    line = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode == 2 and line.endswith("is empty; a language model needs some text"), line


def test_heads_that_do_not_divide_d_model_are_one_line(train_config, corpus: Path) -> None:
    cfg = train_config(*TINY_LM, f"data.path={corpus}", "model.net.d_model=30", "debug=fdr")
    with pytest.raises(Exception) as error:
        train(cfg)
    line = describe(error.value)
    assert "\n" not in line and "model.net.d_model: 30 is not divisible by model.net.n_heads=4" in line


def test_cross_validation_is_refused_where_it_does_not_apply(corpus: Path) -> None:
    with pytest.raises(UserError, match="^cv.folds: 5; a generated task"):
        Seq2SeqDataModule(task="sort", folds=5)
    with pytest.raises(UserError, match="^cv.folds: 3; k-fold cross-validation does not apply"):
        CharTextDataModule(path=str(corpus), folds=3)


@pytest.mark.parametrize("family", ["lm", "seq2seq"])
def test_bf16_mixed_precision_on_cpu(train_config, corpus: Path, family: str) -> None:
    settings = TINY_LM + [f"data.path={corpus}"] if family == "lm" else TINY_S2S
    cfg = train_config(*settings, "trainer.precision=bf16-mixed", "trainer.accelerator=cpu", "debug=fdr")
    train(cfg)
    metrics = metrics_of(cfg)
    assert math.isfinite(metrics["test/loss"]) and metrics["train/loss"] > 0


def test_output_heads_are_tied_to_the_embedding() -> None:
    lm = DecoderLM(vocab_size=10, block_size=8, d_model=16, n_heads=2, n_layers=1)
    s2s = Seq2SeqTransformer(vocab_size=10, max_len=8, d_model=16, n_heads=2, encoder_layers=1, decoder_layers=1)
    assert lm.head.weight is lm.embed.weight and s2s.head.weight is s2s.embed.weight
    untied = DecoderLM(vocab_size=10, block_size=8, d_model=16, n_heads=2, n_layers=1, tie_weights=False)
    assert sum(p.numel() for p in untied.parameters()) == sum(p.numel() for p in lm.parameters()) + 160
