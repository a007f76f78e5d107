"""train(cfg) and evaluate(cfg): plain functions from a composed config to a finished run.

The command-line scripts are thin Hydra wrappers around these; tests call them directly.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from zoo.errors import UserError
from zoo.records import (
    flat_hparams,
    format_table,
    load_checkpoint,
    load_lightning_checkpoint,
    saved_run_config,
    write_json,
    write_metrics,
)

log = logging.getLogger(__name__)
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision


def train(cfg: DictConfig) -> float | None:
    """Fit, then test with the best checkpoint; with `cv.folds > 1`, once per fold.

    Returns `cfg.optimized_metric` (its mean over folds), the value sweeps and Optuna optimize.
    """
    resume_from = cfg.get("ckpt_path")
    if resume_from and not Path(str(resume_from)).is_file():  # before seconds of building data, model and trainer
        raise UserError(f"ckpt_path: no file at '{resume_from}'")
    output_dir = Path(cfg.paths.output_dir)
    _start(cfg, output_dir)
    folds = (cfg.get("cv") or {}).get("folds", 1)
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise UserError(f"cv.folds: expected an integer >= 2 for k-fold cross-validation, or 1 for none; got {folds!r}")
    if (cfg.get("cv") or {}).get("ensemble") is not None:
        from zoo.ensemble import check_cv_ensemble

        check_cv_ensemble(cfg, folds)
    metrics = cross_validate(cfg, output_dir, folds) if folds > 1 else fit_and_test(cfg, output_dir)
    _close_process_group()
    value = metrics.get(cfg.optimized_metric)
    if value is None and _in_a_sweep():  # a single run's return value goes nowhere; a sweep's ranks the trials
        logged = ", ".join(k for k in metrics if k.startswith("val/"))
        log.warning("optimized_metric '%s' was not logged; set it to one of: %s", cfg.optimized_metric, logged)
    return value


def _in_a_sweep() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except ValueError:  # no Hydra run: the Python API
        return False


def quiet_lightning_logging() -> None:
    """Each Lightning line once: the `lightning` package prints through a handler of its own and then passes the
    line on to the root logger, which Hydra already prints to the console and the run's log file."""
    import lightning  # noqa: F401 - importing it installs the handler

    root, package = logging.getLogger(), logging.getLogger("lightning")
    if root.handlers:
        for handler in list(package.handlers):
            package.removeHandler(handler)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _LightningConsole) for f in rank_zero.filters):
        rank_zero.addFilter(_LightningConsole())
    # Lightning's tree utilities call a torch API that newer torch releases deprecate: nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=DeprecationWarning)


class _LightningConsole(logging.Filter):
    """No advertisement, and "Time limit reached" once: while `min_epochs` holds a timed-out run in its first
    epoch, Lightning's timer says it again at every step."""

    def __init__(self) -> None:
        super().__init__()
        self.timed_out = False

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        repeated = self.timed_out and message.startswith("Time limit reached")
        self.timed_out = message.startswith("Time limit reached")
        return "Tip: For seamless cloud logging" not in message and not repeated


def _close_process_group() -> None:
    """Ends a DDP run in step on every rank.

    Left to interpreter exit, a rank that finishes first tears its gloo threads down while the
    others still write their results, and can abort (SIGABRT) and take the whole run with it.
    """
    import sys

    if "torch" not in sys.modules:  # gradient-boosted runs never import torch
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def fit_and_test(cfg: DictConfig, output_dir: Path, on_tested: Callable[..., None] | None = None) -> dict[str, float]:
    """Fit, then test the best checkpoint; `on_tested(model, datamodule, checkpoint)` then sees the tested weights
    (`checkpoint`: their file, None when the test took the final weights in memory)."""
    if is_classic(cfg):  # XGBoost and scikit-learn train outside Lightning, behind the same CLI
        from zoo.classic import run as classic_run

        return classic_run.fit_and_test(cfg, output_dir)

    import lightning as L
    import torch
    from hydra.utils import instantiate

    quiet_lightning_logging()
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.get("float32_matmul_precision", "highest"))
    datamodule = instantiate(cfg.data)
    model = build_model(cfg, datamodule)
    trainer = build_trainer(cfg, _fine_tuning(cfg, model))

    if cfg.get("tune"):  # a finder instead of training: its suggestion is the run's result
        from zoo import tuning

        return tuning.run(cfg, trainer, model, datamodule, output_dir)
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path:
        check_checkpoint(ckpt_path, model)
    metrics: dict[str, float] = {}
    if cfg.get("train", True):
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
        metrics.update(_floats(trainer.callback_metrics))
    if cfg.get("test", True):
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None and cfg.get("train", True) else ""
        if not best and not cfg.get("train", True):
            best = ckpt_path or ""
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        metrics.update(_floats(trainer.callback_metrics))
        if on_tested is not None:
            on_tested(model, datamodule, best or None)

    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_metrics(output_dir / "metrics.json", metrics)
        _log_hparams(trainer, cfg, metrics)
    return metrics


