"""Training from dense masks: napari-unet's dataset training vs MONAI ``BasicUNet``, same CPU budget (issue 20).

Sets (``/work/shared/data`` or ``--data``):

- DSB 2018 nuclei (ground truth ``label > 0``): train on the first 30 images in sorted file order, score the last
  20: foreground Dice (mean over images and pooled) and mean IoU (background and nucleus, over all test pixels);
- ISBI 2012 membranes: train on slices 0-19, score slices 20-29: foreground (membrane) Dice and pixel error (the
  share of misclassified pixels of the argmax; the challenge scored its own hidden test set differently).

Contenders, each with the same training budget (``--budget`` seconds, ``--threads`` threads), run one after the
other in an order that alternates between the sets:

- ``napari_unet_dense``: ``DatasetTrainer`` exactly as ``napari-unet train --dataset DIR --time-budget B`` runs it
  (default settings, 50 epochs, 10 % of the training images validating, the best epoch kept, the temperature fitted
  on the validation pixels), on a plain-layout copy of the training images (``images/`` + ``masks/``), predicted
  as ``napari-unet predict`` does by default (``predict_image``: flips + edge refinement);
- ``monai_basicunet``: MONAI's ``BasicUNet`` with its default features (padded convolutions, instance norm), trained
  by a plain loop on random 128 x 128 crops of all the training images (batch 4, Adam 1e-3, no augmentation, no
  validation) with the same loss (``losses.masked_loss``: cross-entropy + soft Dice, unweighted), the same image
  normalization, and predicted with ``monai.inferers.sliding_window_inference`` (256 x 256 windows, overlap 0.25,
  Gaussian blending);
- ``napari_unet_strokes``: for reference, napari-unet's sparse-stroke model (``quality.train_strokes`` on
  ``quality_strokes.simulate_strokes`` strokes of the same training images), predicted by default; its temperature
  is fitted on the held-out share of the strokes (``TrainingSettings.calibration_holdout``);
- ``napari_unet_strokes_all`` (only when named in ``--contenders``): the same with ``temperature="off"``, every
  stroke training: what holding strokes out costs.

Every row reports train and predict seconds and the expected calibration error of its probabilities on the test
pixels; napari-unet's rows also with their temperature reset to 1 (``ece_uncalibrated``), so the effect of the
fitted temperature is measured on images that neither training nor the fit saw.

    python bench/dense.py [--budget 300] [--sets dsb isbi] [--threads 2] [--data DIR] [--json OUT]
        [--contenders napari_unet_dense monai_basicunet napari_unet_strokes napari_unet_strokes_all]
"""

from __future__ import annotations

import argparse
import ast
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).parent))
import quality
from quality import PAINTED, dice, train_strokes
from quality_strokes import simulate_strokes

DEFAULT_DATA = Path("/work/shared/data")
CROP, WINDOW, BATCH = 128, 256, 4


def load_dsb(data: Path):
    """The first 30 DSB images to train (dense), the last 20 to test."""
    return quality.load_dsb(data, train_count=30)


def load_isbi(data: Path):
    """ISBI slices 0-19 to train (dense), 20-29 to test."""
    return quality.load_isbi(data, train_count=20)


