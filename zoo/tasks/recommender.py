"""Recommenders: explicit rating prediction (RMSE, MAE) and implicit-feedback ranking (HR@k, NDCG@k).

Both tasks take the run's rating datamodule itself (`data`, handed over by zoo.run.build_model): the embedding
tables are sized by its numbers of users and items, which MovieLens only tells once read, and the id
maps, training statistics, titles and features come from it too (see zoo.data.recommender).
"""

from __future__ import annotations

import abc
import functools
import inspect
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import lightning as L
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MaxMetric, MeanAbsoluteError, MeanMetric, MeanSquaredError, MinMetric, SumMetric

from zoo.errors import UserError
from zoo.metrics.ranking import exclude_seen, hit_rate, ndcg, target_ranks
from zoo.optim import with_scheduler
from zoo.tasks import figures

if TYPE_CHECKING:
    from zoo.data.recommender import RatingsDataModule

# one (users x items) score matrix is cut into chunks of at most this many entries
SCORE_CHUNK = 1 << 22
LOSSES = ("bpr", "logistic")
SOLVERS = ("gradient", "als", "gibbs")
# the solvers that take the whole training split at the first batch of each epoch, with no optimizer
SWEEP_SOLVERS = ("als", "gibbs")


def build_net(net: nn.Module | Callable[..., nn.Module], data: RatingsDataModule) -> nn.Module:
    """Call the network factory with the sizes (and, where it takes them, the features) of the data."""
    if isinstance(net, nn.Module):
        return net

    def as_tensor(array: np.ndarray | None) -> torch.Tensor | None:
        return None if array is None else torch.from_numpy(array)

    offered = {
        "num_users": data.num_users,
        "num_items": data.num_items,
        "user_features": as_tensor(data.user_features),
        "item_features": as_tensor(data.item_features),
    }
    accepted = inspect.signature(net).parameters
    return net(**{k: v for k, v in offered.items() if k in accepted})


def make_optimizer(
    make: Callable[..., torch.optim.Optimizer] | None, module: nn.Module, sparse: bool
) -> torch.optim.Optimizer:
    """Biases in a group without weight decay; sparse gradients get an optimizer that takes them.

    With sparse embedding gradients, Adam and AdamW run as torch.optim.SparseAdam with the same lr,
    betas and eps (SparseAdam has no weight decay: the L2 terms of the loss regularize the rows a batch
    touches); SGD and Adagrad take sparse gradients as they are, with weight_decay 0.
    """
    if make is None:
        raise ValueError("no optimizer given: set the `optimizer` config group, e.g. optimizer=adam")
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    weights = [p for n, p in named if "bias" not in n]
    biases = [p for n, p in named if "bias" in n]
    groups: list[dict[str, Any]] = [{"params": weights, "name": "lr"}]
    if biases:
        groups.append({"params": biases, "name": "lr_biases", **({} if sparse else {"weight_decay": 0.0})})
    if not sparse:
        return make(params=groups)
    function = getattr(make, "func", make)
    settings = dict(getattr(make, "keywords", {}))
    if function in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SparseAdam):
        return torch.optim.SparseAdam(
            groups,
            lr=float(settings.get("lr", 1e-3)),
            betas=tuple(settings.get("betas", (0.9, 0.999))),
            eps=float(settings.get("eps", 1e-8)),
        )
    if function in (torch.optim.SGD, torch.optim.Adagrad):
        if settings.get("weight_decay"):
            raise UserError(
                "optimizer.weight_decay must be 0 with sparse gradients (model.net.sparse=true); "
                "the model's L2 terms regularize"
            )
        return make(params=groups)
    name = getattr(function, "__name__", str(function))
    raise UserError(
        f"model.net.sparse=true needs optimizer=adam, adamw, sgd or adagrad; {name} takes no sparse gradients"
    )


