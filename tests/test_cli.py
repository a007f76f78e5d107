"""train.py and evaluate.py as a user runs them: end to end, sweeps, DDP on CPU, and bad input."""

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONFIG_DIR, run_script

QUIET = ["extras.print_config=false", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
SHORT = [*QUIET, "trainer.max_epochs=2", "trainer.limit_train_batches=3"]
# every model config, as the one-line errors and --help list them
MODELS = ", ".join(sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")))


def run_folders(root: Path, task: str = "train") -> list[Path]:
    return sorted((root / "logs" / task / "runs").iterdir())


@pytest.mark.slow  # train.py then evaluate.py as subprocesses, 50-70 s
def test_train_then_evaluate_end_to_end(tmp_path: Path) -> None:
    trained = run_script("train.py", *SHORT, "model=mlp", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    (run,) = run_folders(tmp_path)
    assert {"config.yaml", "metrics.json", "checkpoints", "tensorboard", ".hydra"} <= {p.name for p in run.iterdir()}
    logged = json.loads((run / "metrics.json").read_text())
    best = next((run / "checkpoints").glob("epoch_*.ckpt"))

    scored = run_script("evaluate.py", f"ckpt_path={best}", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert "test/acc" in scored.stdout
    (evaluation,) = run_folders(tmp_path, "eval")
    for name, value in json.loads((evaluation / "metrics.json").read_text()).items():
        assert value == pytest.approx(logged[name], abs=1e-6), name


@pytest.mark.slow  # subprocesses or many short runs, 25-30 s under load
def test_tensorboard_gets_curves_hparams_and_figures(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run_script("train.py", *SHORT, "model=cnn", "trainer.log_every_n_steps=1", cwd=tmp_path).returncode == 0
    (run,) = run_folders(tmp_path)
    tags: dict[str, list[str]] = {"scalars": [], "images": [], "tensors": []}
    plugins: set[str] = set()
    for events in (run / "tensorboard").glob("events.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        for kind in tags:
            tags[kind] += acc.Tags()[kind]
        if _has_plugin(acc, "hparams"):
            plugins.add("hparams")
    for name in ("train/loss", "train/acc", "val/loss", "val/acc", "val/acc_best", "test/acc", "test/f1", "train/lr"):
        assert name in tags["scalars"], name
    assert {"test/confusion_matrix", "test/misclassified"} <= set(tags["images"])
    assert "hparams" in plugins


@pytest.mark.slow  # tests/test_run_folders.py covers taken names and racing runs in the default suite
def test_new_runs_never_share_a_folder_or_touch_an_old_one(tmp_path: Path) -> None:
    for _ in range(2):
        assert run_script("train.py", *SHORT, "model=logreg", cwd=tmp_path).returncode == 0
    first, second = run_folders(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    reused = run_script("train.py", *SHORT, f"hydra.run.dir={first}", cwd=tmp_path)
    assert reused.returncode == 2
    assert reused.stderr.strip().splitlines()[-1].startswith("error: hydra.run.dir:")
    assert before == {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model=transformr"], f"error: model: no config 'transformr'; allowed: {MODELS}"),
        (["optimizer=adam,adamw,sgdd"], "error: optimizer: no config 'sgdd'; allowed: adagrad, adam"),
        (["trainer.max_epoch=3"], "error: trainer.max_epoch: no such config key; did you mean trainer.max_epochs"),
        # slow through train.py (they need the network or the trainer built); tests/test_nn.py raises the
        # network's errors in-process, the precision message is Lightning's
        pytest.param(["model.net.activation=swish"], "allowed: relu, gelu, silu, tanh, elu", marks=pytest.mark.slow),
        pytest.param(["trainer.precision=17"], "Precision 17 is invalid. Allowed", marks=pytest.mark.slow),
        (["seed=abc"], "error: seed: expected an integer, got 'abc'"),
        (["float32_matmul_precision=fast"], "float32_matmul_precision: unknown 'fast'; allowed: highest, high, medium"),
        pytest.param(
            ["data=mnist1d", "model=resnet"],
            "ResNet needs image input (C, H, W), got input_shape [1, 40]",
            marks=pytest.mark.slow,
        ),
        (["ckpt_path=missing.ckpt"], "error: ckpt_path: no file at 'missing.ckpt'"),
        pytest.param(["data=mnist"], "MNIST not found in", marks=pytest.mark.slow),
        (["tags=[]"], "error: tags: empty"),
    ],
)
def test_bad_input_gets_one_line_and_exit_code_2(tmp_path: Path, args: list[str], expected: str) -> None:
    result = run_script("train.py", *QUIET, *args, cwd=tmp_path)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], result.stderr[-1500:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # four evaluate.py subprocesses, 20-30 s
def test_bad_checkpoints_get_one_line(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    for script, args, expected in [
        ("train.py", [f"ckpt_path={corrupt}"], "is not a readable checkpoint"),
        ("evaluate.py", [f"ckpt_path={corrupt}"], "found no config.yaml"),
        ("evaluate.py", [], "ckpt_path: missing: the checkpoint to score"),
    ]:
        result = run_script(script, *args, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-1500:]
        assert expected in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # subprocesses of train.py and evaluate.py, 30-50 s
def test_resuming_with_another_models_checkpoint_is_refused(tmp_path: Path) -> None:
    assert run_script("train.py", *SHORT, "model=logreg", cwd=tmp_path).returncode == 0
    (run,) = run_folders(tmp_path)
    result = run_script("train.py", *SHORT, "model=mlp", f"ckpt_path={run}/checkpoints/last.ckpt", cwd=tmp_path)
    assert result.returncode == 2
    assert "was written by a different model (missing: net.layers" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # subprocesses of train.py and evaluate.py, 30-50 s
def test_grid_sweep_runs_every_combination(tmp_path: Path) -> None:
    result = run_script(
        "train.py", "-m", *SHORT, "model=logreg", "optimizer=adam,radam", "optimizer.lr=1e-3,3e-3", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 4 and all((job / "metrics.json").is_file() for job in jobs)
    chosen = {
        (
            json.loads(json.dumps(_yaml(job / "config.yaml")["optimizer"]))["_target_"],
            _yaml(job / "config.yaml")["optimizer"]["lr"],
        )
        for job in jobs
    }
    assert chosen == {(t, lr) for t in ("torch.optim.Adam", "torch.optim.RAdam") for lr in (1e-3, 3e-3)}


@pytest.mark.slow  # Optuna through train.py stays in the default suite via tests/test_classic.py
def test_optuna_search_with_parallel_joblib_jobs(tmp_path: Path) -> None:
    result = run_script(
        "train.py",
        "-m",
        "hparams_search=mnist1d_optuna",
        *SHORT,
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.n_jobs=2",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (sweep,) = (tmp_path / "logs" / "mnist1d_optuna" / "multiruns").iterdir()
    best = _yaml(sweep / "optimization_results.yaml")
    values = [
        json.loads((job / "metrics.json").read_text())["val/acc_best"]
        for job in sweep.iterdir()
        if (job / "metrics.json").is_file()
    ]
    assert len(values) == 2 and best["best_value"] == pytest.approx(max(values))


@pytest.mark.slow  # two spawned processes, about 15 s
def test_ddp_simulated_with_two_cpu_processes(tmp_path: Path) -> None:
    result = run_script("train.py", *SHORT, "model=mlp", "trainer=ddp_sim", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = run_folders(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test/acc"] > 0.2
    assert "world_size=2" in result.stdout + result.stderr or "GLOBAL_RANK: 1" in result.stdout + result.stderr


def test_cluster_configs_compose() -> None:
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        # the README's sbatch equivalent: 2 nodes x 4 tasks (one per GPU), 120 minutes, partition gpu
        launcher = ["nodes=2", "tasks_per_node=4", "gpus_per_node=4", "timeout_min=120", "partition=gpu"]
        slurm = compose(
            "train",
            overrides=["hydra/launcher=submitit_slurm", *(f"hydra.launcher.{kv}" for kv in launcher)],
            return_hydra_config=True,
        )
        ddp = compose("train", overrides=["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    settings = slurm.hydra.launcher
    assert (settings.nodes, settings.tasks_per_node, settings.gpus_per_node) == (2, 4, 4)
    assert (settings.timeout_min, settings.partition) == (120, "gpu")
    assert (ddp.trainer.strategy, ddp.trainer.devices, ddp.trainer.num_nodes) == ("ddp", 4, 2)


def test_help_lists_the_config_groups(tmp_path: Path) -> None:
    result = run_script("train.py", "--help", cwd=tmp_path)
    assert result.returncode == 0
    assert f"model: {MODELS}" in result.stdout and "optimizer: adagrad, adam, adamax, adamw" in result.stdout


def _has_plugin(acc, name: str) -> bool:
    try:
        return bool(acc.PluginTagToContent(name))
    except KeyError:  # this event file holds no summary of that plugin
        return False


def _yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path))


@pytest.mark.parametrize(
    ("message", "key", "line"),
    [
        ("norm: unknown 'x'; allowed: instance", "model.net", "model.net: norm: unknown 'x'; allowed: instance"),
        ("scheduler: has its own schedule; allowed: none", "model", "scheduler: has its own schedule; allowed: none"),
        ("model.generator.image_shape: bad", "model.generator", "model.generator.image_shape: bad"),
    ],
)
def test_errors_inside_instantiation_name_their_key_once(message: str, key: str, line: str) -> None:
    from hydra.errors import InstantiationException

    from zoo.cli import describe
    from zoo.errors import UserError

    try:
        try:
            raise UserError(message)
        except UserError as inner:
            raise InstantiationException(f"Error in call to target 'x':\nUserError()\nfull_key: {key}") from inner
    except InstantiationException as error:
        assert describe(error) == line
