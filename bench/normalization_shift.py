"""How far each perturbation of ``bench/robustness.py`` moves the objects on the normalized scale, without a
network: for every held-out image (DSB 2018: the last 20, ISBI 2012: slices 20-29) and perturbation, the median
normalized intensity of the ground-truth objects (DSB nuclei, ISBI membranes) under a recipe, as a ratio to the
unperturbed image's under the same recipe. A ratio far from 1 under gain, offset or debris is the normalization's
doing (gamma and illumination move objects by themselves); the images furthest off are listed with their upper
values, which is how an image that a recipe handles badly is found before any training. The last column is the
rest of the image (the ground truth's other class): the median over the images of its 95th percentile, clean and
perturbed; a background lifted toward the objects is what an uneven illumination or gamma 0.5 does to it.

    python bench/normalization_shift.py [--sets dsb isbi] [--recipes robust background percentile] [--show 3]
"""

import argparse
import platform
from pathlib import Path

import numpy as np
from quality import DEFAULT_DATA, load_dsb, load_isbi
from robustness import PERTURBATIONS, perturbed_sets

from napari_unet.devices import cpu_model
from napari_unet.normalization import BACKGROUND_RECIPE, DEFAULT_RECIPE, PERCENTILE_RECIPE, image_params, normalize

RECIPES = {"robust": DEFAULT_RECIPE, "background": BACKGROUND_RECIPE, "percentile": PERCENTILE_RECIPE}


def object_levels(images, truths, recipe: dict) -> tuple[list[float], list[float], list[float]]:
    """Per image: the median normalized intensity of its objects, its upper normalization value, and the 95th
    percentile of the rest of the image."""
    levels, uppers, rest = [], [], []
    for image, truth in zip(images, truths):
        params = image_params(image, recipe)
        normalized = normalize(image, params)
        levels.append(float(np.median(normalized[truth])))
        uppers.append(float(params["high_values"][0]))
        rest.append(float(np.percentile(normalized[~truth], 95.0)))
    return levels, uppers, rest


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", nargs="+", default=["dsb", "isbi"], choices=["dsb", "isbi"])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--show", type=int, default=3, help="images furthest off listed per condition")
    args = parser.parse_args(argv)
    print(f"# {cpu_model()}, {platform.python_version()}")
    loaders = {"dsb": load_dsb, "isbi": load_isbi}
    print(
        "| set | recipe | perturbation | median ratio | min ratio | max ratio | furthest off (image: ratio, upper) "
        "| rest p95, clean -> perturbed |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in args.sets:
        _, test_pairs = loaders[name](args.data)
        truths = [gt.astype(bool) for _, gt in test_pairs]
        sets = perturbed_sets([image for image, _ in test_pairs])
        for recipe in args.recipes:
            clean, _, clean_rest = object_levels(sets["none"], truths, RECIPES[recipe])
            for condition in PERTURBATIONS:
                if condition == "none":
                    continue
                levels, uppers, rest = object_levels(sets[condition], truths, RECIPES[recipe])
                ratios = np.array(levels) / np.array(clean)
                worst = np.argsort(-np.abs(np.log(ratios)))[: args.show]
                listed = ", ".join(f"{k}: {ratios[k]:.2f}, {uppers[k]:.4g}" for k in worst)
                print(
                    f"| {name} | {recipe} | {condition} | {np.median(ratios):.3f} | {ratios.min():.3f} "
                    f"| {ratios.max():.3f} | {listed} | {np.median(clean_rest):.3f} -> {np.median(rest):.3f} |"
                )


if __name__ == "__main__":
    main()