class _Recommender(L.LightningModule, abc.ABC):
    """What both tasks share: the id maps and side information of the data, optimizers, projector, top-k."""

    def __init__(
        self,
        data: RatingsDataModule,
        net: nn.Module | Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer] | None,
        scheduler: Callable[..., Any] | None,
        monitor: str,
    ) -> None:
        super().__init__()
        if not hasattr(data, "num_users"):
            raise UserError(
                f"model: a recommender needs rating data, data=ratings_synthetic or data=movielens, "
                f"not {type(data).__name__}"
            )
        self.net = build_net(net, data)
        self.make_optimizer, self.make_scheduler, self.monitor = optimizer, scheduler, monitor
        # the raw ids behind the dense indices: saved with the weights, so raw ids map the same way later
        self.register_buffer("user_ids", torch.from_numpy(data.user_ids))
        self.register_buffer("item_ids", torch.from_numpy(data.item_ids))
        self.register_buffer("seen_indptr", torch.from_numpy(data.seen_indptr), persistent=False)
        self.register_buffer("seen_items", torch.from_numpy(data.seen_items), persistent=False)
        self.item_titles: list[str] = list(data.item_titles)
        self.genre_names: list[str] = list(data.genre_names)
        self.item_genres = data.item_features
        self.data_name = data.name

    @abc.abstractmethod
    def scores_of_all_items(self, users: torch.Tensor) -> torch.Tensor:
        """Defined by each subclass."""

    def configure_optimizers(self) -> Any:
        optimizer = make_optimizer(self.make_optimizer, self.net, bool(getattr(self.net, "sparse", False)))
        return with_scheduler(self, optimizer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Remember where the loaded weights come from: testing loads the best checkpoint, not the last step."""
        self._loaded_from = (int(checkpoint.get("global_step", 0)), int(checkpoint.get("epoch", 0)))

    def write_projector(self) -> None:
        """Item embeddings to TensorBoard's projector, labelled by title (and genres where the data has them).

        The vectors are those the test metrics were computed with (the checkpoint trainer.test loaded), and the
        projector's step is that checkpoint's step, not the last training step.
        """
        writer = figures.tensorboard_writer(self.loggers)
        if writer is None or not self.trainer.is_global_zero:
            return
        with torch.no_grad():
            vectors = self.net.item_embeddings().detach().float().cpu()
        keep = np.flatnonzero(self.net.item_known.cpu().numpy())
        if len(keep) < 2:
            return
        clean = lambda text: " ".join(str(text).split()) or "-"  # noqa: E731 - tabs and newlines break the TSV
        titles = [clean(self.item_titles[k]) for k in keep]
        if self.item_genres is not None and self.genre_names:
            genres = [
                clean("|".join(g for g, flag in zip(self.genre_names, self.item_genres[k]) if flag)) for k in keep
            ]
            metadata: list[Any] = [list(row) for row in zip(titles, genres)]
            header: list[str] | None = ["title", "genres"]
        else:
            metadata, header = titles, None
        writer.add_embedding(
            vectors[torch.from_numpy(keep)],
            metadata=metadata,
            metadata_header=header,
            tag="items",
            global_step=getattr(self, "_loaded_from", (self.global_step, 0))[0],
        )

    def user_index(self, user_id: int) -> int:
        """The dense index of a raw user id, -1 for an id the data never had."""
        position = int(torch.searchsorted(self.user_ids, torch.tensor(user_id, device=self.user_ids.device)))
        found = position < len(self.user_ids) and int(self.user_ids[position]) == user_id
        return position if found else -1

    @torch.no_grad()
    def recommend(self, user_id: int, k: int = 10) -> list[tuple[int, str, float]]:
        """Top-k (raw item id, title, score) for a raw user id, leaving out the items the user already rated.

        A user id without training data is ranked by the model's terms that need no user row (biases, features).
        """
        was_training = self.training
        self.eval()
        index = self.user_index(user_id)
        scores = self.scores_of_all_items(torch.tensor([index], device=self.device))[0].clone()
        self.train(was_training)
        if index >= 0:
            scores[self.seen_items[self.seen_indptr[index] : self.seen_indptr[index + 1]]] = -math.inf
        top = torch.topk(scores, min(k, int(torch.isfinite(scores).sum())))
        return [
            (int(self.item_ids[i]), self.item_titles[i], float(s))
            for i, s in zip(top.indices.tolist(), top.values.tolist())
        ]

    eval_modes = ("recommend",)

    def run_eval_mode(self, mode: str, cfg: Any) -> None:
        """`evaluate.py mode=recommend user_id=... top_k=...` prints the user's top-k items."""
        if cfg.get("user_id") is None:
            raise UserError("user_id: required with mode=recommend, e.g. user_id=196")
        print(f"checkpoint: {cfg.ckpt_path}")
        print(self.format_recommendations(int(cfg.user_id), int(cfg.get("top_k", 10))))

    def format_recommendations(self, user_id: int, k: int = 10) -> str:
        """The table that `evaluate.py mode=recommend user_id=...` prints: rank, item id, title, score."""
        rows = self.recommend(user_id, k)
        index = self.user_index(user_id)
        lines = [f"top-{k} recommendations for user {user_id} ({self.data_name})"]
        if index < 0 or not bool(self.net.user_known[index]):
            lines[0] += ": a user without training data, ranked without a user vector"
        width = max((len(t) for _, t, _ in rows), default=5)
        lines += [
            f"{rank:>3}  {item:>7}  {title:<{width}}  {score:8.3f}" for rank, (item, title, score) in enumerate(rows, 1)
        ]
        return "\n".join(lines)


class RatingTask(_Recommender):
    """Explicit ratings: squared error plus L2 on the factors and biases of the rows each batch touches.

    Logs `train/loss` (the objective), `train/rmse`, `val/rmse`, `val/mae`, `val/rmse_best`, `test/rmse`,
    `test/mae`, and per split the number of ratings whose user or item had no training data
    (`*/unknown_users`, `*/unknown_items`: these get bias-only predictions). Evaluation clips
    predictions to the rating scale. A generated data set also logs its noise floor, `test/noise_floor`.

    solver=gradient trains with the optimizer on batches; solver=als (BiasedMF only) runs one sweep of alternating
    least squares per epoch on the whole training split, minimizing the same objective in closed form: no optimizer,
    no learning rate, and no per-batch overhead (use a data.batch_size as large as the split: one batch an epoch).
    `cg_steps` > 0 replaces each exact solve by that many warm-started conjugate-gradient steps (cheaper at high rank).
    `count_exponent` a scales a user's or item's L2 with its rating count to the power a (1: the per-rating L2 above;
    below 1, entities with many ratings are shrunk less than in proportion), ALS only.

    solver=gibbs is Bayesian probabilistic MF (Salakhutdinov & Mnih, 2008), BiasedMF only. The chain, a BiasedMF
    of model.net.rank (`chain`), starts from the MAP solution the paper starts from: `map_sweeps` epochs of ALS
    with the factor_l2, bias_l2 and count_exponent above. Each further epoch draws the priors' hyperparameters and
    every row from their conditionals (zoo.nn.recommender.gibbs_sweep, ratings with precision `noise_precision`),
    up to `samples` draws. The net predicts with the average of the drawn samples' predictions, which is itself a
    BiasedMF: the samples' factors side by side, each scaled by 1/sqrt(kept), and the biases averaged. So the net is
    built with rank model.net.rank x samples, and everything that reads a BiasedMF (evaluation, recommendations,
    the projector) reads the posterior mean. The chain and its seed are in the checkpoint, and each epoch's draws
    depend on the seed and the epoch alone: a resumed run draws what the uninterrupted one did. Logs `train/loss`
    and `train/rmse`: the current sample's mean squared error and its root.
    """

    def __init__(
        self,
        data: RatingsDataModule,
        net: nn.Module | Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/rmse",
        factor_l2: float = 0.02,
        bias_l2: float = 0.02,
        clip_predictions: bool = True,
        solver: str = "gradient",
        cg_steps: int = 0,
        count_exponent: float = 1.0,
        noise_precision: float = 2.0,
        map_sweeps: int = 5,
        samples: int = 30,
    ) -> None:
        chain_net = net
        if solver == "gibbs":
            net = self._posterior_mean_net(net, samples)
        super().__init__(data, net, optimizer, scheduler, monitor)
        if factor_l2 < 0 or bias_l2 < 0:
            raise ValueError(f"model.factor_l2 and model.bias_l2 must be >= 0, got {factor_l2}, {bias_l2}")
        if data.protocol != "ratings":
            raise UserError("model: this explicit-rating model needs data.protocol=ratings")
        if solver not in SOLVERS:
            raise ValueError(f"model.solver: unknown '{solver}'; allowed: {', '.join(SOLVERS)}")
        if solver in SWEEP_SOLVERS and (not hasattr(self.net, "user_bias") or hasattr(self.net, "set_implicit")):
            raise UserError(
                f"model.solver={solver} solves BiasedMF in closed form; {type(self.net).__name__} needs gradient"
            )
        if solver in SWEEP_SOLVERS and (factor_l2 <= 0 or bias_l2 <= 0):
            raise ValueError(
                f"model.solver={solver} needs model.factor_l2 > 0 and model.bias_l2 > 0 (the ALS normal equations)"
            )
        self.factor_l2, self.bias_l2, self.clip_predictions = factor_l2, bias_l2, clip_predictions
        if cg_steps < 0:
            raise ValueError(f"model.cg_steps must be >= 0, got {cg_steps}")
        if count_exponent != 1.0 and solver not in SWEEP_SOLVERS:
            raise UserError("model.count_exponent applies to model.solver=als or gibbs; gradient training uses 1")
        self.solver, self.cg_steps, self.count_exponent = solver, cg_steps, count_exponent
        if solver == "gibbs":
            if noise_precision <= 0 or map_sweeps < 0:
                raise ValueError(
                    f"model.noise_precision must be > 0 and model.map_sweeps >= 0, got {noise_precision}, {map_sweeps}"
                )
            self.noise_precision, self.map_sweeps, self.samples = float(noise_precision), int(map_sweeps), samples
            # the chain's current sample (ALS sweeps find its MAP start) and the seed of its draws
            self.chain = build_net(chain_net, data).requires_grad_(False)
            self.register_buffer("chain_seed", torch.randint(0, 2**31 - 1, ()))
            self.register_buffer("chain_kept", torch.zeros((), dtype=torch.long))
        if solver in SWEEP_SOLVERS:
            # every sweep solves against all training ratings, whatever the batch: they live on the module's device
            self.automatic_optimization = False
            for name, tensor in zip(("als_users", "als_items", "als_ratings"), data.splits["train"]):
                self.register_buffer(name, tensor.clone(), persistent=False)
            self._als_groups: tuple[Any, Any] | None = None
        for module in (self.net, self.chain) if solver == "gibbs" else (self.net,):
            module.set_statistics(
                data.global_mean,
                torch.from_numpy(data.item_mean),
                torch.from_numpy(data.user_known),
                torch.from_numpy(data.item_known),
            )
        if hasattr(self.net, "set_implicit"):  # SVD++: which items each user rated in training
            self.net.set_implicit(*data.splits["train"][:2])
        if hasattr(self.net, "set_ratings"):  # AutoRec: the training ratings are its input
            self.net.set_ratings(*data.splits["train"])
        self.register_buffer("rating_scale", torch.tensor(data.scale, dtype=torch.float32))
        self.noise_std = data.noise_std
        self.train_loss, self.train_rmse = MeanMetric(), MeanSquaredError(squared=False)
        self.val_rmse, self.test_rmse = MeanSquaredError(squared=False), MeanSquaredError(squared=False)
        self.val_mae, self.test_mae = MeanAbsoluteError(), MeanAbsoluteError()
        self.unknown = nn.ModuleDict({f"{s}_{w}": SumMetric() for s in ("val", "test") for w in ("users", "items")})
        self.val_rmse_best = MinMetric()
        self.val_rmse_best.persistent(True)  # part of the checkpoint, so a resumed run keeps its best

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Ratings for evaluation: clipped to the scale of the data."""
        predictions = self.net(users, items)
        if self.clip_predictions:
            predictions = predictions.clamp(self.rating_scale[0], self.rating_scale[1])
        return predictions

    def scores_of_all_items(self, users: torch.Tensor) -> torch.Tensor:
        return self.net.predict_all(users)

    @staticmethod
    def _posterior_mean_net(net: nn.Module | Callable[..., nn.Module], samples: int) -> Callable[..., nn.Module]:
        """The BiasedMF factory at rank x samples: solver=gibbs stores its kept samples side by side."""
        keywords = getattr(net, "keywords", None)
        if isinstance(net, nn.Module) or keywords is None:
            raise UserError("model.solver=gibbs builds its net from model.net (a _partial_ BiasedMF config)")
        if samples < 1:
            raise ValueError(f"model.samples must be >= 1 for model.solver=gibbs, got {samples}")
        rank = int(keywords.get("rank", inspect.signature(net).parameters["rank"].default))
        return functools.partial(net, rank=rank * samples)

    def configure_optimizers(self) -> Any:
        if self.solver in SWEEP_SOLVERS:
            return None  # closed-form sweeps: no optimizer, no learning rate
        return super().configure_optimizers()

    def on_fit_start(self) -> None:
        max_epochs = self.trainer.max_epochs  # None or -1: no epoch limit, which a chain of fixed length cannot follow
        if self.solver == "gibbs" and (max_epochs is None or not 0 <= max_epochs <= self.map_sweeps + self.samples):
            raise UserError(
                f"trainer.max_epochs: solver=gibbs runs model.map_sweeps ({self.map_sweeps}) + model.samples "
                f"({self.samples}) sweeps, one an epoch; allowed: at most {self.map_sweeps + self.samples}, "
                f"got {max_epochs}"
            )

    def _count_sweep(self) -> None:
        """A sweep is these solvers' optimizer step: counted where Lightning counts manual steps, so that
        global_step moves, and with it the checkpoint callbacks (they save only once the step has moved) and
        trainer.max_steps. The count is part of the loop state a checkpoint stores."""
        if self._trainer is None:  # a sweep called by hand, outside a fit: nothing counts steps
            return
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        progress.increment_ready()
        progress.increment_completed()

    def _rating_groups(self) -> tuple[Any, Any]:
        """The training ratings by user and by item, built once on the module's device."""
        from zoo.nn.recommender import ALSGroups

        users, items = self.als_users, self.als_items
        if self._als_groups is None or self._als_groups[0].counts.device != users.device:
            num_users, num_items = len(self.user_ids), len(self.item_ids)
            self._als_groups = (
                ALSGroups(users, num_users, items, num_items),
                ALSGroups(items, num_items, users, num_users),
            )
        return self._als_groups

    def _gibbs_step(self, batch_idx: int) -> None:
        """One sweep per epoch on the chain: ALS in the first map_sweeps epochs (the MAP start), then a Gibbs
        sweep, whose sample joins the posterior mean in the net."""
        from zoo.nn.recommender import als_sweep, gibbs_sweep

        if batch_idx != 0:
            return
        users, items, ratings = self.als_users, self.als_items, self.als_ratings
        chain, groups = self.chain, self._rating_groups()
        if self.current_epoch < self.map_sweeps:
            l2 = (self.factor_l2, self.bias_l2, 0, self.count_exponent)  # exact solves: the sweep returns its error
            error = als_sweep(chain, users, items, ratings, groups, *l2)
            self._keep_sample(first=True)
        else:
            # the epoch's draws depend on the chain's seed and the epoch alone: a resumed run repeats them
            generator = torch.Generator(self.device).manual_seed(int(self.chain_seed) + self.current_epoch)
            error = gibbs_sweep(chain, users, items, ratings, groups, self.noise_precision, generator)
            self._keep_sample(first=bool(self.chain_kept == 0))
            self.chain_kept += 1
        self._count_sweep()
        self.log("train/loss", error, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/rmse", error.sqrt(), on_step=False, on_epoch=True)

    @torch.no_grad()
    def _keep_sample(self, first: bool) -> None:
        """Fold the chain into the net's average: kept samples side by side, each scaled by 1/sqrt(kept), so that
        the net's dot product is the mean of theirs, and the biases averaged. The MAP start stands alone (`first`)
        until the first draw replaces it."""
        rank = self.chain.user_factors.weight.shape[1]
        kept = 1 if first else int(self.chain_kept) + 1
        for factors, bias, chain_factors, chain_bias in (
            (self.net.user_factors, self.net.user_bias, self.chain.user_factors, self.chain.user_bias),
            (self.net.item_factors, self.net.item_bias, self.chain.item_factors, self.chain.item_bias),
        ):
            slices = factors.weight.view(len(factors.weight), self.samples, rank)
            if first:
                slices.zero_()
                bias.weight.zero_()
            slices[:, : kept - 1] *= math.sqrt((kept - 1) / kept)
            slices[:, kept - 1] = chain_factors.weight / math.sqrt(kept)
            bias.weight += (chain_bias.weight - bias.weight) / kept

    def _als_step(self, batch_idx: int) -> torch.Tensor | None:
        """One ALS sweep per epoch (at its first batch) over the whole training split; the objective after it."""
        from zoo.nn.recommender import als_sweep

        if batch_idx != 0:
            return None
        users, items, ratings = self.als_users, self.als_items, self.als_ratings
        self._rating_groups()
        als_sweep(
            self.net,
            users,
            items,
            ratings,
            self._als_groups,
            self.factor_l2,
            self.bias_l2,
            self.cg_steps,
            self.count_exponent,
        )
        self._count_sweep()
        predictions, loss = self._als_objective()
        self.train_loss.update(loss)
        self.train_rmse.update(predictions, self.als_ratings)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/rmse", self.train_rmse, on_step=False, on_epoch=True)
        return None

    @torch.no_grad()
    def _als_objective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training predictions and the objective the sweeps minimize (per rating), without gathering a row per
        rating: the dot products come from a sampled product at the rated cells, the L2 terms from the counts."""
        net, (by_user, by_item) = self.net, self._als_groups
        users = torch.cat([net.user_factors.weight, net.user_bias.weight, torch.ones_like(net.user_bias.weight)], 1)
        items = torch.cat([net.item_factors.weight, torch.ones_like(net.item_bias.weight), net.item_bias.weight], 1)
        pattern = by_user.matrix(torch.ones_like(self.als_ratings))
        if len(self.als_ratings) > pattern.shape[0] * pattern.shape[1]:  # see conjugate_gradient_solve
            scores = (users @ items.T)[by_user.entity, by_item.entity]
        else:
            scores = torch.empty_like(self.als_ratings)
            scores[by_user.order] = torch.sparse.sampled_addmm(pattern, users, items.T, beta=0.0).values()
        predictions = net._offset(self.als_items, torch.ones_like(self.als_items, dtype=torch.bool)) + scores
        # each row's L2 weight: its rating count to count_exponent (1: the per-rating L2 of gradient training)
        user_counts = by_user.counts.to(scores.dtype).pow(self.count_exponent)
        item_counts = by_item.counts.to(scores.dtype).pow(self.count_exponent)
        factors = user_counts @ net.user_factors.weight.square().sum(
            1
        ) + item_counts @ net.item_factors.weight.square().sum(1)
        biases = user_counts @ net.user_bias.weight[:, 0].square() + item_counts @ net.item_bias.weight[:, 0].square()
        count = len(self.als_ratings)
        loss = F.mse_loss(predictions, self.als_ratings) + (self.factor_l2 * factors + self.bias_l2 * biases) / count
        return predictions, loss

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor | None:
        if self.solver in SWEEP_SOLVERS:
            # closed-form solves and Cholesky factors in full precision, whatever trainer.precision autocasts
            with torch.autocast(self.device.type, enabled=False):
                return self._als_step(batch_idx) if self.solver == "als" else self._gibbs_step(batch_idx)
        users, items, ratings = batch
        predictions = self.net(users, items)
        factors, biases = self.net.penalty(users, items)
        loss = F.mse_loss(predictions, ratings) + self.factor_l2 * factors.mean() + self.bias_l2 * biases.mean()
        self.train_loss.update(loss.detach())
        self.train_rmse.update(predictions.detach(), ratings)
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/rmse", self.train_rmse, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, ...], split: str) -> None:
        users, items, ratings = batch
        predictions = self(users, items)
        rmse, mae = (self.val_rmse, self.val_mae) if split == "val" else (self.test_rmse, self.test_mae)
        rmse.update(predictions, ratings)
        mae.update(predictions, ratings)
        user_ok, item_ok = self.net.known(users, items)
        self.unknown[f"{split}_users"].update((~user_ok).sum())
        self.unknown[f"{split}_items"].update((~item_ok).sum())
        self.log(f"{split}/rmse", rmse, on_epoch=True, prog_bar=split == "val")
        self.log(f"{split}/mae", mae, on_epoch=True)
        self.log(f"{split}/unknown_users", self.unknown[f"{split}_users"], on_epoch=True)
        self.log(f"{split}/unknown_items", self.unknown[f"{split}_items"], on_epoch=True)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # the sanity check's untrained score is no "best"
            return
        self.val_rmse_best(self.val_rmse.compute())
        self.log("val/rmse_best", self.val_rmse_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        if self.noise_std is not None:
            self.log("test/noise_floor", float(self.noise_std))
        self.write_projector()


class RankingTask(_Recommender):
    """Implicit feedback: each training interaction against `num_negatives` sampled items the user has not had.

    loss=bpr: -log sigmoid(s_pos - s_neg) (Rendle et al., 2009); loss=logistic: binary cross-entropy with
    the positive as 1 and the negatives as 0. Negatives are uniform over items, redrawn where they hit a
    training interaction. Evaluation is leave-one-out: the held-out item's rank among all items the user
    has not rated (`val/hr@10`, `val/ndcg@10`, `test/...`), and among the data's fixed sampled negatives
    (`*/hr@10_sampled100`, `*/ndcg@10_sampled100`, the protocol of He et al., 2017). The popularity baseline
    (items ranked by their number of training interactions, same protocol) is logged beside the model as
    `*/hr@10_popularity` and `*/ndcg@10_popularity` (and `*/hr@10_sampled100_popularity`, ... on the sampled
    candidates): a model that does not beat it clearly has learned nothing personal. Also logs
    `val/ndcg@10_best` and `*/unknown_items`: held-out items without training data.
    """

    def __init__(
        self,
        data: RatingsDataModule,
        net: nn.Module | Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/ndcg@10",
        loss: str = "bpr",
        num_negatives: int = 4,
        l2: float = 1e-4,
        k: int = 10,
    ) -> None:
        super().__init__(data, net, optimizer, scheduler, monitor)
        if loss not in LOSSES:
            raise ValueError(f"model.loss: unknown '{loss}'; allowed: {', '.join(LOSSES)}")
        if num_negatives < 1 or k < 1 or l2 < 0:
            raise ValueError(f"model.num_negatives and model.k must be >= 1 and model.l2 >= 0, got {num_negatives}")
        if data.protocol != "leave_one_out":
            raise UserError("model: this ranking model needs data.protocol=leave_one_out")
        self.loss_name, self.num_negatives, self.l2, self.k = loss, num_negatives, l2, k
        self.net.set_known(torch.from_numpy(data.user_known), torch.from_numpy(data.item_known))
        train_users, train_items = data.splits["train"]
        keys = torch.unique(train_users * data.num_items + train_items)
        self.register_buffer("train_keys", keys, persistent=False)
        popularity = torch.bincount(train_items, minlength=data.num_items).float()
        self.register_buffer("popularity", popularity, persistent=False)
        self.sampled = f"sampled{data.sampled_negatives}"
        self.train_loss = MeanMetric()
        names = [f"hr@{k}", f"ndcg@{k}", f"hr@{k}_{self.sampled}", f"ndcg@{k}_{self.sampled}"]
        names += [f"hr@{k}_popularity", f"ndcg@{k}_popularity"]
        names += [f"hr@{k}_{self.sampled}_popularity", f"ndcg@{k}_{self.sampled}_popularity"]
        self.names = names
        self.scores = nn.ModuleDict({f"{s}_{n}": MeanMetric() for s in ("val", "test") for n in range(len(names))})
        self.unknown = nn.ModuleDict({s: SumMetric() for s in ("val", "test")})
        self.val_ndcg_best = MaxMetric()
        self.val_ndcg_best.persistent(True)

    def scores_of_all_items(self, users: torch.Tensor) -> torch.Tensor:
        return self.net.score_all(users)

    def _negatives(self, users: torch.Tensor) -> torch.Tensor:
        num_items = len(self.item_ids)
        negatives = torch.randint(0, num_items, (len(users), self.num_negatives), device=users.device)
        for _ in range(3):
            keys = users[:, None] * num_items + negatives
            found = self.train_keys[torch.searchsorted(self.train_keys, keys).clamp(max=len(self.train_keys) - 1)]
            hit = found == keys
            if not hit.any():
                break
            negatives = torch.where(hit, torch.randint_like(negatives, num_items), negatives)
        return negatives

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        users, items = batch[0], batch[1]
        negatives = self._negatives(users)
        positive = self.net(users, items)
        negative = self.net(users, negatives)
        if self.loss_name == "bpr":
            data_loss = -F.logsigmoid(positive[:, None] - negative).mean()
        else:
            data_loss = (F.softplus(-positive).sum() + F.softplus(negative).sum()) / (negative.numel() + len(users))
        candidates = torch.cat([items[:, None], negatives], dim=1)
        loss = data_loss + self.l2 * self.net.penalty(users, candidates).mean()
        self.train_loss.update(loss.detach())
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, ...], split: str) -> None:
        users, targets, negatives = batch
        chunk = max(1, SCORE_CHUNK // max(1, len(self.item_ids)))
        for start in range(0, len(users), chunk):
            part = slice(start, start + chunk)
            candidates = torch.cat([targets[part, None], negatives[part]], dim=1)
            # one pass of the net serves both protocols: the sampled candidates' scores are columns of the
            # full ranking's (a sequential net encodes each user's history once, not twice)
            every = self.net.score_all(users[part])
            sampled_ranks = target_ranks(every.gather(1, candidates), torch.zeros_like(targets[part]))
            scores = exclude_seen(every, users[part], targets[part], self.seen_indptr, self.seen_items)
            ranks = target_ranks(scores, targets[part])
            values = (hit_rate(ranks, self.k), ndcg(ranks, self.k))
            values += (hit_rate(sampled_ranks, self.k), ndcg(sampled_ranks, self.k))
            popular = self.popularity.expand(len(users[part]), -1)
            popular_ranks = target_ranks(
                exclude_seen(popular, users[part], targets[part], self.seen_indptr, self.seen_items), targets[part]
            )
            values += (hit_rate(popular_ranks, self.k), ndcg(popular_ranks, self.k))
            popular_sampled = target_ranks(self.popularity[candidates], torch.zeros_like(targets[part]))
            values += (hit_rate(popular_sampled, self.k), ndcg(popular_sampled, self.k))
            for n, value in enumerate(values):
                self.scores[f"{split}_{n}"].update(value)
        item_ok = self.net.item_known[targets.clamp(0, len(self.item_ids) - 1)]
        self.unknown[split].update((~item_ok).sum())
        for n, name in enumerate(self.names):
            self.log(f"{split}/{name}", self.scores[f"{split}_{n}"], on_epoch=True, prog_bar=n == 1 and split == "val")
        self.log(f"{split}/unknown_items", self.unknown[split], on_epoch=True)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_ndcg_best(self.scores["val_1"].compute())
        self.log(f"val/ndcg@{self.k}_best", self.val_ndcg_best.compute(), prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.write_projector()


def _in_time_order(*parts: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Interactions of consecutive periods (each sorted by user, then time) merged, sorted by user, then time."""
    users = torch.cat([p[0].cpu() for p in parts])
    items = torch.cat([p[1].cpu() for p in parts])
    order = torch.from_numpy(np.argsort(users.numpy(), kind="stable"))  # stable: earlier periods stay first
    return users[order], items[order]


class SequenceTask(RankingTask):
    """Next-item training of a sequential recommender (SASRec, Kang & McAuley, 2018), ranked like RankingTask.

    A batch is `data.batch_size` users (data.train_unit=user). At every position of a user's training history
    the net scores the item that comes next against one sampled item the user did not have in training; the loss
    is the logistic loss of both, averaged over the real (unpadded) positions. The net ranks from its `history`:
    the training items while training and validating; for the test, the training items and the validation item
    (the test item is what follows everything before it, the paper's protocol); for `mode=recommend`, every
    interaction of the data.
    """

    def __init__(
        self,
        data: RatingsDataModule,
        net: nn.Module | Callable[..., nn.Module],
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        monitor: str = "val/ndcg@10",
        k: int = 10,
    ) -> None:
        super().__init__(data, net, optimizer, scheduler, monitor, loss="logistic", num_negatives=1, l2=0.0, k=k)
        if getattr(data, "train_unit", None) != "user":
            raise UserError(
                "data.train_unit: a sequential model reads whole histories; allowed: user (model=sasrec sets it)"
            )
        if not hasattr(self.net, "set_history"):
            raise UserError("model.net: SequenceTask needs a sequential net, e.g. zoo.nn.sasrec.SASRec")
        from zoo.nn.sasrec import left_padded

        train = tuple(data.splits["train"])
        val, test = tuple(data.splits["val"][:2]), tuple(data.splits["test"][:2])
        self.histories = {"train": train, "test": _in_time_order(train, val), "all": _in_time_order(train, val, test)}
        pad = data.num_items
        # one more than the net reads: the inputs are positions [:-1], their next items [1:]
        sequences = left_padded(*train, data.num_users, self.net.max_length + 1, pad)
        self.register_buffer("train_sequences", sequences, persistent=False)
        self._history_in_use = ""
        self._use_history("train")

    def _use_history(self, name: str) -> None:
        """Rebuilt only when it changes: every validation reads the training history the last one set."""
        if name != self._history_in_use:
            self.net.set_history(*self.histories[name])
            self._history_in_use = name

    def on_validation_start(self) -> None:
        self._use_history("train")

    def on_test_start(self) -> None:
        self._use_history("test")

    def recommend(self, user_id: int, k: int = 10) -> list[tuple[int, str, float]]:
        self._use_history("all")
        return super().recommend(user_id, k)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        (users,) = batch
        sequences = self.train_sequences[users]
        inputs, targets = sequences[:, :-1], sequences[:, 1:]
        real = targets != self.net.num_items
        negatives = self._negatives(users.repeat_interleave(targets.shape[1])).view_as(targets)
        positive, negative = self.net.next_item_scores(inputs, targets, negatives)
        loss = (F.softplus(-positive[real]).sum() + F.softplus(negative[real]).sum()) / real.sum().clamp(min=1)
        self.train_loss.update(loss.detach())
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        return loss
