"""Headless demo on the bundled CC0 DSB 2018 nuclei images (``napari-unet demo``).

Trains a U-Net on the simulated strokes of ``nuclei1.tif`` (1 = background, 2 = nucleus), predicts the other
bundled images (averaging the 8 flips/transpositions and snapping to edges, as ``napari-unet predict`` does by
default), writes the model, probabilities and labels, and reports the foreground Dice of each prediction against
its ground truth.
:func:`sample_paths` gives the bundled files (napari sample data reuses them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

DATA = Path(__file__).parent / "data"
NUCLEUS_ID = 2


def sample_paths() -> dict:
    """The bundled files: ``images`` (4 paths), ``truths`` (their ground truth), ``strokes`` (of image 0)."""
    images = [DATA / f"nuclei{i}.tif" for i in range(1, 5)]
    return {
        "images": images,
        "truths": [DATA / f"nuclei{i}_truth.tif" for i in range(1, 5)],
        "strokes": DATA / "nuclei1_strokes.tif",
    }


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def run_demo(
    time_budget: float = 60.0,
    out: str | Path = "napari-unet-demo",
    *,
    device: str = "auto",
    seed: int = 0,
    log: Callable[[str], None] = print,
    **settings,
) -> dict:
    """Train on the bundled strokes, predict the other images, write outputs to ``out``.

    ``settings`` override ``TrainingSettings`` fields (defaults otherwise).

    Returns ``{"model": path, "dice": {image name: Dice}, "mean_dice": float, "train_seconds": float}``.
    """
    import tifffile

    from .devices import available_cores
    from .io import write_tiff
    from .predict import PredictionSettings, predict_image
    from .training import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = sample_paths()
    image = tifffile.imread(paths["images"][0])
    strokes = tifffile.imread(paths["strokes"])
    log(
        f"training on {paths['images'][0].name} ({int((strokes > 0).sum())} painted pixels) "
        f"for {time_budget:g} s on device {device}"
    )
    last = [0.0]

    def report(event):
        if event.done or event.elapsed - last[0] >= 5:
            last[0] = event.elapsed
            log(f"  iteration {event.iteration:5d}  loss {event.loss:.4f}  {event.elapsed:5.1f} s")

    settings.setdefault("cpu_threads", available_cores())  # headless: no interface to keep responsive
    started = time.perf_counter()
    trainer = train(
        image,
        strokes,
        time_budget=time_budget,
        device=device,
        seed=seed,
        class_names=["background", "nucleus"],
        callback=report,
        **settings,
    )
    train_seconds = time.perf_counter() - started
    model_path = out / "demo_model.safetensors"
    trainer.save(model_path)
    scores = {}
    settings = PredictionSettings(device=device)  # the defaults of `napari-unet predict`
    for path, truth_path in zip(paths["images"][1:], paths["truths"][1:]):
        predicted = predict_image(trainer.model, trainer.metadata, tifffile.imread(path), settings)
        write_tiff(out / f"{path.stem}_probabilities.tif", predicted.probabilities, axes="CYX", output="probabilities")
        write_tiff(out / f"{path.stem}_labels.tif", predicted.labels, axes="YX", output="labels")
        scores[path.name] = dice(predicted.labels == NUCLEUS_ID, tifffile.imread(truth_path) > 0)
        log(f"{path.name}: Dice {scores[path.name]:.3f} (nucleus vs ground truth)")
    mean = float(np.mean(list(scores.values())))
    log(f"mean Dice {mean:.3f}; model and predictions written to {out}")
    return {"model": model_path, "dice": scores, "mean_dice": mean, "train_seconds": train_seconds}
