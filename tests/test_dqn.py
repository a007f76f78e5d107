"""DQN: buffer, n-step returns, TD targets at episode ends, target updates, epsilon, learning, resume, evaluate,
TensorBoard and GIF output, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import assert_same_final_weights, compose_config, interrupted_and_resumed, run_script
from zoo.data.dqn import EnvDataModule
from zoo.errors import UserError
from zoo.nn.dqn import ConvQNetwork, QNetwork
from zoo.run import build_model, evaluate, train
from zoo.tasks.dqn import (
    DQNTask,
    NStepQueue,
    PrioritizedReplayBuffer,
    ReplayBuffer,
    SumTree,
    linear_schedule,
    td_targets,
    update_target,
)

# a tiny CartPole recipe: 2 epochs of 200 steps, small net and buffer, one greedy evaluation episode per epoch
TINY = [
    "experiment=dqn_cartpole",
    "data.steps_per_epoch=200",
    "data.eval_episodes=1",
    "data.test_episodes=2",
    "model.net.hidden_sizes=[16]",
    "model.buffer_size=500",
    "model.batch_size=16",
    "model.learning_starts=50",
    "model.train_frequency=10",
    "model.gradient_steps=2",
    "model.target_update_interval=40",
    "model.gif=false",
    "data.total_steps=null",
    "trainer.max_epochs=2",
]
torch.set_num_threads(1)


def make_task(**overrides) -> DQNTask:
    data = EnvDataModule("CartPole-v1", seed=0, **overrides.pop("data", {}))
    return DQNTask(data, QNetwork(data.observation_shape, data.num_actions, (8,)), **overrides)


def test_buffer_wraps_around_and_samples_only_stored_rows() -> None:
    buffer = ReplayBuffer(5, (2,), torch.float32, torch.device("cpu"))
    for start in (0, 3, 6):  # 9 rows into 5 places: rows 4..8 remain
        rows = torch.arange(start, start + 3, dtype=torch.float32)
        buffer.add(rows[:, None].repeat(1, 2), rows.long(), rows, rows[:, None].repeat(1, 2) + 1, torch.ones(3))
    assert buffer.size == 5 and buffer.position == 4
    assert sorted(buffer.rewards.tolist()) == [4, 5, 6, 7, 8]
    assert buffer.rewards[:4].tolist() == [5, 6, 7, 8]  # the oldest (0..3) were overwritten in ring order
    observations, actions, rewards, next_observations, _ = buffer.sample(1000, torch.Generator().manual_seed(0))
    assert set(rewards.tolist()) == {4.0, 5.0, 6.0, 7.0, 8.0}  # uniform over what is stored, nothing else
    assert torch.equal(observations[:, 0], rewards) and torch.equal(actions, rewards.long())
    assert torch.equal(next_observations[:, 0], rewards + 1)


def test_buffer_state_round_trips() -> None:
    a = ReplayBuffer(4, (3,), torch.float32, torch.device("cpu"))
    a.add(torch.randn(6, 3), torch.arange(6), torch.randn(6), torch.randn(6, 3), torch.rand(6))
    b = ReplayBuffer(4, (3,), torch.float32, torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert all(torch.equal(x, y) for x, y in zip(a.sample(8, g1), b.sample(8, g2)))
    with pytest.raises(UserError, match="model.buffer_size"):
        ReplayBuffer(8, (3,), torch.float32, torch.device("cpu")).load_state_dict(a.state_dict())


def prioritized_buffer(capacity: int, td_errors: list[float], alpha: float = 0.5) -> PrioritizedReplayBuffer:
    """A buffer of len(td_errors) one-number rows (row k holds k), whose priorities come from those TD errors."""
    buffer = PrioritizedReplayBuffer(capacity, (1,), torch.float32, torch.device("cpu"), alpha=alpha, eps=1e-6)
    rows = torch.arange(len(td_errors), dtype=torch.float32)
    buffer.add(rows[:, None], rows.long(), rows, rows[:, None], torch.ones(len(rows)))
    buffer.update_priorities(torch.arange(len(rows)), torch.tensor(td_errors))
    return buffer


def test_sum_tree_sums_equal_brute_force_after_updates_and_wrap_around() -> None:
    """13 rows (not a power of two) filled three times over by both add paths, priorities updated at random: every
    inner node holds the sum (and minimum) of its leaves, new rows the largest priority so far."""
    rng = np.random.default_rng(0)
    buffer = PrioritizedReplayBuffer(13, (2,), torch.float32, torch.device("cpu"), alpha=0.6, eps=1e-3)
    tree, largest = buffer.tree, 1.0
    for step in range(20):
        count = int(rng.integers(1, 5))
        start = buffer.position
        rows = rng.normal(size=(count, 2)).astype(np.float32)
        if step % 2:
            buffer.add_arrays(rows, np.zeros(count, dtype=np.int64), np.zeros(count), rows, np.ones(count))
        else:
            buffer.add(*(torch.from_numpy(x) for x in (rows, np.zeros(count, dtype=np.int64))), torch.zeros(count),
                       torch.from_numpy(rows), torch.ones(count))  # fmt: skip
        new = (start + np.arange(count)) % 13
        assert np.all(buffer.priorities[new] == buffer.max_priority)
        index = torch.from_numpy(rng.integers(0, buffer.size, size=6))
        td_errors = torch.from_numpy(rng.normal(scale=3.0, size=13)[index])  # a row drawn twice: one TD error
        buffer.update_priorities(index, td_errors)
        expected = (td_errors.abs().numpy() + 1e-3) ** 0.6
        assert np.allclose(buffer.priorities[index.numpy()], expected)
        largest = max(largest, expected.max())
        assert buffer.max_priority == largest
        leaves = tree.sums[tree.leaves :]
        assert np.all(leaves[buffer.size :] == 0)
        for node in range(1, tree.leaves):  # node covers leaves [first, first + width)
            width = tree.leaves >> (node.bit_length() - 1)
            first = node * width - tree.leaves
            covered = leaves[first : first + width]
            assert tree.sums[node] == pytest.approx(covered.sum(), rel=1e-12), node
            positive = covered[covered > 0]
            assert tree.mins[node] == (positive.min() if len(positive) else np.inf), node
        assert tree.total == pytest.approx(buffer.priorities[: buffer.size].sum(), rel=1e-12)
    assert buffer.size == 13  # wrapped around: more than 13 rows were added
    rebuilt = SumTree(13)
    rebuilt.set_leaves(slice(0, 13), buffer.priorities.copy())
    rebuilt.rebuild()
    assert np.array_equal(rebuilt.sums, tree.sums) and np.array_equal(rebuilt.mins, tree.mins)  # no drift
    masses = rng.uniform(0, tree.total, size=1000)  # the descent finds what a search of the prefix sums finds
    assert np.array_equal(tree.find(masses), np.searchsorted(np.cumsum(buffer.priorities), masses, side="right"))


def test_prioritized_sampling_frequencies_are_proportional_to_priority_to_the_alpha() -> None:
    """Six rows, alpha 0.6: 100,000 draws in batches of 50 from a fixed generator pass a chi-square test at 0.1%."""
    from scipy.stats import chi2

    td_errors = [0.5, -1.0, 2.0, 4.0, -8.0, 0.1]
    buffer = prioritized_buffer(8, td_errors, alpha=0.6)
    generator = torch.Generator().manual_seed(0)
    counts = np.zeros(6)
    for _ in range(2000):
        (_, actions, *_), index, _ = buffer.sample_prioritized(50, generator, beta=0.4)
        assert torch.equal(actions, index)  # the sampled rows are the indexed ones
        counts += np.bincount(index.numpy(), minlength=6)
    probabilities = (np.abs(td_errors) + 1e-6) ** 0.6
    probabilities /= probabilities.sum()
    expected = probabilities * counts.sum()
    statistic = ((counts - expected) ** 2 / expected).sum()
    assert statistic < chi2.ppf(0.999, df=5), (counts, expected)
    assert np.allclose(counts / counts.sum(), probabilities, atol=0.005)
    assert counts[6:].sum() == 0  # rows 6 and 7 hold nothing and are never drawn


def test_stratified_sampling_takes_one_row_from_each_segment() -> None:
    """The mass is cut into B equal segments and draw j falls in segment j: with equal priorities and B = N, every
    row exactly once; with unequal ones, row j's interval of mass meets segment j."""
    equal = prioritized_buffer(10, [1.0] * 10)
    _, index, _ = equal.sample_prioritized(10, torch.Generator().manual_seed(1), beta=0.5)
    assert index.tolist() == list(range(10))
    buffer = prioritized_buffer(16, [0.3, 5.0, 1.0, 0.01, 2.0, 7.0, 0.5, 1.5, 3.0, 0.2, 4.0])
    mass = buffer.priorities[: buffer.size]
    ends = np.cumsum(mass)
    starts = ends - mass
    for seed in range(20):
        _, index, _ = buffer.sample_prioritized(8, torch.Generator().manual_seed(seed), beta=0.5)
        segment = mass.sum() / 8
        for j, row in enumerate(index.tolist()):
            assert starts[row] < (j + 1) * segment and ends[row] > j * segment, (seed, j, row)
        assert index.tolist() == sorted(index.tolist())


