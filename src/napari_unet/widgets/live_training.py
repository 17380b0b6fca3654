"""One training run as the user sees it in the viewer: strokes painted meanwhile reach the trainer, the live
preview follows the part of the image in view, preview layers are filled region by region. Main thread only:
the worker's messages arrive here through the composing widget."""

from __future__ import annotations

import numpy as np
from napari.utils.notifications import show_warning
from qtpy.QtCore import QObject, QTimer

from .._layers import layer_data, output_layer, spatial_shape
from .._workers import PREVIEW_MAX_SIZE, LabelsRefused, Preview, Ready, ViewRegion
from ..class_ids import labels_dtype

LABELS_DEBOUNCE_MS = 300
"""Strokes are sent to the trainer this long after the last paint event."""


class LiveTraining(QObject):
    """The viewer side of one training run on ``image`` (where previews go) with ``labels`` (the painted layers,
    one per image trained on). ``view`` is the region the worker previews, written here as the user pans."""

    def __init__(self, viewer, image, labels: list, *, previews: bool, parent=None):
        super().__init__(parent)
        self.viewer, self.image, self.labels, self.previews = viewer, image, list(labels), previews
        self._shape = spatial_shape(image)  # what the trainer reads: previews are regions of it
        self.view = ViewRegion()
        self.trainer = None
        """The running trainer, once the worker has built it."""
        self.previews_shown = 0
        """Previews pushed to the output layers in this run."""
        self.preview_layers: list = []
        """The output layers previews go to (made or reused when the trainer is ready)."""
        self._made: list = []  # those of them this run added
        self._dirty: set[int] = set()
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(LABELS_DEBOUNCE_MS)
        self._timer.timeout.connect(self.send_labels)
        for layer in self.labels:
            layer.events.paint.connect(self._on_paint)
            layer.events.data.connect(self._on_paint)

    def ready(self, message: Ready) -> None:
        """The worker built its trainer: pass on strokes painted meanwhile and make the preview layers now, while
        the worker waits, not in the middle of training."""
        self.trainer = trainer = message.trainer
        if self._dirty:
            self.send_labels()
        if self.previews and self.image in self.viewer.layers:
            shape = spatial_shape(self.image)
            probabilities = (len(trainer.class_ids), *shape)
            before = {id(layer) for layer in self.viewer.layers}
            self.preview_layers = [
                output_layer(self.viewer, self.image, "probabilities", probabilities, np.float32),
                output_layer(
                    self.viewer,
                    self.image,
                    "segmentation",
                    shape,
                    labels_dtype(trainer.class_ids),
                    class_ids=trainer.class_ids,
                    class_names=trainer.class_names,
                ),
            ]
            self._made = [layer for layer in self.preview_layers if id(layer) not in before]

    def failed(self) -> None:
        """Training failed: preview layers this run added and never filled go (an earlier prediction's stay)."""
        if self.previews_shown == 0:
            for layer in self._made:
                if layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
        self._made = []

    def source_removed(self, layer) -> None:
        """``layer`` left the viewer during the run: when it is the image previews go to, its preview layers go too
        (they would belong to no image) and no preview is shown any more; a labels layer sends no more strokes."""
        if layer is self.image:
            for preview in self.preview_layers:
                if preview in self.viewer.layers:
                    self.viewer.layers.remove(preview)
            self.preview_layers = []
            self.previews = False

    def labels_refused(self, message: LabelsRefused) -> None:
        name = self.labels[message.index].name if message.index < len(self.labels) else f"labels {message.index}"
        show_warning(f"U-Net: new strokes in '{name}' not used: {message.reason}")

    def _image_unchanged(self) -> bool:
        """Whether the training image is still in the viewer with the shape training started on. New data of
        another shape (``layer.data = ...``) ends the previews with a warning, once: the run goes on with the image
        it read, whose regions no longer fit the layer."""
        if self.image not in self.viewer.layers:
            return False
        if spatial_shape(self.image) == self._shape:
            return True
        if self.previews:
            self.previews = False
            show_warning(
                f"U-Net: '{self.image.name}' changed shape during training ({self._shape} -> "
                f"{spatial_shape(self.image)}): no more previews; training goes on with the image it started with"
            )
        return False

    def show_preview(self, message: Preview) -> None:
        """Write a preview region into the output layers of the training image (if it is still there, as it was)."""
        result = message.result
        if not self._image_unchanged():
            return
        shape = spatial_shape(self.image)
        probabilities = output_layer(
            self.viewer, self.image, "probabilities", (result.probabilities.shape[0], *shape), np.float32
        )
        segmentation = output_layer(
            self.viewer, self.image, "segmentation", shape, result.segmentation.dtype, class_ids=result.class_ids
        )
        probabilities.data[(slice(None), *result.region)] = result.probabilities
        segmentation.data[result.region] = result.segmentation
        probabilities.refresh()
        segmentation.refresh()
        self.previews_shown += 1

    def _on_paint(self, event=None) -> None:
        source = getattr(event, "source", None)
        indices = [i for i, layer in enumerate(self.labels) if layer is source]
        self._dirty.update(indices or range(len(self.labels)))
        self._timer.start()

    def send_labels(self) -> None:
        """Tell the running trainer which labels layers were painted since the last call; it reads them on its own
        thread, so painting never waits for a copy of a large layer."""
        if self.trainer is None:
            return
        dirty, self._dirty = self._dirty, set()
        for index in sorted(dirty):
            self.trainer.update_labels_later(index, layer_data(self.labels[index]))

    def end(self) -> None:
        """Stop listening to the painting layers and let go of the trainer (the run is over)."""
        self.trainer = None
        self._timer.stop()
        for layer in self.labels:
            for emitter in (layer.events.paint, layer.events.data):
                emitter.disconnect(self._on_paint)
        self.labels = []

    def follow_view(self, model_ndim: int) -> None:
        """Record the part of the training image in view (current slice, visible field) for previews."""
        layer, viewer = self.image, self.viewer
        if not self._image_unchanged():
            return
        shape = spatial_shape(layer)
        point = np.asarray(layer.world_to_data(viewer.dims.point))
        offset = viewer.dims.ndim - layer.ndim
        displayed = [a - offset for a in viewer.dims.displayed if a >= offset]
        corners = np.asarray(layer.corner_pixels)
        region = []
        for axis, size in enumerate(shape):
            centre = int(np.clip(np.round(point[axis]), 0, size - 1))
            if axis < len(shape) - model_ndim:  # a stack axis a 2D net predicts slice by slice
                region.append(slice(centre, centre + 1))
                continue
            low, high = 0, size
            if axis in displayed and viewer.dims.ndisplay == 2 and corners[1, axis] - corners[0, axis] >= 2:
                low, high = int(corners[0, axis]), int(corners[1, axis]) + 1
            elif axis not in displayed:  # the slice axis of a 3D net: a slab around the current slice
                low, high = max(0, centre - 4), min(size, centre + 4)
            if high - low > PREVIEW_MAX_SIZE:
                middle = (low + high) // 2
                low = max(0, min(middle - PREVIEW_MAX_SIZE // 2, size - PREVIEW_MAX_SIZE))
                high = low + PREVIEW_MAX_SIZE
            region.append(slice(low, min(high, size)))
        self.view.region = tuple(region)
