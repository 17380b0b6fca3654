"""`napari-unet train --dataset`: epochs printed with their validation scores, the best model in --out, the last one
beside it, --resume, one-line errors; `predict` with the model gives the dataset's mask values."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from test_datasets import make_plain, make_voc

from napari_unet.cli import last_checkpoint_path, main
from napari_unet.io import load_model

TINY = ["--depth", "1", "--filters", "4", "--patch-size", "24", "--batch-size", "2", "--device", "cpu"]


def test_train_dataset_prints_epochs_keeps_best_and_resumes(tmp_path, capsys):
    make_voc(tmp_path / "voc", count=5, rgb=False)
    (tmp_path / "voc" / "classes.txt").write_text("background\nnucleus\n")
    out = tmp_path / "model.safetensors"
    assert main(["train", "--dataset", str(tmp_path / "voc"), "--out", str(out), "--epochs", "2", *TINY]) == 0
    err = capsys.readouterr().err
    assert "validating on 2 (voc layout" in err and "classes 0 background, 1 nucleus" in err
    assert "epoch 1/2  val loss" in err and "epoch 2/2" in err and "nucleus IoU" in err and "best epoch" in err
    assert "calibration: temperature" in err and "expected calibration error" in err
    model, meta = load_model(out)
    assert model.temperature == meta["calibration"]["temperature"]
    assert meta["class_ids"] == [0, 1] and meta["dense_labels"] and meta["class_names"] == ["background", "nucleus"]
    record = meta["dataset_training"]
    assert [s["epoch"] for s in record["epochs"]] == [1, 2]
    assert record["best_mean_iou"] == max(s["mean_iou"] for s in record["epochs"])
    last = last_checkpoint_path(out)
    assert last.name == "model.last.safetensors" and load_model(last)[1]["dataset_training"]["iteration"] == (
        2 * record["epoch_iterations"]
    )
    # resume with more epochs: epochs 3 and 4 follow
    args = ["train", "--dataset", str(tmp_path / "voc"), "--out", str(out), "--epochs", "4", "--resume", *TINY]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "epoch 1/" not in err and "epoch 3/4" in err and "epoch 4/4" in err
    assert [s["epoch"] for s in load_model(last)[1]["dataset_training"]["epochs"]] == [1, 2, 3, 4]
    # predict: labels with the dataset's values
    image = np.asarray(__import__("PIL.Image").Image.open(next((tmp_path / "voc" / "JPEGImages").glob("*0.png"))))
    tifffile.imwrite(tmp_path / "new.tif", image)
    assert main(["predict", "--model", str(out), str(tmp_path / "new.tif"), "--out", str(tmp_path / "pred")]) == 0
    labels = tifffile.imread(next((tmp_path / "pred").glob("*labels*.tif")))
    assert set(np.unique(labels)) <= {0, 1} and labels.shape == image.shape


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--images", "x.tif"], "not both"),
        (["--iterations", "5"], "counts --epochs"),
        (["--resume"], "no checkpoint"),
        (["--border-weight"], "border weights are for sparse strokes"),
    ],
)
def test_train_dataset_errors_are_one_line(tmp_path, capsys, extra, message):
    make_plain(tmp_path / "data", count=3, suffix=".png")
    args = ["train", "--dataset", str(tmp_path / "data"), "--out", str(tmp_path / "m.safetensors"), *TINY, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_broken_dataset_is_one_line(tmp_path, capsys):
    make_plain(tmp_path / "data", count=3, suffix=".png")
    (tmp_path / "data" / "masks" / "cell1.png").unlink()
    assert main(["train", "--dataset", str(tmp_path / "data"), "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("napari-unet: error:") and "cell1.png has no mask" in err and len(err.splitlines()) == 1
    assert main(["train", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "or --dataset DIR" in capsys.readouterr().err


def test_train_dataset_with_vgg16_encoder_weights(tmp_path, capsys):
    import torch
    from test_encoders import vgg16_features

    features = vgg16_features()
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg16.pth")
    make_plain(tmp_path / "data", count=3, suffix=".png", size=(40, 40))
    out = tmp_path / "m.safetensors"
    args = ["train", "--dataset", str(tmp_path / "data"), "--out", str(out), "--epochs", "1", "--depth", "1"]
    args += ["--patch-size", "8", "--batch-size", "1", "--device", "cpu", "--block", "vgg16", "--filters", "64"]
    assert main([*args, "--encoder-weights", str(tmp_path / "vgg16.pth"), "--freeze-encoder", "100"]) == 0
    assert "encoder: 4 convolutions from" in capsys.readouterr().err
    model, meta = load_model(out)
    # grey images: VGG's first kernels averaged over RGB; the encoder stayed frozen (100 iterations > one epoch)
    torch.testing.assert_close(model.encoder[0].layers[0].conv.weight, features[0].weight.mean(1, keepdim=True))
    assert meta["training"]["history"][-1]["settings"]["freeze_encoder"] == 100
    assert main([*args, "--filters", "32", "--encoder-weights", str(tmp_path / "vgg16.pth")]) == 2
    assert "needs the 2D vgg16 layout" in capsys.readouterr().err