def test_importance_weights_equal_the_hand_computation() -> None:
    """w_i = (N P(i))^-beta / max_j (N P(j))^-beta, with P(i) = p_i^a / sum p^a over the N stored rows."""
    td_errors = [1.0, -2.0, 4.0, 8.0, 0.25]
    buffer = prioritized_buffer(8, td_errors, alpha=0.7)
    p = (np.abs(td_errors) + 1e-6) ** 0.7
    n, probabilities = len(p), p / p.sum()
    for beta in (0.0, 0.4, 1.0):
        _, index, weights = buffer.sample_prioritized(32, torch.Generator().manual_seed(2), beta)
        by_hand = (n * probabilities) ** -beta / ((n * probabilities) ** -beta).max()
        assert weights.dtype == torch.float32
        assert np.allclose(weights.numpy(), by_hand[index.numpy()], rtol=1e-6)
        assert weights.max() <= 1.0
    assert weights[index == 4][0].item() == pytest.approx(1.0)  # the least likely row has the largest weight


def test_prioritized_buffer_state_round_trips_with_its_tree() -> None:
    """A restored buffer has the same tree, bit for bit, and draws the same batches with the same weights."""
    buffer = prioritized_buffer(8, [1.0, 3.0, 0.5, 2.0, 6.0, 0.1])
    buffer.add(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), torch.zeros(4), torch.zeros(4, 1), torch.ones(4))
    assert buffer.size == 8 and buffer.position == 2  # wrapped: rows 0 and 1 were overwritten at the max priority
    assert buffer.max_priority == pytest.approx((6.0 + 1e-6) ** 0.5)
    assert np.all(buffer.priorities[[0, 1, 6, 7]] == buffer.max_priority)
    restored = PrioritizedReplayBuffer(8, (1,), torch.float32, torch.device("cpu"), alpha=0.5, eps=1e-6)
    restored.load_state_dict(buffer.state_dict())
    buffer._refresh_tree()
    assert np.array_equal(restored.tree.sums, buffer.tree.sums) and np.array_equal(restored.tree.mins, buffer.tree.mins)
    assert restored.max_priority == buffer.max_priority
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    (batch_a, index_a, weights_a), (batch_b, index_b, weights_b) = (
        b.sample_prioritized(16, g, beta=0.6) for b, g in ((buffer, g1), (restored, g2))
    )
    assert torch.equal(index_a, index_b) and torch.equal(weights_a, weights_b)
    assert all(torch.equal(x, y) for x, y in zip(batch_a, batch_b))
    with pytest.raises(UserError, match="model.prioritized"):
        restored.load_state_dict(ReplayBuffer(8, (1,), torch.float32, torch.device("cpu")).state_dict())


