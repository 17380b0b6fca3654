"""How often the out-of-distribution warning (``domain.py``) fires, and on which images (issue 17).

Trains a model from 2 % simulated strokes as ``bench/robustness.py`` does (a fixed number of iterations, so that the
result does not depend on the machine's load; or loads ``--model``), then predicts each validation image (DSB
images 10-29, ISBI slices 5-19: no benchmark scores them) unperturbed and under the perturbations of
``bench/robustness.py`` in one pass (no flips, no refinement: the check's own predictions are one pass either
way). Per condition: mean Dice, warned images, images that lose more than 0.1 Dice against their unperturbed Dice
and how many of those are warned, warned images that lose less than 0.05 ("false alarms"), and the highest score of
an image that kept its Dice.

    python bench/domain_check.py [--sets dsb isbi] [--iterations 1000] [--threads 1] [--model FILE] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from quality import DEFAULT_DATA, PAINTED, dice, load_dsb, load_isbi
from quality_strokes import simulate_strokes
from robustness import perturbed_sets, validation_images

SKIPPED = ("gain_0.4", "gain_2.5", "offset")
"""Cancelled exactly by per-image normalization (identical to the unperturbed images)."""


def trained_model(name: str, data: Path, iterations: int, threads: int):
    from napari_unet.training import train

    train_pairs, _ = {"dsb": load_dsb, "isbi": load_isbi}[name](data)
    strokes = [simulate_strokes(gt, PAINTED, seed=k) for k, (_, gt) in enumerate(train_pairs)]
    images = [image for image, _ in train_pairs]
    trainer = train(images, strokes, time_budget=None, iterations=iterations, device="cpu", cpu_threads=threads, seed=0)
    return trainer.model, trainer.metadata


def run(name: str, model, metadata, data: Path) -> list[dict]:
    from napari_unet.predict import PredictionSettings, predict_image

    pairs = validation_images(name, data)
    settings = PredictionSettings(device="cpu", test_time_flips=False, refine_radius=0)
    rows, clean = [], None
    for condition, images in perturbed_sets([image for image, _ in pairs]).items():
        if condition in SKIPPED:
            continue
        outputs = [predict_image(model, metadata, image, settings) for image in images]
        scores = [dice(o.labels == PAINTED[1], gt.astype(bool)) for o, (_, gt) in zip(outputs, pairs)]
        clean = scores if clean is None else clean
        drops = [s - c for s, c in zip(scores, clean)]
        warned = [o.domain.unlike for o in outputs]
        big = [d < -0.1 for d in drops]
        row = {
            "set": name,
            "condition": condition,
            "dice": float(np.mean(scores)),
            "warned": sum(warned),
            "images": len(images),
            "big_drops": sum(big),
            "caught": sum(w and b for w, b in zip(warned, big)),
            "false_alarms": sum(w and d > -0.05 for w, d in zip(warned, drops)),
            "highest_kept": max((o.domain.score for o, d in zip(outputs, drops) if d > -0.05), default=0.0),
            "per_image": [[round(s, 4), round(o.domain.score, 3), o.domain.reason] for s, o in zip(scores, outputs)],
        }
        rows.append(row)
        print({k: v for k, v in row.items() if k != "per_image"}, flush=True)
    return rows


def main(argv=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["dsb", "isbi"], choices=["dsb", "isbi"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", type=Path, help="a model file to check instead of training one (one set only)")
    parser.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "domain_check.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.sets:
        if args.model is not None:
            from napari_unet.io import load_model

            model, metadata = load_model(args.model)
        else:
            model, metadata = trained_model(name, args.data, args.iterations, args.threads)
        rows += run(name, model, metadata, args.data)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=1))
    print("\n| set | condition | mean Dice | warned | big drops | caught | false alarms | highest score kept |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['set']} | {r['condition']} | {r['dice']:.3f} | {r['warned']}/{r['images']} | {r['big_drops']} "
            f"| {r['caught']} | {r['false_alarms']} | {r['highest_kept']:.2f} |"
        )


if __name__ == "__main__":
    main()
