"""The layers a running training or prediction reads, watched while it runs: an image renamed takes its output
layers with it (``_layers.follow_rename``), an image or labels layer removed is said in a message (and the caller
drops what belonged to it). The worker already holds the layers' data, so it goes on either way. Main thread only."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from napari.utils.notifications import show_info, show_warning

from .._layers import follow_rename

_GOES_ON = {
    ("training", "image"): "training goes on with the data it was given; its live previews are removed",
    ("training", "labels"): "training goes on with the strokes painted so far",
    ("prediction", "image"): "its prediction is not shown",
}
"""What happens after a layer the run reads leaves the viewer, by (task, kind of layer)."""


class LayerWatch:
    """Watch ``images`` and ``labels`` (layers) of the run ``task`` ("training", "prediction") in ``viewer``.

    ``on_removed(layer)`` is called after the message when one of them leaves the viewer. :attr:`removed` holds
    the layers removed so far; :meth:`close` stops watching (the run is over)."""

    def __init__(
        self,
        viewer,
        task: str,
        images: Sequence,
        labels: Sequence = (),
        on_removed: Callable[[object], None] | None = None,
    ):
        self.viewer, self.task, self.on_removed = viewer, task, on_removed
        self.removed: list = []
        self._watched: dict[int, tuple[object, str, str]] = {}  # id(layer): (layer, name, kind)
        for kind, layers in (("labels", labels), ("image", images)):
            for layer in layers:
                self._watched[id(layer)] = (layer, layer.name, kind)
        for layer, _, kind in self._watched.values():
            if kind == "image":
                layer.events.name.connect(self._on_renamed)
        viewer.layers.events.removed.connect(self._on_removed)

    def _on_renamed(self, event) -> None:
        layer = event.source
        entry = self._watched.get(id(layer))
        if entry is None or entry[1] == layer.name:
            return
        old, new = entry[1], layer.name
        self._watched[id(layer)] = (layer, new, entry[2])
        moved = follow_rename(self.viewer, old, new)
        follows = "its output layers follow it" if moved else "its outputs will carry the new name"
        show_info(f"U-Net: image '{old}' was renamed '{new}' during {self.task}; {follows}")

    def _on_removed(self, event) -> None:
        layer = event.value
        entry = self._watched.get(id(layer))
        if entry is None or layer in self.viewer.layers:
            return
        _, name, kind = entry
        self.removed.append(layer)
        what = "labels" if kind == "labels" else "image"
        show_warning(f"U-Net: {what} '{name}' was removed during {self.task}: {_GOES_ON[self.task, kind]}")
        if self.on_removed is not None:
            self.on_removed(layer)

    def close(self) -> None:
        """Stop watching."""
        for layer, _, kind in self._watched.values():
            if kind == "image":
                layer.events.name.disconnect(self._on_renamed)
        self.viewer.layers.events.removed.disconnect(self._on_removed)
        self._watched = {}