def test_one_step_targets_bootstrap_through_truncation_not_termination() -> None:
    gamma = 0.9
    o, n = np.zeros(1), np.ones(1)
    (terminated,) = NStepQueue(1, gamma).push(o, 0, 1.0, n, terminated=True, truncated=False)
    (truncated,) = NStepQueue(1, gamma).push(o, 0, 1.0, n, terminated=False, truncated=True)
    (running,) = NStepQueue(1, gamma).push(o, 0, 1.0, n, terminated=False, truncated=False)
    assert terminated[4] == 0.0 and truncated[4] == running[4] == gamma
    rewards = torch.tensor([terminated[2], truncated[2], running[2]])
    discounts = torch.tensor([terminated[4], truncated[4], running[4]])
    next_q = torch.tensor([[2.0, 5.0]] * 3)  # max Q(s') = 5
    assert td_targets(rewards, discounts, next_q).tolist() == pytest.approx([1.0, 1.0 + 0.9 * 5, 1.0 + 0.9 * 5])


def test_n_step_returns_by_hand() -> None:
    gamma, queue = 0.5, NStepQueue(3, 0.5)
    obs = [np.full(1, float(k)) for k in range(6)]
    assert queue.push(obs[0], 0, 1.0, obs[1], False, False) == []
    assert queue.push(obs[1], 1, 2.0, obs[2], False, False) == []
    (first,) = queue.push(obs[2], 0, 4.0, obs[3], False, False)  # r0 + g r1 + g^2 r2, bootstrap from s3 with g^3
    assert first[1] == 0 and first[2] == pytest.approx(1 + 0.5 * 2 + 0.25 * 4) and first[4] == gamma**3
    assert first[3][0] == 3.0
    flushed = queue.push(obs[3], 1, 8.0, obs[4], terminated=True, truncated=False)  # the episode ends: all pending
    assert [row[2] for row in flushed] == pytest.approx([2 + 0.5 * 4 + 0.25 * 8, 4 + 0.5 * 8, 8.0])
    assert [row[4] for row in flushed] == [0.0, 0.0, 0.0] and not queue.items
    queue.push(obs[0], 0, 1.0, obs[1], False, False)
    (cut,) = queue.push(obs[1], 0, 1.0, obs[2], terminated=False, truncated=True)[1:]  # truncation bootstraps
    assert cut[4] == gamma and cut[3][0] == 2.0


