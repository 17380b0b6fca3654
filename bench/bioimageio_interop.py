"""Does another tool run an exported model as napari-unet does? ``bioimageio.core`` against ``predict_image``.

Trains a model on the DSB 2018 benchmark strokes (``bench/quality.py``'s training half, ``--iterations`` fixed so
it is reproducible) or takes ``--model``, exports it with ``napari-unet export-bioimageio``, has
``bioimageio.core`` test the package and predict the 20 held-out DSB images whole (its own blocking, block size
parameter 10), and compares with napari-unet's one-pass overlap-tile probabilities: largest absolute difference,
argmax agreement, foreground Dice of both.

Needs ``bioimageio.core`` (not a napari-unet dependency; it pins its own ``bioimageio.spec``, so use a separate
environment, e.g. ``python -m venv --system-site-packages ENV && ENV/bin/pip install bioimageio.core``) and
``/work/shared/data`` (or ``--data``).

    ENV/bin/python bench/bioimageio_interop.py [--model MODEL] [--iterations 300] [--data DIR]
        [--normalization percentile|robust|background]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import quality

from napari_unet.bioimageio_export import export_bioimageio
from napari_unet.io import load_model
from napari_unet.normalization import BACKGROUND_RECIPE, PERCENTILE_RECIPE, ROBUST_RECIPE
from napari_unet.predict import PredictionSettings, predict_image

ONE_PASS = PredictionSettings(device="cpu", test_time_flips=False, refine_radius=0, precision="float32")
"""The network's own probabilities, what the package's weights compute: no flips, no edge refinement, float32 (the
package's TorchScript runs in float32; "auto" is bfloat16 on a CPU with native bfloat16)."""
RECIPES = {"percentile": PERCENTILE_RECIPE, "robust": ROBUST_RECIPE, "background": BACKGROUND_RECIPE}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="a saved model (default: train one on the DSB strokes)")
    parser.add_argument("--iterations", type=int, default=300, help="training iterations without --model")
    parser.add_argument("--data", type=Path, default=quality.DEFAULT_DATA)
    parser.add_argument(
        "--normalization",
        choices=sorted(RECIPES),
        default="robust",
        help="the recipe the model trains with, without --model (default robust, napari-unet's default)",
    )
    args = parser.parse_args(argv)
    from bioimageio.core import Tensor, create_prediction_pipeline, load_model_description, predict, test_model

    train, test = quality.load_dsb(args.data)
    if args.model is None:
        from quality_strokes import simulate_strokes

        from napari_unet.training import train as train_model

        strokes = [simulate_strokes(truth, quality.PAINTED, seed=k) for k, (_, truth) in enumerate(train)]
        trainer = train_model(
            [image for image, _ in train],
            strokes,
            iterations=args.iterations,
            time_budget=None,
            device="cpu",
            seed=0,
            normalization=RECIPES[args.normalization],
        )
        model, metadata = trainer.model, trainer.metadata
    else:
        model, metadata = load_model(args.model)
    foreground = metadata["class_ids"].index(2)
    with tempfile.TemporaryDirectory() as folder:
        package = export_bioimageio(model, metadata, test[-1][0], Path(folder) / "model.zip", name="DSB nuclei")
        print("bioimageio.core test_model:", test_model(package).status)
        description = load_model_description(package)
        pipeline = create_prediction_pipeline(description)
        differences, agreement, dice_ours, dice_core, seconds = [], [], [], [], [0.0, 0.0]
        for image, truth in test:
            start = time.perf_counter()
            ours = predict_image(model, metadata, image, ONE_PASS).probabilities
            seconds[0] += time.perf_counter() - start
            start = time.perf_counter()
            raw = Tensor(image.astype(np.float32)[None, None], dims=("batch", "channel", "y", "x"))
            result = predict(model=pipeline, inputs={"raw": raw}, blocksize_parameter=10)
            theirs = np.asarray(result.members["probabilities"].data)[0]
            seconds[1] += time.perf_counter() - start
            differences.append(float(np.abs(theirs - ours).max()))
            agreement.append(float((theirs.argmax(0) == ours.argmax(0)).mean()))
            dice_ours.append(quality.dice(ours.argmax(0) == foreground, truth.astype(bool)))
            dice_core.append(quality.dice(theirs.argmax(0) == foreground, truth.astype(bool)))
    print(
        f"{len(test)} images: largest |p_core - p_napari_unet| {max(differences):.2e}, argmax agreement "
        f"{min(agreement):.5f} (worst image), mean Dice {np.mean(dice_ours):.4f} (napari-unet) / "
        f"{np.mean(dice_core):.4f} (bioimageio.core); predict {seconds[0]:.1f} s / {seconds[1]:.1f} s"
    )


if __name__ == "__main__":
    main()
