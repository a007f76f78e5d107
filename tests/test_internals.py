"""The private parts of Lightning and torch that zoo.internals reaches: a failure here names what moved."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

from zoo import internals


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.seen: list[tuple[int, bool, int | None, object]] = []

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        trainer = internals.attached_trainer(self)
        self.seen.append(
            (
                internals.batches_that_stepped(trainer),
                internals.logs_this_step(trainer),
                internals.max_epochs(trainer),
                internals.grad_scaler(trainer),
            )
        )
        return self.layer(batch).square().mean()

    def on_train_start(self) -> None:
        internals.set_max_epochs(self.trainer, 2)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(torch.randn(6, 2), batch_size=2)


def test_lightning_internals_still_mean_what_the_zoo_reads(tmp_path) -> None:
    model = Tiny()
    assert internals.attached_trainer(model) is None
    trainer = L.Trainer(
        max_epochs=5,
        log_every_n_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model)
    steps = [seen[0] for seen in model.seen]
    assert steps == list(range(6)), "set_max_epochs(2) stops after 2 epochs of 3 batches, counted 0..5"
    assert [seen[1] for seen in model.seen] == [(i + 1) % 2 == 0 for i in range(6)]  # logged after steps 2, 4, 6
    assert {seen[2] for seen in model.seen} == {2} and {seen[3] for seen in model.seen} == {None}
    internals.set_batches_that_stepped(trainer, 41)
    assert internals.batches_that_stepped(trainer) == 41


def test_summaries_and_batch_norm(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with SummaryWriter(str(tmp_path)) as writer:
        for summary in hparams({"lr": 0.1}, {"val/acc": 0.5}):
            internals.add_summary(writer, summary)
    (events,) = tmp_path.glob("events.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    assert accumulator.PluginTagToContent("hparams"), "the hparams summary reached the event file"
    assert internals.is_batch_norm(nn.BatchNorm2d(3)) and internals.is_batch_norm(nn.SyncBatchNorm(3))
    assert not internals.is_batch_norm(nn.LayerNorm(3))


def test_the_zoo_checkpoint_callback_still_saves_every_n_training_steps(tmp_path) -> None:
    """Its batch end skips Lightning's checks only when no step or time trigger is set."""
    from zoo.callbacks import ModelCheckpoint

    def saved(**trigger: int) -> list[str]:
        folder = tmp_path / str(trigger)
        callback = ModelCheckpoint(
            dirpath=folder, filename="step_{step}", save_top_k=-1, auto_insert_metric_name=False, **trigger
        )
        trainer = L.Trainer(
            max_epochs=5,
            callbacks=[callback],
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(Tiny())  # 2 epochs of 3 steps
        return sorted(p.name for p in folder.glob("*.ckpt"))

    assert saved(every_n_train_steps=2) == ["step_2.ckpt", "step_4.ckpt", "step_6.ckpt"]
    assert saved(every_n_epochs=1) == ["step_3.ckpt", "step_6.ckpt"]