def random_steps(steps: int, **data) -> DQNTask:
    """A task whose two CartPole copies took `steps` random steps each, everything stored in its buffer."""
    task = make_task(data={"num_envs": 2, **data}, gamma=0.9, buffer_size=1000, batch_size=4)
    task.epsilon = lambda step=None: 1.0
    task.buffer = ReplayBuffer(1000, (4,), torch.float32, torch.device("cpu"))
    envs = task.data.make_vector_env()
    task._attach(envs)
    task._env_steps(steps)
    envs.close()
    return task


def test_truncated_steps_keep_gamma_and_the_final_observation() -> None:
    """Episodes cut at 5 steps (too short for the pole to fall): each ends in a truncation that bootstraps."""
    task = random_steps(12, max_episode_steps=5)
    buffer = task.buffer
    assert buffer.size == 24 and task.env_steps == 24
    assert torch.allclose(buffer.discounts[:24], torch.tensor(0.9))  # no termination: every discount is gamma
    for env in (0, 1):
        rows = list(range(env, 24, 2))  # the rows of one environment, in order
        for step, (row, following) in enumerate(zip(rows, rows[1:]), start=1):
            continues = torch.equal(buffer.next_observations[row], buffer.observations[following])
            assert continues == (step % 5 != 0), step  # at a truncation s' is the last real state, not the reset
    assert task._stats["episode_lengths"] == [5, 5, 5, 5]


def test_terminated_steps_have_no_bootstrap() -> None:
    task = random_steps(60)
    buffer = task.buffer
    ends = (buffer.discounts[: buffer.size] == 0).nonzero().flatten()
    assert len(ends) >= 2 and len(ends) == len(task._stats["episode_lengths"])
    angle, position = buffer.next_observations[ends, 2].abs(), buffer.next_observations[ends, 0].abs()
    assert torch.all((angle > 0.2095) | (position > 2.4))  # s' is the state where the pole fell or the cart left
    others = torch.ones(buffer.size, dtype=torch.bool)
    others[ends] = False
    assert torch.allclose(buffer.discounts[: buffer.size][others], torch.tensor(0.9))


def test_double_dqn_takes_the_online_argmax() -> None:
    rewards, discounts = torch.zeros(1), torch.ones(1)
    next_target = torch.tensor([[1.0, 10.0, 3.0]])
    next_online = torch.tensor([[0.0, -1.0, 7.0]])  # the online net prefers action 2
    assert td_targets(rewards, discounts, next_target).item() == 10.0
    assert td_targets(rewards, discounts, next_target, next_online).item() == 3.0


def test_soft_update_with_tau_one_is_the_hard_copy() -> None:
    online, target, soft = QNetwork((4,), 2, (8,)), QNetwork((4,), 2, (8,)), QNetwork((4,), 2, (8,))
    soft.load_state_dict(target.state_dict())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    update_target(target, online, tau=1.0)
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), online.state_dict().values()))
    update_target(soft, online, tau=0.25)
    for key, value in soft.state_dict().items():
        assert torch.allclose(value, 0.75 * before[key] + 0.25 * online.state_dict()[key])


