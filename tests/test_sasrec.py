"""SASRec: the padded histories, causality, next-item training, the test-time history, and bad settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import assert_same_final_weights, interrupted_and_resumed
from tests.test_recommender import metrics_of, write_100k
from zoo.nn.sasrec import SASRec, left_padded
from zoo.run import build_model, train

ITEMS, LENGTH = 60, 12
TINY = ["model.net.dim=16", "model.net.max_length=16", "model.net.dropout=0.1", "data.batch_size=64"]


def chain_ratings(users: int = 200, seed: int = 0) -> list[tuple[int, int, int, int]]:
    """Each user rates LENGTH consecutive items of a circle of ITEMS, one after the other from a random start:
    the next item follows from the last one, which a sequential model can learn and popularity cannot."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(users):
        start = int(rng.integers(ITEMS))
        rows += [(user + 1, (start + t) % ITEMS + 1, 4, 880_000_000 + 1000 * user + t) for t in range(LENGTH)]
    return rows


def sasrec_config(train_config, folder: Path, *overrides: str):
    write_100k(folder, chain_ratings())
    return train_config("model=sasrec", "data=movielens", f"data.path={folder}", *TINY, "logger=none", *overrides)


def test_left_padded_keeps_each_users_latest_items_right_aligned() -> None:
    users = torch.tensor([0, 0, 0, 2])
    items = torch.tensor([5, 6, 7, 1])
    table = left_padded(users, items, num_users=3, width=2, pad=9)
    assert table.tolist() == [[6, 7], [9, 9], [9, 1]]
    with pytest.raises(ValueError, match="sorted by user"):
        left_padded(torch.tensor([1, 0]), torch.tensor([0, 0]), num_users=2, width=2, pad=9)


def test_each_position_sees_only_its_past_and_the_window_of_latest_items() -> None:
    torch.manual_seed(0)
    net = SASRec(num_users=1, num_items=10, dim=8, max_length=5, dropout=0.0).eval()
    sequence = torch.tensor([[10, 3, 4, 5, 6]])  # one pad, then four items
    changed = sequence.clone()
    changed[0, -1] = 7
    with torch.no_grad():
        before, after = net.encode(sequence), net.encode(changed)
    assert torch.allclose(before[:, :-1], after[:, :-1]) and not torch.allclose(before[:, -1], after[:, -1])
    assert before[0, 0].abs().sum() == 0  # a padded position carries nothing
    net.set_history(torch.tensor([0] * 7), torch.tensor([1, 2, 3, 4, 5, 6, 7]))
    assert net.history.tolist() == [[3, 4, 5, 6, 7]]
    older = SASRec(num_users=1, num_items=10, dim=8, max_length=5, dropout=0.0).eval()
    older.load_state_dict(net.state_dict())
    older.set_history(torch.tensor([0] * 7), torch.tensor([9, 8, 3, 4, 5, 6, 7]))  # differs outside the window
    with torch.no_grad():
        assert torch.equal(net.score_all(torch.tensor([0])), older.score_all(torch.tensor([0])))
        unknown = net.score_all(torch.tensor([-1]))
    assert torch.isfinite(unknown).all()


def test_candidate_scores_are_the_full_rankings_columns() -> None:
    """The evaluation reads the sampled candidates' scores off score_all; forward must give the same numbers."""
    torch.manual_seed(0)
    net = SASRec(num_users=3, num_items=10, dim=8, max_length=4, dropout=0.0).eval()
    net.set_history(torch.tensor([0, 0, 0, 2]), torch.tensor([1, 2, 3, 4]))
    users = torch.tensor([0, 2, 1, -1])
    candidates = torch.tensor([[3, 1, 9], [0, 2, 5], [7, 8, 4], [6, 0, 1]])
    with torch.no_grad():
        assert torch.allclose(net(users, candidates), net.score_all(users).gather(1, candidates), atol=1e-6)


def test_a_users_vector_is_the_last_position_of_the_full_encoding() -> None:
    """Ranking runs the final block for the last position alone; it must equal the last row of encoding every
    position (as training does), padded, unknown and full histories alike, with two heads and three blocks."""
    torch.manual_seed(0)
    net = SASRec(num_users=4, num_items=10, dim=8, max_length=5, blocks=3, heads=2, dropout=0.0).eval()
    net.set_history(torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 3]), torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    users = torch.tensor([0, 1, 2, 3, -1])
    with torch.no_grad():
        sequences = torch.where((users >= 0)[:, None], net.history[users.clamp(min=0)], net.num_items)
        assert torch.allclose(net.user_vectors(users), net.encode(sequences)[:, -1], atol=1e-6)


def test_sasrec_learns_what_comes_next_where_popularity_cannot(train_config, tmp_path: Path) -> None:
    cfg = sasrec_config(train_config, tmp_path / "ml", "trainer.max_epochs=30", "optimizer.lr=5e-3")
    train(cfg)
    metrics = metrics_of(cfg)
    # the test item is the one after the validation item; 48 unrated candidates, so chance HR@10 is about 0.2
    assert metrics["test/hr@10"] > 0.9 > 0.5 > metrics["test/hr@10_popularity"]
    assert metrics["train/loss"] < 0.5


def test_the_test_reads_the_validation_item_and_recommend_reads_every_interaction(train_config, tmp_path: Path) -> None:
    cfg = sasrec_config(train_config, tmp_path / "ml", "trainer.max_epochs=1")
    model = build_model(cfg)
    first_user = [item for user, item, _, _ in chain_ratings() if user == 1]  # raw ids 1-based, dense 0-based
    latest = lambda: model.net.history[0][-3:].tolist()  # noqa: E731
    assert latest() == [i - 1 for i in first_user[-5:-2]]  # training: all but the val and test items
    model.on_test_start()
    assert latest() == [i - 1 for i in first_user[-4:-1]]  # the test follows the validation item
    top = model.recommend(1, k=3)
    assert latest() == [i - 1 for i in first_user[-3:]]
    assert not {item for item, _, _ in top} & set(first_user)


def test_resume_equals_the_uninterrupted_run(train_config, tmp_path: Path) -> None:
    """Negatives and dropout draw from the global generator; a resumed run must draw what the full one did."""
    write_100k(tmp_path / "ml", chain_ratings(users=40))
    settings = ["model=sasrec", "data=movielens", f"data.path={tmp_path / 'ml'}", *TINY, "data.batch_size=16"]
    settings += ["trainer.max_epochs=4", "callbacks.model_checkpoint.save_top_k=-1", "test=false", "logger=none"]
    assert_same_final_weights(*interrupted_and_resumed(train_config, *settings))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.train_unit=interaction"], "data.train_unit: a sequential model reads whole histories; allowed: user"),
        (["data.train_unit=users"], "data.train_unit: unknown 'users'; allowed: interaction, user"),
        (["data.protocol=ratings"], "data.train_unit=user batches the histories of the leave-one-out split"),
        (
            ["model.net._target_=zoo.nn.recommender.ImplicitMF"]
            + [f"~model.net.{key}" for key in ("dim", "blocks", "heads", "max_length", "dropout")],
            "model.net: SequenceTask needs a sequential net",
        ),
        (["model.net.heads=3"], "model.net.dim: 16 is not divisible by model.net.heads=3; allowed: a multiple of it"),
    ],
)
def test_bad_sequence_settings_are_one_line_errors(
    train_config, tmp_path: Path, overrides: list[str], message: str
) -> None:
    from zoo.cli import describe

    with pytest.raises(Exception) as error:
        build_model(sasrec_config(train_config, tmp_path / "ml", *overrides))
    text = describe(error.value)
    assert message in text and "\n" not in text, text