def cross_validate(cfg: DictConfig, output_dir: Path, folds: int) -> dict[str, float]:
    """k-fold CV: each fold trains a fresh model in its own sub-folder; reports mean and std of each metric.

    With `cv.ensemble`, the data first cut an outer test split (`cv.test_fraction` of the rows, the same for every
    fold) and the k-fold runs over the rest; each fold's tested model and the k models combined are scored on it.
    """
    cv = cfg.get("cv") or {}
    combine = cv.get("ensemble")
    results, held_out, checkpoints = [], [], []

    def keep_outputs(model: Any, datamodule: Any, checkpoint: str | None) -> None:
        from zoo.ensemble import holdout_outputs

        held_out.append(holdout_outputs(model, datamodule))
        checkpoints.append(checkpoint)

    for fold in range(folds):
        fold_cfg = cfg.copy()
        with open_dict(fold_cfg):
            fold_cfg.data.folds, fold_cfg.data.fold = folds, fold
            if combine is not None:
                fold_cfg.data.holdout_fraction = float(cv.test_fraction)
            fold_cfg.paths.output_dir = str(output_dir / f"fold_{fold}")
        Path(fold_cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(fold_cfg, Path(fold_cfg.paths.output_dir) / "config.yaml", resolve=True)
        log.info("cross-validation: fold %d of %d", fold + 1, folds)
        tested = keep_outputs if combine is not None else None
        results.append(fit_and_test(fold_cfg, Path(fold_cfg.paths.output_dir), on_tested=tested))

    summary: dict[str, float] = {}
    for name in sorted(set.intersection(*(set(r) for r in results))):
        values = [r[name] for r in results]
        mean = sum(values) / folds
        summary[name] = mean
        summary[f"{name}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (folds - 1))
    report = {
        "folds": folds,
        "per_fold": results,
        "mean": {k: v for k, v in summary.items() if not k.endswith("_std")},
        "std": {k[:-4]: v for k, v in summary.items() if k.endswith("_std")},
    }
    if combine is not None:
        from zoo.ensemble import outer_test_report, outer_test_summary

        report["outer_test"] = outer_test_report(cfg, held_out, checkpoints, str(combine))
        summary.update(outer_test_summary(report["outer_test"]))
    write_json(output_dir / "cv.json", report)
    _write_scalars(output_dir / "tensorboard" / "cv", {f"cv/{k}": v for k, v in summary.items()})
    print(f"\n{folds}-fold cross-validation (mean ± std over folds)")
    print(
        format_table(
            {k: f"{report['mean'][k]:.4f} ± {report['std'][k]:.4f}" for k in report["mean"] if k.startswith("test/")}
        )
    )
    if combine is not None:
        from zoo.ensemble import outer_test_table

        print(outer_test_table(report))
    return summary


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Rebuild the model and data from the config saved in the checkpoint's run folder and score it."""
    _check_eval_keys(cfg)
    if cfg.get("ensemble"):
        from zoo import ensemble

        return ensemble.evaluate(cfg)
    if not cfg.get("ckpt_path"):
        raise UserError("ckpt_path: missing: the checkpoint to score (ckpt_path=<run>/checkpoints/<file>.ckpt)")
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = Path(cfg.ckpt_path)
    run_cfg = saved_run_config(ckpt_path, trust=bool(cfg.get("trust_config", False)))
    if cfg.get("scorer_ckpt_path"):  # before any family branches off: a run without a scorer refuses the key
        _swap_scorer(run_cfg, str(cfg.scorer_ckpt_path), ckpt_path)
    if cfg.get("mode") == "predict":  # before the families branch off: XGBoost and scikit-learn runs predict too
        from zoo import predict

        return predict.predict(cfg, run_cfg, ckpt_path)
    if is_classic(run_cfg):
        from zoo.classic import run as classic_run

        return classic_run.evaluate(cfg, run_cfg)

    import lightning as L
    from hydra.utils import instantiate
    from lightning.pytorch.loggers import TensorBoardLogger

    quiet_lightning_logging()
    if cfg.get("batch_size"):
        run_cfg.data.eval_batch_size = cfg.batch_size
    datamodule = instantiate(run_cfg.data)
    model = build_model(run_cfg, datamodule)
    check_checkpoint(str(ckpt_path), model)
    mode = cfg.get("mode", "score")
    if cfg.get("render") and mode == "score":  # `render=true` asks for the family's render mode (DQN: a GIF)
        mode = "render"
    if mode == "export":  # any classifier or regressor, whatever its family
        from zoo import export

        model.load_state_dict(load_lightning_checkpoint(ckpt_path)["state_dict"])
        return export.export(model, datamodule, output_dir, str(cfg.get("format", "onnx")))
    if mode != "score":
        return _run_eval_mode(cfg, model, ckpt_path, mode)
    trainer = L.Trainer(
        accelerator=cfg.get("accelerator") or "auto",
        devices=1,
        precision=cfg.get("precision") or run_cfg.trainer.get("precision", "32-true"),
        logger=TensorBoardLogger(str(output_dir / "tensorboard"), name="", version="", default_hp_metric=False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    split = cfg.get("split", "test")
    if split not in ("test", "val"):
        raise UserError(f"split: unknown '{split}'; allowed: test, val")
    run = trainer.test if split == "test" else trainer.validate
    with warnings.catch_warnings():  # scoring needs none of the training callbacks whose states the file holds
        warnings.filterwarnings("ignore", message=".*callbacks used to create the checkpoint.*")
        scored = run(model, datamodule=datamodule, ckpt_path=str(ckpt_path), weights_only=True, verbose=False)
    metrics = _floats(scored[0])
    write_metrics(output_dir / "metrics.json", metrics)
    print(f"\n{split} metrics of {ckpt_path}")
    print(format_table({k: f"{v:.4f}" for k, v in metrics.items()}))
    if cfg.get("data_path"):
        target = Path(cfg.get("predictions") or output_dir / "predictions.csv")
        predict_table_rows(model, datamodule, Path(str(cfg.data_path)).expanduser(), target)
    return metrics


def predict_table_rows(model: Any, datamodule: Any, source: Path, target: Path, key: str = "data_path") -> None:
    """`data_path=<csv>` (or `mode=predict input=<csv>`, with `key`) for a neural run on a table: the rows with
    their predictions, as for XGBoost's runs."""
    import torch

    from zoo.classic.run import write_predictions
    from zoo.data.tabular import TabularDataModule
    from zoo.tasks.classification import ClassificationTask

    if not isinstance(datamodule, TabularDataModule):
        raise UserError(
            f"{key}: new rows are predicted for table runs (data=breast_cancer, diabetes, tabular_csv, ...); "
            f"this run's data is {type(datamodule).__name__}"
        )

    def predict_rows(rows: Any) -> Any:
        x = torch.as_tensor(datamodule.table.encoded(rows), dtype=torch.float32)
        x = ((x - datamodule.mean) / datamodule.std).nan_to_num(0.0)
        if getattr(datamodule, "projection", None) is not None:
            x = x @ datamodule.projection
        with torch.no_grad():
            output = model.cpu().eval()(x)
        return (output.softmax(-1) if isinstance(model, ClassificationTask) else output).numpy()

    rows = write_predictions(predict_rows, datamodule.table, source, target, key=key)
    print(f"wrote {rows} predictions to {target}")


# evaluate.py's counts: the key, the smallest value allowed, and whether null is allowed
EVAL_COUNTS = (("episodes", 1, False), ("max_new_tokens", 1, False), ("top_k", 1, True), ("batch_size", 1, True))


def _check_eval_keys(cfg: DictConfig) -> None:
    for key, minimum, nullable in EVAL_COUNTS:
        value = cfg.get(key)
        if value is None and nullable:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            allowed = f"an integer >= {minimum}" + (" or null" if nullable else "")
            raise UserError(f"{key}: expected {allowed}, got {value!r}")
    temperature = cfg.get("temperature", 0.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise UserError(f"temperature: expected a number >= 0, got {temperature!r}")
    if cfg.get("input") is not None and cfg.get("mode") != "predict":
        raise UserError(f"input: read by mode=predict only; add mode=predict (mode is {cfg.get('mode')!r})")
    for key in ("word", "a", "b", "c"):  # word2vec's words; whether the model knows them is the model's to say
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
            raise UserError(f"{key}: expected a word, got {value!r}")


def _swap_scorer(run_cfg: DictConfig, scorer_path: str, ckpt_path: Path) -> None:
    """Scores a generator with another classifier than the one its run was trained with."""
    if "ckpt_path" not in (run_cfg.model.get("scorer") or {}):
        raise UserError(
            f"scorer_ckpt_path: the run of '{ckpt_path}' has no model.scorer.ckpt_path to replace; "
            "allowed: GAN, PGGAN and VAE runs, which one classifier scores"
        )
    load_checkpoint(Path(scorer_path).expanduser(), key="scorer_ckpt_path")  # unreadable files are named as this key
    run_cfg.model.scorer.ckpt_path = scorer_path


def _run_eval_mode(cfg: DictConfig, model: Any, ckpt_path: Path, mode: str) -> dict[str, float]:
    """Modes other than scoring belong to a family: its task lists them in `eval_modes` and runs them."""
    offered = tuple(getattr(model, "eval_modes", ()))
    if mode not in offered:
        raise UserError(
            f"mode: '{mode}' is not offered by {type(model).__name__}; allowed: {', '.join(('score', *offered))}"
        )
    model.load_state_dict(load_lightning_checkpoint(ckpt_path)["state_dict"])
    model.eval()
    return model.run_eval_mode(mode, cfg) or {}


def _fine_tuning(cfg: DictConfig, model: Any) -> tuple[Any, ...]:
    """`init_from` (weights of another run, nothing else), `freeze` (parameter patterns) and `unfreeze_at_epoch`,
    `head` with `head_lr_mult` (discriminative learning rates); the callbacks they need."""
    from zoo import finetune

    source, patterns = cfg.get("init_from"), list(cfg.get("freeze") or [])
    if source and cfg.get("ckpt_path"):
        raise UserError("init_from: a new run starts from weights, ckpt_path resumes a run; give one of them")
    if source:
        report = finetune.init_from(model, str(source))
        print(f"init_from {source}: {finetune.describe(report)}")
    head, multiplier = list(cfg.get("head") or []), float(cfg.get("head_lr_mult", 1.0))
    if multiplier <= 0 or (multiplier != 1.0 and not head):
        raise UserError(f"head_lr_mult: expected a number > 0 with head=[<parameter patterns>], got {multiplier}")
    if head:
        model.head_parameters = {id(p) for p in finetune.matching(model, head, key="head")}
        model.head_lr_mult = multiplier
    unfreeze_at = cfg.get("unfreeze_at_epoch")
    if unfreeze_at is not None and (not patterns or isinstance(unfreeze_at, bool) or not isinstance(unfreeze_at, int)):
        raise UserError(f"unfreeze_at_epoch: expected an epoch number with freeze=[<patterns>], got {unfreeze_at!r}")
    if not patterns:
        return ()
    from zoo.callbacks import FrozenNormsInEval, Unfreeze

    frozen = finetune.freeze(model, patterns)
    holder = FrozenNormsInEval(finetune.frozen_norms(model))
    if unfreeze_at is None:
        return (holder,) if holder.modules else ()
    return holder, Unfreeze(unfreeze_at, finetune.matching(model, frozen, key="freeze"), holder)


def build_trainer(cfg: DictConfig, extra_callbacks: tuple[Any, ...] = (), **kwargs: Any) -> Any:
    """The trainer of the config's callbacks and loggers, plus what every run has whatever the config says:
    a divergence guard, and checkpoints written atomically and loaded without running code."""
    from hydra.utils import instantiate
    from lightning.pytorch.callbacks import ModelSummary, ProgressBar

    from zoo.callbacks import AtomicCheckpointIO, DivergenceGuard, LayerSummary, NoProfiler

    callbacks = [*extra_callbacks, *(instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None)]
    callbacks.append(DivergenceGuard())
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None]
    if not cfg.trainer.get("enable_progress_bar", True):  # so that trainer.enable_progress_bar=false just works
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    # the zoo's layer table stands in for Lightning's, whose FLOPs column reads 0 for every zoo task
    summary = kwargs.pop("enable_model_summary", cfg.trainer.get("enable_model_summary", True))
    if summary and not any(isinstance(c, ModelSummary) for c in callbacks):
        callbacks.append(LayerSummary())
    plugins = [*(instantiate(p) for p in cfg.trainer.get("plugins") or []), AtomicCheckpointIO()]
    if kwargs.get("profiler") is None and cfg.trainer.get("profiler") is None:
        kwargs["profiler"] = NoProfiler()
    return instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=plugins,
        enable_model_summary=False,
        **kwargs,
    )


def is_classic(cfg: DictConfig) -> bool:
    """Models from zoo.classic (XGBoost, scikit-learn) are not LightningModules: train and evaluate hand them over."""
    return str(cfg.model.get("_target_", "")).startswith("zoo.classic.")


def build_model(cfg: DictConfig, datamodule: Any | None = None) -> Any:
    """The task module with its network, plus the optimizer and scheduler factories from their groups.

    A task whose tables or vocabulary are sized by the data takes the datamodule as `data`: the run's own one
    when given, so that a run builds (and reads) its data once.

    Config lists and dicts arrive as plain Python ones (`_convert_="all"`): an optimizer's `betas` kept as a
    ListConfig would be pickled into every checkpoint, which then could not load weights-only.
    """
    from hydra.utils import instantiate

    optimizer = instantiate(cfg.optimizer, _convert_="all") if cfg.get("optimizer") else None
    scheduler = instantiate(cfg.scheduler, _convert_="all") if cfg.get("scheduler") else None
    monitor = cfg.get("monitor", "val/loss")
    extra = {}
    if takes_data(cfg.model):
        extra["data"] = datamodule if datamodule is not None else instantiate(cfg.data)
    model = instantiate(cfg.model, optimizer=optimizer, scheduler=scheduler, monitor=monitor, _convert_="all", **extra)
    if cfg.get("compile"):
        compile_network(model)
    return model


def compile_network(model: Any) -> None:
    """`compile=true`: torch.compile the task's network in place (the module keeps its state_dict names)."""
    import torch

    net = getattr(model, "net", None)
    if not isinstance(net, torch.nn.Module):
        raise UserError(
            f"compile=true: {type(model).__name__} keeps no network in `net` to compile; allowed: the tasks with one "
            "(classification, regression, char_lm, seq2seq, vae, dqn, word2vec, recommenders); else compile=false"
        )
    net.compile()


def takes_data(model_cfg: DictConfig) -> bool:
    """Whether the task's constructor has a `data` parameter (recommenders, DQN, language models, seq2seq)."""
    import inspect

    from hydra._internal.utils import _locate

    target = _locate(str(model_cfg.get("_target_", "")))
    return "data" in inspect.signature(target).parameters and "data" not in model_cfg


def check_checkpoint(ckpt_path: str, model: Any) -> None:
    """Turn a missing, unreadable or mismatched checkpoint into one clear line before Lightning touches it."""
    path = Path(ckpt_path)
    checkpoint = load_lightning_checkpoint(path)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    if missing or unexpected or mismatched:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' …' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("other shape", mismatched))
            if keys
        )
        raise UserError(f"ckpt_path: '{path}' was written by a different model ({detail})")


def _start(cfg: DictConfig, output_dir: Path) -> None:
    """Before a run: refuse a used run folder, enforce tags, save the resolved config, print it.

    Only the first process of a distributed run writes the config: RANK under torchrun, where every node has
    a LOCAL_RANK 0 sharing the folder; LOCAL_RANK for Lightning's own DDP child processes, which get no RANK.
    """
    is_child = os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) != "0"
    checkpoints = output_dir / "checkpoints"
    if not is_child and checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise UserError(f"run folder '{output_dir}' already holds checkpoints; a new run needs a new folder")
    if not isinstance(cfg.get("seed"), int):
        raise UserError(f"seed: expected an integer, got {cfg.get('seed')!r}")
    precision = cfg.get("float32_matmul_precision", "highest")
    if precision not in MATMUL_PRECISIONS:
        raise UserError(f"float32_matmul_precision: unknown {precision!r}; allowed: {', '.join(MATMUL_PRECISIONS)}")
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if extras.get("enforce_tags") and not cfg.get("tags"):
        raise UserError("tags: empty; give the run at least one tag, e.g. tags=[baseline]")
    if not is_child:
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)  # what evaluate.py rebuilds from
        if extras.get("print_config"):
            print(config_summary(cfg, output_dir / "config.yaml"))