def test_epsilon_schedule() -> None:
    values = [linear_schedule(1.0, 0.05, 100, step) for step in (0, 50, 100, 1000)]
    assert values == pytest.approx([1.0, 0.525, 0.05, 0.05])


def test_dueling_head_separates_value_and_advantage() -> None:
    net = QNetwork((4,), 3, (16,), dueling=True)
    x = torch.randn(5, 4)
    q = net(x)
    value = net.head.value(net.trunk(x))
    assert torch.allclose(q.mean(dim=1, keepdim=True), value, atol=1e-6)  # the advantages average to zero


def test_conv_q_network_takes_stacked_frames() -> None:
    net = ConvQNetwork((4, 84, 84), 6, hidden_size=32, dueling=True)
    frames = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    assert net(frames).shape == (2, 6)
    with pytest.raises(ValueError, match="model.net"):
        ConvQNetwork((8,), 4)


def test_td_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    task = make_task(loss="mse")
    batch = (torch.randn(32, 4), torch.randint(0, 2, (32,)), torch.randn(32), torch.randn(32, 4), torch.zeros(32))
    optimizer = torch.optim.Adam(task.net.parameters(), lr=1e-2)
    losses = []
    for _ in range(300):
        loss, *_ = task.td_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::50]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.env_id=NoSuchEnv-v0"], "data.env_id: unknown environment 'NoSuchEnv-v0'"),
        (["data.env_id=Pendulum-v1"], "DQN needs a Discrete one"),
        (["model.buffer_size=10", "model.batch_size=32"], "model.buffer_size: 10 is smaller than model.batch_size 32"),
        (["model.loss=l1"], "model.loss: unknown 'l1'; allowed: huber, mse"),
        (["model.tau=0"], "model.tau"),
        (["model.prioritized=true", "model.per_eps=0"], "model.per_eps: must be > 0"),
    ],
)
def test_bad_input_is_one_clear_line(train_config, overrides: list[str], message: str) -> None:
    cfg = train_config("experiment=dqn_cartpole", *overrides)
    with pytest.raises(Exception) as caught:
        build_model(cfg)
    error = caught.value
    while not isinstance(error, UserError) and error.__cause__ is not None:  # Hydra wraps what the constructor raised
        error = error.__cause__
    assert isinstance(error, UserError) and message in str(error) and "\n" not in str(error)


