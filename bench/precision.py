"""What reduced precision costs in accuracy (issue 19): one model per quality set, its test images predicted as
``napari-unet predict`` does by default (flips + edge refinement) in float32, bfloat16 and float16 autocast; foreground
Dice against the ground truth, agreement of the labels with float32's, the largest probability difference, time.

Train as ``bench/quality.py`` does (DSB 2018: first 10 images, ISBI 2012: slices 0-4, 2 % simulated strokes) with a
fixed number of iterations (the result must not depend on the machine's load), or load a model saved by an earlier
run (``--models DIR``: ``<set>.safetensors``, written there after training). On a CPU without native bfloat16 /
float16 (``devices.cpu_has_native_bfloat16``), torch emulates them: neither the times nor the numbers are a native
CPU's (native bfloat16 kernels round differently: docs/benchmarks.md).

    python bench/precision.py [--sets dsb isbi] [--iterations 1000] [--images N] [--models DIR] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from quality import DEFAULT_DATA, PAINTED, dice, load_dsb, load_isbi
from quality_strokes import simulate_strokes

PRECISIONS = ("float32", "bfloat16", "float16")


def trained_model(name, train_pairs, iterations: int, threads: int, models: Path):
    from napari_unet.io import load_model
    from napari_unet.training import train

    path = models / f"{name}.safetensors"
    if path.exists():
        return load_model(path)
    images = [image for image, _ in train_pairs]
    strokes = [simulate_strokes(gt, PAINTED, seed=index) for index, (_, gt) in enumerate(train_pairs)]
    trainer = train(images, strokes, iterations=iterations, time_budget=None, device="cpu", cpu_threads=threads, seed=0)
    models.mkdir(parents=True, exist_ok=True)
    trainer.save(path)
    return load_model(path)


def compare(model, metadata, test_pairs) -> dict:
    from napari_unet.predict import PredictionSettings, predict_image

    settings = PredictionSettings(device="cpu")
    rows, reference = {}, None
    for precision in PRECISIONS:
        start = time.perf_counter()
        outputs = [
            predict_image(model, metadata, image, replace(settings, precision=precision)) for image, _ in test_pairs
        ]
        seconds = time.perf_counter() - start
        labels = [o.labels for o in outputs]
        row = {
            "dice": float(
                np.mean([dice(lab == PAINTED[1], gt.astype(bool)) for lab, (_, gt) in zip(labels, test_pairs)])
            ),
            "seconds": seconds,
        }
        if reference is None:
            reference = outputs
        else:
            row["label_agreement"] = float(np.mean([np.mean(o.labels == r.labels) for o, r in zip(outputs, reference)]))
            row["max_probability_difference"] = float(
                max(np.abs(o.probabilities - r.probabilities).max() for o, r in zip(outputs, reference))
            )
        rows[precision] = row
        print(precision, {k: round(v, 5) for k, v in row.items()}, flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["dsb", "isbi"], choices=["dsb", "isbi"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, help="score only the first N test images")
    parser.add_argument("--models", type=Path, default=Path(__file__).parent / "results" / "precision_models")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "precision.json")
    args = parser.parse_args(argv)

    import torch

    from napari_unet.devices import cpu_has_native_bfloat16, cpu_model

    torch.set_num_threads(args.threads)
    loaders = {"dsb": load_dsb, "isbi": load_isbi}
    results = {"cpu": cpu_model(), "native_bfloat16": cpu_has_native_bfloat16(), "torch": torch.__version__}
    for name in args.sets:
        train_pairs, test_pairs = loaders[name](args.data)
        model, metadata = trained_model(name, train_pairs, args.iterations, args.threads, args.models)
        print(name, flush=True)
        results[name] = compare(model, metadata, test_pairs[: args.images])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print("\n| set | precision | Dice | labels equal to float32 | max probability difference | seconds |")
    print("|---|---|---|---|---|---|")
    for name in args.sets:
        for precision, row in results[name].items():
            agreement = row.get("label_agreement")
            difference = row.get("max_probability_difference")
            print(
                f"| {name} | {precision} | {row['dice']:.4f} | {'' if agreement is None else f'{agreement:.5f}'} "
                f"| {'' if difference is None else f'{difference:.4f}'} | {row['seconds']:.0f} |"
            )


if __name__ == "__main__":
    main()
