"""What the docs' screenshot scripts share: a real napari window of a fixed size, the Qt event loop run by hand
(the scripts drive the widget from the main thread), and a screenshot of the whole window written to a file."""

import os
import tempfile
import time
from pathlib import Path

import imageio.v3 as iio
import napari
from qtpy.QtWidgets import QApplication

from napari_unet.widgets.remembered import CONFIG_DIR_VARIABLE


def open_viewer() -> napari.Viewer:
    """A shown napari viewer, 1500 x 950 at the screen's corner (the size the user guide's images have), whose
    U-Net widget starts as on a first run: a fresh configuration folder, so no settings remembered from earlier
    sessions (an "Uncertainty" left on, another normalization) and no recovery files change what the scripts show."""
    os.environ[CONFIG_DIR_VARIABLE] = tempfile.mkdtemp(prefix="napari-unet-screenshots-")
    QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    viewer.window._qt_window.move(0, 0)
    return viewer


def pump(seconds: float = 0.5) -> None:
    """Run the Qt event loop for ``seconds`` (workers report, layers redraw)."""
    app = QApplication.instance()
    end = time.time() + seconds
    while time.time() < end:
        app.processEvents()
        time.sleep(0.01)


def wait_idle(widget) -> None:
    """Pump until the U-Net widget's worker is done; fail on its error."""
    while widget.busy:
        pump(0.1)
    assert widget.last_error is None, widget.last_error


def shot(viewer: napari.Viewer, folder: Path, name: str) -> None:
    """The whole window (dock widgets included) as ``folder / name``."""
    pump(0.8)
    image = viewer.screenshot(canvas_only=False, flash=False)
    iio.imwrite(folder / name, image)
    print("saved", name, image.shape)
