"""Recurrent networks: packing, carried state, attention, decoding, training, resume and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import assert_same_final_weights, compose_config, interrupted_and_resumed
from zoo.cli import describe
from zoo.data.char_lm import CharTextDataModule
from zoo.errors import UserError
from zoo.nn.rnn import RNNClassifier, RNNLanguageModel, Seq2SeqRNN, make_rnn, run_rnn
from zoo.run import evaluate, train
from zoo.tasks.char_lm import CharLMTask

TEXT = "the quick brown fox jumps over the lazy dog. " * 40 + "pack my box with five dozen liquor jugs!\n" * 40
TINY_LM = [
    "experiment=lstm_char_lm",
    "data.block_size=16",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "model.net.hidden_size=32",
    "model.sample_tokens=20",
]
TINY_S2S = [
    "experiment=seq2seq_rnn_reverse",
    "data.max_len=5",
    "data.num_train=512",
    "data.num_val=64",
    "data.num_test=64",
    "data.batch_size=64",
    "model.net.hidden_size=32",
    "model.beam_size=2",
]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


# ---------------------------------------------------------------- packing and shapes


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_padding_does_not_change_the_real_steps(cell: str) -> None:
    torch.manual_seed(0)
    rnn = make_rnn(cell, 3, 8, num_layers=2, bidirectional=True).eval()
    lengths = torch.tensor([7, 4, 2])
    x = torch.randn(3, 7, 3)
    x[1, 4:], x[2, 2:] = 100.0, -100.0  # garbage in the padding must not leak into anything
    out, state = run_rnn(rnn, x, lengths)
    assert out.shape == (3, 7, 16)
    h = state[0] if isinstance(state, tuple) else state
    for row, length in enumerate(lengths.tolist()):
        alone_out, alone_state = rnn(x[row : row + 1, :length])
        alone_h = alone_state[0] if isinstance(alone_state, tuple) else alone_state
        torch.testing.assert_close(out[row, :length], alone_out[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h[:, row], alone_h[:, 0], rtol=1e-5, atol=1e-6)
        assert out[row, length:].abs().max() == 0 if length < 7 else True


@pytest.mark.parametrize("pool", ["last", "mean", "max"])
def test_classifier_shapes_and_padded_rows_score_as_unpadded(pool: str) -> None:
    torch.manual_seed(0)
    net = RNNClassifier([2, 12], num_classes=5, cell="lstm", hidden_size=16, pool=pool).eval()
    x = torch.randn(4, 2, 12)
    assert net(x).shape == (4, 5)
    padded = torch.cat([x[:, :, :9], torch.full((4, 2, 3), 50.0)], dim=2)
    lengths = torch.full((4,), 9)
    torch.testing.assert_close(net(padded, lengths), net(x[:, :, :9]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(net(padded), net(x[:, :, :9]))  # without lengths the padding is read


# ---------------------------------------------------------------- language model


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_carried_state_equals_a_full_forward(cell: str) -> None:
    torch.manual_seed(0)
    model = RNNLanguageModel(vocab_size=20, cell=cell, hidden_size=24, num_layers=2).eval()
    idx = torch.randint(0, 20, (2, 12))
    full = model(idx)
    logits, state = model.forward_state(idx[:, :5])
    steps = [logits]
    for t in range(5, 12):
        logits, state = model.forward_state(idx[:, t : t + 1], state)
        steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_feeds_one_token_a_step_and_equals_rerunning_the_prefix(temperature: float) -> None:
    torch.manual_seed(0)
    model = RNNLanguageModel(vocab_size=20, hidden_size=24, num_layers=2).eval()
    fed: list[int] = []
    model.embed.register_forward_hook(lambda module, args, out: fed.append(args[0].shape[1]))
    prompt = torch.randint(0, 20, (2, 5))
    runs = []
    for carry in (True, False):
        fed.clear()
        runs.append(
            model.generate(
                prompt, 10, temperature, top_k=5, use_cache=carry, generator=torch.Generator().manual_seed(1)
            )
        )
        if carry:
            assert fed == [5] + [1] * 9  # the prompt once, then only the newest token
    assert runs[0].shape == (2, 15) and torch.equal(runs[0], runs[1])


def test_truncated_bptt_keeps_the_loss_and_cuts_the_gradient(corpus: Path) -> None:
    torch.manual_seed(0)
    data = CharTextDataModule(path=str(corpus), block_size=16)

    def net(**sizes: int) -> RNNLanguageModel:
        return RNNLanguageModel(**sizes, hidden_size=16, num_layers=1, dropout=0.0)

    windows = data.splits["train"][:8]
    grads = []
    for steps in (None, 4):
        torch.manual_seed(0)
        task = CharLMTask(data, net, tbptt_steps=steps).train()
        loss, count = task._loss((windows,))
        loss.backward()
        grads.append((float(loss.detach()), task.net.rnn.weight_hh_l0.grad.clone()))
    assert count == windows[:, 1:].numel()
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)  # the forward pass is the same
    assert not torch.allclose(grads[0][1], grads[1][1])  # the gradient stops at chunk boundaries
    with pytest.raises(UserError, match="model.tbptt_steps: 0; allowed"):
        CharLMTask(data, net, tbptt_steps=0)


# ---------------------------------------------------------------- encoder-decoder


@pytest.mark.parametrize("attention", ["additive", "dot"])
def test_attention_weights_sum_to_one_and_skip_padding(attention: str) -> None:
    torch.manual_seed(0)
    model = Seq2SeqRNN(vocab_size=14, hidden_size=16, attention=attention, pad_id=0).eval()
    src = torch.randint(3, 14, (3, 7))
    src[1, 4:], src[2, 2:] = 0, 0
    tgt = torch.randint(3, 14, (3, 5))
    logits, weights = model(src, tgt, return_attention=True)
    assert logits.shape == (3, 5, 14) and weights.shape == (3, 5, 7)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(3, 5))
    assert weights[1, :, 4:].eq(0).all() and weights[2, :, 2:].eq(0).all()
    assert (weights[0] > 0).all()
    # more padding columns change nothing
    wider = torch.cat([src, torch.zeros(3, 3, dtype=torch.long)], dim=1)
    torch.testing.assert_close(model(wider, tgt), logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("cell", "attention"), [("lstm", "additive"), ("gru", "dot")])
def test_rnn_beam_search_with_one_beam_equals_greedy(cell: str, attention: str) -> None:
    torch.manual_seed(0)
    model = Seq2SeqRNN(vocab_size=14, hidden_size=16, cell=cell, attention=attention, num_layers=2).eval()
    src = torch.randint(3, 13, (16, 6))
    src[::3, 4:] = 0
    greedy = model.greedy(src, bos_id=1, eos_id=2, max_len=10)
    beam = model.beam_search(src, bos_id=1, eos_id=2, max_len=10, beam_size=1)
    assert torch.equal(beam[:, : greedy.shape[1]], greedy)
    # greedy decoding with the carried state picks the argmax of the teacher-forced logits of its own output
    forced = model(src, greedy[:, :-1]).argmax(dim=-1)
    live = torch.cat([torch.ones(16, 1, dtype=torch.bool), (greedy[:, 1:-1] != 2).cumprod(dim=1).bool()], dim=1)
    assert torch.equal(forced[live], greedy[:, 1:][live])
    wide = model.beam_search(src, bos_id=1, eos_id=2, max_len=10, beam_size=3)
    assert wide.shape[0] == 16 and wide[:, 0].eq(1).all()


# ---------------------------------------------------------------- training, resume, sampling, bad input


def test_seq2seq_rnn_loss_falls_and_the_gradient_norm_is_logged(train_config) -> None:
    cfg = train_config(
        *TINY_S2S,
        "trainer.max_epochs=4",
        "optimizer.lr=5e-3",
        "scheduler=none",
        "logger=csv",
        "test=false",
        "trainer.log_every_n_steps=2",
    )
    train(cfg)
    rows = (Path(cfg.paths.output_dir) / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")

    def column(name: str) -> list[float]:
        return [float(r.split(",")[header.index(name)]) for r in rows[1:] if r.split(",")[header.index(name)]]

    losses = column("train/loss")
    assert len(losses) == 4 and all(a > b for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses
    norms = column("train/grad_norm")
    assert len(norms) >= 4 and all(n > 0 for n in norms)


def test_resume_equals_the_uninterrupted_run_and_samples_continue(train_config, corpus: Path, tmp_path, capsys):
    settings = [
        *TINY_LM,
        f"data.path={corpus}",
        "model.tbptt_steps=8",
        "trainer.limit_train_batches=4",
        "trainer.max_epochs=4",
        "callbacks.model_checkpoint.save_top_k=-1",
        "test=false",
    ]
    full, resumed = interrupted_and_resumed(train_config, *settings)
    assert_same_final_weights(full, resumed)
    ckpt = Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt"
    eval_cfg = compose_config(
        "eval",
        [
            f"ckpt_path={ckpt}",
            "extras.print_config=false",
            "mode=sample",
            "max_new_tokens=30",
            "prompt=the quick brown fox jumps over the lazy dog",
        ],
        tmp_path,
    )
    eval_cfg.paths.output_dir = str(tmp_path / "eval")
    capsys.readouterr()
    evaluate(eval_cfg)  # a recurrent LM has no context limit: a prompt longer than block_size is fine
    printed = capsys.readouterr().out.rstrip("\n")
    prompt = "the quick brown fox jumps over the lazy dog"
    assert printed.startswith(prompt) and len(printed) == len(prompt) + 30 and set(printed) <= set(TEXT)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.net.cell=transformer", "model.net.cell: unknown 'transformer'; allowed: rnn, lstm, gru"),
        ("model.net.attention=general", "model.net.attention: unknown 'general'; allowed: additive, dot"),
    ],
)
def test_bad_choices_are_one_line(train_config, override: str, message: str) -> None:
    cfg = train_config(*TINY_S2S, override, "debug=fdr")
    with pytest.raises(Exception) as error:
        train(cfg)
    line = describe(error.value)
    assert "\n" not in line and message in line, line


def test_bad_cell_of_the_classifier_is_one_line() -> None:
    with pytest.raises(UserError) as error:
        RNNClassifier([1, 40], 10, cell="elman")
    assert str(error.value) == "model.net.cell: unknown 'elman'; allowed: rnn, lstm, gru"


@pytest.mark.parametrize(
    "experiment",
    ["gru_mnist1d", "lstm_char_lm", "seq2seq_rnn_reverse", "seq2seq_rnn_sort", "seq2seq_rnn_addition"],
)
def test_recurrent_recipes_clip_gradients(train_config, experiment: str) -> None:
    cfg = train_config(f"experiment={experiment}")
    assert cfg.trainer.gradient_clip_val > 0 and cfg.model.net._target_.startswith("zoo.nn.rnn.")
