"""Deep Q-learning (Mnih et al., 2015) on gymnasium environments, trained by Lightning.

Read top to bottom: the replay buffer, n-step returns, the epsilon schedule, the TD target, the target-network
update, then the task, whose training step is one iteration of the usual loop:

    for each of train_frequency environment steps:
        act epsilon-greedily, step the environments, store (s, a, r, s', discount) in the replay buffer
    after learning_starts steps (and a batch in the buffer), gradient_steps times:
        sample a batch and regress Q(s, a) on r + discount * max Q'(s')
    every target_update_interval steps: move the target network towards the online one (hard copy or tau)

The discount stored with a transition is gamma^n, and 0 after a termination: a time-limit truncation is not the end
of the task, so its value is bootstrapped; a termination (the pole fell, the lander crashed) has none.
Exploration and sampling draw from the task's own generator, which the checkpoint keeps with the buffer, the
counters and the training episodes in progress (their reset seeds and actions, replayed on resume), so a resumed
run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MaxMetric

from zoo.data.dqn import episode_seed
from zoo.errors import UserError
from zoo.internals import (
    add_summary,
    attached_trainer,
    batches_that_stepped,
    set_batches_that_stepped,
    set_max_epochs,
)
from zoo.optim import lr_scheduler_config
from zoo.tasks import figures

if TYPE_CHECKING:
    import gymnasium as gym

    from zoo.data.dqn import EnvDataModule

LOSSES = ("huber", "mse")


class ReplayBuffer:
    """A ring of preallocated tensors on the training device; when full, new transitions overwrite the oldest."""

    FIELDS = ("observations", "actions", "rewards", "next_observations", "discounts")

    def __init__(
        self, capacity: int, observation_shape: Sequence[int], observation_dtype: torch.dtype, device: torch.device
    ) -> None:
        self.capacity, self.position, self.size = capacity, 0, 0
        self.observations = torch.zeros((capacity, *observation_shape), dtype=observation_dtype, device=device)
        self.next_observations = torch.zeros_like(self.observations)
        self.actions = torch.zeros(capacity, dtype=torch.long, device=device)
        self.rewards = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.discounts = torch.zeros(capacity, dtype=torch.float32, device=device)
        self._views: dict[str, np.ndarray] | None = None
        self._refresh_views()

    def _refresh_views(self) -> None:
        """NumPy views of CPU storage: one environment step is then written without building any tensor."""
        on_cpu = self.actions.device.type == "cpu"
        self._views = {name: getattr(self, name).numpy() for name in self.FIELDS} if on_cpu else None

    def add_arrays(
        self,
        observations: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        next_observations: np.ndarray,
        discounts: np.ndarray,
    ) -> None:
        """`add` for NumPy rows, as the environments return them: straight into the storage when it is on the CPU."""
        views = self._views
        if views is None:
            self.add(
                *(
                    torch.from_numpy(np.asarray(x))
                    for x in (observations, actions, rewards, next_observations, discounts)
                )
            )
            return
        count = len(actions)
        if self.position + count <= self.capacity:
            index: slice | np.ndarray = slice(self.position, self.position + count)
        else:
            index = (self.position + np.arange(count)) % self.capacity
        views["observations"][index] = observations
        views["actions"][index] = actions
        views["rewards"][index] = rewards
        views["next_observations"][index] = next_observations
        views["discounts"][index] = discounts
        self.position = (self.position + count) % self.capacity
        self.size = min(self.size + count, self.capacity)

    def add(
        self,
        observations: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        next_observations: torch.Tensor,
        discounts: torch.Tensor,
    ) -> None:
        """Store a batch of transitions (one per environment) at the next positions of the ring."""
        count = len(actions)
        if self.position + count <= self.capacity:  # the usual case: a slice, cheaper than an index
            index: slice | torch.Tensor = slice(self.position, self.position + count)
        else:
            index = ((self.position + torch.arange(count)) % self.capacity).to(self.actions.device)
        for name, values in zip(self.FIELDS, (observations, actions, rewards, next_observations, discounts)):
            getattr(self, name)[index] = values.to(self.actions.device, getattr(self, name).dtype)
        self.position = (self.position + count) % self.capacity
        self.size = min(self.size + count, self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Uniform with replacement over the stored transitions; indices come from the (CPU) generator."""
        index = torch.randint(self.size, (batch_size,), generator=generator).to(self.actions.device)
        return tuple(getattr(self, name)[index] for name in self.FIELDS)

    def to(self, device: torch.device | str) -> ReplayBuffer:
        """Moves the ring with the module: Lightning moves parameters between devices, not this buffer."""
        for name in self.FIELDS:
            setattr(self, name, getattr(self, name).to(device))
        self._refresh_views()
        return self

    def state_dict(self) -> dict[str, Any]:
        """Only the filled part, on the CPU: a checkpoint of an early run stays small."""
        state: dict[str, Any] = {"position": self.position, "size": self.size, "capacity": self.capacity}
        state.update({name: getattr(self, name)[: self.size].cpu().clone() for name in self.FIELDS})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["capacity"] != self.capacity:
            raise UserError(
                f"model.buffer_size: the checkpoint's buffer holds {state['capacity']} transitions, "
                f"this run's {self.capacity}; resume with the same buffer_size"
            )
        self.position, self.size = int(state["position"]), int(state["size"])
        for name in self.FIELDS:
            getattr(self, name)[: self.size] = state[name].to(getattr(self, name).device)


