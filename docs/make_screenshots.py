"""Screenshots for docs/user_guide.md: real napari, the U-Net widget at work on the bundled sample data.

    xvfb-run -s "-screen 0 1600x1000x24" python docs/make_screenshots.py docs/images 40

(arguments: output folder, training seconds). Do not set QT_QPA_PLATFORM=offscreen with Xvfb: the
canvas would come out black. Prints the foreground Dice of "Segment all" against the bundled ground truth.
"""

import sys
import time
from pathlib import Path

import tifffile
from screenshot_session import open_viewer, pump, shot

from napari_unet.demo import dice, sample_paths

OUT = Path(sys.argv[1])
OUT.mkdir(parents=True, exist_ok=True)
viewer = open_viewer()


viewer.open_sample("napari-unet", "nuclei_strokes")
_, widget = viewer.window.add_plugin_dock_widget("napari-unet", "U-Net")
viewer.reset_view()
shot(viewer, OUT, "01_sample_with_strokes.png")

widget.training.basic["time_budget"].value = int(sys.argv[2]) if len(sys.argv) > 2 else 40
widget.device_combo.setCurrentText("cpu")
widget.train()
start = time.time()
taken = False
while widget.busy:
    pump(0.1)
    if not taken and widget.previews_shown >= 3 and time.time() - start > 15:
        shot(viewer, OUT, "02_training_live_preview.png")
        taken = True
print(widget.status_label.text())
widget.training.advanced.expand(animate=False)
pump(0.5)
widget.settings_area.ensureWidgetVisible(widget.training.form.native)  # the panels scroll: show the form
shot(viewer, OUT, "03_training_done.png")
widget.training.advanced.collapse(animate=False)
widget.settings_area.verticalScrollBar().setValue(0)

viewer.open_sample("napari-unet", "nuclei")
viewer.layers.remove("nuclei1 [1]")  # already open with its strokes
pump(1)
widget.prediction.form["uncertainty"].value = True
widget.segment_all()
while widget.busy:
    pump(0.1)
print(widget.status_label.text(), widget.last_error)
for layer in viewer.layers:
    layer.visible = False
viewer.layers["nuclei3"].visible = True
viewer.layers["nuclei3 segmentation"].visible = True
viewer.layers.selection.active = viewer.layers["nuclei3 segmentation"]
viewer.reset_view()
shot(viewer, OUT, "04_segment_all.png")
viewer.layers["nuclei3 segmentation"].visible = False
viewer.layers["nuclei3 uncertainty"].visible = True
viewer.layers["nuclei3 uncertainty"].opacity = 0.8
shot(viewer, OUT, "05_uncertainty.png")
# Dice of the segment-all result against the bundled ground truth
for i, path in enumerate(sample_paths()["truths"]):
    name = f"nuclei{i + 1}"
    seg = viewer.layers[f"{name} segmentation"].data
    truth = tifffile.imread(path)
    print(name, "dice", round(dice(seg == 2, truth > 0), 3))
viewer.close()
