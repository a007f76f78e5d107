"""DQN through the zoo over seeds, and its environment steps per second beside a plain single-file loop.

Why: an RL result moves a lot with the seed, so a recipe is judged by mean ± std over seeds; and Lightning's loop
must not cost the DQN much speed, so the same network, settings, buffer and environment run in a plain PyTorch
loop (CleanRL-style) in the same process, on the same thread count, and the ratio is printed.

    python benchmarks/dqn.py                                        # dqn_cartpole, seeds 1,2,3, then the speed pair
    python benchmarks/dqn.py --experiment dqn_lunarlander --seeds 1,2,3
    python benchmarks/dqn.py --seeds 1 --max-epochs 2 --speed-steps 5000   # a quick check that everything runs
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import gymnasium as gym
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, open_dict
from torch.nn import functional as F

from zoo.nn.qnet import QNetwork
from zoo.run import train

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
QUIET = [
    "extras.print_config=false",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
# the targets of this family: CartPole within 100k steps, LunarLander solved (200) within 500k
TARGETS = {"dqn_cartpole": 475.0, "dqn_lunarlander": 200.0}


class TrainingClock(Callback):
    """Wall time of the training epochs less the evaluation episodes, and the environment steps taken in it."""

    def __init__(self) -> None:
        self.seconds, self.steps = 0.0, 0

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        self._start, self._steps, self._validating = time.perf_counter(), module.env_steps, 0.0

    def on_validation_start(self, trainer: Any, module: Any) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if hasattr(self, "_start"):
            self._validating += time.perf_counter() - self._validation_start

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        self.seconds += time.perf_counter() - self._start - self._validating
        self.steps += module.env_steps - self._steps


CLOCK = TrainingClock()


def compose_run(experiment: str, seed: int, output_dir: Path, extra: list[str]) -> DictConfig:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", [*QUIET, f"experiment={experiment}", f"seed={seed}", "logger=none", *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.callbacks.clock = {"_target_": "__main__.clock"}
    return cfg


def clock() -> TrainingClock:
    return CLOCK


def run_zoo(experiment: str, seed: int, output_dir: Path, extra: list[str]) -> dict[str, float]:
    CLOCK.seconds, CLOCK.steps = 0.0, 0
    cfg = compose_run(experiment, seed, output_dir, extra)
    started = time.perf_counter()
    train(cfg)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - started
    metrics["steps_per_s"] = CLOCK.steps / max(CLOCK.seconds, 1e-9)
    return metrics


def plain_dqn(cfg: DictConfig, total_steps: int) -> float:
    """A single-file DQN loop with the config's network and settings; returns environment steps per second."""
    m, env_id = cfg.model, cfg.data.env_id
    torch.manual_seed(cfg.seed)
    env = gym.make(env_id)
    num_actions, shape = env.action_space.n, env.observation_space.shape
    q = QNetwork(shape, num_actions, list(m.net.hidden_sizes), dueling=m.net.dueling)
    target = QNetwork(shape, num_actions, list(m.net.hidden_sizes), dueling=m.net.dueling)
    target.load_state_dict(q.state_dict())
    optimizer = torch.optim.Adam(q.parameters(), lr=cfg.optimizer.lr)
    capacity = m.buffer_size
    obs_buf, next_buf = torch.zeros(capacity, *shape), torch.zeros(capacity, *shape)
    act_buf, rew_buf, disc_buf = torch.zeros(capacity, dtype=torch.long), torch.zeros(capacity), torch.zeros(capacity)
    size = position = 0
    generator = torch.Generator().manual_seed(cfg.seed)
    decay = m.exploration_fraction * total_steps
    obs, _ = env.reset(seed=cfg.seed)
    pending: collections.deque[tuple[Any, int, float]] = collections.deque()
    started = time.perf_counter()
    for step in range(1, total_steps + 1):
        epsilon = m.epsilon_start + (m.epsilon_end - m.epsilon_start) * min(1.0, step / decay)
        if torch.rand(1, generator=generator).item() < epsilon:
            action = int(torch.randint(num_actions, (1,), generator=generator))
        else:
            with torch.no_grad():
                action = int(q(torch.as_tensor(obs)[None]).argmax(dim=1))
        next_obs, reward, terminated, truncated, _ = env.step(action)
        pending.append((obs, action, float(reward)))
        ended = terminated or truncated
        # n-step returns: the oldest pending step is stored once n steps follow it, or when the episode ends
        while pending and (len(pending) == m.n_step or ended):
            first_obs, first_action, _ = pending[0]
            obs_buf[position], next_buf[position] = torch.as_tensor(first_obs), torch.as_tensor(next_obs)
            act_buf[position] = first_action
            rew_buf[position] = sum(m.gamma**k * r for k, (_, _, r) in enumerate(pending))
            disc_buf[position] = 0.0 if terminated else m.gamma ** len(pending)
            position, size = (position + 1) % capacity, min(size + 1, capacity)
            pending.popleft()
        obs = next_obs
        if terminated or truncated:
            obs, _ = env.reset()
        if step >= m.learning_starts and step % m.train_frequency == 0:
            for _ in range(m.gradient_steps):
                index = torch.randint(size, (m.batch_size,), generator=generator)
                with torch.no_grad():
                    if m.double:
                        best = q(next_buf[index]).argmax(dim=1, keepdim=True)
                        next_values = target(next_buf[index]).gather(1, best).squeeze(1)
                    else:
                        next_values = target(next_buf[index]).max(dim=1).values
                    targets = rew_buf[index] + disc_buf[index] * next_values
                values = q(obs_buf[index]).gather(1, act_buf[index, None]).squeeze(1)
                loss = F.smooth_l1_loss(values, targets) if m.loss == "huber" else F.mse_loss(values, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if m.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(q.parameters(), m.max_grad_norm)
                optimizer.step()
            if step % m.target_update_interval < m.train_frequency:
                with torch.no_grad():
                    for t, p in zip(target.parameters(), q.parameters()):
                        t.lerp_(p, m.tau)
    seconds = time.perf_counter() - started
    env.close()
    return total_steps / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="dqn_cartpole")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--max-epochs", type=int, default=None, help="shorter runs (default: the experiment's)")
    parser.add_argument("--speed-steps", type=int, default=20_000, help="steps of each side of the speed pair")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="dqn-bench-"))
    extra = [f"trainer.max_epochs={args.max_epochs}"] if args.max_epochs else []

    print(f"{args.experiment}: seeds {args.seeds}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f}")
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        metrics = run_zoo(args.experiment, seed, root / f"seed_{seed}", extra)
        rows.append(metrics)
        print(
            f"seed {seed}: test/return {metrics['test/return']:7.1f} ± {metrics['test/return_std']:5.1f} "
            f"(20 episodes, best checkpoint)  last val/return {metrics['val/return']:7.1f}  "
            f"best val/return {metrics['val/return_best']:7.1f}  env steps {int(metrics['train/env_steps'])}  "
            f"{metrics['steps_per_s']:6.0f} steps/s  {metrics['wall_s']:5.0f} s",
            flush=True,
        )

    def spread(name: str) -> str:
        values = [r[name] for r in rows]
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return f"{statistics.mean(values):.1f} ± {std:.1f}"

    target = TARGETS.get(args.experiment)
    reached = sum(r["test/return"] >= target for r in rows) if target else None
    print(
        f"\nmean ± std over {len(rows)} seeds: test/return {spread('test/return')}, last val/return "
        f"{spread('val/return')}, steps/s {spread('steps_per_s')}, wall {spread('wall_s')} s"
    )
    if target:
        print(f"seeds with test/return >= {target:g}: {reached} of {len(rows)}")

    if args.speed_steps:
        extra_speed = [
            f"data.steps_per_epoch={args.speed_steps}",
            "data.eval_episodes=1",
            "data.test_episodes=1",
            "trainer.max_epochs=1",
            "model.gif=false",
            "trainer.num_sanity_val_steps=0",
        ]
        cfg = compose_run(args.experiment, 1, root / "speed_zoo", extra_speed)
        plain = plain_dqn(cfg, args.speed_steps)
        zoo = run_zoo(args.experiment, 1, root / "speed_zoo_run", extra_speed)["steps_per_s"]
        print(
            f"\nspeed, {args.speed_steps} steps each: plain loop {plain:.0f} steps/s, zoo {zoo:.0f} steps/s, "
            f"ratio {zoo / plain:.2f} (load average {os.getloadavg()[0]:.2f})"
        )
    print(f"runs in {root}")


if __name__ == "__main__":
    main()
