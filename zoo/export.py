"""`evaluate.py ckpt_path=<ckpt> mode=export format=onnx|torchscript`: a classifier's or regressor's network as a
file that runs without the zoo, checked against PyTorch on the test split's first batch.

The exported graph takes what the run's network took (a batch of its data module's inputs) and returns logits
(classifiers) or predictions on the target's scale (regressors); a table's standardization (the training split's
column means and deviations) is part of the graph, so it takes the encoded table's raw columns.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zoo.errors import UserError

FORMATS = ("onnx", "torchscript")


class Exported(nn.Module):
    """The network alone (no Lightning module: nothing of the trainer is traced), between a table's standardization
    of the inputs and, for regressors, the target's scale on the outputs."""

    def __init__(
        self,
        net: nn.Module,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
        target_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.standardize, self.regression = mean is not None and std is not None, target_scale is not None
        self.register_buffer("mean", mean if mean is not None else torch.zeros(0))
        self.register_buffer("std", std if std is not None else torch.ones(0))
        self.register_buffer("target_scale", target_scale if target_scale is not None else torch.zeros(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.standardize:
            x = (x - self.mean) / self.std
        output = self.net(x)
        if self.regression:
            output = output.squeeze(-1) * self.target_scale[1] + self.target_scale[0]
        return output


def _exportable(model: Any) -> None:
    from zoo.tasks.classification import ClassificationTask
    from zoo.tasks.regression import RegressionTask

    if not isinstance(model, ClassificationTask | RegressionTask):
        raise UserError(
            f"mode=export: {type(model).__name__} is not exported; allowed: classifiers and regressors "
            "(model=mlp, cnn, resnet, transformer, rnn, mlp_regressor)"
        )


def export(model: Any, datamodule: Any, output_dir: Path, fmt: str) -> dict[str, float]:
    """Write model.onnx or model.pt to `output_dir`; return the largest difference from PyTorch's outputs."""
    if fmt not in FORMATS:
        raise UserError(f"format: unknown '{fmt}'; allowed: {', '.join(FORMATS)}")
    _exportable(model)
    datamodule.setup("test")
    x = next(iter(datamodule.test_dataloader()))[0][:8].float().cpu()
    mean, std = getattr(datamodule, "mean", None), getattr(datamodule, "std", None)
    if getattr(datamodule, "pca_components", None):
        raise UserError("mode=export: a run with data.pca_components is not exported (the projection is not in it)")
    model = model.cpu().eval()
    wrapped = Exported(model.net, mean, std, getattr(model, "target_scale", None)).eval()
    raw = x * std + mean if wrapped.standardize else x  # the inputs the exported graph takes
    with torch.no_grad():
        expected = wrapped(raw)
        if not torch.allclose(expected, model(x), atol=1e-5):
            raise RuntimeError("mode=export: the exported module disagrees with the task's own forward")
    output_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "onnx":
        path = output_dir / "model.onnx"
        _to_onnx(wrapped, raw, path)
        produced = _run_onnx(path, raw)
    else:
        path = output_dir / "model.pt"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation notice: the format still loads everywhere
            torch.jit.trace(wrapped, raw).save(str(path))
            produced = torch.jit.load(str(path))(raw)  # the file just written, read back
    difference = float((produced - expected).abs().max()) if produced is not None else float("nan")
    print(f"mode=export: {path} (input {tuple(raw.shape[1:])} per row, any batch size)")
    print(f"largest difference from PyTorch on {len(raw)} test rows: {difference:.2e}")
    return {"export/max_abs_difference": difference}


def _to_onnx(module: nn.Module, x: torch.Tensor, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401 - torch.onnx's exporter needs it
    except ImportError as error:
        raise UserError("format=onnx needs the onnx extra: pip install -e '.[onnx]'") from error
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes={"x": {0: batch}}, verbose=False)
    program.save(str(path))


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor | None:
    """The file's outputs by ONNX Runtime, when it is installed: the check that the export means what it says."""
    try:
        import onnxruntime
    except ImportError:
        print("onnxruntime is not installed: the file was written but not checked")
        return None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(output)
