"""The data module of tables for neural models; the tables themselves are read by `zoo.data.table`."""

from __future__ import annotations

from typing import Any

import torch

from zoo.data.table import Table, pca_components
from zoo.data.tensor import TensorDataModule
from zoo.errors import UserError


class TabularDataModule(TensorDataModule):
    """A Table for neural models: the same rows per split as XGBoost gets, as standardized float tensors.

    Categoricals are one-hot encoded; every column is standardized with the mean and standard deviation of the
    train split, and missing values become 0 (the train mean). `input_shape` is `[encoded width]`; bundled
    configs set it, a CSV table must be told (the error names the width). A regression target (num_classes 1, one
    output) is standardized the same way; `target_scale` is its training (mean, std), None for classes.
    """

    def __init__(
        self,
        dataset: str = "csv",
        path: str | None = None,
        target: str | None = None,
        task: str = "auto",
        categorical: list[str] | None = None,
        drop: list[str] | None = None,
        input_shape: list[int] | None = None,
        num_classes: int | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        folds: int = 1,
        fold: int = 0,
        data_dir: str = "data",
        normal_class: Any = None,
        anomaly_share: float = 0.05,
        train_fraction: float = 1.0,
        pca_components: int | None = None,
        holdout_fraction: float = 0.0,
        table: Table | None = None,
    ) -> None:
        # `table`: one already read with these settings (prepare's CSV streaming), so the file is not read again
        self.table = table or Table(
            dataset,
            path,
            target,
            task,
            categorical,
            drop,
            val_fraction,
            test_fraction,
            split_seed,
            folds,
            fold,
            normal_class=normal_class,
            anomaly_share=anomaly_share,
            train_fraction=train_fraction,
            holdout_fraction=holdout_fraction,
        )
        self.pca_components = pca_components
        width = self.table.encoded_width if pca_components is None else pca_components
        outputs = 1 if self.table.task == "regression" else self.table.num_classes
        if input_shape is None or num_classes is None:
            raise UserError(
                f"data.input_shape: set data.input_shape=[{width}] data.num_classes={outputs} for a neural model on "
                f"this table{' (one output: a regression target)' if outputs == 1 else ''}"
            )
        super().__init__(
            input_shape,
            num_classes,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            split_seed=split_seed,
            shuffle_seed=shuffle_seed,
            folds=folds,
            fold=fold,
            data_dir=data_dir,
            train_fraction=train_fraction,
            holdout_fraction=holdout_fraction,
        )
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self.target_scale: tuple[float, float] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        table = self.table
        regression = table.task == "regression"
        if regression and self.num_classes != 1:
            raise UserError(f"data.num_classes is {self.num_classes}; a regression target has one output: set it to 1")
        if not regression and table.num_classes != self.num_classes:
            raise UserError(f"data.num_classes is {self.num_classes} but the target has {table.num_classes} classes")
        components = pca_components({"pca_components": self.pca_components}, table.encoded_width)
        width = components or table.encoded_width
        if (width,) != self.input_shape:
            what = f"{components} principal components" if components else f"the encoded table's {width} columns"
            raise UserError(
                f"data.input_shape is {list(self.input_shape)} but the model gets {what}; "
                f"set data.input_shape=[{width}]"
            )
        target_type = torch.float32 if regression else torch.long
        raw = {
            name: (torch.as_tensor(table.encoded(x)), torch.as_tensor(y, dtype=target_type))
            for name, (x, y) in table.splits().items()
        }
        if regression:  # the target standardized like the columns; the task maps predictions back
            target = raw["train"][1].double()
            mean, std = float(target.mean()), float(target.std(correction=0))
            self.target_scale = (mean, std if std > 0 else 1.0)
            raw = {name: (x, ((y - mean) / self.target_scale[1]).float()) for name, (x, y) in raw.items()}
        train = raw["train"][0]
        self.mean = torch.nanmean(train, dim=0).nan_to_num(0.0)
        spread = torch.sqrt(torch.nanmean((train - self.mean) ** 2, dim=0)).nan_to_num(0.0)
        self.std = torch.where(spread > 0, spread, torch.ones_like(spread))
        for name, (x, y) in raw.items():
            self.splits[name] = (((x - self.mean) / self.std).nan_to_num(0.0), y)
        if components:  # the training split's principal directions of the standardized columns
            _, _, directions = torch.linalg.svd(self.splits["train"][0].double(), full_matrices=False)
            self.projection = directions[:components].T.float()
            for name, (x, y) in self.splits.items():
                self.splits[name] = (x @ self.projection, y)
