"""mode=export: the file ONNX Runtime (or TorchScript) runs gives what PyTorch gives, with a table's
standardization inside the graph; what cannot be exported is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from zoo.errors import UserError
from zoo.export import export
from zoo.run import build_model

# a classifier per network family (untrained: the export must hold whatever the weights), each exported in seconds
NETWORKS = [
    ["experiment=mlp_breast_cancer"],
    ["experiment=cnn_digits"],
    ["model=resnet", "data=digits", "model.net.depth=8"],
    ["experiment=transformer_mnist1d"],
]


def exported(train_config, overrides: list[str], tmp_path: Path, fmt: str) -> tuple[float, torch.Tensor, object]:
    cfg = train_config(*overrides, "logger=none")
    torch.manual_seed(0)
    data = instantiate(cfg.data)
    model = build_model(cfg, data)
    result = export(model, data, tmp_path / "export", fmt)
    data.setup("test")
    return result["export/max_abs_difference"], next(iter(data.test_dataloader()))[0][:8], model


@pytest.mark.parametrize("overrides", NETWORKS)
def test_onnx_runtime_gives_what_pytorch_gives(train_config, tmp_path: Path, overrides: list[str]) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra (pip install -e '.[onnx]') is not installed")
    difference, _, _ = exported(train_config, overrides, tmp_path, "onnx")
    assert difference < 1e-5 and (tmp_path / "export" / "model.onnx").stat().st_size > 1000


def test_onnx_graph_takes_raw_table_columns_and_any_batch_size(train_config, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    _, standardized, model = exported(train_config, ["experiment=mlp_breast_cancer"], tmp_path, "onnx")
    cfg = train_config("experiment=mlp_breast_cancer")
    data = instantiate(cfg.data)
    data.setup("test")
    raw = torch.cat([standardized, standardized[:3]]) * data.std + data.mean  # 11 rows: not the traced batch size
    session = onnxruntime.InferenceSession(str(tmp_path / "export" / "model.onnx"))
    (logits,) = session.run(None, {session.get_inputs()[0].name: raw.numpy()})
    with torch.no_grad():
        expected = model(torch.cat([standardized, standardized[:3]]))
    assert logits.shape == (11, 2) and torch.allclose(torch.from_numpy(logits), expected, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_regressor_predicts_on_the_targets_scale(train_config, tmp_path: Path) -> None:
    difference, x, model = exported(train_config, ["experiment=mlp_diabetes"], tmp_path, "torchscript")
    assert difference < 1e-5
    loaded = torch.jit.load(str(tmp_path / "export" / "model.pt"))
    data = instantiate(train_config("experiment=mlp_diabetes").data)
    data.setup("test")
    predictions = loaded(x * data.std + data.mean)
    assert predictions.shape == (8,) and predictions.abs().mean() > 20  # disease progression is 25-346, not ~0


def test_export_refuses_other_families_and_formats(train_config, tmp_path: Path) -> None:
    cfg = train_config("experiment=mlp_breast_cancer", "logger=none")
    data = instantiate(cfg.data)
    with pytest.raises(UserError, match="format: unknown 'tflite'; allowed: onnx, torchscript"):
        export(build_model(cfg, data), data, tmp_path, "tflite")
    cfg = train_config("experiment=dcgan_mnist", "logger=none")
    data = instantiate(cfg.data)
    with pytest.raises(UserError, match="GANTask is not exported; allowed: classifiers and regressors"):
        export(build_model(cfg, data), data, tmp_path, "onnx")
