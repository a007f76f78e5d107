"""The data module of tables for neural models; the tables themselves are read by `zoo.data.table`."""

from __future__ import annotations

from typing import Any

import torch

from zoo.data.table import Table, pca_components
from zoo.data.tensor import TensorDataModule
from zoo.errors import UserError


class TabularDataModule(TensorDataModule):
    """A Table for neural classifiers: the same rows per split as XGBoost gets, as standardized float tensors.

    Categoricals are one-hot encoded; every column is standardized with the mean and standard deviation of the
    train split, and missing values become 0 (the train mean). `input_shape` is `[encoded width]`; bundled
    configs set it, a CSV table must be told (the error names the width).
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
    ) -> None:
        self.table = Table(
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
        )
        self.pca_components = pca_components
        width = self.table.encoded_width if pca_components is None else pca_components
        if input_shape is None or num_classes is None:
            table = self.table
            if table.task == "regression":
                raise UserError("data.task: neural models here are classifiers; a regression table needs XGBoost")
            raise UserError(
                f"data.input_shape: set data.input_shape=[{width}] "
                f"data.num_classes={table.num_classes} for a neural model on this table"
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
        )
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        table = self.table
        if table.task == "regression":
            raise UserError("data.task: neural models here are classifiers; a regression table needs XGBoost")
        if table.num_classes != self.num_classes:
            raise UserError(f"data.num_classes is {self.num_classes} but the target has {table.num_classes} classes")
        components = pca_components({"pca_components": self.pca_components}, table.encoded_width)
        width = components or table.encoded_width
        if (width,) != self.input_shape:
            what = f"{components} principal components" if components else f"the encoded table's {width} columns"
            raise UserError(
                f"data.input_shape is {list(self.input_shape)} but the model gets {what}; "
                f"set data.input_shape=[{width}]"
            )
        raw = {
            name: (torch.as_tensor(table.encoded(x)), torch.as_tensor(y, dtype=torch.long))
            for name, (x, y) in table.splits().items()
        }
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
