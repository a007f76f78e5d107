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

from zoo.data.env import episode_seed
from zoo.errors import UserError
from zoo.optim import lr_scheduler_config
from zoo.tasks import figures

if TYPE_CHECKING:
    import gymnasium as gym

    from zoo.data.env import EnvDataModule

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
    loss, hard or soft target updates, gradient clipping by norm, several environments at once.

    Logs, against environment steps: `train/episode_return`, `train/episode_length`, `train/epsilon`, `train/loss`
    (TD loss), `train/q_mean`, `train/steps_per_second`, `val/return` (mean over the evaluation episodes),
    `val/return_std`, `val/length`, `val/return_best`; at test `test/return`, `test/return_std`, `test/length`;
    at the end of training a GIF of one greedy evaluation episode (`episode.gif` in the run folder, and the
    Images tab of TensorBoard).
    """

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
        eval_epsilon: float = 0.0,
        gif: bool = True,
        gif_fps: int = 30,
        gif_max_frames: int = 500,
    ) -> None:
        super().__init__()
        if not hasattr(data, "num_actions"):
            raise UserError(
                f"model: DQN needs an environment, data=cartpole or data=lunarlander, not {type(data).__name__}"
            )
        if buffer_size < batch_size:
            raise UserError(
                f"model.buffer_size: {buffer_size} is smaller than model.batch_size {batch_size}; "
                "allowed: buffer_size >= batch_size"
            )
        if loss not in LOSSES:
            raise UserError(f"model.loss: unknown '{loss}'; allowed: {', '.join(LOSSES)}")
        if not 0.0 < tau <= 1.0:
            raise UserError(f"model.tau: {tau} is outside (0, 1]; 1 is a hard copy")
        for key, value in (
            ("n_step", n_step),
            ("train_frequency", train_frequency),
            ("gradient_steps", gradient_steps),
            ("target_update_interval", target_update_interval),
            ("batch_size", batch_size),
        ):
            if value < 1:
                raise UserError(f"model.{key}: must be >= 1, got {value}")
        if not 0.0 <= gamma <= 1.0:
            raise UserError(f"model.gamma: {gamma} is outside [0, 1]")

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
        self.gif, self.gif_fps, self.gif_max_frames = gif, gif_fps, gif_max_frames
        self.num_envs = data.num_envs
        # one training batch = this many steps of the vector env (train_frequency counts single-env steps)
        self.vector_steps = max(1, train_frequency // self.num_envs)
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
        self._exploration_steps: float | None = None

    # ----- acting -------------------------------------------------------------------------------------------

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.net(observations)

    @property
    def total_env_steps(self) -> int:
        epochs = self.trainer.max_epochs if self._trainer is not None else None
        if epochs is None or epochs < 1:
            raise UserError("trainer.max_epochs: DQN sets its run length (and epsilon schedule) by epochs; give >= 1")
        return epochs * self.data.iterations_per_epoch * self.vector_steps * self.num_envs

    def epsilon(self, step: int | None = None) -> float:
        if self._exploration_steps is None:  # set once per fit (on_fit_start), as the run length is known then
            self._exploration_steps = self.exploration_fraction * self.total_env_steps
        duration = self._exploration_steps
        return linear_schedule(self.epsilon_start, self.epsilon_end, duration, self.env_steps if step is None else step)

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
        """Reset fresh environments, or replay the episodes in progress of a checkpoint (same seeds, same actions)."""
        self._envs = envs
        if self._pending is None:
            seeds = [self._start_episode() for _ in range(self.num_envs)]
            observations, _ = envs.reset(seed=seeds)
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
        envs.reset(seed=list(state["seeds"]))
        for i, actions in enumerate(state["actions"]):
            sub_env = envs.envs[i]
            for action in actions:
                observation, *_ = sub_env.step(action)
            if actions and not np.array_equal(observation, state["observations"][i]):
                warnings.warn("replaying the episode in progress gave another state: resume is not exact", stacklevel=2)
        queues = []
        for items in state["queues"]:
            queue = NStepQueue(self.n_step, self.gamma)
            queue.items.extend(items)
            queues.append(queue)
        self.env = {**state, "actions": [list(a) for a in state["actions"]], "queues": queues}

    def _env_step(self, envs: gym.vector.VectorEnv) -> None:
        env = self.env
        observations = torch.as_tensor(env["observations"])
        actions = self.act(observations.to(self.device), self.epsilon(), self.generator)
        next_observations, rewards, terminated, truncated, _ = envs.step(actions.numpy())
        if self.n_step == 1:  # the common case without a Python loop over environments
            discounts = torch.as_tensor(self.gamma * ~terminated, dtype=torch.float32)
            self.buffer.add(
                observations, actions, torch.as_tensor(rewards), torch.as_tensor(next_observations), discounts
            )
        else:
            for i, queue in enumerate(env["queues"]):
                for row in queue.push(
                    env["observations"][i], int(actions[i]), float(rewards[i]), next_observations[i],
                    bool(terminated[i]), bool(truncated[i]),
                ):  # fmt: skip
                    o, a, r, n, d = (torch.as_tensor(np.asarray(x))[None] for x in row)
                    self.buffer.add(o, a, r, n, d)
        self.env_steps += self.num_envs
        env["returns"] += rewards
        env["lengths"] += 1
        for i, action in enumerate(actions.tolist()):
            env["actions"][i].append(action)
        done = terminated | truncated
        if done.any():
            for i in np.flatnonzero(done):
                self._stats["episode_returns"].append(float(env["returns"][i]))
                self._stats["episode_lengths"].append(int(env["lengths"][i]))
                env["seeds"][i] = self._start_episode()
                env["returns"][i], env["lengths"][i], env["actions"][i] = 0.0, 0, []
            next_observations, _ = envs.reset(seed=list(env["seeds"]), options={"reset_mask": done})
        env["observations"] = next_observations

    # ----- learning ---------------------------------------------------------------------------------------

    def td_loss(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The TD loss of a batch (s, a, r, s', discount) and the mean Q(s, a), for logging."""
        observations, actions, rewards, next_observations, discounts = batch
        with torch.no_grad():
            next_q_target = self.target_net(next_observations)
            next_q_online = self.net(next_observations) if self.double else None
            targets = td_targets(
                rewards, discounts, next_q_target.float(), None if next_q_online is None else next_q_online.float()
            )
        q = self.net(observations).gather(1, actions[:, None]).squeeze(1).float()
        loss = F.smooth_l1_loss(q, targets) if self.loss_name == "huber" else F.mse_loss(q, targets)
        return loss, q.detach().mean()

    def _learn(self) -> None:
        optimizer = self.optimizers()
        for _ in range(self.gradient_steps):
            loss, q_mean = self.td_loss(self.buffer.sample(self.batch_size, self.generator))
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
        before = self.env_steps
        for _ in range(self.vector_steps):
            self._env_step(envs)
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

    def _log_scalars(self, metrics: dict[str, float]) -> None:
        """Straight to every logger with environment steps as the x axis, the convention of RL curves."""
        if self.trainer.is_global_zero:
            for logger in self.loggers:
                logger.log_metrics(metrics, step=self.env_steps)

    def on_train_epoch_start(self) -> None:
        self._stats["time"], self._stats["steps"] = time.perf_counter(), self.env_steps

    def _log_training(self) -> None:
        stats, now = self._stats, time.perf_counter()
        metrics = {"train/epsilon": self.epsilon()}
        if stats["time"] is not None and now > stats["time"]:
            metrics["train/steps_per_second"] = (self.env_steps - stats["steps"]) / (now - stats["time"])
        if stats["count"]:
            metrics["train/loss"] = float(stats["loss"] / stats["count"])
            metrics["train/q_mean"] = float(stats["q"] / stats["count"])
        if stats["episode_returns"]:
            metrics["train/episode_return"] = float(np.mean(stats["episode_returns"]))
            metrics["train/episode_length"] = float(np.mean(stats["episode_lengths"]))
        self._log_scalars(metrics)
        for name in ("train/loss", "train/episode_return", "train/steps_per_second"):
            if name in metrics:  # for the progress bar and metrics.json; the curves went to the loggers above
                self.log(name, metrics[name], logger=False, prog_bar=name != "train/steps_per_second")
        self._stats = self._fresh_stats()
        self._stats["time"], self._stats["steps"] = now, self.env_steps

    # ----- evaluation -------------------------------------------------------------------------------------

    @torch.no_grad()
    def play_episode(
        self, env: gym.Env, seed: int, epsilon: float = 0.0, render: bool = False
    ) -> tuple[float, int, list[np.ndarray]]:
        """One episode from `env.reset(seed=seed)`, greedy (or epsilon-greedy with a generator seeded by `seed`)."""
        generator = torch.Generator().manual_seed(seed)
        observation, _ = env.reset(seed=seed)
        total, length, frames = 0.0, 0, []
        while True:
            if render and len(frames) < self.gif_max_frames:
                frames.append(env.render())
            obs = torch.as_tensor(observation, device=self.device)[None]
            action = int(self.act(obs, epsilon, generator)[0]) if epsilon > 0 else int(self.net(obs).argmax(dim=1)[0])
            observation, reward, terminated, truncated, _ = env.step(action)
            total, length = total + float(reward), length + 1
            if terminated or truncated:
                return total, length, frames

    def validation_step(self, seed: int, batch_idx: int) -> None:
        total, length, _ = self.play_episode(self.trainer.datamodule.eval_env, int(seed), self.eval_epsilon)
        self._eval_results.append((total, length))

    def _summary(self, split: str) -> dict[str, float]:
        returns = np.array([r for r, _ in self._eval_results])
        lengths = np.array([n for _, n in self._eval_results])
        self._eval_results = []
        return {
            f"{split}/return": float(returns.mean()),
            f"{split}/return_std": float(returns.std()),
            f"{split}/length": float(lengths.mean()),
        }

    def on_validation_epoch_start(self) -> None:
        self._validation_started = time.perf_counter()

    def on_validation_epoch_end(self) -> None:
        summary = self._summary("val")
        if self._stats.get("time") is not None:  # the steps-per-second clock stops while evaluating
            self._stats["time"] += time.perf_counter() - self._validation_started
        if self.trainer.sanity_checking:  # the sanity check's untrained score is no "best"
            return
        self.val_return_best(summary["val/return"])
        summary["val/return_best"] = float(self.val_return_best.compute())
        summary["train/env_steps"] = float(self.env_steps)
        self._log_scalars(summary)
        for name, value in summary.items():
            self.log(name, value, logger=False, prog_bar=name in ("val/return", "val/return_best"))

    def test_step(self, seed: int, batch_idx: int) -> None:
        total, length, _ = self.play_episode(self.trainer.datamodule.eval_env, int(seed))
        self._eval_results.append((total, length))

    def on_test_epoch_end(self) -> None:
        for name, value in self._summary("test").items():
            self.log(name, value)

    def on_train_epoch_end(self) -> None:
        scheduler = self.lr_schedulers()
        if scheduler is not None and self._scheduler_interval == "epoch":
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(self.trainer.callback_metrics.get(self.monitor, 0.0))
            else:
                scheduler.step()

    def on_train_end(self) -> None:
        """A GIF of one greedy evaluation episode in the run folder, and in TensorBoard's Images tab."""
        if not self.gif or self.trainer.fast_dev_run or not self.trainer.is_global_zero:
            return
        path = Path(self.trainer.default_root_dir) / "episode.gif"
        total, length = self.write_gif(path, self.data.eval_seed)
        writer = figures.tensorboard_writer(self.loggers)
        if writer is not None:
            add_gif(writer, "val/episode", path, self.env_steps)
        print(f"evaluation episode (return {total:.1f}, {length} steps) written to {path}")

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
        self._exploration_steps = None
        dm = self.trainer.datamodule
        dm.env_steps_per_iteration = self.vector_steps * self.num_envs
        self.data.env_steps_per_iteration = dm.env_steps_per_iteration
        if self.buffer is None:
            dtype = torch.from_numpy(np.zeros(0, dtype=dm.observation_dtype)).dtype
            self.buffer = ReplayBuffer(self.buffer_size, dm.observation_shape, dtype, self.device)
        self.buffer.to(self.device)  # a second fit may run on another device
        pending = getattr(self, "_pending_buffer", None)
        if pending is not None:
            self.buffer.load_state_dict(pending)
            self._pending_buffer = None

    def on_fit_end(self) -> None:
        """Frees the GPU memory of the buffer with the rest of the module, which Lightning moves to the CPU."""
        if self.buffer is not None:
            self.buffer.to("cpu")

    def setup(self, stage: str) -> None:
        """The datamodule cuts epochs into iterations of this task's size before Lightning asks for batches."""
        if self._trainer is not None and self.trainer.datamodule is not None:
            self.trainer.datamodule.env_steps_per_iteration = self.vector_steps * self.num_envs
        self.data.env_steps_per_iteration = self.vector_steps * self.num_envs

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
    writer._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=encoded)]), step)
    writer.flush()
