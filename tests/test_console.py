"""What a newcomer reads on the console: each line once, one metrics table, no warnings about nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import run_script

SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "callbacks.progress_bar=null"]


@pytest.mark.slow  # subprocesses of train.py and evaluate.py, 30-50 s
def test_training_and_evaluation_print_each_line_once(tmp_path: Path) -> None:
    trained = run_script("train.py", *SHORT, "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    lines = [line.strip() for line in (trained.stdout + trained.stderr).splitlines() if line.strip()]
    said = Counter(line for line in lines if line.startswith("INFO:") or "Seed set to" in line)
    assert said and all(count == 1 for count in said.values()), said
    assert not any("litlogger" in line for line in lines)
    # the config in a few lines: group choices and what changed, not the whole resolved YAML; no FLOPs of 0
    assert any(line.startswith("groups: ") and "model=cnn" in line and "data=digits" in line for line in lines)
    assert "command line: trainer.max_epochs=1" in trained.stdout
    assert "_target_" not in trained.stdout and "FLOPs" not in trained.stdout + trained.stderr
    assert any("Total params" in line for line in lines)
    assert not any("LeafSpec" in line for line in lines)

    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert "Seed set to 42" in (run / "train.log").read_text()  # the run's log file keeps Lightning's lines
    best = next((run / "checkpoints").glob("epoch_*.ckpt"))
    scored = run_script("evaluate.py", f"ckpt_path={best}", cwd=tmp_path)
    assert scored.returncode == 0, scored.stderr[-2000:]
    output = scored.stdout + scored.stderr
    assert output.count("test/acc") == 1, output
    assert "callbacks used to create the checkpoint" not in output
