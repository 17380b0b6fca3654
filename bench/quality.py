"""Training quality from sparse strokes: napari-unet vs an ilastik-style random forest (issue 3).

Simulated strokes (``quality_strokes.py``: radius-1 brush along each class's eroded skeleton, 2 % of each
class's pixels, fixed seeds) on:

- ISBI 2012 membranes: train on slices 0-4, score slices 20-29 (membrane = foreground);
- DSB 2018 nuclei: train on the first 10 images in sorted file order, score the last 20 (any nucleus).

napari-unet trains with its default settings and a CPU time budget (300 s by default); the baseline is a
scikit-learn random forest (100 trees) on ``skimage.feature.multiscale_basic_features`` (intensity, edges,
texture, sigma 1 to 16) of the same strokes. Both are scored by foreground Dice of the argmax on the held-out
images (mean over images, and pooled over all pixels). The ``napari_unet`` row predicts as ``napari-unet predict``
and the widget do by default: the 8 flips/transpositions averaged, then the probabilities snapped to the image's
edges by a guided filter whose window fits the width of the predicted structures
(``predict_image`` with its default ``PredictionSettings``; the radii chosen are listed per set). From the same
trained network, ``napari_unet_unrefined`` scores the flips without the refinement (``--refine-radius 0``) and
``napari_unet_one_pass`` a single pass without either; ``random_forest_refined`` applies the same refinement to the
forest's probabilities, to show what the refinement alone is worth.
Needs ``/work/shared/data`` (or ``--data``).

    python bench/quality.py [--budget 300] [--sets isbi dsb] [--data DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).parent))
from quality_strokes import simulate_strokes

DEFAULT_DATA = Path("/work/shared/data")
PAINTED = {0: 1, 1: 2}  # ground truth background -> painted id 1, foreground -> painted id 2


def load_isbi(data: Path, train_count: int = 5):
    """ISBI 2012 (image, membrane mask) pairs: slices ``0..train_count-1`` to train, 20-29 to test."""
    folder = data / "isbi2012_em_membranes"
    read = lambda kind, i: tifffile.imread(folder / kind / f"{i}.tif")  # noqa: E731
    train = [(read("images", i), read("labels", i).astype(np.uint8)) for i in range(train_count)]
    test = [(read("images", i), read("labels", i).astype(np.uint8)) for i in range(20, 30)]
    return train, test


def load_dsb(data: Path, train_count: int = 10):
    """DSB 2018 (image, nucleus mask) pairs in sorted file order: the first ``train_count`` to train, the last 20 to
    test."""
    folder = data / "dsb2018_nuclei_subset"
    names = sorted(p.name for p in (folder / "images").glob("*.tif"))
    pairs = [
        (tifffile.imread(folder / "images" / n), (tifffile.imread(folder / "labels" / n) > 0).astype(np.uint8))
        for n in names
    ]
    return pairs[:train_count], pairs[-20:]


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Foreground Dice of two boolean masks (1.0 when both are empty)."""
    total = prediction.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(prediction, truth).sum() / total)


def scores(predictions, truths) -> dict:
    per_image = [dice(p, t) for p, t in zip(predictions, truths)]
    pooled = dice(np.concatenate([p.ravel() for p in predictions]), np.concatenate([t.ravel() for t in truths]))
    return {"dice_mean": float(np.mean(per_image)), "dice_pooled": pooled}


def refined(probabilities, guides, foreground: int) -> tuple[list, float, dict]:
    """The default edge refinement (``predict_tiled``'s last step: radius "auto") applied in place to each
    ``(classes, Y, X)`` probability map with its normalized image as guide; returns the foreground masks, the
    seconds it took and how many images got each radius."""
    from napari_unet.refine import auto_radius, refine_probabilities

    start = time.perf_counter()
    radii = []
    for p, guide in zip(probabilities, guides):
        radii.append(auto_radius(p, spatial_ndim=2))
        refine_probabilities(p, guide, spatial_ndim=2, radius=radii[-1], out=p)
    seconds = time.perf_counter() - start
    return [p.argmax(0) == foreground for p in probabilities], seconds, {r: radii.count(r) for r in sorted(set(radii))}


def _forest_features(image):
    from skimage.feature import multiscale_basic_features

    return multiscale_basic_features(
        image.astype(np.float32), intensity=True, edges=True, texture=True, sigma_min=1, sigma_max=16
    )


def fit_forest(train_images, strokes, threads: int):
    """The ilastik-style baseline fitted on the painted pixels: a random forest (100 trees) on multiscale features
    of the raw intensities."""
    from sklearn.ensemble import RandomForestClassifier

    xs, ys = [], []
    for image, stroke in zip(train_images, strokes):
        f = _forest_features(image)
        xs.append(f[stroke > 0])
        ys.append(stroke[stroke > 0])
    forest = RandomForestClassifier(n_estimators=100, n_jobs=threads, random_state=0)
    return forest.fit(np.concatenate(xs), np.concatenate(ys))


def forest_probabilities(forest, images) -> list:
    """``(classes, Y, X)`` float32 probabilities of the fitted forest for each image."""
    out = []
    for image in images:
        f = _forest_features(image)
        out.append(forest.predict_proba(f.reshape(-1, f.shape[-1])).T.reshape(-1, *image.shape).astype(np.float32))
    return out


def forest_foreground(forest) -> int:
    """The index of the foreground class among the forest's outputs."""
    return list(forest.classes_).index(PAINTED[1])