@pytest.mark.slow  # a train.py subprocess; the in-process check above is fast
def test_unknown_environment_through_train_py(tmp_path: Path) -> None:
    result = run_script("train.py", "experiment=dqn_cartpole", "data.env_id=CartPol-v1", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "data.env_id: unknown environment 'CartPol-v1'" in lines[-1]


def test_resume_equals_the_uninterrupted_run(train_config) -> None:
    """Two environments, 3-step returns, soft updates, a decaying learning rate, prioritized replay, the run length
    in environment steps: stop after epoch 2 of 4, resume, end where the full run ended. trainer.max_epochs (2) plays
    no part."""
    settings = [
        *TINY,
        "data.num_envs=2",
        "data.total_steps=800",
        "model.n_step=3",
        "model.tau=0.5",
        "model.double=true",
        "model.lr_end_factor=0.1",
        "model.prioritized=true",
        "model.iteration_steps=60",
        "callbacks.model_checkpoint.save_top_k=-1",
        "test=false",
        "logger=none",
    ]
    full, resumed = interrupted_and_resumed(train_config, *settings)
    assert_same_final_weights(full, resumed)
    end_a, end_b = (
        torch.load(Path(c.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True) for c in (full, resumed)
    )
    for a, b in zip(end_a["optimizer_states"][0]["param_groups"], end_b["optimizer_states"][0]["param_groups"]):
        assert a["lr"] == b["lr"] < 0.2 * a["initial_lr"]  # the same point of the same decay
    end_a, end_b = end_a["dqn"], end_b["dqn"]
    assert end_a["env_steps"] == end_b["env_steps"] == 800 and end_a["updates"] == end_b["updates"]
    for name in (*ReplayBuffer.FIELDS, "priorities"):
        assert torch.equal(end_a["buffer"][name], end_b["buffer"][name]), name
    assert end_a["buffer"]["max_priority"] == end_b["buffer"]["max_priority"]
    assert torch.equal(end_a["generator"], end_b["generator"])
    assert end_a["env"]["actions"] == end_b["env"]["actions"]


def test_the_run_is_exactly_total_steps_with_no_sanity_episodes(train_config) -> None:
    """330 steps in epochs of 200: the second epoch stops at 330; epsilon reaches its floor at half the run."""
    from lightning.pytorch import Callback

    seen: dict[str, list] = {"sanity": [], "val_epochs": [], "epsilon": []}

    class Watch(Callback):
        def on_sanity_check_start(self, trainer, module) -> None:
            seen["sanity"].append(True)

        def on_validation_epoch_end(self, trainer, module) -> None:
            seen["val_epochs"].append(module.env_steps)

        def on_train_batch_end(self, trainer, module, *args) -> None:
            seen["epsilon"].append((module.env_steps, module.epsilon()))

    cfg = train_config(
        *TINY, "data.total_steps=330", "model.n_step=1", "trainer.max_epochs=50", "trainer.num_sanity_val_steps=2"
    )
    cfg.model.exploration_fraction, cfg.model.epsilon_end = 0.5, 0.1
    datamodule, model = instantiate(cfg.data), build_model(cfg, instantiate(cfg.data))
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[Watch()], enable_checkpointing=False)
    trainer.fit(model, datamodule=datamodule)
    assert model.env_steps == 330 and trainer.current_epoch == 2
    assert model.buffer.size == 330  # one-step returns: every step stored, none after the budget
    assert seen["sanity"] == [] and seen["val_epochs"] == [200, 330]
    assert model.epsilon(165) == pytest.approx(0.1) and model.epsilon(0) == 1.0
    assert all(eps == pytest.approx(model.epsilon(step)) for step, eps in seen["epsilon"])


def test_train_logs_curves_and_evaluate_reproduces_the_test_return(train_config, tmp_path: Path) -> None:
    """test/return is the final policy's (last.ckpt), the best checkpoint's score is test/return_best_val."""
    cfg = train_config(*TINY, "model.gif=true", "model.gif_max_frames=20", "data.test_episodes=3")
    train(cfg)
    run = Path(cfg.paths.output_dir)
    logged = json.loads((run / "metrics.json").read_text())
    assert {"test/return", "test/return_std", "test/return_best_val", "val/return", "val/return_best"} <= set(logged)
    assert {"train/loss", "train/steps_per_second"} <= set(logged)
    assert (run / "episode.gif").read_bytes()[:6] == b"GIF89a"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/episode_return", "train/episode_length", "train/epsilon", "train/loss", "train/q_mean"):
        assert tag in tags, tag
    assert {"train/steps_per_second", "train/lr", "val/return", "val/return_std", "test/return"} <= tags
    assert "test/episode" in events.Tags()["images"]
    for tag in ("train/epsilon", "train/lr", "test/return", "test/return_best_val"):  # x axis: environment steps
        assert events.Scalars(tag)[-1].step == 400, tag

    def score(ckpt: Path, *extra: str) -> dict[str, float]:
        eval_cfg = compose_config("eval", [f"ckpt_path={ckpt}", "extras.print_config=false", *extra], tmp_path)
        eval_cfg.paths.output_dir = str(tmp_path / f"eval_{ckpt.stem}_{len(extra)}")
        return evaluate(eval_cfg)

    final = score(run / "checkpoints" / "last.ckpt")
    assert final["test/return"] == pytest.approx(logged["test/return"])
    assert final["test/return_std"] == pytest.approx(logged["test/return_std"])
    best = score(next((run / "checkpoints").glob("epoch_*.ckpt")))
    assert best["test/return"] == pytest.approx(logged["test/return_best_val"])
    rendered = score(run / "checkpoints" / "last.ckpt", "render=true", "episodes=3")
    assert rendered["test/return"] == pytest.approx(logged["test/return"])  # the same seeds, the same episodes
    assert (tmp_path / "eval_last_2" / "episode.gif").read_bytes()[:6] == b"GIF89a"


def test_the_headline_is_the_final_policy_not_the_best_checkpoint(train_config) -> None:
    """A run whose best validation came early: test/return scores the weights training ended with."""
    cfg = train_config(*TINY, "trainer.max_epochs=3", "logger=none", "data.test_episodes=2")
    datamodule, model = instantiate(cfg.data), build_model(cfg)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=True, callbacks=[])
    trainer.fit(model, datamodule=datamodule)
    final = {k: v.clone() for k, v in model.net.state_dict().items()}
    with torch.no_grad():  # a hand-made policy stands in for an earlier, better-scoring checkpoint
        for p in model.net.parameters():
            p.zero_()
        first, head = model.net.trunk[1], model.net.head  # push the way the pole falls: sign(angle + angular velocity)
        first.weight[0, 2:] = 1.0
        first.weight[1, 2:] = -1.0
        head.weight[1, 0] = head.weight[0, 1] = 1.0
    env = datamodule.make_env()
    seeds = datamodule.test_dataloader()
    by_hand_other = [model.play_episode(env, s)[0] for s in seeds]
    path = Path(cfg.paths.output_dir) / "other.ckpt"
    trainer.save_checkpoint(path)
    model.net.load_state_dict(final)
    (scores,) = trainer.test(model, datamodule=datamodule, ckpt_path=str(path), weights_only=True, verbose=False)
    model.net.load_state_dict(final)
    by_hand = [model.play_episode(env, s)[0] for s in seeds]
    assert scores["test/return"] == pytest.approx(np.mean(by_hand))
    assert scores["test/return_best_val"] == pytest.approx(np.mean(by_hand_other))
    assert np.mean(by_hand_other) > 100 > np.mean(by_hand)  # the two policies are told apart


