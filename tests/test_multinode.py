"""Two nodes on one machine: two torchrun agents (gloo on CPU) train one run, and it equals one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, run_script

# no dropout, no batch norm and no augmentation: nothing that differs between a rank's half batch and the whole
# batch, so DDP's averaged gradients are the single process's, step for step
SETTINGS = [
    "model=mlp",
    "model.net.dropout=0",
    "model.net.norm=none",
    "data.augment.shift=0",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "extras.print_config=false",
    "trainer.enable_progress_bar=false",
    "seed=3",
]
PER_RANK_BATCH = 32


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in state["state_dict"].items() if v.is_floating_point()}


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow  # two torchrun agents, about 35 s
def test_two_nodes_train_one_run_equal_to_one_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "TORCHELASTIC_RUN_ID")}
    env |= {"PYTHONWARNINGS": "ignore", "HYDRA_FULL_ERROR": "0"}
    port = free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1"]
            + [f"--node_rank={rank}", "--master_addr=127.0.0.1", f"--master_port={port}", str(ROOT / "train.py")]
            + ["trainer=ddp", "trainer.num_nodes=2", "trainer.accelerator=cpu", "trainer.devices=1"]
            + [f"data.batch_size={PER_RANK_BATCH}", *SETTINGS],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in "".join(outputs)
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()  # one run folder for both nodes

    single = run_script(
        "train.py", f"data.batch_size={2 * PER_RANK_BATCH}", *SETTINGS, "hydra.run.dir=single", cwd=tmp_path
    )
    assert single.returncode == 0, single.stderr[-3000:]
    other = run_script("train.py", f"data.batch_size={PER_RANK_BATCH}", *SETTINGS, "hydra.run.dir=other", cwd=tmp_path)
    assert other.returncode == 0, other.stderr[-3000:]

    two_nodes, one_process = final_weights(run), final_weights(tmp_path / "single")
    assert largest_difference(two_nodes, one_process) < 1e-5
    # the control: a run on another batch size ends elsewhere, so the equality above is not of untrained weights
    assert largest_difference(final_weights(tmp_path / "other"), one_process) > 1e-3


@pytest.mark.slow  # a train.py subprocess, about 20 s
def test_fsdp_without_a_gpu_is_one_line(tmp_path: Path) -> None:
    result = run_script(
        "train.py", "experiment=transformer_mnist1d", "trainer=ddp_sim", "trainer.strategy=fsdp", cwd=tmp_path
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: trainer: The strategy `fsdp` requires a GPU accelerator")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP needs a CUDA GPU")
def test_fsdp_trains_the_transformer(train_config) -> None:
    from zoo.run import train

    cfg = train_config(
        "experiment=transformer_mnist1d", "trainer=ddp", "trainer.devices=1", "trainer.strategy=fsdp",
        "trainer.max_epochs=3", "logger=csv",
    )  # fmt: skip
    cfg.optimized_metric = "test/acc"
    assert train(cfg) > 0.3  # chance is 0.1
    assert (Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt").exists()
