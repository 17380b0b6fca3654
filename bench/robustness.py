"""Predictions that hold when images differ in intensity (issue 17): train once from sparse strokes as
``bench/quality.py`` does, then score the held-out images unperturbed and under each perturbation below, with the
random forest of ``bench/quality.py`` (features of the raw intensities, the same strokes) beside it.

Sets: DSB 2018 nuclei (train on the first 10 images, score the last 20) and ISBI 2012 membranes (train on slices 0-4,
score 20-29); 2 % simulated strokes (``quality_strokes.py``). napari-unet predicts as ``napari-unet predict`` does
by default (``predict_image`` with the default ``PredictionSettings``: flips + edge refinement). Perturbations of each
test image (float32, no clipping or requantization, fixed seeds, applied to the raw image):

- ``gain_0.4`` / ``gain_2.5``: intensities x0.4 / x2.5;
- ``offset``: + 30 % of the image's 1-99.8 percentile range;
- ``gamma_0.5`` / ``gamma_2``: ``max * (x / max) ** gamma``;
- ``gradient``: a linear illumination ramp x0.5 at one corner to x1.5 at the opposite one;
- ``debris_0.5`` / ``debris_2``: bright saturated debris: discs of radius 1-5 px at 3.5x the image's 99.8th
  percentile (a flat, saturated top) until they cover 0.5 % / 2 % of the pixels;
- ``combined``: gradient, gamma 0.5, gain 0.4, offset and 2 % debris together;
- ``haze``: + a smooth bright haze (out-of-focus light, autofluorescence): a Gaussian bump 0.6 of each side wide,
  centred on a corner drawn at random, peaking at half the image's 1-99.8 percentile range.

Floors (issue 17): under every perturbation napari-unet's Dice >= the forest's + 0.05 and at most 0.03 below its
unperturbed Dice. "warned": how many images of a condition the out-of-distribution check (``domain.py``) flags as
unlike the training images, "hinted": how many of those the warning tells to try the background-subtracting
normalization (each image's Dice, check score and terms are in the JSON).

    python bench/robustness.py [--budget 300] [--sets dsb isbi] [--set FIELD=VALUE ...] [--json OUT]
                               [--save-models DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import tifffile
from quality import (
    DEFAULT_DATA,
    PAINTED,
    dice,
    fit_forest,
    forest_foreground,
    forest_probabilities,
    load_dsb,
    load_isbi,
)
from quality_strokes import simulate_strokes


def _span(image: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(image, [1.0, 99.8])
    return float(low), float(high)


def gain(factor):
    return lambda image, rng: image * factor


def offset(image, rng):
    low, high = _span(image)
    return image + 0.3 * (high - low)


def gamma(value):
    def apply(image, rng):
        top = float(image.max()) or 1.0
        return top * np.clip(image / top, 0.0, None) ** value

    return apply


def gradient(image, rng):
    ramp = np.add.outer(np.linspace(0.0, 0.5, image.shape[0]), np.linspace(0.0, 0.5, image.shape[1]))
    return image * (0.5 + ramp).astype(np.float32)


def debris(fraction):
    def apply(image, rng):
        out = image.copy()
        level = 3.5 * _span(image)[1]
        yy, xx = np.ogrid[: image.shape[0], : image.shape[1]]
        covered = np.zeros(image.shape, bool)
        while covered.mean() < fraction:
            cy, cx = rng.integers(0, image.shape[0]), rng.integers(0, image.shape[1])
            radius = rng.integers(1, 6)
            covered |= (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
        out[covered] = level
        return out

    return apply


def haze(image, rng):
    low, high = _span(image)
    cy, cx = rng.integers(0, 2, size=2) * (np.asarray(image.shape[:2]) - 1)
    y = ((np.arange(image.shape[0]) - cy) / (0.6 * image.shape[0])) ** 2
    x = ((np.arange(image.shape[1]) - cx) / (0.6 * image.shape[1])) ** 2
    return image + (0.5 * (high - low) * np.exp(-np.add.outer(y, x))).astype(np.float32)


def combined(image, rng):
    for step in (gradient, gamma(0.5), gain(0.4), offset, debris(0.02)):
        image = step(image, rng)
    return image


PERTURBATIONS = {
    "none": lambda image, rng: image,
    "gain_0.4": gain(0.4),
    "gain_2.5": gain(2.5),
    "offset": offset,
    "gamma_0.5": gamma(0.5),
    "gamma_2": gamma(2.0),
    "gradient": gradient,
    "debris_0.5": debris(0.005),
    "debris_2": debris(0.02),
    "combined": combined,
    "haze": haze,  # last: the seeds of the others (by position) stay those of the earlier runs
}


def perturbed_sets(test_images, seed: int = 0) -> dict:
    """Every perturbation of every test image (float32), with one fixed seed per perturbation and image."""
    out = {}
    for k, (name, perturb) in enumerate(PERTURBATIONS.items()):
        out[name] = [
            perturb(image.astype(np.float32), np.random.default_rng([seed, k, i])).astype(np.float32)
            for i, image in enumerate(test_images)
        ]
    return out


def validation_images(name: str, data: Path) -> list:
    """Held-out images that no benchmark scores, for choosing defaults: DSB images 10-29 in sorted order, ISBI
    slices 5-19 (``bench/quality.py`` trains on DSB 0-9 / ISBI 0-4 and scores DSB 30-49 / ISBI 20-29)."""
    if name == "dsb":
        folder = data / "dsb2018_nuclei_subset"
        names = sorted(p.name for p in (folder / "images").glob("*.tif"))[10:30]
        read = lambda kind, n: tifffile.imread(folder / kind / n)  # noqa: E731
        return [(read("images", n), (read("labels", n) > 0).astype(np.uint8)) for n in names]
    folder = data / "isbi2012_em_membranes"
    read = lambda kind, i: tifffile.imread(folder / kind / f"{i}.tif")  # noqa: E731
    return [(read("images", i), read("labels", i).astype(np.uint8)) for i in range(5, 20)]


def run(
    name, train_pairs, test_pairs, budget, threads, overrides, baseline: bool, only=None, save: Path | None = None
) -> dict:
    """Train on ``train_pairs``' strokes, score ``test_pairs`` under each condition; ``save``: write the trained
    model there (``<save>/<name>.safetensors``) for diagnosis after the run."""
    import torch

    from napari_unet.io import save_model
    from napari_unet.predict import PredictionSettings, predict_image
    from napari_unet.training import train

    images = [image for image, _ in train_pairs]
    strokes = [simulate_strokes(gt, PAINTED, seed=index) for index, (_, gt) in enumerate(train_pairs)]
    truths = [gt.astype(bool) for _, gt in test_pairs]
    sets = perturbed_sets([image for image, _ in test_pairs])
    sets = {k: v for k, v in sets.items() if only is None or k in only or k == "none"}
    start = time.perf_counter()
    settings = {"time_budget": budget, "device": "cpu", "cpu_threads": threads, "seed": 0, **overrides}
    trainer = train(images, strokes, **settings)
    record = trainer.metadata["training"]["history"][-1]
    result = {
        "set": name,
        "train_s": time.perf_counter() - start,
        "iterations": record["iterations"],
        "overrides": overrides,
        "normalization": trainer.normalization,
        "conditions": {},
    }
    print(name, "trained:", record["iterations"], "iterations,", f"{result['train_s']:.0f} s", flush=True)
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        result["model"] = str(save_model(trainer.model, save / f"{name}.safetensors", trainer.metadata))
    torch.set_num_threads(threads)
    prediction = PredictionSettings(device="cpu")
    forest = fit_forest(images, strokes, threads) if baseline else None  # fitted once, scored on every condition
    for condition, test_images in sets.items():
        start = time.perf_counter()
        outputs = [predict_image(trainer.model, trainer.metadata, image, prediction) for image in test_images]
        scores = [dice(o.labels == PAINTED[1], t) for o, t in zip(outputs, truths)]
        row = {
            "napari_unet": float(np.mean(scores)),
            "predict_s": time.perf_counter() - start,
            "warned": sum(o.domain is not None and o.domain.unlike for o in outputs),
            "per_image": [round(float(s), 4) for s in scores],
            "domain_scores": [None if o.domain is None else round(o.domain.score, 3) for o in outputs],
            "domain_terms": [None if o.domain is None else o.domain.as_metadata()["terms"] for o in outputs],
            "hinted": sum(o.domain is not None and bool(o.domain.hint) for o in outputs),
        }
        if forest is not None:
            foreground = forest_foreground(forest)
            theirs = [p.argmax(0) == foreground for p in forest_probabilities(forest, test_images)]
            row["random_forest"] = float(np.mean([dice(p, t) for p, t in zip(theirs, truths)]))
        result["conditions"][condition] = row
        summary = {k: round(v, 4) for k, v in row.items() if not isinstance(v, list)}
        print(name, condition, summary, flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=300.0, help="napari-unet training seconds")
    parser.add_argument("--sets", nargs="+", default=["dsb", "isbi"], choices=["isbi", "dsb"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "robustness.json")
    parser.add_argument("--no-baseline", action="store_true", help="skip the random forest")
    parser.add_argument(
        "--validation", action="store_true", help="score the validation images no benchmark scores (choosing defaults)"
    )
    parser.add_argument("--only", nargs="+", choices=list(PERTURBATIONS), help="score only these conditions")
    parser.add_argument("--save-models", type=Path, metavar="DIR", help="write each set's trained model to DIR")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a TrainingSettings field (JSON value, repeatable), e.g. --set iterations=1500",
    )
    args = parser.parse_args(argv)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.overrides)}
    loaders = {"isbi": load_isbi, "dsb": load_dsb}
    results = []
    for n in args.sets:
        train_pairs, test_pairs = loaders[n](args.data)
        if args.validation:
            test_pairs = validation_images(n, args.data)
        baseline = not args.no_baseline
        results.append(
            run(n, train_pairs, test_pairs, args.budget, args.threads, overrides, baseline, args.only, args.save_models)
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"budget_s": args.budget, "threads": args.threads, "results": results}, indent=1))
    print("\n| set | perturbation | napari-unet | forest | margin | drop | warned | hinted |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        clean = r["conditions"]["none"]["napari_unet"]
        for condition, row in r["conditions"].items():
            forest = row.get("random_forest")
            margin = "" if forest is None else f"{row['napari_unet'] - forest:+.3f}"
            forest = "" if forest is None else f"{forest:.3f}"
            print(
                f"| {r['set']} | {condition} | {row['napari_unet']:.3f} | {forest} | {margin} "
                f"| {row['napari_unet'] - clean:+.3f} | {row['warned']}/{len(row['per_image'])} | {row['hinted']} |"
            )
    print(f"\nresults written to {args.json}")


if __name__ == "__main__":
    main()
