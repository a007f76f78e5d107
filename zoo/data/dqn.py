"""Gymnasium environments as a LightningDataModule: the "dataset" of reinforcement learning is a count of steps.

Lightning needs batches to loop over; here a training batch is only the index of an iteration (the task steps
the environments itself and learns from its replay buffer), a validation or test batch is the seed of one
greedy evaluation episode. A run is `total_steps` environment steps; one epoch is `steps_per_epoch` of them,
followed by `eval_episodes` evaluation episodes on a separate environment instance, so checkpoints and early
stopping see `val/return`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import gymnasium as gym
import lightning as L
import numpy as np
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from zoo.errors import UserError

EXAMPLES = "CartPole-v1, LunarLander-v3"


def make_env(
    env_id: str, render_mode: str | None = None, max_episode_steps: int | None = None, **kwargs: Any
) -> gym.Env:
    """`gym.make` with the errors a user can cause turned into one line naming `data.env_id`."""
    if render_mode is not None:  # rendering to arrays needs no display or sound device
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
        os.environ.setdefault("SDL_AUDIODRIVER", "dummy")
    try:
        return gym.make(env_id, render_mode=render_mode, max_episode_steps=max_episode_steps, **kwargs)
    except gym.error.DependencyNotInstalled as error:
        first = str(error).splitlines()[0]
        raise UserError(
            f"data.env_id: '{env_id}' needs a missing package ({first}); pip install 'gymnasium[box2d]'"
        ) from error
    except gym.error.Error as error:
        raise UserError(
            f"data.env_id: unknown environment '{env_id}' ({str(error).splitlines()[0]}); "
            f"allowed: a registered gymnasium id, e.g. {EXAMPLES}"
        ) from error


def episode_seed(seed: int, episode: int) -> int:
    """The reset seed of training episode `episode`: explicit per episode, so an episode can be replayed on resume."""
    return int(np.random.SeedSequence([seed, episode]).generate_state(1)[0])


class EnvDataModule(L.LightningDataModule):
    """Makes the training environments (a `gymnasium.vector.SyncVectorEnv` of `num_envs` copies, autoreset
    off so that the task resets each finished episode itself with a known seed) and a separate evaluation one.

    The spaces are read once at construction, so the task can size its Q-network before any environment runs,
    and a continuous action space is refused here, where the user chose the environment.
    """

    def __init__(
        self,
        env_id: str,
        num_envs: int = 1,
        total_steps: int | None = None,
        steps_per_epoch: int = 5000,
        eval_episodes: int = 10,
        test_episodes: int = 20,
        seed: int = 0,
        eval_seed: int = 10_000,
        test_seed: int = 20_000,
        max_episode_steps: int | None = None,
        env_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("num_envs", num_envs), ("steps_per_epoch", steps_per_epoch)):
            if int(value) < 1:
                raise UserError(f"data.{key}: must be >= 1, got {value}")
        if total_steps is not None and int(total_steps) < 1:
            raise UserError(f"data.total_steps: must be >= 1 (environment steps), got {total_steps}")
        self.total_steps = None if total_steps is None else int(total_steps)
        for key, value in (("eval_episodes", eval_episodes), ("test_episodes", test_episodes)):
            if int(value) < 1:
                raise UserError(f"data.{key}: must be >= 1, got {value}")
        self.env_id, self.num_envs, self.steps_per_epoch = env_id, int(num_envs), int(steps_per_epoch)
        self.eval_episodes, self.test_episodes = int(eval_episodes), int(test_episodes)
        self.seed, self.eval_seed, self.test_seed = int(seed), int(eval_seed), int(test_seed)
        self.max_episode_steps = max_episode_steps
        self.env_kwargs = dict(env_kwargs or {})
        probe = self.make_env()
        try:
            action_space, observation_space = probe.action_space, probe.observation_space
        finally:
            probe.close()
        if not isinstance(action_space, gym.spaces.Discrete):
            raise UserError(
                f"data.env_id: '{env_id}' has a continuous or non-discrete action space ({action_space}); "
                f"DQN needs a Discrete one, e.g. {EXAMPLES}"
            )
        if not isinstance(observation_space, gym.spaces.Box):
            raise UserError(f"data.env_id: '{env_id}' has {observation_space} observations; allowed: Box observations")
        self.num_actions = int(action_space.n)
        self.observation_shape = tuple(int(d) for d in observation_space.shape)
        self.observation_dtype = np.dtype(observation_space.dtype)
        # the task sets how many environment steps one training batch (iteration) takes
        self.env_steps_per_iteration = self.num_envs
        self.train_envs: SyncVectorEnv | None = None
        self.eval_env: gym.Env | None = None

    def make_env(self, render_mode: str | None = None) -> gym.Env:
        return make_env(self.env_id, render_mode, self.max_episode_steps, **self.env_kwargs)

    def make_vector_env(self) -> SyncVectorEnv:
        return SyncVectorEnv(
            [self.make_env for _ in range(self.num_envs)], copy=True, autoreset_mode=AutoresetMode.DISABLED
        )

    @property
    def iterations_per_epoch(self) -> int:
        return math.ceil(self.steps_per_epoch / self.env_steps_per_iteration)

    def setup(self, stage: str | None = None) -> None:
        if self.eval_env is None:
            self.eval_env = self.make_env()
        if stage in (None, "fit") and self.train_envs is None:
            self.train_envs = self.make_vector_env()

    def teardown(self, stage: str | None = None) -> None:
        for env in (self.train_envs, self.eval_env):
            if env is not None:
                env.close()
        self.train_envs, self.eval_env = None, None

    def train_dataloader(self) -> range:
        return range(self.iterations_per_epoch)

    def val_dataloader(self) -> list[int]:
        return [self.eval_seed + k for k in range(self.eval_episodes)]

    def test_dataloader(self) -> list[int]:
        return [self.test_seed + k for k in range(self.test_episodes)]
