"""DQN through the zoo over seeds, and its environment steps per second beside a plain single-file loop.

Why: an RL result moves a lot with the seed, so a recipe is judged over seeds, by the greedy return of the policy a
run ends with (test/return, 20 held-out episodes); the best-by-validation checkpoint's score is printed beside it
(test/return_best_val), never instead; the validation returns of every epoch are printed too, as recipes are chosen on
them, never on test/return. And Lightning's loop must not cost the DQN much speed: a plain PyTorch DQN
loop written here (one file's worth, CleanRL-style) and the zoo run the same settings in this process, alternately,
on the same thread count; the ratio is printed for the learning-free phase (acting and storing only) and for the
whole run.

    python benchmarks/dqn.py                                           # dqn_cartpole, seeds 1..5, then the speed pair
    python benchmarks/dqn.py --seeds 1 --speed-steps 0                 # one seed, no speed pair
    python benchmarks/dqn.py --seeds "" --speed-steps 30000            # only the speed pair (dqn_cartpole_cleanrl)
    python benchmarks/dqn.py --experiment dqn_lunarlander --seeds 1,2,3
    python benchmarks/dqn.py --experiment dqn_cartpole --seeds 1 --extra model.net.dueling=true   # an ablation row
    python benchmarks/dqn.py --seeds "" --speed-experiment dqn_cartpole --speed-steps 20000 --repeats 3 \\
        --speed-ablation model.prioritized=true          # the zoo without and with prioritized replay, alternated

What an option costs in speed is measured the same way: `--speed-ablation` alternates zoo runs without and with the
given overrides (same seed, same thread count) in place of the plain loop, and prints the whole run's steps/s and
those of the learning phase (after model.learning_starts), where the gradient steps are.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import random
import statistics
import tempfile
import time
import warnings
from collections import deque
from pathlib import Path
from typing import Any

from common import environment
from omegaconf import DictConfig, open_dict

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
QUIET = [
    "extras.print_config=false",
    "callbacks.progress_bar=null",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]
# the targets of this family: CartPole within 100k steps, LunarLander solved (200) within 500k
TARGETS = {"dqn_cartpole": 475.0, "dqn_cartpole_cleanrl": 475.0, "dqn_lunarlander": 200.0}


class TrainingClock:
    """Wall time of the training epochs less the evaluation episodes, and the time at which learning starts.

    `clock()` builds it as a Lightning callback.
    """

    def __init__(self) -> None:
        self.reset(0)

    def reset(self, learning_starts: int) -> None:
        self.seconds, self.steps, self.learning_starts = 0.0, 0, learning_starts
        self.free_seconds, self.free_steps = math.nan, 0
        self._free = (math.nan, 0)  # time and steps at the end of the last iteration without a gradient step
        self.val_returns: list[float] = []  # each evaluation's val/return: how a recipe is chosen, never test/return

    def on_train_epoch_start(self, trainer: Any, module: Any) -> None:
        self._start, self._steps, self._validating = time.perf_counter(), module.env_steps, 0.0

    def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
        """The learning-free phase ends with the last iteration before the one whose round took the first gradient
        step: that iteration's time is mostly learning, which the plain loop's learning-free clock leaves out too."""
        if not math.isnan(self.free_seconds):
            return
        elapsed = self.seconds + time.perf_counter() - self._start - self._validating
        if module.updates == 0:
            self._free = (elapsed, self.steps + module.env_steps - self._steps)
        else:
            self.free_seconds, self.free_steps = self._free

    def on_validation_start(self, trainer: Any, module: Any) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: Any, module: Any) -> None:
        if hasattr(self, "_start"):
            self._validating += time.perf_counter() - self._validation_start
        if "val/return" in trainer.callback_metrics:
            self.val_returns.append(float(trainer.callback_metrics["val/return"]))

    def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
        self.seconds += time.perf_counter() - self._start - self._validating
        self.steps += module.env_steps - self._steps


@functools.cache
def clock() -> TrainingClock:
    """The one clock of this process, which every zoo run reports to (the `_target_` of `callbacks.clock`)."""
    from lightning.pytorch.callbacks import Callback

    return type("TrainingClock", (TrainingClock, Callback), {})()


def compose_run(experiment: str, seed: int, output_dir: Path, extra: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", [*QUIET, f"experiment={experiment}", f"seed={seed}", "logger=none", *extra])
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.callbacks.clock = {"_target_": "__main__.clock"}
    return cfg


def run_zoo(experiment: str, seed: int, output_dir: Path, extra: list[str]) -> dict[str, float]:
    from zoo.run import train

    cfg = compose_run(experiment, seed, output_dir, extra)
    timer = clock()
    timer.reset(int(cfg.model.learning_starts))
    started = time.perf_counter()
    train(cfg)
    metrics = json.loads((output_dir / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - started
    metrics["steps_per_s"] = timer.steps / max(timer.seconds, 1e-9)
    metrics["free_steps_per_s"] = timer.free_steps / timer.free_seconds
    metrics["test_episodes"] = int(cfg.data.test_episodes)
    metrics["val_returns"] = list(timer.val_returns)
    return metrics


def plain_dqn(cfg: DictConfig, total_steps: int) -> tuple[float, float]:
    """A single-file DQN loop with the config's network and settings on one environment: double DQN, n-step returns,
    Huber loss, gradient clipping, soft or hard target updates and the linear learning-rate decay where the config
    asks for them (no prioritized replay).

    Returns environment steps per second before learning starts and over the whole run.
    """
    import gymnasium as gym
    import numpy as np
    import torch
    from torch.nn import functional as F

    from zoo.nn.dqn import QNetwork

    m = cfg.model
    if cfg.data.num_envs != 1 or m.prioritized:
        raise SystemExit("the plain loop runs one environment with uniform replay: set data.num_envs=1, no PER")
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    env = gym.make(cfg.data.env_id)
    num_actions, shape = int(env.action_space.n), env.observation_space.shape
    q = QNetwork(shape, num_actions, list(m.net.hidden_sizes), dueling=m.net.dueling)
    target = QNetwork(shape, num_actions, list(m.net.hidden_sizes), dueling=m.net.dueling)
    target.load_state_dict(q.state_dict())
    optimizer = torch.optim.Adam(q.parameters(), lr=cfg.optimizer.lr)
    capacity = m.buffer_size
    obs_buf, next_buf = torch.zeros(capacity, *shape), torch.zeros(capacity, *shape)
    act_buf, rew_buf, disc_buf = torch.zeros(capacity, dtype=torch.long), torch.zeros(capacity), torch.zeros(capacity)
    obs_np, next_np, act_np, rew_np, disc_np = (b.numpy() for b in (obs_buf, next_buf, act_buf, rew_buf, disc_buf))
    size = position = 0
    decay = m.exploration_fraction * total_steps
    pending: deque[tuple[np.ndarray, int, float]] = deque()  # the last n steps, for n-step returns
    obs, _ = env.reset(seed=cfg.seed)
    started = time.perf_counter()
    free_seconds = math.nan
    for step in range(total_steps):
        epsilon = m.epsilon_start + (m.epsilon_end - m.epsilon_start) * min(1.0, step / decay)
        if rng.random() < epsilon:
            action = rng.randrange(num_actions)
        else:
            with torch.inference_mode():
                action = int(q(torch.from_numpy(obs)[None]).argmax(dim=1))
        next_obs, reward, terminated, truncated, _ = env.step(action)
        pending.append((obs, action, float(reward)))
        # store the oldest step once it has n rewards after it, and every pending one at an episode's end
        while pending and (terminated or truncated or len(pending) == m.n_step):
            n_return = sum(m.gamma**k * r for k, (_, _, r) in enumerate(pending))
            first_obs, first_action, _ = pending.popleft()
            obs_np[position], next_np[position], act_np[position] = first_obs, next_obs, first_action
            rew_np[position], disc_np[position] = n_return, 0.0 if terminated else m.gamma ** (len(pending) + 1)
            position, size = (position + 1) % capacity, min(size + 1, capacity)
        obs = env.reset()[0] if terminated or truncated else next_obs
        done = step + 1
        if done == m.learning_starts:
            free_seconds = time.perf_counter() - started
        if done >= m.learning_starts and done % m.train_frequency == 0:
            for group in optimizer.param_groups:  # linear from lr at step 0 to lr * lr_end_factor at the last
                group["lr"] = cfg.optimizer.lr * (1.0 - (1.0 - m.lr_end_factor) * done / total_steps)
            for _ in range(m.gradient_steps):
                index = torch.randint(size, (m.batch_size,))
                next_observations = next_buf[index]
                with torch.no_grad():
                    if m.double:
                        best = q(next_observations).argmax(dim=1, keepdim=True)
                        next_values = target(next_observations).gather(1, best).squeeze(1)
                    else:
                        next_values = target(next_observations).max(dim=1).values
                    targets = rew_buf[index] + disc_buf[index] * next_values
                values = q(obs_buf[index]).gather(1, act_buf[index, None]).squeeze(1)
                loss = F.smooth_l1_loss(values, targets) if m.loss == "huber" else F.mse_loss(values, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if m.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(q.parameters(), m.max_grad_norm)
                optimizer.step()
            if done % m.target_update_interval < m.train_frequency:
                with torch.no_grad():
                    for t, p in zip(target.parameters(), q.parameters()):
                        t.lerp_(p, m.tau)
    seconds = time.perf_counter() - started
    env.close()
    return m.learning_starts / free_seconds, total_steps / seconds


def seed_rows(args: argparse.Namespace, root: Path) -> None:
    extra = list(args.extra)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = []
    for seed in seeds:
        metrics = run_zoo(args.experiment, seed, root / f"seed_{seed}", extra)
        rows.append(metrics)
        print(
            f"seed {seed}: test/return {metrics['test/return']:6.1f} ± {metrics['test/return_std']:5.1f} "
            f"(final policy, {metrics['test_episodes']} episodes)  "
            f"test/return_best_val {metrics.get('test/return_best_val', math.nan):6.1f}  "
            f"last val/return {metrics['val/return']:6.1f}  env steps {int(metrics['train/env_steps'])}  "
            f"{metrics['train/steps_per_second']:5.0f} steps/s  {metrics['wall_s']:4.0f} s\n"
            f"  val/return by epoch: {' '.join(f'{v:.0f}' for v in metrics['val_returns'])}",
            flush=True,
        )
    if not rows:
        return

    def spread(name: str) -> str:
        values = [r.get(name, math.nan) for r in rows]
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return f"{statistics.mean(values):.1f} ± {std:.1f}"

    print(
        f"mean ± std over {len(rows)} seeds: test/return {spread('test/return')}, test/return_best_val "
        f"{spread('test/return_best_val')}, steps/s {spread('train/steps_per_second')}, wall {spread('wall_s')} s"
    )
    worst = min(rows, key=lambda r: r["test/return"])
    print(f"worst seed: {seeds[rows.index(worst)]} (test/return {worst['test/return']:.1f}); val/return at the end "
          f"{spread('val/return')}")  # fmt: skip
    target = TARGETS.get(args.experiment)
    if target:
        reached = sum(r["test/return"] >= target for r in rows)
        print(f"seeds whose final policy reaches test/return >= {target:g}: {reached} of {len(rows)}")


def speed_overrides(steps: int, extra: list[str]) -> list[str]:
    """A run of exactly `steps` environment steps in one epoch, with the fewest evaluation episodes and no GIF."""
    return [
        f"data.total_steps={steps}",
        f"data.steps_per_epoch={steps}",
        "data.eval_episodes=1",
        "data.test_episodes=1",
        "model.gif=false",
        *extra,
    ]


def speed_pair(args: argparse.Namespace, root: Path) -> None:
    import torch

    experiment, steps = args.speed_experiment, args.speed_steps
    extra = speed_overrides(steps, args.extra)
    cfg = compose_run(experiment, 1, root / "speed_plain", extra)
    if steps <= cfg.model.learning_starts:
        raise SystemExit(f"--speed-steps must exceed model.learning_starts ({cfg.model.learning_starts})")
    print(f"\nspeed: {experiment}, {steps} env steps a run (learning from step {cfg.model.learning_starts}), "
          f"{torch.get_num_threads()} thread(s), runs alternate")  # fmt: skip
    print(f"{'run':>4}  {'side':>5}  {'learning-free steps/s':>21}  {'whole-run steps/s':>17}  load")
    plain, zoo = [], []
    for repeat in range(args.repeats):
        free, whole = plain_dqn(cfg, steps)
        plain.append((free, whole))
        print(f"{repeat + 1:>4}  {'plain':>5}  {free:21.0f}  {whole:17.0f}  {os.getloadavg()[0]:.2f}", flush=True)
        metrics = run_zoo(experiment, 1, root / f"speed_zoo_{repeat}", extra)
        zoo.append((metrics["free_steps_per_s"], metrics["steps_per_s"]))
        print(
            f"{repeat + 1:>4}  {'zoo':>5}  {zoo[-1][0]:21.0f}  {zoo[-1][1]:17.0f}  {os.getloadavg()[0]:.2f}", flush=True
        )
    p_free, p_whole = (statistics.median(v) for v in zip(*plain))
    z_free, z_whole = (statistics.median(v) for v in zip(*zoo))
    print(
        f"median: learning-free plain {p_free:.0f}, zoo {z_free:.0f}, ratio {z_free / p_free:.2f}; "
        f"whole run plain {p_whole:.0f}, zoo {z_whole:.0f}, ratio {z_whole / p_whole:.2f}"
    )


def speed_ablation(args: argparse.Namespace, root: Path) -> None:
    import torch

    experiment, steps, ablation = args.speed_experiment, args.speed_steps, list(args.speed_ablation)
    extra = speed_overrides(steps, args.extra)
    learning_starts = compose_run(experiment, 1, root / "ablation_config", extra).model.learning_starts
    if steps <= learning_starts:
        raise SystemExit(f"--speed-steps must exceed model.learning_starts ({learning_starts})")
    print(f"\nspeed: {experiment}, {steps} env steps a run (learning from step {learning_starts}), "
          f"{torch.get_num_threads()} thread(s), without and with {' '.join(ablation)}, runs alternate")  # fmt: skip
    print(f"{'run':>4}  {'side':>7}  {'whole-run steps/s':>17}  {'learning steps/s':>16}  load")
    figures: dict[str, list[tuple[float, float]]] = {"without": [], "with": []}
    for repeat in range(args.repeats):
        for side, overrides in (("without", extra), ("with", [*extra, *ablation])):
            metrics = run_zoo(experiment, 1, root / f"ablation_{side}_{repeat}", overrides)
            timer = clock()
            learning = (timer.steps - timer.free_steps) / max(timer.seconds - timer.free_seconds, 1e-9)
            figures[side].append((metrics["steps_per_s"], learning))
            print(f"{repeat + 1:>4}  {side:>7}  {metrics['steps_per_s']:17.0f}  {learning:16.0f}  "
                  f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    (w_whole, w_learn), (a_whole, a_learn) = (
        (statistics.median(v) for v in zip(*figures[side])) for side in ("without", "with")
    )
    print(
        f"median: whole run without {w_whole:.0f}, with {a_whole:.0f}, ratio {a_whole / w_whole:.2f}; "
        f"learning phase without {w_learn:.0f}, with {a_learn:.0f}, ratio {a_learn / w_learn:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="dqn_cartpole")
    parser.add_argument("--seeds", default="1,2,3,4,5")
    parser.add_argument(
        "--extra", nargs="*", default=[], help="config overrides for every run, e.g. model.dueling=true"
    )
    parser.add_argument("--speed-experiment", default="dqn_cartpole_cleanrl")
    parser.add_argument("--speed-steps", type=int, default=30_000, help="env steps of each run of the speed pair")
    parser.add_argument("--repeats", type=int, default=2, help="alternations of the speed pair (medians printed)")
    parser.add_argument(
        "--speed-ablation",
        nargs="*",
        default=[],
        help="overrides the speed pair compares the zoo without and with, e.g. model.prioritized=true",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output-dir", default=None)
    args = parser.parse_args()
    print(environment(), flush=True)
    # imported before the log levels and warning filters below, which must override what these set on import
    import gymnasium  # noqa: F401
    import lightning.pytorch  # noqa: F401
    import numpy as np
    import torch

    np.set_printoptions(precision=3)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    root = Path(args.output_dir or tempfile.mkdtemp(prefix="dqn-bench-"))
    print(f"{args.experiment}: seeds {args.seeds or 'none'}, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.2f}, extra {args.extra}")  # fmt: skip
    seed_rows(args, root)
    if args.speed_steps and args.speed_ablation:
        speed_ablation(args, root)
    elif args.speed_steps:
        speed_pair(args, root)
    print(f"runs in {root}")


if __name__ == "__main__":
    main()
