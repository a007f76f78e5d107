"""Predictions for new inputs: evaluate.py data_path=<csv> beside the scores of a table run, and mode=predict
input=<path> for image classifiers (a folder), table runs (a CSV file), language models and seq2seq (a text file)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from sklearn.datasets import load_breast_cancer, load_diabetes

from tests.conftest import compose_config, run_script
from zoo.errors import UserError
from zoo.records import load_lightning_checkpoint
from zoo.run import build_model, evaluate, train

SHORT = ["trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1"]
CORPUS = "the quick brown fox jumps over the lazy dog. " * 40 + "pack my box with five dozen liquor jugs!\n" * 40
TINY_LM = [
    "experiment=char_lm",
    "data.block_size=16",
    "data.batch_size=16",
    "data.eval_batch_size=64",
    "model.net.d_model=32",
    "model.net.n_layers=2",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=8",
    "trainer.limit_val_batches=1",
]
TINY_S2S = [
    "experiment=seq2seq_reverse",
    "data.max_len=5",
    "data.num_train=256",
    "data.num_val=64",
    "data.num_test=64",
    "data.batch_size=64",
    "model.net.d_model=32",
    "model.net.encoder_layers=1",
    "model.net.decoder_layers=1",
    *SHORT,
]


def trained(train_config, *overrides: str, folder: str = "run") -> tuple[object, str]:
    epochs = [] if any(o.startswith("trainer.max_epochs=") for o in overrides) else ["trainer.max_epochs=2"]
    cfg = train_config(*overrides, *epochs, "logger=none", folder=folder)
    train(cfg)
    return cfg, str(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")


def evaluated(tmp_path: Path, ckpt: str | Path, *overrides: str, folder: str = "eval") -> Path:
    """Runs evaluate; returns its output folder."""
    cfg = compose_config("eval", [f"ckpt_path={ckpt}", "extras.print_config=false", *overrides], tmp_path)
    cfg.paths.output_dir = str(tmp_path / folder)
    evaluate(cfg)
    return tmp_path / folder


def predicted(tmp_path: Path, ckpt: str, rows: pd.DataFrame, folder: str = "eval") -> pd.DataFrame:
    source = tmp_path / "new_rows.csv"
    rows.to_csv(source, index=False)
    return pd.read_csv(evaluated(tmp_path, ckpt, f"data_path={source}", folder=folder) / "predictions.csv")


def predicted_by_mode(
    tmp_path: Path, ckpt: str | Path, source: Path, *overrides: str, folder: str, dtype: object = None
) -> pd.DataFrame:
    output = evaluated(tmp_path, ckpt, "mode=predict", f"input={source}", *overrides, folder=folder)
    return pd.read_csv(output / "predictions.csv", keep_default_na=False, dtype=dtype)


def weights(cfg, ckpt: str, data) -> torch.nn.Module:
    model = build_model(cfg, data)
    model.load_state_dict(load_lightning_checkpoint(Path(ckpt))["state_dict"])
    return model.eval()


# ---- tables ----------------------------------------------------------------------------------------------------------


def test_classifier_predicts_raw_rows_as_it_scored_the_test_split(train_config, tmp_path: Path) -> None:
    cfg, ckpt = trained(train_config, "experiment=mlp_breast_cancer")
    frame = load_breast_cancer(as_frame=True).frame
    result = predicted(tmp_path, ckpt, frame.drop(columns=["target"]).head(40))
    assert list(result.columns[-3:]) == ["prediction", "probability_0", "probability_1"]
    assert result[["probability_0", "probability_1"]].sum(axis=1).round(5).eq(1).all()
    # the same rows through the datamodule's own encoding and scaling give the same probabilities
    data = instantiate(cfg.data)
    data.setup("fit")
    model = weights(cfg, ckpt, data)
    x = torch.as_tensor(data.table.encoded(frame.drop(columns=["target"]).head(40)), dtype=torch.float32)
    with torch.no_grad():
        expected = model((x - data.mean) / data.std).softmax(-1)[:, 1].numpy()
    assert abs(result["probability_1"].to_numpy() - expected).max() < 1e-5
    assert (result["prediction"] == frame["target"].head(40)).mean() > 0.8  # mostly right after two epochs
    # mode=predict input=<csv> writes the same file, without scoring
    by_mode = predicted_by_mode(tmp_path, ckpt, tmp_path / "new_rows.csv", folder="predict")
    pd.testing.assert_frame_equal(by_mode, result)
    assert not (tmp_path / "predict" / "metrics.json").exists()


def test_regressor_predicts_on_the_targets_scale_and_images_are_refused(train_config, tmp_path: Path) -> None:
    cfg, ckpt = trained(train_config, "experiment=mlp_diabetes")
    rows = load_diabetes(as_frame=True, scaled=False).frame.drop(columns=["target"]).head(9)
    result = predicted(tmp_path, ckpt, rows)
    assert len(result) == 9 and result["prediction"].between(0, 400).all() and result["prediction"].std() > 1
    by_mode = predicted_by_mode(tmp_path, ckpt, tmp_path / "new_rows.csv", folder="predict")
    data = instantiate(cfg.data)
    data.setup("fit")
    x = torch.as_tensor(data.table.encoded(rows), dtype=torch.float32)
    with torch.no_grad():
        expected = weights(cfg, ckpt, data)((x - data.mean) / data.std).numpy()
    assert np.abs(by_mode["prediction"].to_numpy() - expected).max() < 1e-3  # values in the hundreds
    assert list(by_mode.columns) == [*rows.columns, "prediction"]
    _, image_ckpt = trained(train_config, "experiment=cnn_digits", "trainer.limit_train_batches=2", folder="cnn")
    with pytest.raises(UserError, match="data_path: new rows are predicted for table runs"):
        predicted(tmp_path, image_ckpt, pd.DataFrame({"a": [1]}), folder="eval_cnn")


def test_xgboost_predicts_a_csv_as_its_booster_does(train_config, tmp_path: Path) -> None:
    import xgboost as xgb

    cfg = train_config("experiment=xgb_breast_cancer", "model.n_estimators=5", "logger=none")
    train(cfg)
    model_file = Path(cfg.paths.output_dir) / "model.json"
    rows = load_breast_cancer(as_frame=True).frame.drop(columns=["target"]).head(25)
    rows.to_csv(tmp_path / "rows.csv", index=False)
    result = predicted_by_mode(tmp_path, model_file, tmp_path / "rows.csv", folder="predict")
    expected = xgb.Booster(model_file=str(model_file)).predict(xgb.DMatrix(rows))
    assert np.abs(result["probability_1"].to_numpy() - expected).max() < 1e-6
    assert (result["prediction"] == (expected > 0.5).astype(int)).all()


# ---- images ----------------------------------------------------------------------------------------------------------


def test_image_classifier_predicts_a_folder_of_pngs_as_its_test_tensors(train_config, tmp_path: Path) -> None:
    cfg, ckpt = trained(train_config, "experiment=cnn_mnist5k", *SHORT, folder="cnn")
    data = instantiate(cfg.data)
    data.setup("test")
    x = data.splits["test"][0][:6]
    folder = tmp_path / "images"
    names = [f"a/{i}.png" if i < 3 else f"b/c/{i}.png" for i in range(len(x))]
    for name, image in zip(names, x):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        pixels = (image[0].numpy() * 255).round().astype(np.uint8)  # mnist5k's own 8-bit pixels
        Image.fromarray(pixels, mode="L").save(folder / name)
    (folder / "notes.txt").write_text("not an image")
    (folder / "b" / "table.csv").write_text("a,b\n1,2\n")

    result = predicted_by_mode(tmp_path, ckpt, folder, "accelerator=cpu", folder="predict")
    with torch.no_grad():
        expected = weights(cfg, ckpt, data)(x).softmax(-1).numpy()
    assert list(result.columns) == ["file", "label", *(f"prob_{k}" for k in range(10))]
    assert result["file"].tolist() == names
    probabilities = result[[f"prob_{k}" for k in range(10)]].to_numpy()
    assert np.abs(probabilities - expected).max() < 1e-5
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert result["label"].astype(int).tolist() == expected.argmax(axis=1).tolist()


def test_image_preprocessing_follows_each_datamodule(tmp_path: Path) -> None:
    from zoo.data.bundled import DigitsDataModule, resize_images
    from zoo.data.vision import ImageFolderDataModule, TorchvisionDataModule
    from zoo.predict import class_names, image_reader

    rng = np.random.default_rng(0)
    gray, rgb = tmp_path / "gray.png", tmp_path / "rgb.png"
    gray_pixels, rgb_pixels = rng.integers(0, 256, (8, 8), dtype=np.uint8), rng.integers(0, 256, (40, 40, 3))
    Image.fromarray(gray_pixels, mode="L").save(gray)
    Image.fromarray(rgb_pixels.astype(np.uint8), mode="RGB").save(rgb)
    # digits framed as MNIST: the 8x8 image resized to 20x20, then 4 zero pixels around it
    digits = DigitsDataModule(input_shape=[1, 28, 28], num_classes=10, image_size=20, pad=4)
    x = image_reader(digits)(gray)
    assert x.shape == (1, 28, 28) and x[0, :4].abs().max() == 0 and x[0, :, -4:].abs().max() == 0
    expected = resize_images((gray_pixels / 255.0)[None, None].astype(np.float32), 20, 4)[0]
    assert torch.allclose(x, torch.from_numpy(expected))
    # CIFAR-10, normalized: an RGB image of another size is resized to 32x32, then standardized per channel
    cifar = TorchvisionDataModule("cifar10", normalize=True, data_dir=str(tmp_path))
    x = image_reader(cifar)(rgb)
    scaled = torch.from_numpy(resize_images((rgb_pixels / 255.0).transpose(2, 0, 1)[None].astype(np.float32), 32, 0))
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2470, 0.2435, 0.2616])
    assert torch.allclose(x, (scaled[0] - mean[:, None, None]) / std[:, None, None], atol=1e-6)
    assert class_names(cifar)[:3] == ["airplane", "automobile", "bird"]  # no file read: batches.meta is a pickle
    assert class_names(TorchvisionDataModule("fashion_mnist", data_dir=str(tmp_path)))[0] == "T-shirt/top"
    # an image folder run: its own test transform, grayscale, resized to 16x16
    for label in ("cat", "dog"):
        for i in range(5):
            (tmp_path / "pets" / label).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (20, 20, 3)).astype(np.uint8)).save(
                tmp_path / "pets" / label / f"{i}.png"
            )
    folder = ImageFolderDataModule(str(tmp_path / "pets"), input_shape=[1, 16, 16], num_classes=2, image_size=16)
    x = image_reader(folder)(rgb)
    assert x.shape == (1, 16, 16) and x.min() >= 0 and x.max() <= 1
    assert class_names(folder) == ["cat", "dog"]


# ---- text ------------------------------------------------------------------------------------------------------------


def test_language_model_continues_each_line_as_sample_mode_does(train_config, tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    _, ckpt = trained(train_config, *TINY_LM, f"data.path={corpus}", folder="lm")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the quick\n\npack my\n   \r\nlazy dog\n", encoding="utf-8")
    settings = ["temperature=0", "max_new_tokens=12"]
    result = predicted_by_mode(tmp_path, ckpt, prompts, *settings, folder="predict", dtype=str)
    assert list(result.columns) == ["prompt", "continuation"]
    assert result["prompt"].tolist() == ["the quick", "pack my", "lazy dog"]
    assert result["continuation"].str.len().eq(12).all()
    for number in (0, 2):
        prompt, continuation = result["prompt"].iloc[number], result["continuation"].iloc[number]
        capsys.readouterr()
        evaluated(tmp_path, ckpt, "mode=sample", f"prompt={prompt}", *settings, folder=f"sample{number}")
        assert capsys.readouterr().out.rstrip("\n") == prompt + continuation
    # drawn at a temperature with a seed: each line as mode=sample draws it with that seed
    drawn = ["temperature=1.0", "sample_seed=3", "max_new_tokens=20"]
    result = predicted_by_mode(tmp_path, ckpt, prompts, *drawn, folder="predict_drawn", dtype=str)
    capsys.readouterr()
    evaluated(tmp_path, ckpt, "mode=sample", "prompt=lazy dog", *drawn, folder="sample_drawn")
    assert capsys.readouterr().out.rstrip("\n") == "lazy dog" + result["continuation"].iloc[2]
    prompts.write_text("the quick\nZebra\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"^input: line 2: characters not in the model's vocabulary: 'Z'"):
        evaluated(tmp_path, ckpt, "mode=predict", f"input={prompts}", folder="bad")


def test_seq2seq_decodes_each_line_greedily(train_config, tmp_path: Path) -> None:
    cfg, ckpt = trained(train_config, *TINY_S2S, folder="s2s")
    sources = tmp_path / "sources.txt"
    sources.write_text("12345\n\n907\n 4 \n", encoding="utf-8")
    result = predicted_by_mode(tmp_path, ckpt, sources, folder="predict", dtype=str)
    assert list(result.columns) == ["source", "prediction"]
    assert result["source"].tolist() == ["12345", "907", "4"]
    data = instantiate(cfg.data)
    model = weights(cfg, ckpt, data)
    src = torch.tensor([data.source_ids(s) for s in ("12345", "907", "4")])
    with torch.no_grad():
        expected = [model.text(row) for row in model.decode(src, beam_size=1).tolist()]
    assert result["prediction"].tolist() == expected
    sources.write_text("123\n12a\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"^input: line 2: expected a string of digits \(e.g. 4721\), got '12a'$"):
        evaluated(tmp_path, ckpt, "mode=predict", f"input={sources}", folder="bad")
    sources.write_text("123456\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"^input: line 1: '123456' has more than the run's 5 digits$"):
        evaluated(tmp_path, ckpt, "mode=predict", f"input={sources}", folder="bad")


# ---- mistakes --------------------------------------------------------------------------------------------------------


def fake_run(train_config, tmp_path: Path, *overrides: str, folder: str) -> Path:
    """A run folder with its config and an empty checkpoint: enough for every refusal made before loading weights."""
    cfg = train_config(*overrides, folder=folder)
    run = Path(cfg.paths.output_dir)
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save(cfg, run / "config.yaml", resolve=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    return run / "checkpoints" / "last.ckpt"


def refused(tmp_path: Path, ckpt: Path, *overrides: str) -> str:
    with pytest.raises(UserError) as error:
        evaluated(tmp_path, ckpt, *overrides, folder="refused")
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_input_is_refused_in_one_line(train_config, tmp_path: Path) -> None:
    images, empty, csv = tmp_path / "images", tmp_path / "empty", tmp_path / "rows.csv"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("no images here")
    images.mkdir()
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(images / "0.png")
    csv.write_text("a,b\n1,2\n")
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)))
    cnn = fake_run(train_config, tmp_path, "experiment=cnn_mnist5k", folder="cnn")
    lm = fake_run(train_config, tmp_path, "experiment=char_lm", folder="lm")
    mlp = fake_run(train_config, tmp_path, "experiment=mlp_breast_cancer", folder="mlp")

    assert re.fullmatch(
        r"input: missing: a folder of images \(png, jpg, \.\.\.\) to predict \(mode=predict input=<path>\)",
        refused(tmp_path, cnn, "mode=predict"),
    )
    assert refused(tmp_path, cnn, "mode=predict", f"input={tmp_path / 'nowhere'}") == (
        f"input: no file or folder at '{tmp_path / 'nowhere'}'"
    )
    assert re.fullmatch(
        r"input: '.*rows\.csv' is a file; this run, an image classifier on MNIST5kDataModule, predicts a folder of "
        r"images \(png, jpg, \.\.\.\)",
        refused(tmp_path, cnn, "mode=predict", f"input={csv}"),
    )
    assert re.fullmatch(
        r"input: no images \(png, jpg, \.\.\.\) in '.*empty' or its sub-folders",
        refused(tmp_path, cnn, "mode=predict", f"input={empty}"),
    )
    assert re.fullmatch(
        r"input: '.*images' is a folder; this run, a character language model, predicts a text file with one "
        r"prompt per line",
        refused(tmp_path, lm, "mode=predict", f"input={images}"),
    )
    assert re.fullmatch(
        r"input: '.*weights\.bin' is not UTF-8 text; .*", refused(tmp_path, lm, "mode=predict", f"input={binary}")
    )
    assert re.fullmatch(
        r"input: '.*0\.png' is not a CSV file; this run, a classifier on a table, predicts a CSV file with the run's "
        r"feature columns",
        refused(tmp_path, mlp, "mode=predict", f"input={images / '0.png'}"),
    )
    # families without predictions name those with them
    for experiment, name in (("dcgan_mnist", "GANTask"), ("dqn_cartpole", "DQNTask"), ("cnn_mnist1d", "")):
        ckpt = fake_run(train_config, tmp_path, f"experiment={experiment}", folder=experiment)
        message = refused(tmp_path, ckpt, "mode=predict", f"input={csv}")
        shown = name or "ClassificationTask on MNIST1DDataModule"
        assert re.fullmatch(
            rf"mode: 'predict' is not offered by {shown} runs; it is for image classifiers \(a folder of images\), "
            r"classifiers and regressors on tables, XGBoost and scikit-learn \(a CSV file\), .*seq2seq.*",
            message,
        ), message
    # nothing on disk is replaced; `input` needs mode=predict; data_path belongs to scoring
    existing = tmp_path / "old.csv"
    existing.write_text("kept\n")
    assert refused(tmp_path, mlp, "mode=predict", f"input={csv}", f"predictions={existing}") == (
        f"predictions: '{existing}' already exists; give another file (predictions=<file.csv>)"
    )
    assert existing.read_text() == "kept\n"
    assert (
        refused(tmp_path, mlp, f"input={csv}") == "input: read by mode=predict only; add mode=predict (mode is 'score')"
    )
    assert refused(tmp_path, mlp, "mode=predict", f"data_path={csv}").startswith("data_path: mode=score predicts it")


def test_evaluate_py_reports_a_missing_input_in_one_line(train_config, tmp_path: Path) -> None:
    ckpt = fake_run(train_config, tmp_path, "experiment=char_lm", folder="lm")
    done = run_script("evaluate.py", f"ckpt_path={ckpt}", "mode=predict", cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: input: missing: a text file with one prompt per line to predict (mode=predict input=<path>)"
    ]