def test_a_short_cartpole_run_beats_a_random_policy(train_config) -> None:
    """A random policy balances CartPole for about 22 steps; the policy after 3k steps of DQN must do clearly better."""
    cfg = train_config(
        "experiment=dqn_cartpole",
        "data.steps_per_epoch=1000",
        "data.eval_episodes=5",
        "data.test_episodes=10",
        "model.net.hidden_sizes=[64,64]",
        "model.learning_starts=500",
        "model.gradient_steps=32",
        "model.train_frequency=64",
        "model.exploration_fraction=0.3",
        "model.gif=false",
        "data.total_steps=3000",
        "model.lr_end_factor=1.0",
        "optimizer.lr=2.3e-3",  # 3k steps need a faster rate than the recipe's 100k-step one
        "logger=none",
    )
    cfg.optimized_metric = "test/return"  # the final policy's
    assert train(cfg) > 60


@pytest.mark.slow  # subprocesses of train.py and evaluate.py, 30-50 s
def test_train_py_and_evaluate_py_as_a_user_runs_them(tmp_path: Path) -> None:
    result = run_script(
        "train.py", *TINY, "trainer.max_epochs=1", "model.gif=true", "model.gif_max_frames=5", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = next((tmp_path / "logs" / "dqn_cartpole" / "runs").iterdir())
    assert (run / "episode.gif").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    scored = run_script("evaluate.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert "test/return" in scored.stdout and "test/return_std" in scored.stdout
    rendered = run_script(
        "evaluate.py", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "mode=render", "episodes=3", cwd=tmp_path
    )
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    assert "3 greedy episodes of CartPole-v1" in rendered.stdout and "±" in rendered.stdout
    assert len(list((tmp_path / "logs" / "eval" / "runs").glob("*/episode.gif"))) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("prioritized", [False, True])
def test_replay_buffer_and_updates_live_on_the_gpu(train_config, prioritized: bool) -> None:
    from lightning.pytorch import Callback

    devices: set[str] = set()

    class RecordDevices(Callback):  # while training: Lightning's teardown moves the module back to the CPU
        def on_train_batch_end(self, trainer, module, *args) -> None:
            devices.update(p.device.type for p in (*module.net.parameters(), *module.target_net.parameters()))
            devices.add(module.buffer.observations.device.type)

    cfg = train_config(*TINY, "trainer=gpu", "logger=none", f"model.prioritized={prioritized}")
    datamodule, model = instantiate(cfg.data), build_model(cfg)
    instantiate(cfg.trainer, logger=False, callbacks=[RecordDevices()]).fit(model, datamodule=datamodule)
    assert isinstance(model.buffer, PrioritizedReplayBuffer) == prioritized
    if prioritized:  # the tree stays on the CPU; every stored row has a positive priority
        assert np.all(model.buffer.priorities[: model.buffer.size] > 0)
    assert devices == {"cuda"}
    pending = sum(len(queue.items) for queue in model.env["queues"])  # n-step returns not yet complete
    assert model.buffer.size + pending == model.env_steps == 400
    assert model.buffer.observations.device.type == "cpu", "fit must give the buffer's GPU memory back"