def config_summary(cfg: DictConfig, saved: Path) -> str:
    """The run's config in a few lines: the group choices, then only what the experiment and the command line
    change from those groups' defaults. The full resolved config is the saved file (or `--cfg job`)."""
    lines = [f"config: {saved} (full, resolved)"]
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
    except ValueError:  # composed outside a Hydra run (the Python API, tests): the saved file says it all
        return lines[0]
    choices = {k: v for k, v in hydra_cfg.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    first = ("experiment", "model", "data", "optimizer", "scheduler", "trainer")
    choices = dict(sorted(choices.items(), key=lambda kv: first.index(kv[0]) if kv[0] in first else len(first)))
    lines.append("groups: " + " ".join(f"{group}={choice}" for group, choice in choices.items()))
    experiment = choices.get("experiment")
    if experiment:
        lines.append(f"experiment {experiment}: " + _settings(cfg, _experiment_keys(str(experiment))))
    command_line = [o for o in hydra_cfg.overrides.task if "=" in o and o.split("=", 1)[0].lstrip("+~") not in choices]
    if command_line:
        lines.append("command line: " + " ".join(command_line))
    return "\n".join(lines)


def _experiment_keys(name: str) -> list[str]:
    """The dotted keys an experiment file sets itself (its group overrides are already among the choices)."""
    from zoo.cli import CONFIG_DIR

    path = CONFIG_DIR / "experiment" / f"{name}.yaml"
    if not path.is_file():
        return []
    keys: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, DictConfig) and "_target_" not in node:
            for key in node:
                walk(node[key], f"{prefix}{key}.")
        else:
            keys.append(prefix[:-1])

    loaded = OmegaConf.load(path)
    for key in loaded:
        if key not in ("defaults", "tags", "task_name"):
            walk(loaded[key], f"{key}.")
    return keys


def _settings(cfg: DictConfig, keys: list[str]) -> str:
    """key=value with the values the run resolved to (the command line may have changed them again)."""
    shown = []
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig | list) or OmegaConf.is_config(value):
            value = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        shown.append(f"{key}={value}")
    return " ".join(shown) or "(group choices only)"


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def _log_hparams(trainer: Any, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """One hparams entry per run, with its final metrics, for TensorBoard's HPARAMS tab."""
    from zoo.internals import add_summary
    from zoo.tasks.figures import tensorboard_writer

    writer = tensorboard_writer(trainer.loggers)
    if writer is None:
        return
    from torch.utils.tensorboard.summary import hparams

    final = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}
    for summary in hparams(flat_hparams(cfg), final):
        add_summary(writer, summary)
    writer.flush()


def _write_scalars(folder: Path, scalars: dict[str, float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as writer:
        for name, value in scalars.items():
            writer.add_scalar(name, value, 0)