def random_forest(train_images, strokes, test_images, threads: int) -> dict:
    """The ilastik-style baseline; also scored after the same edge refinement as napari-unet (``refined_``)."""
    from napari_unet.normalization import normalize_image

    start = time.perf_counter()
    forest = fit_forest(train_images, strokes, threads)
    train_time = time.perf_counter() - start
    start = time.perf_counter()
    probabilities = forest_probabilities(forest, test_images)
    foreground = forest_foreground(forest)
    result = {
        "train_s": train_time,
        "predict_s": time.perf_counter() - start,
        "predictions": [p.argmax(0) == foreground for p in probabilities],
    }
    guides = (normalize_image(image) for image in test_images)
    result["refined_predictions"], seconds, result["refined_radii"] = refined(probabilities, guides, foreground)
    result["refined_predict_s"] = result["predict_s"] + seconds
    return result


def train_strokes(train_images, strokes, budget: float, threads: int, overrides: dict):
    """napari-unet's default training on the strokes (CPU, ``threads`` threads, seed 0, ``budget`` seconds):
    the trained ``Trainer``."""
    from napari_unet.training import train

    settings = {"time_budget": budget, "device": "cpu", "cpu_threads": threads, "seed": 0, **overrides}
    return train(train_images, strokes, **settings)


def napari_unet(train_images, strokes, test_images, budget: float, threads: int, overrides: dict) -> dict:
    import torch

    from napari_unet.normalization import normalize_image
    from napari_unet.predict import PredictionSettings, predict_image

    start = time.perf_counter()
    trainer = train_strokes(train_images, strokes, budget, threads, overrides)
    train_time = time.perf_counter() - start
    record = trainer.metadata["training"]["history"][-1]
    torch.set_num_threads(threads)
    model = trainer.model  # predict_tiled runs its own batch-norm-folded copy
    normalized_images = [normalize_image(image, trainer.normalization) for image in test_images]  # refinement guides
    foreground = trainer.class_ids.index(PAINTED[1])
    result = {
        "iterations": record["iterations"],
        "data_fraction": record["data_seconds"] / record["seconds"],
        "settings": record["settings"],
    }

    def predict_all(flips: bool):
        """The probabilities before refinement (refined below, in place, so one prediction gives both rows)."""
        start = time.perf_counter()
        settings = PredictionSettings(device="cpu", test_time_flips=flips, refine_radius=0)
        probabilities = [predict_image(model, trainer.metadata, image, settings).probabilities for image in test_images]
        return probabilities, time.perf_counter() - start

    flipped, result["unrefined_predict_s"] = predict_all(True)
    result["unrefined_predictions"] = [p.argmax(0) == foreground for p in flipped]
    result["predictions"], seconds, result["refine_radii"] = refined(flipped, normalized_images, foreground)
    result["predict_s"] = result["unrefined_predict_s"] + seconds
    one_pass, result["one_pass_predict_s"] = predict_all(False)
    result["one_pass_predictions"] = [p.argmax(0) == foreground for p in one_pass]
    result["train_s"] = train_time
    return result


def run(name: str, train_pairs, test_pairs, budget: float, threads: int, overrides: dict, baseline: bool) -> dict:
    images = [image for image, _ in train_pairs]
    strokes = [simulate_strokes(gt, PAINTED, seed=index) for index, (_, gt) in enumerate(train_pairs)]
    test_images = [image for image, _ in test_pairs]
    truths = [gt.astype(bool) for _, gt in test_pairs]
    result = {"set": name, "painted_pixels": int(sum((s > 0).sum() for s in strokes))}
    methods = [("napari_unet", lambda: napari_unet(images, strokes, test_images, budget, threads, overrides))]
    if baseline:
        methods.insert(0, ("random_forest", lambda: random_forest(images, strokes, test_images, threads)))
    for method, fn in methods:
        out = fn()
        for variant in ("one_pass", "unrefined", "refined"):  # extra rows scored from the same run
            if variant + "_predictions" in out:
                row = {"predict_s": out.pop(variant + "_predict_s"), "train_s": out["train_s"]}
                row.update(scores(out.pop(variant + "_predictions"), truths))
                result[f"{method}_{variant}"] = row
                print(name, f"{method}_{variant}", row, flush=True)
        out.update(scores(out.pop("predictions"), truths))
        result[method] = out
        print(name, method, {k: v for k, v in out.items() if k != "settings"}, flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=300.0, help="napari-unet training seconds")
    parser.add_argument("--sets", nargs="+", default=["isbi", "dsb"], choices=["isbi", "dsb"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "quality.json")
    parser.add_argument("--no-baseline", action="store_true", help="skip the random forest")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a TrainingSettings field (repeatable), e.g. --set depth=2",
    )
    args = parser.parse_args(argv)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    loaders = {"isbi": load_isbi, "dsb": load_dsb}
    results = [
        run(name, *loaders[name](args.data), args.budget, args.threads, overrides, not args.no_baseline)
        for name in args.sets
    ]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    summary = {"budget_s": args.budget, "threads": args.threads, "overrides": overrides, "results": results}
    args.json.write_text(json.dumps(summary, indent=1))
    print("\n| set | method | Dice (mean) | Dice (pooled) | train s | predict s |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for method in (
            "napari_unet",
            "napari_unet_unrefined",
            "napari_unet_one_pass",
            "random_forest",
            "random_forest_refined",
        ):
            if method not in r:
                continue
            m = r[method]
            print(
                f"| {r['set']} | {method} | {m['dice_mean']:.3f} | {m['dice_pooled']:.3f} "
                f"| {m['train_s']:.0f} | {m['predict_s']:.1f} |"
            )
    for r in results:
        if "random_forest" in r:
            margin = r["napari_unet"]["dice_mean"] - r["random_forest"]["dice_mean"]
            print(f"{r['set']}: napari-unet - random forest = {margin:+.3f} (floor: +0.050)")
    print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