class SumTree:
    """Segment trees over `capacity` leaves: each inner node holds the sum (and, in a second tree, the minimum) of
    its two children, so the total mass and the smallest leaf are read at the root, a leaf changes in O(log n), and
    the leaf at a given cumulative mass is found by one descent from the root.

    Node 1 is the root, node k has children 2k and 2k + 1, and leaf i is node `leaves + i`. Every operation is
    vectorised over a batch: one NumPy step per tree level, never a Python loop per leaf. The trees live in NumPy
    on the CPU whatever the replay buffer's device: a descent is a few tiny gathers per level, microseconds each
    here, a kernel launch each on a GPU.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.leaves = 1 << max(0, capacity - 1).bit_length()  # the next power of two: a complete binary tree
        self.depth = self.leaves.bit_length() - 1
        self.sums = np.zeros(2 * self.leaves, dtype=np.float64)
        self.mins = np.full(2 * self.leaves, np.inf, dtype=np.float64)  # empty leaves never set the minimum

    @property
    def total(self) -> float:
        return float(self.sums[1])

    @property
    def min(self) -> float:
        """The smallest positive leaf (a zero leaf is never drawn, so it has no weight to normalise by)."""
        return float(self.mins[1])

    def values(self, index: np.ndarray | slice) -> np.ndarray:
        return self.sums[self.leaves :][index]

    def set_leaves(self, index: np.ndarray | slice, values: np.ndarray | float) -> None:
        """Writes leaves only; `propagate` then brings their ancestors up to date (once for many writes)."""
        self.sums[self.leaves :][index] = values
        values = np.asarray(values, dtype=np.float64)
        self.mins[self.leaves :][index] = np.where(values > 0, values, np.inf)

    def propagate(self, index: np.ndarray) -> None:
        """Recomputes the ancestors of the given leaves, level by level up to the root.

        A parent is always recomputed from its two children (never incremented), so the trees hold exactly what a
        rebuild from the leaves gives, however many updates came before: no rounding drifts in.
        """
        node = np.asarray(index, dtype=np.int64) + self.leaves
        for _ in range(self.depth):
            node //= 2  # a parent repeated in `node` is written twice, with the same value
            left = 2 * node
            right = left + 1
            self.sums[node] = self.sums[left] + self.sums[right]
            self.mins[node] = np.minimum(self.mins[left], self.mins[right])

    def update(self, index: np.ndarray, values: np.ndarray) -> None:
        self.set_leaves(index, values)
        self.propagate(index)

    def rebuild(self) -> None:
        """Every inner node from the leaves, a level at a time: O(n), after loading the leaves of a checkpoint."""
        for level in range(self.depth - 1, -1, -1):
            node = np.arange(1 << level, 2 << level)
            self.sums[node] = self.sums[2 * node] + self.sums[2 * node + 1]
            self.mins[node] = np.minimum(self.mins[2 * node], self.mins[2 * node + 1])

    def find(self, mass: np.ndarray) -> np.ndarray:
        """The leaf i with prefix_i <= mass < prefix_i + value_i for each mass in [0, total), all at once: at each
        node, go right when the mass is not below the left child's sum, taking that sum off.

        A zero leaf is never reached from a mass below the total (its interval is empty); a mass that rounding took
        to the total or past it ends on the last leaf of the subtree it overshot, which the caller clamps.
        """
        mass = np.array(mass, dtype=np.float64)
        node = np.ones(len(mass), dtype=np.int64)
        for _ in range(self.depth):
            node *= 2  # the left child
            left_sum = self.sums[node]
            right = mass >= left_sum
            mass -= left_sum * right
            node += right
        return node - self.leaves


class PrioritizedReplayBuffer(ReplayBuffer):
    """Proportional prioritized replay (Schaul et al., 2016): transition i is drawn with probability
    P(i) = p_i^a / sum_j p_j^a, p_i = |TD error| + eps, and its loss is weighted by w_i = (N P(i))^-beta / max_j w_j,
    which undoes the bias of the skewed draws as beta goes to 1.

    The p^a live in the leaves of a sum tree beside the ring (leaf i is row i), so drawing a batch and updating its
    priorities cost O(B log N), not O(N). A batch is stratified as in the paper: the total mass is cut into B equal
    segments and one row is drawn from each. The largest weight belongs to the least likely row, so max_j w_j comes
    from the tree's minimum: w_i = (p_i^a / min_j p_j^a)^-beta (N cancels). New transitions enter at the largest
    priority seen so far, so each is replayed soon at least once. Their leaves are written as they arrive, and their
    ancestors summed once before the next draw, not at every environment step.
    """

    def __init__(
        self,
        capacity: int,
        observation_shape: Sequence[int],
        observation_dtype: torch.dtype,
        device: torch.device,
        alpha: float = 0.6,
        eps: float = 1e-6,
    ) -> None:
        super().__init__(capacity, observation_shape, observation_dtype, device)
        self.alpha, self.eps = alpha, eps
        self.tree = SumTree(capacity)
        self.max_priority = 1.0  # of p^alpha, over every update so far
        self._stale = 0  # the last `_stale` rows before `position` have leaves newer than their ancestors

    @property
    def priorities(self) -> np.ndarray:
        """p^alpha of every row (a view of the tree's leaves; 0 where nothing is stored yet)."""
        return self.tree.values(slice(0, self.capacity))

    def _mark_new(self, start: int, count: int) -> None:
        if start + count <= self.capacity:
            self.tree.set_leaves(slice(start, start + count), self.max_priority)
        else:
            self.tree.set_leaves((start + np.arange(count)) % self.capacity, self.max_priority)
        self._stale = min(self._stale + count, self.capacity)

    def _refresh_tree(self) -> None:
        """Sums the ancestors of the rows added since the last draw: one pass for all of them."""
        if self._stale:
            self.tree.propagate((self.position - self._stale + np.arange(self._stale)) % self.capacity)
            self._stale = 0

    def add(self, *rows: torch.Tensor) -> None:
        start = self.position
        super().add(*rows)
        self._mark_new(start, len(rows[1]))

    def add_arrays(self, *rows: np.ndarray) -> None:
        start = self.position
        super().add_arrays(*rows)
        self._mark_new(start, len(rows[1]))

    def sample_prioritized(
        self, batch_size: int, generator: torch.Generator, beta: float
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor]:
        """A batch drawn proportionally to p^alpha, one row per segment of the mass, its row indices and its
        normalised importance weights (on the buffer's device)."""
        self._refresh_tree()
        segment = self.tree.total / batch_size
        offsets = torch.rand(batch_size, generator=generator, dtype=torch.float64).numpy()
        # rows fill from 0, so a leaf past the last stored row can only come from a mass rounded up to the total
        index = np.minimum(self.tree.find((np.arange(batch_size) + offsets) * segment), self.size - 1)
        weights = (self.tree.values(index) / self.tree.min) ** -beta
        device = self.actions.device
        rows = torch.from_numpy(index).to(device)
        weights_tensor = torch.from_numpy(weights).to(device, torch.float32)
        return tuple(getattr(self, name)[rows] for name in self.FIELDS), rows, weights_tensor

    def update_priorities(self, index: torch.Tensor, td_errors: torch.Tensor) -> None:
        """p^alpha = (|TD error| + eps)^alpha for the rows of a batch (one copy to the CPU per batch)."""
        self._refresh_tree()
        values = (td_errors.detach().abs().double().cpu().numpy() + self.eps) ** self.alpha
        self.tree.update(index.cpu().numpy(), values)
        self.max_priority = max(self.max_priority, float(values.max()))

    def state_dict(self) -> dict[str, Any]:
        """The leaves of the stored rows: the inner nodes are a function of them, rebuilt bit for bit on load."""
        state = super().state_dict()
        state["priorities"] = torch.from_numpy(self.priorities[: self.size].copy())
        state["max_priority"] = self.max_priority
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "priorities" not in state:
            raise UserError("model.prioritized: the checkpoint's replay buffer has no priorities; resume without it")
        super().load_state_dict(state)
        self.tree = SumTree(self.capacity)
        self.tree.set_leaves(slice(0, self.size), state["priorities"].double().numpy())
        self.tree.rebuild()
        self.max_priority, self._stale = float(state["max_priority"]), 0


class NStepQueue:
    """Turns one environment's 1-step transitions into n-step ones: r_t + g r_t+1 + ... + g^(k-1) r_t+k-1, with
    discount g^k, or 0 when the episode terminated within the k steps. At an episode end (terminated or truncated)
    every pending transition is emitted with the steps it has, as the return cannot run on into the next episode.
    """

    def __init__(self, n: int, gamma: float) -> None:
        self.n, self.gamma = n, gamma
        self.items: deque[tuple[np.ndarray, int, float]] = deque()

    def push(
        self,
        observation: np.ndarray,
        action: int,
        reward: float,
        next_observation: np.ndarray,
        terminated: bool,
        truncated: bool,
    ) -> list[tuple[np.ndarray, int, float, np.ndarray, float]]:
        self.items.append((observation, action, reward))
        done = terminated or truncated
        emitted = []
        while self.items and (done or len(self.items) == self.n):
            ret = sum(self.gamma**k * r for k, (_, _, r) in enumerate(self.items))
            discount = 0.0 if terminated else self.gamma ** len(self.items)
            first_observation, first_action, _ = self.items.popleft()
            emitted.append((first_observation, first_action, ret, next_observation, discount))
        return emitted


def linear_schedule(start: float, end: float, duration: float, step: int) -> float:
    """From `start` at step 0 to `end` at `duration`, then constant."""
    if duration <= 0:
        return end
    return start + (end - start) * min(1.0, step / duration)


def td_targets(
    rewards: torch.Tensor,
    discounts: torch.Tensor,
    next_q_target: torch.Tensor,
    next_q_online: torch.Tensor | None = None,
) -> torch.Tensor:
    """r + discount * Q_target(s', a*): a* = argmax of Q_target (DQN) or, given the online net's values, of those
    (double DQN, van Hasselt et al., 2016), which curbs the overestimation that comes from max over noisy values.
    """
    if next_q_online is None:
        next_values = next_q_target.max(dim=1).values
    else:
        next_values = next_q_target.gather(1, next_q_online.argmax(dim=1, keepdim=True)).squeeze(1)
    return rewards + discounts * next_values


@torch.no_grad()
def update_target(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- tau * online + (1 - tau) * target; tau = 1 is the hard copy of the original DQN."""
    for t, o in zip(target.state_dict().values(), online.state_dict().values()):
        if tau >= 1.0 or not t.is_floating_point():
            t.copy_(o)
        else:
            t.lerp_(o, tau)


class DQNTask(L.LightningModule):
    """DQN with the usual options: double targets, a dueling head (in the network), n-step returns, Huber or MSE
    loss, hard or soft target updates, gradient clipping by norm, a learning rate decaying linearly over the run,
    several environments at once.

    The run length is `data.total_steps` environment steps, exactly; epsilon, the learning-rate decay and the
    target updates count environment steps too, so they do not depend on trainer.max_epochs and a resumed run
    follows the same schedule. One Lightning iteration is a few rounds of (train_frequency environment steps, then
    the gradient steps): the loop's per-batch cost is paid once per `iteration_steps` environment steps.

    Logs, against environment steps: `train/episode_return`, `train/episode_length`, `train/epsilon`, `train/lr`,
    `train/loss` (TD loss), `train/q_mean`, `train/steps_per_second`, `val/return` (mean over the evaluation
    episodes), `val/return_std`, `val/length`, `val/return_best`. At test: `test/return`, `test/return_std`,
    `test/length` of the final policy (the weights training ended with), and, when the run tested its
    best-by-validation checkpoint, that checkpoint's `test/return_best_val` and `test/return_best_val_std` beside it.
    At the end of training a GIF of one greedy episode of the final policy (`episode.gif` in the run folder, and the
    Images tab of TensorBoard).
    """

    stops_on_plateau = False  # trains for its budget whatever `monitor` does (zoo.callbacks.PlateauStopping)

    eval_modes = ("episodes", "render")

    def __init__(
        self,
        data: EnvDataModule,
        net: nn.Module | Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/return",
        gamma: float = 0.99,
        buffer_size: int = 10_000,
        batch_size: int = 128,
        learning_starts: int = 1000,
        train_frequency: int = 10,
        gradient_steps: int = 1,
        target_update_interval: int = 500,
        tau: float = 1.0,
        loss: str = "huber",
        double: bool = False,
        n_step: int = 1,
        max_grad_norm: float | None = 10.0,
        epsilon_start: float = 1.0,
        epsilon_end: float = 0.05,
        exploration_fraction: float = 0.5,
        lr_end_factor: float = 1.0,
        prioritized: bool = False,
        per_alpha: float = 0.6,
        per_beta_start: float = 0.4,
        per_eps: float = 1e-6,
        iteration_steps: int = 200,
        eval_epsilon: float = 0.0,
        gif: bool = True,
        gif_fps: int = 30,
        gif_max_frames: int = 500,
    ) -> None:
        super().__init__()
        _check_settings(
            data,
            scheduler,
            loss=loss,
            tau=tau,
            gamma=gamma,
            lr_end_factor=lr_end_factor,
            per_alpha=per_alpha,
            per_beta_start=per_beta_start,
            per_eps=per_eps,
            buffer_size=buffer_size,
            counts={
                "n_step": n_step,
                "train_frequency": train_frequency,
                "gradient_steps": gradient_steps,
                "target_update_interval": target_update_interval,
                "batch_size": batch_size,
                "iteration_steps": iteration_steps,
            },
        )
        self.automatic_optimization = False  # several gradient steps, or none, per iteration
        self.data = data
        self.net = net if isinstance(net, nn.Module) else net(data.observation_shape, data.num_actions)
        self.target_net = copy.deepcopy(self.net).requires_grad_(False)
        self.make_optimizer, self.make_scheduler, self.monitor = optimizer, scheduler, monitor
        self.gamma, self.buffer_size, self.batch_size = gamma, buffer_size, batch_size
        self.learning_starts, self.train_frequency = learning_starts, train_frequency
        self.gradient_steps, self.target_update_interval = gradient_steps, target_update_interval
        self.tau, self.loss_name = tau, loss
        self.double, self.n_step, self.max_grad_norm = double, n_step, max_grad_norm
        self.epsilon_start, self.epsilon_end = epsilon_start, epsilon_end
        self.exploration_fraction, self.eval_epsilon = exploration_fraction, eval_epsilon
        self.lr_end_factor = lr_end_factor
        self.prioritized, self.per_alpha, self.per_beta_start, self.per_eps = (
            prioritized, per_alpha, per_beta_start, per_eps,
        )  # fmt: skip
        self.gif, self.gif_fps, self.gif_max_frames = gif, gif_fps, gif_max_frames
        self.num_envs = data.num_envs
        # one round = this many steps of the vector env (train_frequency counts single-env steps), then learning
        self.vector_steps = max(1, train_frequency // self.num_envs)
        self.round_steps = self.vector_steps * self.num_envs
        self.rounds_per_iteration = max(1, math.ceil(iteration_steps / self.round_steps))
        self.val_return_best = MaxMetric()
        self.val_return_best.persistent(True)  # part of the checkpoint, so a resumed run keeps its best

        # everything below is training state that the checkpoint keeps (on_save_checkpoint)
        self.generator = torch.Generator().manual_seed(data.seed)
        self.buffer: ReplayBuffer | None = None
        self.env_steps = 0  # environment steps, summed over the environments
        self.episodes_started = 0
        self.updates = 0  # gradient steps
        self.env: dict[str, Any] | None = None  # the training episodes in progress
        self._pending: dict[str, Any] | None = None  # what a checkpoint restores once the environments exist
        self._envs: gym.vector.VectorEnv | None = None
        self._stats = self._fresh_stats()
        self._eval_results: list[tuple[float, int]] = []
        self._final_results: list[tuple[float, int]] = []
        self._final: dict[str, Any] | None = None  # the final policy, kept when testing loads another checkpoint
        self._final_net: nn.Module | None = None
        self._run_clock = {"seconds": 0.0, "steps": 0}

    # ----- the schedules, in environment steps -----------------------------------------------------------------

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.net(observations)

    @property
    def total_env_steps(self) -> int:
        """data.total_steps; without it (older configs) trainer.max_epochs epochs of data.steps_per_epoch."""
        total = getattr(self.data, "total_steps", None)
        if total is not None:
            return int(total)
        epochs = self.trainer.max_epochs if attached_trainer(self) is not None else None
        if epochs is None or epochs < 1:
            raise UserError("data.total_steps: DQN needs a run length; give data.total_steps (environment steps)")
        return epochs * self.data.iterations_per_epoch * self.data.env_steps_per_iteration

    def epsilon(self, step: int | None = None) -> float:
        duration = self.exploration_fraction * self.total_env_steps
        return linear_schedule(self.epsilon_start, self.epsilon_end, duration, self.env_steps if step is None else step)

    def learning_rate_factor(self, step: int | None = None) -> float:
        """Linear from 1 at step 0 to lr_end_factor at the last environment step of the run."""
        return linear_schedule(1.0, self.lr_end_factor, self.total_env_steps, self.env_steps if step is None else step)

    def per_beta(self, step: int | None = None) -> float:
        """Importance-sampling exponent: per_beta_start at step 0, 1 at the run's end, where the bias matters most."""
        return linear_schedule(self.per_beta_start, 1.0, self.total_env_steps, self.env_steps if step is None else step)

    @torch.no_grad()
    def act(self, observations: torch.Tensor, epsilon: float, generator: torch.Generator) -> torch.Tensor:
        """Epsilon-greedy: the random draws are made every step, so their number does not depend on the net."""
        count = len(observations)
        explore = torch.rand(count, generator=generator) < epsilon
        random_actions = torch.randint(self.data.num_actions, (count,), generator=generator)
        if bool(explore.all()):
            return random_actions
        greedy = self.net(observations).argmax(dim=1).cpu()
        return torch.where(explore, random_actions, greedy)

    # ----- the training environments and their resumable state ----------------------------------------------

    def _start_episode(self) -> int:
        seed = episode_seed(self.data.seed, self.episodes_started)
        self.episodes_started += 1
        return seed

    def _attach(self, envs: gym.vector.VectorEnv) -> None:
        """Reset fresh environments, or replay the episodes in progress of a checkpoint (same seeds, same actions).

        The task steps the copies inside the vector env one by one: with autoreset off this is what the vector env
        does too, less its per-step stacking and copying.
        """
        self._envs = envs
        subs = envs.envs
        dtype = self.data.observation_dtype
        self._scratch = {
            "next_observations": np.zeros((self.num_envs, *self.data.observation_shape), dtype=dtype),
            "rewards": np.zeros(self.num_envs),
            "terminated": np.zeros(self.num_envs, dtype=bool),
            "truncated": np.zeros(self.num_envs, dtype=bool),
        }
        if self._pending is None:
            seeds = [self._start_episode() for _ in range(self.num_envs)]
            observations = np.stack([sub.reset(seed=seed)[0] for sub, seed in zip(subs, seeds)]).astype(dtype)
            self.env = {
                "observations": observations,
                "seeds": seeds,
                "actions": [[] for _ in range(self.num_envs)],
                "returns": np.zeros(self.num_envs),
                "lengths": np.zeros(self.num_envs, dtype=np.int64),
                "queues": [NStepQueue(self.n_step, self.gamma) for _ in range(self.num_envs)],
            }
            return
        state, self._pending = self._pending, None
        for i, (sub, seed, actions) in enumerate(zip(subs, state["seeds"], state["actions"])):
            observation, _ = sub.reset(seed=int(seed))
            for action in actions:
                observation, *_ = sub.step(action)
            if not np.array_equal(observation, state["observations"][i]):
                warnings.warn("replaying the episode in progress gave another state: resume is not exact", stacklevel=2)
        queues = []
        for items in state["queues"]:
            queue = NStepQueue(self.n_step, self.gamma)
            queue.items.extend(items)
            queues.append(queue)
        self.env = {
            **state,
            "observations": np.array(state["observations"], dtype=dtype),
            "actions": [list(a) for a in state["actions"]],
            "queues": queues,
        }

    def _env_steps(self, count: int) -> None:
        """`count` epsilon-greedy steps of every environment, stored in the replay buffer.

        The exploration draws of all `count` steps come from the generator in two calls, and the greedy action
        is computed only when some environment does not explore: the same draws whatever the network says.
        """
        env, subs, scratch = self.env, self._envs.envs, self._scratch
        observations, next_observations = env["observations"], scratch["next_observations"]
        rewards, terminated, truncated = scratch["rewards"], scratch["terminated"], scratch["truncated"]
        draws = torch.rand((count, self.num_envs), generator=self.generator).numpy()
        random_actions = torch.randint(self.data.num_actions, (count, self.num_envs), generator=self.generator)
        random_actions = random_actions.numpy()
        net, device, steps = self.net, self.device, self.env_steps  # a local counter: no Module.__setattr__ per step
        # n-step rows are stored together after the steps (nothing samples the buffer in between): one write, not one
        # per row
        n_step_rows: list[tuple[np.ndarray, int, float, np.ndarray, float]] = []
        for k in range(count):
            explore = draws[k] < self.epsilon(steps)
            actions = random_actions[k]
            if not explore.all():
                with torch.inference_mode():
                    greedy = net(torch.from_numpy(observations).to(device)).argmax(dim=1).cpu().numpy()
                actions = np.where(explore, actions, greedy)
            for i, sub in enumerate(subs):
                next_observations[i], rewards[i], terminated[i], truncated[i], _ = sub.step(int(actions[i]))
            if self.n_step == 1:  # the common case without a Python loop over environments
                discounts = np.where(terminated, 0.0, self.gamma)
                self.buffer.add_arrays(observations, actions, rewards, next_observations, discounts)
            else:
                for i, queue in enumerate(env["queues"]):
                    n_step_rows += queue.push(
                        observations[i].copy(), int(actions[i]), float(rewards[i]), next_observations[i].copy(),
                        bool(terminated[i]), bool(truncated[i]),
                    )  # fmt: skip
            steps += self.num_envs
            env["returns"] += rewards
            env["lengths"] += 1
            for i in range(self.num_envs):
                env["actions"][i].append(int(actions[i]))
            np.copyto(observations, next_observations)
            if terminated.any() or truncated.any():
                for i in np.flatnonzero(terminated | truncated):
                    self._stats["episode_returns"].append(float(env["returns"][i]))
                    self._stats["episode_lengths"].append(int(env["lengths"][i]))
                    env["seeds"][i] = self._start_episode()
                    env["returns"][i], env["lengths"][i], env["actions"][i] = 0.0, 0, []
                    observations[i] = subs[i].reset(seed=env["seeds"][i])[0]
        if n_step_rows:
            o, a, r, n, d = zip(*n_step_rows)
            self.buffer.add_arrays(np.stack(o), np.array(a), np.array(r), np.stack(n), np.array(d))
        self.env_steps = steps

    # ----- learning ---------------------------------------------------------------------------------------

    def td_loss(
        self, batch: Sequence[torch.Tensor], weights: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The TD loss of a batch (s, a, r, s', discount), weighted per row when given (prioritized replay), the
        mean Q(s, a) for logging, and the TD errors, which prioritized replay turns into new priorities."""
        observations, actions, rewards, next_observations, discounts = batch
        with torch.no_grad():
            next_q_target = self.target_net(next_observations)
            next_q_online = self.net(next_observations) if self.double else None
            targets = td_targets(
                rewards, discounts, next_q_target.float(), None if next_q_online is None else next_q_online.float()
            )
        q = self.net(observations).gather(1, actions[:, None]).squeeze(1).float()
        reduction = "mean" if weights is None else "none"
        if self.loss_name == "huber":
            loss = F.smooth_l1_loss(q, targets, reduction=reduction)
        else:
            loss = F.mse_loss(q, targets, reduction=reduction)
        if weights is not None:
            loss = (loss * weights).mean()
        return loss, q.detach().mean(), (q - targets).detach()

    def _learn(self) -> None:
        optimizer = self.optimizers()
        if self.lr_end_factor != 1.0:  # a function of environment steps: a resumed run continues the same line
            factor = self.learning_rate_factor()
            for group in optimizer.optimizer.param_groups:
                group["lr"] = group.setdefault("initial_lr", group["lr"]) * factor
        for _ in range(self.gradient_steps):
            if self.prioritized:
                batch, index, weights = self.buffer.sample_prioritized(self.batch_size, self.generator, self.per_beta())
                loss, q_mean, td_errors = self.td_loss(batch, weights)
                self.buffer.update_priorities(index, td_errors)
            else:
                loss, q_mean, _ = self.td_loss(self.buffer.sample(self.batch_size, self.generator))
            optimizer.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            if self.max_grad_norm:
                self.clip_gradients(optimizer, gradient_clip_val=self.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
            self.updates += 1
            self._stats["loss"] += loss.detach()
            self._stats["q"] += q_mean
            self._stats["count"] += 1

    def training_step(self, batch: int, batch_idx: int) -> None:
        envs = self.trainer.datamodule.train_envs
        if self._envs is not envs:
            self._attach(envs)
        total = self.total_env_steps
        for _ in range(self.rounds_per_iteration):
            if self.env_steps >= total:  # the budget is exact: the last epoch's spare iterations do nothing
                break
            before = self.env_steps
            self._env_steps(min(self.vector_steps, math.ceil((total - self.env_steps) / self.num_envs)))
            if self.env_steps >= self.learning_starts and self.buffer.size >= self.batch_size:
                self._learn()
                if before // self.target_update_interval != self.env_steps // self.target_update_interval:
                    update_target(self.target_net, self.net, self.tau)
                scheduler = self.lr_schedulers()
                if scheduler is not None and self._scheduler_interval == "step":
                    scheduler.step()
        if (batch_idx + 1) % max(1, self.trainer.log_every_n_steps) == 0 or self.trainer.fast_dev_run:
            self._log_training()

    # ----- logging ------------------------------------------------------------------------------------------

    @staticmethod
    def _fresh_stats() -> dict[str, Any]:
        return {"loss": 0.0, "q": 0.0, "count": 0, "episode_returns": [], "episode_lengths": [], "time": None}

    def _log_scalars(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Straight to every logger with environment steps as the x axis, the convention of RL curves."""
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.env_steps if step is None else step)

    def on_train_start(self) -> None:
        # a run resumed from a checkpoint saved inside an epoch (a SIGTERM, say) restarts without on_train_epoch_start
        self.on_train_epoch_start()

    def on_train_epoch_start(self) -> None:
        self._stats["time"], self._stats["steps"] = time.perf_counter(), self.env_steps
        self._epoch_clock = {"start": time.perf_counter(), "steps": self.env_steps, "validating": 0.0}

    def on_train_epoch_end(self) -> None:
        clock = self._epoch_clock
        self._run_clock["seconds"] += time.perf_counter() - clock["start"] - clock["validating"]
        self._run_clock["steps"] += self.env_steps - clock["steps"]
        if self._run_clock["seconds"] > 0:  # the whole run's figure (evaluation episodes excluded), for metrics.json
            self.log("train/steps_per_second", self._run_clock["steps"] / self._run_clock["seconds"], logger=False)
        scheduler = self.lr_schedulers()
        if scheduler is not None and self._scheduler_interval == "epoch":
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(self.trainer.callback_metrics.get(self.monitor, 0.0))
            else:
                scheduler.step()

    def _log_training(self) -> None:
        stats, now = self._stats, time.perf_counter()
        metrics = {"train/epsilon": self.epsilon()}
        optimizers = self.trainer.optimizers
        if optimizers:
            metrics["train/lr"] = float(optimizers[0].param_groups[0]["lr"])
        if stats["time"] is not None and now > stats["time"]:
            metrics["train/steps_per_second"] = (self.env_steps - stats["steps"]) / (now - stats["time"])
        if stats["count"]:
            metrics["train/loss"] = float(stats["loss"] / stats["count"])
            metrics["train/q_mean"] = float(stats["q"] / stats["count"])
        if stats["episode_returns"]:
            metrics["train/episode_return"] = float(np.mean(stats["episode_returns"]))
            metrics["train/episode_length"] = float(np.mean(stats["episode_lengths"]))
        self._log_scalars(metrics)
        for name in ("train/loss", "train/episode_return"):
            if name in metrics:  # for the progress bar and metrics.json; the curves went to the loggers above
                self.log(name, metrics[name], logger=False, prog_bar=True)
        self._stats = self._fresh_stats()
        self._stats["time"], self._stats["steps"] = now, self.env_steps

    # ----- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def play_episode(
        self,
        env: gym.Env,
        seed: int,
        epsilon: float = 0.0,
        render: bool = False,
        net: nn.Module | None = None,
    ) -> tuple[float, int, list[np.ndarray]]:
        """One episode from `env.reset(seed=seed)`, greedy (or epsilon-greedy with a generator seeded by `seed`)."""
        net = self.net if net is None else net
        generator = torch.Generator().manual_seed(seed)
        observation, _ = env.reset(seed=seed)
        total, length, frames = 0.0, 0, []
        while True:
            if render and len(frames) < self.gif_max_frames:
                frames.append(env.render())
            obs = torch.as_tensor(observation, device=self.device)[None]
            if epsilon > 0:
                explore = float(torch.rand(1, generator=generator)) < epsilon
                random_action = int(torch.randint(self.data.num_actions, (1,), generator=generator))
                action = random_action if explore else int(net(obs).argmax(dim=1)[0])
            else:
                action = int(net(obs).argmax(dim=1)[0])
            observation, reward, terminated, truncated, _ = env.step(action)
            total, length = total + float(reward), length + 1
            if terminated or truncated:
                return total, length, frames

    def validation_step(self, seed: int, batch_idx: int) -> None:
        total, length, _ = self.play_episode(self.trainer.datamodule.eval_env, int(seed), self.eval_epsilon)
        self._eval_results.append((total, length))

    def _summary(self, split: str, results: list[tuple[float, int]] | None = None) -> dict[str, float]:
        if results is None:
            results, self._eval_results = self._eval_results, []
        returns = np.array([r for r, _ in results])
        lengths = np.array([n for _, n in results])
        return {
            f"{split}/return": float(returns.mean()),
            f"{split}/return_std": float(returns.std()),
            f"{split}/length": float(lengths.mean()),
        }

    def on_validation_epoch_start(self) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_epoch_end(self) -> None:
        summary = self._summary("val")
        elapsed = time.perf_counter() - self._validation_started
        if self._stats.get("time") is not None:  # the steps-per-second clocks stop while evaluating
            self._stats["time"] += elapsed
        if getattr(self, "_epoch_clock", None) is not None and not self.trainer.sanity_checking:
            self._epoch_clock["validating"] += elapsed
        if self.trainer.sanity_checking:  # the sanity check's untrained score is no "best"
            return
        self.val_return_best(summary["val/return"])
        summary["val/return_best"] = float(self.val_return_best.compute())
        summary["train/env_steps"] = float(self.env_steps)
        self._log_scalars(summary)
        for name, value in summary.items():
            self.log(name, value, logger=False, prog_bar=name in ("val/return", "val/return_best"))

    def on_fit_end(self) -> None:
        """Keeps the final policy: testing after fit may load the best-by-validation checkpoint into `net`."""
        self._final = {
            "state": {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
            "env_steps": self.env_steps,
        }
        if self.buffer is not None:  # frees the GPU memory of the buffer with the rest of the module
            self.buffer.to("cpu")

    def on_test_epoch_start(self) -> None:
        """After fit, the tested checkpoint (Lightning loads the best-by-validation one) is scored beside the final
        policy, on the same episodes; testing the final weights themselves plays them once."""
        self._final_net, self._score_best = None, False
        self._eval_results, self._final_results = [], []
        if self._final is None or self.trainer.ckpt_path is None:
            return
        self._score_best = True
        loaded = self.net.state_dict()
        if all(torch.equal(v.cpu(), self._final["state"][k]) for k, v in loaded.items()):
            return
        self._final_net = copy.deepcopy(self.net)
        self._final_net.load_state_dict(self._final["state"])
        self._final_net.eval()

    def test_step(self, seed: int, batch_idx: int) -> None:
        env = self.trainer.datamodule.eval_env
        total, length, _ = self.play_episode(env, int(seed))
        self._eval_results.append((total, length))
        if self._final_net is not None:
            total, length, _ = self.play_episode(env, int(seed), net=self._final_net)
            self._final_results.append((total, length))

    def on_test_epoch_end(self) -> None:
        """test/return is the final policy's; the best-by-validation checkpoint's is test/return_best_val."""
        tested = self._summary("test", self._eval_results)
        summary = self._summary("test", self._final_results) if self._final_net is not None else dict(tested)
        if self._score_best:
            summary["test/return_best_val"] = tested["test/return"]
            summary["test/return_best_val_std"] = tested["test/return_std"]
        self._eval_results, self._final_results, self._final_net = [], [], None
        for name, value in summary.items():
            self.log(name, value)
        # Lightning writes these to the loggers after this hook, at its batch counter: for the test figures, the
        # counter shows the environment steps of the tested run instead, and is put back at the end of testing
        self._batch_counter = batches_that_stepped(self.trainer)
        set_batches_that_stepped(self.trainer, self.env_steps if self._final is None else self._final["env_steps"])

    def on_test_end(self) -> None:
        if getattr(self, "_batch_counter", None) is not None:
            set_batches_that_stepped(self.trainer, self._batch_counter)
            self._batch_counter = None

    def on_train_end(self) -> None:
        """A GIF of one greedy episode of the final policy in the run folder, and in TensorBoard's Images tab."""
        if not self.gif or self.trainer.fast_dev_run or not self.trainer.is_global_zero:
            return
        path = Path(self.trainer.default_root_dir) / "episode.gif"
        total, length = self.write_gif(path, self.data.test_seed)
        writer = figures.tensorboard_writer(self.loggers)
        if writer is not None:
            add_gif(writer, "test/episode", path, self.env_steps)
        print(
            f"final policy: test episode of seed {self.data.test_seed} (return {total:.1f}, {length} steps) in {path}"
        )

    def write_gif(self, path: Path, seed: int) -> tuple[float, int]:
        env = self.data.make_env(render_mode="rgb_array")
        try:
            was_training = self.training
            self.eval()
            total, length, frames = self.play_episode(env, seed, render=True)
            self.train(was_training)
        finally:
            env.close()
        save_gif(frames, path, self.gif_fps)
        return total, length

    # ----- evaluate.py modes --------------------------------------------------------------------------------

    def run_eval_mode(self, mode: str, cfg: Any) -> dict[str, float]:
        """`evaluate.py mode=episodes`: greedy episodes from seed `episode_seed` on; mode=render also writes a GIF."""
        episodes = int(cfg.get("episodes") or self.data.test_episodes)
        first_seed = cfg.get("episode_seed")
        first_seed = self.data.test_seed if first_seed is None else int(first_seed)
        if episodes < 1:
            raise UserError(f"episodes: must be >= 1, got {episodes}")
        output_dir = Path(cfg.paths.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        env = self.data.make_env()
        try:
            self._eval_results = [self.play_episode(env, first_seed + k)[:2] for k in range(episodes)]
        finally:
            env.close()
        metrics = self._summary("test")
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        print(f"\n{episodes} greedy episodes of {self.data.env_id} (seeds {first_seed}..{first_seed + episodes - 1})")
        mean, std, length = (metrics[f"test/{k}"] for k in ("return", "return_std", "length"))
        print(f"return {mean:.2f} ± {std:.2f}, mean length {length:.1f}")
        if mode == "render":
            path = output_dir / "episode.gif"
            total, length = self.write_gif(path, first_seed)
            print(f"episode of seed {first_seed} (return {total:.1f}, {length} steps) written to {path}")
        return metrics

    # ----- optimizers and checkpoints ------------------------------------------------------------------------

    def configure_optimizers(self) -> Any:
        if self.make_optimizer is None:
            raise ValueError("no optimizer given: set the `optimizer` config group, e.g. optimizer=adam")
        optimizer = self.make_optimizer(params=self.net.parameters())
        self._scheduler_interval = None
        if self.make_scheduler is None:
            return optimizer
        config = lr_scheduler_config(self.make_scheduler, optimizer, self.trainer, self.monitor)
        self._scheduler_interval = config["interval"]  # manual optimization: the task steps it (training_step)
        return {"optimizer": optimizer, "lr_scheduler": config}

    def on_fit_start(self) -> None:
        dm = self.trainer.datamodule
        self._sync_iteration_size(dm)
        if self.buffer is None:
            dtype = torch.from_numpy(np.zeros(0, dtype=dm.observation_dtype)).dtype
            if self.prioritized:
                self.buffer = PrioritizedReplayBuffer(
                    self.buffer_size, dm.observation_shape, dtype, self.device, self.per_alpha, self.per_eps
                )
            else:
                self.buffer = ReplayBuffer(self.buffer_size, dm.observation_shape, dtype, self.device)
        self.buffer.to(self.device)  # a second fit may run on another device
        pending = getattr(self, "_pending_buffer", None)
        if pending is not None:
            self.buffer.load_state_dict(pending)
            self._pending_buffer = None
        self._final, self._run_clock = None, {"seconds": 0.0, "steps": 0}

    def _sync_iteration_size(self, dm: Any) -> None:
        for module in {id(dm): dm, id(self.data): self.data}.values():
            module.env_steps_per_iteration = self.rounds_per_iteration * self.round_steps

    def setup(self, stage: str) -> None:
        """Sizes the epochs and the run before Lightning asks for batches.

        The run is data.total_steps environment steps: the epochs it takes replace trainer.max_epochs. No sanity
        validation: an untrained policy's episodes only cost time. The learning rate is logged by the task, against
        environment steps, in place of the trainer-wide callback that counts batches.
        """
        trainer = attached_trainer(self)
        dm = trainer.datamodule if trainer is not None and trainer.datamodule is not None else self.data
        self._sync_iteration_size(dm)
        if trainer is None or stage != "fit":
            return
        trainer.num_sanity_val_steps = 0
        trainer.callbacks = [c for c in trainer.callbacks if type(c).__name__ != "LearningRates"]
        total = getattr(self.data, "total_steps", None)
        if total is not None and not trainer.fast_dev_run:
            epoch_steps = self.data.iterations_per_epoch * self.data.env_steps_per_iteration
            set_max_epochs(trainer, max(1, math.ceil(int(total) / epoch_steps)))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        env = self.env
        checkpoint["dqn"] = {
            "buffer": None if self.buffer is None else self.buffer.state_dict(),
            "generator": self.generator.get_state(),
            "env_steps": self.env_steps,
            "episodes_started": self.episodes_started,
            "updates": self.updates,
            "env": None if env is None else _env_state(env),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("dqn")
        if state is None:
            return
        self.generator.set_state(state["generator"])
        self.env_steps, self.episodes_started, self.updates = (
            state["env_steps"],
            state["episodes_started"],
            state["updates"],
        )
        self._pending_buffer = state["buffer"]
        self._pending = None if state["env"] is None else _env_from_state(state["env"])
        self._envs, self.env = None, None
        if self.buffer is not None and self._pending_buffer is not None:
            self.buffer.load_state_dict(self._pending_buffer)
            self._pending_buffer = None


def _env_state(env: dict[str, Any]) -> dict[str, Any]:
    """The episodes in progress as tensors and Python lists: checkpoints load with torch.load(weights_only=True)."""
    return {
        "observations": torch.as_tensor(np.asarray(env["observations"])).clone(),
        "seeds": [int(s) for s in env["seeds"]],
        "actions": [[int(a) for a in actions] for actions in env["actions"]],
        "returns": torch.as_tensor(env["returns"]).clone(),
        "lengths": torch.as_tensor(env["lengths"]).clone(),
        "queues": [[(torch.as_tensor(o).clone(), int(a), float(r)) for o, a, r in q.items] for q in env["queues"]],
    }


def _env_from_state(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "observations": state["observations"].numpy(),
        "seeds": list(state["seeds"]),
        "actions": [list(a) for a in state["actions"]],
        "returns": state["returns"].numpy().copy(),
        "lengths": state["lengths"].numpy().copy(),
        "queues": [[(o.numpy(), a, r) for o, a, r in items] for items in state["queues"]],
    }


def save_gif(frames: Sequence[np.ndarray], path: Path, fps: int = 30) -> None:
    """RGB frames (H, W, 3) to an animated GIF with Pillow, halved in size when wider than 400 pixels."""
    from PIL import Image

    if not frames:
        raise ValueError("no frames to write")
    images = [Image.fromarray(np.asarray(frame, dtype=np.uint8)) for frame in frames]
    if images[0].width > 400:
        size = (images[0].width // 2, images[0].height // 2)
        images = [image.resize(size) for image in images]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)


def add_gif(writer: Any, tag: str, path: Path, step: int) -> None:
    """An animated GIF as an image summary: TensorBoard's Images tab plays it (what add_video does via moviepy)."""
    from PIL import Image
    from tensorboard.compat.proto.summary_pb2 import Summary

    with Image.open(path) as image:
        width, height = image.size
    encoded = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=path.read_bytes())
    add_summary(writer, Summary(value=[Summary.Value(tag=tag, image=encoded)]), step)
    writer.flush()


def _check_settings(
    data: Any,
    scheduler: Any,
    *,
    loss: str,
    tau: float,
    gamma: float,
    lr_end_factor: float,
    per_alpha: float,
    per_beta_start: float,
    per_eps: float,
    buffer_size: int,
    counts: dict[str, int],
) -> None:
    """DQN's keys, each refused in one line that names it, before any environment is made."""
    if not hasattr(data, "num_actions"):
        kind = type(data).__name__
        raise UserError(f"model: DQN needs an environment, data=cartpole or data=lunarlander, not {kind}")
    if buffer_size < counts["batch_size"]:
        raise UserError(
            f"model.buffer_size: {buffer_size} is smaller than model.batch_size {counts['batch_size']}; "
            "allowed: buffer_size >= batch_size"
        )
    if loss not in LOSSES:
        raise UserError(f"model.loss: unknown '{loss}'; allowed: {', '.join(LOSSES)}")
    if not 0.0 < tau <= 1.0:
        raise UserError(f"model.tau: {tau} is outside (0, 1]; 1 is a hard copy")
    for key, value in counts.items():
        if value < 1:
            raise UserError(f"model.{key}: must be >= 1, got {value}")
    if not 0.0 <= gamma <= 1.0:
        raise UserError(f"model.gamma: {gamma} is outside [0, 1]")
    if not 0.0 <= lr_end_factor <= 1.0:
        raise UserError(f"model.lr_end_factor: {lr_end_factor} is outside [0, 1]; 1 keeps the rate constant")
    if lr_end_factor != 1.0 and scheduler is not None:
        raise UserError(
            "scheduler: DQN decays its learning rate itself over environment steps (model.lr_end_factor); "
            "use scheduler=none with it, or model.lr_end_factor=1.0"
        )
    if not 0.0 <= per_alpha <= 1.0 or not 0.0 <= per_beta_start <= 1.0:
        raise UserError(f"model.per_alpha, model.per_beta_start: {per_alpha}, {per_beta_start}; allowed: [0, 1]")
    if not per_eps > 0.0:
        raise UserError(f"model.per_eps: must be > 0 (a row whose priority is 0 is never replayed), got {per_eps}")
