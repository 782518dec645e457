"""Chapter 6 training scripts, run in FAST mode in-process through main(argv).

Checks the outputs every script promises (metrics.json keys, config.json,
PNG figures, model.keras, logs), that re-running with the same --out resumes
instead of starting over, the real-data paths (oxford_iiit_pet under
tfds.testing.mock_data, an image + mask folder) and clear ValueErrors for bad
input.
"""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.training import RunError
from ch06_segmentation import train_denoiser, train_unet

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _metrics(out):
    return json.loads((Path(out) / "metrics.json").read_text())


def test_train_unet_fast_writes_outputs_and_keeps_its_record(tmp_path):
    out = tmp_path / "unet"
    first = train_unet.main(["--fast", "--epochs", "2", "--out", str(out)])
    assert first["epochs"] == 2 and first["epochs_this_run"] == 2
    # Same command again: nothing left to train, and the record of the first run stays.
    second = train_unet.main(["--fast", "--epochs", "2", "--out", str(out)])
    assert second["epochs"] == 2 and second["epochs_this_run"] == 0
    assert second["train_seconds"] == first["train_seconds"]
    assert second["val_mean_iou"] == pytest.approx(first["val_mean_iou"])
    # Other options into the same --out are refused, naming them.
    with pytest.raises(RunError, match="--epochs"):
        train_unet.main(["--fast", "--epochs", "3", "--out", str(out)])
    metrics = _metrics(out)
    for key in ("val_mean_iou", "val_pixel_accuracy", "train_seconds", "epochs",
                "val_iou_background", "val_iou_star"):
        assert key in metrics
    assert 0.0 <= metrics["val_mean_iou"] <= 1.0 and 0.0 <= metrics["val_pixel_accuracy"] <= 1.0
    assert metrics["train_seconds"] > 0
    config = json.loads((out / "config.json").read_text())
    assert config["fast"] is True and config["epochs"] == 2 and config["image_size"] == 32
    for name in ("predictions.png", "history.png", "model.keras"):
        assert (out / name).stat().st_size > 0
    assert any((out / "logs").iterdir())
    assert (out / "checkpoint" / "state.npz").is_file()


def test_train_unet_fcn8s_fast(tmp_path):
    metrics = train_unet.main(["--fast", "--model", "fcn8s", "--epochs", "1", "--out", str(tmp_path)])
    assert metrics["model"] == "fcn8s" and 0.0 <= metrics["val_mean_iou"] <= 1.0
    assert (tmp_path / "predictions.png").is_file()


def test_train_unet_oxford_pet_under_mock_data(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4):
        metrics = train_unet.main(["--fast", "--dataset", "oxford_iiit_pet", "--epochs", "1",
                                   "--num-train-examples", "4", "--num-val-examples", "2",
                                   "--batch-size", "2", "--out", str(tmp_path)])
    assert metrics["epochs"] == 1 and "val_iou_pet" in metrics


def _write_folder(root, labels=(0, 1, 2), classes=("background", "disc", "bar")):
    rng = np.random.default_rng(0)
    for split, count in (("train", 6), ("validation", 2)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for index in range(count):
            mask = np.zeros((40, 48), np.uint8)
            cv2.circle(mask, (int(rng.integers(10, 38)), 20), 8, int(labels[1]), -1)
            mask[30:36, 5:40] = labels[2]
            image = rng.uniform(0, 60, (40, 48, 3)).astype(np.uint8)
            image[mask > 0] = 200
            cv2.imwrite(str(root / split / "images" / f"{index}.png"), image)
            cv2.imwrite(str(root / split / "masks" / f"{index}.png"), mask)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")


def test_train_unet_image_mask_folder(tmp_path):
    folder = tmp_path / "own"
    _write_folder(folder)
    metrics = train_unet.main(["--fast", "--dataset", str(folder), "--epochs", "1",
                               "--out", str(tmp_path / "run")])
    assert {"val_iou_background", "val_iou_disc", "val_iou_bar"} <= set(metrics)


def test_train_unet_rejects_labels_beyond_num_classes(tmp_path):
    folder = tmp_path / "bad"
    _write_folder(folder, labels=(0, 1, 7))  # 7 is neither a class (3 listed) nor 255
    with pytest.raises(ValueError, match=r"values must be class ids in \[0, 2\].*\[7\]"):
        train_unet.main(["--fast", "--dataset", str(folder), "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("argv,match", [
    (["--image-size", "34"], "--image-size must be a multiple of 4"),  # FAST depth 2 -> 4
    (["--model", "fcn8s", "--image-size", "48"], "multiple of 32"),
    (["--epochs", "0"], "--epochs must be > 0"),
])
def test_train_unet_bad_options(argv, match, tmp_path):
    with pytest.raises(RunError, match=match):
        train_unet.main(["--fast", "--out", str(tmp_path)] + argv)


def test_train_denoiser_fast_gain_outputs_and_resume(tmp_path):
    out = tmp_path / "denoiser"
    first = train_denoiser.main(["--fast", "--out", str(out)])
    for key in ("val_psnr_noisy", "val_psnr_denoised", "val_psnr_gain", "val_ssim_noisy",
                "val_ssim_denoised", "val_ssim_gain", "val_psnr_gain_gaussian",
                "val_psnr_gain_salt_and_pepper", "train_seconds", "epochs"):
        assert key in first
    # Even the FAST run removes noise: positive PSNR gain.
    assert first["val_psnr_gain"] > 0
    assert first["val_psnr_gain"] == pytest.approx(first["val_psnr_denoised"] - first["val_psnr_noisy"])
    assert (out / "before_after.png").stat().st_size > 0 and (out / "model.keras").is_file()
    assert first["epochs"] == 3
    second = train_denoiser.main(["--fast", "--out", str(out)])  # finished: the record stays
    assert second["epochs"] == 3 and second["epochs_this_run"] == 0
    assert second["train_seconds"] == first["train_seconds"]