def write_dataset(pairs, root: Path) -> Path:
    """The training pairs as a plain-layout dataset folder (``images/``, ``masks/``: 0 background, 1 foreground)."""
    for kind in ("images", "masks"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    for i, (image, mask) in enumerate(pairs):
        tifffile.imwrite(root / "images" / f"{i:03d}.tif", image)
        tifffile.imwrite(root / "masks" / f"{i:03d}.tif", mask)
    return root


def scores(probabilities, truths) -> dict:
    """Foreground Dice (mean, pooled), mean IoU over both classes, pixel error and ECE of ``(2, Y, X)`` maps."""
    from napari_unet.calibration import expected_calibration_error

    predictions = [p.argmax(0) == 1 for p in probabilities]
    pred = np.concatenate([p.ravel() for p in predictions])
    truth = np.concatenate([t.ravel() for t in truths])
    ious = [np.logical_and(pred == c, truth == c).sum() / np.logical_or(pred == c, truth == c).sum() for c in (0, 1)]
    flat = np.concatenate([p.reshape(2, -1).T for p in probabilities])
    return {
        "dice_mean": float(np.mean([dice(p, t) for p, t in zip(predictions, truths)])),
        "dice_pooled": dice(pred, truth),
        "mean_iou": float(np.mean(ious)),
        "pixel_error": float(np.mean(pred != truth)),
        "ece": expected_calibration_error(flat, truth.astype(np.int64)),
    }


def predict_napari_unet(model, metadata, images, **options) -> tuple[list, float]:
    """``predict_image`` with the default ``PredictionSettings`` (``options`` replace fields) on each image."""
    from napari_unet.predict import PredictionSettings, predict_image

    start = time.perf_counter()
    settings = PredictionSettings(device="cpu", **options)
    probabilities = [np.asarray(predict_image(model, metadata, im, settings).probabilities) for im in images]
    return probabilities, time.perf_counter() - start


def scored_napari_unet(model, metadata, test_images, truths, foreground: int) -> dict:
    """Default prediction scored, once with the model's temperature and once with it reset to 1; and without the
    edge refinement (``*_unrefined``: flips only)."""
    probabilities, predict_s = predict_napari_unet(model, metadata, test_images)
    order = [1 - foreground, foreground]
    result = {
        "predict_s": predict_s,
        "temperature": model.temperature,
        **scores([p[order] for p in probabilities], truths),
    }
    plain = copy.deepcopy(model)
    plain.temperature = 1.0
    probabilities, _ = predict_napari_unet(plain, metadata, test_images)
    result["ece_uncalibrated"] = scores([p[order] for p in probabilities], truths)["ece"]
    probabilities, _ = predict_napari_unet(model, metadata, test_images, refine_radius=0)
    unrefined = scores([p[order] for p in probabilities], truths)
    result.update({f"{k}_unrefined": unrefined[k] for k in ("dice_mean", "dice_pooled", "ece")})
    return result


def napari_unet_dense(
    train_pairs, test_pairs, budget: float, threads: int, workdir: Path, overrides: dict | None = None
) -> dict:
    """``napari-unet train --dataset`` with its defaults (``overrides``: ``TrainingSettings`` fields, and ``epochs``)
    and ``--time-budget budget``."""
    from napari_unet.dataset_training import DatasetTrainer
    from napari_unet.datasets import open_dataset
    from napari_unet.training import TrainingSettings

    dataset = open_dataset(write_dataset(train_pairs, workdir / "dataset"), val_fraction=0.1, seed=0, spatial_ndim=2)
    start = time.perf_counter()
    overrides = dict(overrides or {})
    epochs = overrides.pop("epochs", 50)
    settings = TrainingSettings(ndim=2, time_budget=budget, device="cpu", seed=0, cpu_threads=threads, **overrides)
    trainer = DatasetTrainer(dataset, settings, epochs=epochs)
    for _ in trainer.run():
        pass
    train_s = time.perf_counter() - start
    record = trainer.metadata["training"]["history"][-1]
    result = {
        "train_s": train_s,
        "iterations": record["iterations"],
        "epochs": len(trainer.scores),
        "best_epoch": trainer.best_epoch,
        "validation_calibration": trainer.calibration,
    }
    truths = [gt.astype(bool) for _, gt in test_pairs]
    foreground = trainer.class_ids.index(1)
    result.update(scored_napari_unet(trainer.model, trainer.metadata, [i for i, _ in test_pairs], truths, foreground))
    return result


def napari_unet_strokes(
    train_pairs, test_pairs, budget: float, threads: int, workdir: Path, overrides: dict | None = None
) -> dict:
    """``bench/quality.py``'s sparse-stroke training on strokes simulated from the same training masks (defaults:
    the temperature fitted on the held-out share of the strokes)."""
    images = [image for image, _ in train_pairs]
    strokes = [simulate_strokes(gt, PAINTED, seed=index) for index, (_, gt) in enumerate(train_pairs)]
    start = time.perf_counter()
    trainer = train_strokes(images, strokes, budget, threads, overrides or {})
    result = {"train_s": time.perf_counter() - start, "painted_pixels": int(sum((s > 0).sum() for s in strokes))}
    result["iterations"] = trainer.metadata["training"]["history"][-1]["iterations"]
    result["validation_calibration"] = getattr(trainer, "calibration", None)
    truths = [gt.astype(bool) for _, gt in test_pairs]
    foreground = trainer.class_ids.index(PAINTED[1])
    result.update(scored_napari_unet(trainer.model, trainer.metadata, [i for i, _ in test_pairs], truths, foreground))
    return result


def monai_basicunet(train_pairs, test_pairs, budget: float, threads: int, workdir: Path) -> dict:
    """MONAI ``BasicUNet`` by a plain loop (see the module docstring)."""
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import BasicUNet

    from napari_unet.losses import masked_loss
    from napari_unet.normalization import normalize_image

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    images = [normalize_image(image).astype(np.float32) for image, _ in train_pairs]
    masks = [gt.astype(np.int64) for _, gt in train_pairs]
    net = BasicUNet(spatial_dims=2, in_channels=1, out_channels=2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    start, iterations = time.perf_counter(), 0
    net.train()
    while time.perf_counter() - start < budget:
        xs, ys = [], []
        for _ in range(BATCH):
            i = rng.integers(len(images))
            y0, x0 = (rng.integers(0, s - CROP + 1) for s in images[i].shape)
            xs.append(images[i][y0 : y0 + CROP, x0 : x0 + CROP])
            ys.append(masks[i][y0 : y0 + CROP, x0 : x0 + CROP])
        x = torch.from_numpy(np.stack(xs)[:, None])
        loss = masked_loss(net(x), torch.from_numpy(np.stack(ys)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        iterations += 1
    train_s = time.perf_counter() - start
    net.eval()
    start, probabilities = time.perf_counter(), []
    with torch.no_grad():
        for image, _ in test_pairs:
            x = torch.from_numpy(normalize_image(image).astype(np.float32)[None, None])
            logits = sliding_window_inference(x, (WINDOW, WINDOW), BATCH, net, overlap=0.25, mode="gaussian")
            probabilities.append(torch.softmax(logits, 1)[0].numpy())
    result = {"train_s": train_s, "iterations": iterations, "predict_s": time.perf_counter() - start}
    result.update(scores(probabilities, [gt.astype(bool) for _, gt in test_pairs]))
    return result


def napari_unet_strokes_all(train_pairs, test_pairs, budget: float, threads: int, workdir: Path) -> dict:
    """The same stroke training with ``temperature="off"``: every painted pixel trains, none is held out (what the
    held-out share costs)."""
    return napari_unet_strokes(train_pairs, test_pairs, budget, threads, workdir, {"temperature": "off"})


CONTENDERS = {
    "napari_unet_dense": napari_unet_dense,
    "monai_basicunet": monai_basicunet,
    "napari_unet_strokes": napari_unet_strokes,
    "napari_unet_strokes_all": napari_unet_strokes_all,
}


def main(argv=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=300.0, help="training seconds of every contender")
    parser.add_argument("--sets", nargs="+", default=["dsb", "isbi"], choices=["dsb", "isbi"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS)[:3], choices=list(CONTENDERS))
    parser.add_argument(
        "--dense-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a TrainingSettings field (or epochs) of napari_unet_dense, VALUE as a Python literal (repeatable); "
        "with --budget 0 the dense run has no time budget (fixed epochs)",
    )
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "dense.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaders = {"dsb": load_dsb, "isbi": load_isbi}
    if not args.budget and args.contenders != ["napari_unet_dense"]:
        parser.error("--budget 0 (fixed epochs) is for --contenders napari_unet_dense alone")
    dense_overrides = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.dense_set)}
    names = list(args.contenders)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for turn, name in enumerate(args.sets):
            train_pairs, test_pairs = loaders[name](args.data)
            order = names[turn % len(names) :] + names[: turn % len(names)]  # who goes first alternates
            result = {"set": name, "order": order}
            for method in order:
                workdir = Path(tmp, name, method)
                workdir.mkdir(parents=True)
                options = {"overrides": dense_overrides} if method == "napari_unet_dense" else {}
                budget = args.budget or None
                result[method] = CONTENDERS[method](train_pairs, test_pairs, budget, args.threads, workdir, **options)
                print(name, method, result[method], flush=True)
            results.append(result)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"budget_s": args.budget, "threads": args.threads, "results": results}, indent=1))
    print("\n| set | method | Dice (mean) | Dice (pooled) | mean IoU | pixel error | ECE | ECE at T=1 | T | iterations "
          "| train s | predict s |")  # fmt: skip
    print("|---" * 12 + "|")
    for r in results:
        for method in names:
            m = r[method]
            t, plain = m.get("temperature"), m.get("ece_uncalibrated")
            print(
                f"| {r['set']} | {method} | {m['dice_mean']:.3f} | {m['dice_pooled']:.3f} | {m['mean_iou']:.3f} "
                f"| {m['pixel_error']:.4f} | {m['ece']:.4f} | {'' if plain is None else f'{plain:.4f}'} "
                f"| {'' if t is None else f'{t:.3f}'} | {m['iterations']} | {m['train_s']:.0f} | {m['predict_s']:.1f} |"
            )
    for r in results:
        if not {"napari_unet_dense", "monai_basicunet"} <= set(r):
            continue
        margin = r["napari_unet_dense"]["dice_mean"] - r["monai_basicunet"]["dice_mean"]
        d = r["napari_unet_dense"]
        print(
            f"{r['set']}: napari-unet dense - MONAI BasicUNet = {margin:+.3f} Dice (floor +0.020); test ECE "
            f"{d['ece_uncalibrated']:.4f} -> {d['ece']:.4f} with T = {d['temperature']:.3f}"
        )
    print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
