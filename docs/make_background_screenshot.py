"""The screenshot of docs/user_guide.md's *Normalization* choice: one image with a haze, predicted by two models
trained in the widget on the same strokes, one with the default normalization, one with the background subtracted.

    xvfb-run -s "-screen 0 1600x1000x24" python docs/make_background_screenshot.py docs/images 400

(arguments: output folder, training iterations per model, 400 by default; it also writes
07_background_warning.png: the default model's prediction with its warning). The hazy image is the bundled
``nuclei2.tif`` with a smooth bright haze added toward one corner (a Gaussian of half the image's 99th percentile at
the corner, 0.6 of the side wide), what out-of-focus light or autofluorescence adds in widefield images. Prints each
model's foreground Dice on it against the bundled ground truth.
"""

import sys
from pathlib import Path

import numpy as np
import tifffile
from napari._qt.dialogs.qt_notification import NapariQtNotification
from screenshot_session import open_viewer, pump, shot, wait_idle

from napari_unet.demo import NUCLEUS_ID, dice, sample_paths
from napari_unet.normalization import BACKGROUND_RECIPE, ROBUST_RECIPE

OUT = Path(sys.argv[1])
OUT.mkdir(parents=True, exist_ok=True)
ITERATIONS = int(sys.argv[2]) if len(sys.argv) > 2 else 400
viewer = open_viewer()


def hazy(image: np.ndarray) -> np.ndarray:
    """``image`` plus a smooth haze rising toward its bottom-right corner."""
    h, w = image.shape
    y, x = np.mgrid[0:h, 0:w]
    haze = np.exp(-(((x - w) / (0.6 * w)) ** 2 + ((y - h) / (0.6 * h)) ** 2))
    return (image.astype(np.float32) + 0.5 * np.percentile(image, 99) * haze).astype(np.float32)


def warning_shot(viewer, name: str) -> None:
    """The window after the default model predicted the hazy image: its segmentation over it and the warning,
    expanded, that names the background recipe (07_background_warning.png)."""
    shown = {layer.name: layer.visible for layer in viewer.layers}
    for layer in viewer.layers:
        layer.visible = layer.name in (name, f"{name} segmentation")
    viewer.layers[f"{name} segmentation"].contour = 2
    viewer.reset_view()
    notes = viewer.window._qt_window.findChildren(NapariQtNotification)
    for note in notes:
        note.timer_stop()
        note.expand()
    shot(viewer, OUT, "07_background_warning.png")
    for note in notes:
        note.close()
    for layer in viewer.layers:
        layer.visible = shown[layer.name]


paths = sample_paths()
truth = tifffile.imread(paths["truths"][1]) > 0
viewer.open_sample("napari-unet", "nuclei_strokes")
training_image = viewer.layers[0].name
_, widget = viewer.window.add_plugin_dock_widget("napari-unet", "U-Net")
widget.device_combo.setCurrentText("cpu")
widget.training.basic["time_budget"].value = 3600
widget.training.form["iterations"].value = ITERATIONS
image = hazy(tifffile.imread(paths["images"][1]))
limits = [float(image.min()), float(np.percentile(image, 99))]

scores = {}
for title, recipe in (("robust (default)", ROBUST_RECIPE), ("background subtracted", BACKGROUND_RECIPE)):
    name = f"nuclei2 hazy, {title}"
    viewer.add_image(image, name=name, contrast_limits=limits)
    widget.data.image_combo.setCurrentText(training_image)
    widget.model_panel.finetune_check.setChecked(False)  # a new model each time
    widget.training.form["normalization"].value = recipe
    widget.train()
    wait_idle(widget)
    widget.data.image_combo.setCurrentText(name)
    widget.predict()
    wait_idle(widget)
    scores[title] = dice(viewer.layers[f"{name} segmentation"].data == NUCLEUS_ID, truth)
    print(f"{title}: Dice {scores[title]:.3f}", flush=True)
    if recipe is ROBUST_RECIPE:
        warning_shot(viewer, name)

for layer in list(viewer.layers):
    if not layer.name.startswith("nuclei2 hazy") or layer.name.endswith(("probabilities", "uncertainty")):
        viewer.layers.remove(layer)
for layer in viewer.layers:
    if layer.name.endswith("segmentation"):
        layer.contour = 2
viewer.grid.enabled = True
viewer.grid.stride = 2
viewer.grid.shape = (2, 1)  # top: the default recipe, bottom: the background subtracted
viewer.reset_view()
pump(1.0)
shot(viewer, OUT, "06_uneven_background.png")
viewer.close()
