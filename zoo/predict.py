"""`python evaluate.py ckpt_path=<file> mode=predict input=<path>`: a run's predictions for new inputs, written to
`<output_dir>/predictions.csv` (or to the file `predictions` names, which must not exist yet).

What `input` is depends on the run:
- image classifiers (data=digits, mnist, mnist5k, fashion_mnist, cifar10, image_folder): a folder of images,
  sub-folders included, each read as the run's data module reads its test images (channels, size, value range,
  normalization); one row per image: `file` (relative to the folder), `label`, `prob_<class>` for each class
- classifiers and regressors on tables, XGBoost and scikit-learn: a CSV file with the run's feature columns, its
  rows written back with a `prediction` column (and class probabilities), as `data_path` writes them
- character language models: a text file, each non-blank line a prompt continued as `mode=sample` continues it
  (max_new_tokens, temperature, top_k, sample_seed); rows `prompt`, `continuation`
- seq2seq: a text file, each non-blank line a source (`4721`, or `12+345` for sums) decoded greedily; rows
  `source`, `prediction`
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from zoo.errors import UserError

if TYPE_CHECKING:
    import torch

IMAGES, TABLE, PROMPTS, SOURCES = "images", "table", "prompts", "sources"
ACCEPTS = {
    IMAGES: "a folder of images (png, jpg, ...)",
    TABLE: "a CSV file with the run's feature columns",
    PROMPTS: "a text file with one prompt per line",
    SOURCES: "a text file with one source sequence per line",
}
FAMILIES = (
    "image classifiers (a folder of images), classifiers and regressors on tables, XGBoost and scikit-learn "
    "(a CSV file), character language models and seq2seq (a text file, one input per line)"
)


def predict(cfg: DictConfig, run_cfg: DictConfig, ckpt_path: Path) -> dict[str, float]:
    """Check `input` against what the run reads, then write one row of predictions per image, table row or line."""
    from zoo.classic.run import check_new_file
    from zoo.run import is_classic

    kind, run = run_kind(run_cfg)
    if kind is None:
        raise UserError(f"mode: 'predict' is not offered by {run} runs; it is for {FAMILIES}")
    if cfg.get("data_path"):
        raise UserError("data_path: mode=score predicts it beside the scores; mode=predict reads input=<path> instead")
    source = checked_input(cfg.get("input"), kind, run)
    target = Path(str(cfg.get("predictions") or Path(cfg.paths.output_dir) / "predictions.csv")).expanduser()
    check_new_file(target)
    if kind == TABLE and is_classic(run_cfg):
        from zoo.classic import run as classic_run

        classic_run.predict_file(run_cfg, ckpt_path, source, target)
        return {}
    # the inputs are read before the model is built, so that a bad one is refused at once
    files = image_files(source) if kind == IMAGES else []
    lines = text_lines(source, kind, run) if kind in (PROMPTS, SOURCES) else []
    model, datamodule = _trained_model(run_cfg, ckpt_path)
    if kind == TABLE:
        from zoo.run import predict_table_rows

        datamodule.setup("test")  # the training split's column means and deviations
        predict_table_rows(model, datamodule, source, target, key="input")
        return {}
    if kind == IMAGES:
        rows = predict_images(cfg, model, datamodule, source, files)
    elif kind == PROMPTS:
        rows = [{"prompt": p, "continuation": c} for p, c in continue_prompts(cfg, model, lines)]
    else:
        rows = predict_sources(cfg, model, datamodule, lines)
    _write(rows, target)
    return {}


def run_kind(run_cfg: DictConfig) -> tuple[str | None, str]:
    """What the run predicts from (None: nothing), and the run in words, from its config alone."""
    from zoo.data.bundled import DigitsDataModule, MNIST5kDataModule
    from zoo.data.tabular import TabularDataModule
    from zoo.data.vision import ImageFolderDataModule, TorchvisionDataModule
    from zoo.run import is_classic
    from zoo.tasks.char_lm import CharLMTask
    from zoo.tasks.classification import ClassificationTask
    from zoo.tasks.regression import RegressionTask
    from zoo.tasks.seq2seq import Seq2SeqTask

    model, data = _target_class(run_cfg.get("model")), _target_class(run_cfg.get("data"))
    model_name = model.__name__ if model is not None else str((run_cfg.get("model") or {}).get("_target_"))
    if is_classic(run_cfg):
        from zoo.classic.estimators import Estimator
        from zoo.classic.model import XGBoostModel

        if _subclass(model, XGBoostModel):
            return TABLE, "an XGBoost model"
        if _subclass(model, Estimator):
            return TABLE, "a scikit-learn model"
        return None, model_name
    if _subclass(model, CharLMTask):
        return PROMPTS, "a character language model"
    if _subclass(model, Seq2SeqTask):
        return SOURCES, "a seq2seq model"
    data_name = data.__name__ if data is not None else "its data"
    if _subclass(model, ClassificationTask | RegressionTask) and _subclass(data, TabularDataModule):
        return TABLE, f"a {'classifier' if _subclass(model, ClassificationTask) else 'regressor'} on a table"
    image_data = (DigitsDataModule, MNIST5kDataModule, TorchvisionDataModule, ImageFolderDataModule)
    if _subclass(model, ClassificationTask) and _subclass(data, image_data):
        return IMAGES, f"an image classifier on {data_name}"
    if _subclass(model, ClassificationTask | RegressionTask):
        return None, f"{model_name} on {data_name}"
    return None, model_name


def _target_class(node: Any) -> type | None:
    from hydra._internal.utils import _locate

    target = (node or {}).get("_target_")
    try:
        found = _locate(str(target))
    except (ImportError, AttributeError, ValueError):
        return None
    return found if isinstance(found, type) else None


def _subclass(found: type | None, parents: Any) -> bool:
    return found is not None and issubclass(found, parents)


def checked_input(value: Any, kind: str, run: str) -> Path:
    """`input` as a path that exists and is of the kind the run reads; every refusal in one line."""
    if value is None or str(value) == "":
        raise UserError(f"input: missing: {ACCEPTS[kind]} to predict (mode=predict input=<path>)")
    source = Path(str(value)).expanduser()
    if not source.exists():
        raise UserError(f"input: no file or folder at '{source}'")
    if kind == IMAGES and not source.is_dir():
        wrong = "a file"
    elif kind != IMAGES and source.is_dir():
        wrong = "a folder"
    elif kind == TABLE and ".csv" not in [s.lower() for s in source.suffixes]:
        wrong = "not a CSV file"
    else:
        return source
    raise UserError(f"input: '{source}' is {wrong}; this run, {run}, predicts {ACCEPTS[kind]}")


def _trained_model(run_cfg: DictConfig, ckpt_path: Path) -> tuple[Any, Any]:
    """The run's task with the checkpoint's weights, in eval mode, and its data module."""
    from hydra.utils import instantiate

    from zoo.records import load_lightning_checkpoint
    from zoo.run import build_model, check_checkpoint, quiet_lightning_logging

    quiet_lightning_logging()
    datamodule = instantiate(run_cfg.data)
    model = build_model(run_cfg, datamodule)
    check_checkpoint(str(ckpt_path), model)
    model.load_state_dict(load_lightning_checkpoint(ckpt_path)["state_dict"])
    return model.eval(), datamodule


# ---- images ----------------------------------------------------------------------------------------------------------


def image_files(folder: Path) -> list[Path]:
    """The images under `folder`, sub-folders included, in sorted order; other files are skipped."""
    from zoo.data.cyclegan import list_images

    files = list_images(folder)
    if not files:
        raise UserError(f"input: no images (png, jpg, ...) in '{folder}' or its sub-folders")
    return files


def predict_images(
    cfg: DictConfig, model: Any, datamodule: Any, folder: Path, files: list[Path]
) -> list[dict[str, Any]]:
    """Class probabilities of each of `files` (images under `folder`), with the most probable class as `label`."""
    import torch

    read = image_reader(datamodule)
    names = class_names(datamodule)
    device = _device(cfg)
    model.to(device)
    batch_size = int(cfg.get("batch_size") or getattr(datamodule, "eval_batch_size", 256))
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        x = torch.stack([read(path) for path in chunk]).to(device)
        with torch.no_grad():
            proba = model(x).float().softmax(-1).cpu()
        for path, best, p in zip(chunk, proba.argmax(-1).tolist(), proba.tolist()):
            row = {"file": path.relative_to(folder).as_posix(), "label": names[best]}
            row.update({f"prob_{name}": value for name, value in zip(names, p)})
            rows.append(row)
    return rows


def image_reader(datamodule: Any) -> Callable[[Path], torch.Tensor]:
    """One image file to the tensor the network takes, as the data module makes its test images.

    An image folder's own test transform (resize to data.image_size, then [0, 1]). The in-memory sets scale 8-bit
    pixels to [0, 1], resize an image of another size to theirs, and add what their loading adds: the digits'
    resize to data.image_size and frame of data.pad zeros (an image is one digit filling its frame, as
    scikit-learn's 8x8 ones are), torchvision sets' per-channel standardization when data.normalize is true.
    """
    import numpy as np
    import torch

    from zoo.data.bundled import DigitsDataModule, resize_images
    from zoo.data.vision import DATASETS, ImageFolderDataModule, TorchvisionDataModule

    if isinstance(datamodule, ImageFolderDataModule):
        transform = datamodule._transform(train=False)
        mode = "L" if datamodule.channels == 1 else "RGB"
        return lambda path: transform(_open_image(path, mode))

    channels, height, _ = datamodule.input_shape
    mode = "L" if channels == 1 else "RGB"
    pad = datamodule.pad if isinstance(datamodule, DigitsDataModule) else 0
    mean = std = None
    if isinstance(datamodule, TorchvisionDataModule) and datamodule.normalize:
        _, _, _, _, mean_, std_ = DATASETS[datamodule.name]
        mean, std = (torch.tensor(v, dtype=torch.float32).reshape(-1, 1, 1) for v in (mean_, std_))

    def read(path: Path) -> torch.Tensor:
        pixels = np.asarray(_open_image(path, mode), dtype=np.float64) / 255.0
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        x = torch.from_numpy(resize_images(pixels[None].astype(np.float32), height - 2 * pad, pad)[0])
        return x if mean is None else (x - mean) / std

    return read


def _open_image(path: Path, mode: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise UserError(f"input: cannot read the image '{path}' ({type(error).__name__})") from None


def class_names(datamodule: Any) -> list[str]:
    """The data module's class names where it has them (torchvision's sets, an image folder's sub-folders), else
    the class indices."""
    import logging

    from zoo.data.vision import ImageFolderDataModule, TorchvisionDataModule

    count = int(datamodule.num_classes)
    names: list[str] | None = None
    if isinstance(datamodule, TorchvisionDataModule):
        names = _torchvision_classes(datamodule)
    elif isinstance(datamodule, ImageFolderDataModule):  # numbered as the training folder's class folders
        source = datamodule.root / "train" if (datamodule.root / "train").is_dir() else datamodule.root
        if source.is_dir():
            names = list(datamodule._scan(source))
        else:
            logging.getLogger(__name__).warning("no folder %s: labels are class indices, not names", source)
    if names is None or len(names) != count:
        names = [str(i) for i in range(count)]
    return [str(name) for name in names]


# CIFAR-10's classes in label order, as its batches.meta lists them; that file is a pickle, and reading it would run
# whatever code a tampered copy holds
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _torchvision_classes(datamodule: Any) -> list[str] | None:
    """torchvision's names: MNIST's and Fashion-MNIST's are in their dataset classes; CIFAR-10's are fixed."""
    import torchvision.datasets

    from zoo.data.vision import DATASETS

    names = getattr(getattr(torchvision.datasets, DATASETS[datamodule.name][0]), "classes", None)
    if isinstance(names, list):
        return names
    return list(CIFAR10_CLASSES) if datamodule.name == "cifar10" else None


def _device(cfg: DictConfig) -> Any:
    import torch

    wanted = str(cfg.get("accelerator") or "auto")
    return torch.device("cuda" if wanted in ("auto", "gpu", "cuda") and torch.cuda.is_available() else "cpu")


# ---- lines of text ---------------------------------------------------------------------------------------------------


def text_lines(source: Path, kind: str, run: str) -> list[tuple[int, str]]:
    """(line number, line) of every non-blank line of a UTF-8 file."""
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"input: '{source}' is not UTF-8 text; this run, {run}, predicts {ACCEPTS[kind]}") from None
    lines = [(n, line.rstrip("\r")) for n, line in enumerate(text.split("\n"), start=1) if line.strip()]
    if not lines:
        raise UserError(f"input: '{source}' has no lines to predict (blank lines are skipped)")
    return lines


def continue_prompts(cfg: DictConfig, model: Any, lines: list[tuple[int, str]]) -> list[tuple[str, str]]:
    """(prompt, continuation) of every numbered line, each drawn as `mode=sample prompt=<line>` draws it."""
    pairs = []
    for number, prompt in lines:
        try:
            text = model.sample_as_asked(prompt, cfg)
        except UserError as error:
            raise UserError(f"input: line {number}: {str(error).removeprefix('prompt: ')}") from None
        pairs.append((prompt, text[len(prompt) :]))
    return pairs


def predict_sources(cfg: DictConfig, model: Any, datamodule: Any, lines: list[tuple[int, str]]) -> list[dict[str, str]]:
    """The greedy decoding of every numbered line's source sequence."""
    import torch

    ids = []
    for number, line in lines:
        try:
            ids.append(datamodule.source_ids(line.strip()))
        except UserError as error:
            raise UserError(f"input: line {number}: {error}") from None
    batch_size = int(cfg.get("batch_size") or datamodule.eval_batch_size)
    decoded: list[list[int]] = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            src = torch.tensor(ids[start : start + batch_size], dtype=torch.long, device=model.device)
            decoded.extend(model.decode(src, beam_size=1).tolist())
    return [{"source": line.strip(), "prediction": model.text(row)} for (_, line), row in zip(lines, decoded)]


def _write(rows: list[dict[str, Any]], target: Path) -> None:
    import pandas as pd

    target.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(target, index=False)
    print(f"wrote {len(rows)} predictions to {target}")
