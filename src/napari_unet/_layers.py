"""Layer helpers of the napari side: class colours, painting layers, and the widget's output layers.

Output layers carry ``metadata["napari_unet"] = {"role": ..., "source": <image name>}``; they are found by
that marker (not by name), so re-running replaces their data and never touches layers the user made.
Main thread only.
"""

from __future__ import annotations

import re

import numpy as np

from .arrays import output_array
from .class_ids import class_colour

META_KEY = "napari_unet"
ROLES = ("probabilities", "segmentation", "uncertainty")


DIRECT_COLORMAP_LIMIT = 2**16
"""Largest label napari draws through a ``DirectLabelColormap`` without numba (optional in napari; beyond it every
draw raises "Cannot use numpy implementation for large values of labels direct colormap")."""


def class_colormap(class_ids, transparent=()):
    """A ``DirectLabelColormap`` giving class id k its colour (``class_ids.class_colour``).

    Ids in ``transparent`` (and 0) are not drawn. Ids beyond ``DIRECT_COLORMAP_LIMIT`` without numba: napari's
    default colormap instead (every id its own colour, none transparent), as direct colours could not be drawn.
    """
    from napari.utils.colormaps import DirectLabelColormap, label_colormap

    if max((abs(int(k)) for k in class_ids), default=0) > DIRECT_COLORMAP_LIMIT and not _has_numba():
        return label_colormap()
    colours = {None: "transparent", 0: "transparent"}
    colours.update({int(k): class_colour(k) for k in class_ids if int(k) > 0})
    colours.update({int(k): "transparent" for k in transparent})
    return DirectLabelColormap(color_dict=colours)


def _has_numba() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None


def segmentation_colormap(class_ids, class_names=()):
    """Class colours for a segmentation, with classes named "background" left transparent."""
    hidden = [i for i, name in zip(class_ids, class_names) if str(name).strip().lower() == "background"]
    return class_colormap(class_ids, hidden)


def painting_layer_kwargs(class_names) -> dict:
    """Labels-layer keyword arguments for painting classes 1..K named ``class_names``.

    Class colours, a ``features`` table (napari shows the class name under the cursor) and
    ``metadata["class_names"]`` (``{id: name}``, which Train uses to name the model's classes).
    """
    ids = list(range(1, len(class_names) + 1))
    return {
        "colormap": class_colormap(ids),
        "features": {"index": [0, *ids], "class": ["unpainted", *class_names]},
        "metadata": {"class_names": dict(zip(ids, class_names))},
        "opacity": 0.8,
    }


def layer_data(layer):
    """A layer's data as it is (the full resolution level of a multiscale layer), not a copy."""
    return layer.data[0] if getattr(layer, "multiscale", False) else layer.data


def image_array(layer):
    """An image layer's data as the engine takes it, a view, not a copy (numpy or lazy; the full resolution level
    of a multiscale layer): an RGB(A) layer's colours become three channels first, ``(3, *spatial)`` (alpha
    dropped). Workers read only what they need from it on their own thread (the tiles they predict, the slices
    of a stack with strokes), so the GUI thread never copies an image."""
    data = layer_data(layer)
    return np.moveaxis(data[..., :3], -1, 0) if getattr(layer, "rgb", False) else data


def stacked_channels(arrays):
    """Single-channel arrays (numpy or lazy) stacked channels first as a lazy dask array: nothing is copied or
    read here; a worker reads the parts it needs."""
    import dask.array as da

    return da.stack(
        [a if isinstance(a, da.Array) else da.from_array(_Unwrapped(a), chunks=a.shape, name=False) for a in arrays]
    )


class _Unwrapped:
    """An array seen only through ``shape``, ``dtype``, ``ndim`` and indexing: ``dask.array.from_array`` copies a
    numpy array it is given, not such an object."""

    def __init__(self, array):
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        return self.array[key]


CHANNEL_LAYER_NAME = re.compile(r"^(?P<stem>.*) \[ch(?P<index>\d+)\]$")
"""How napari-unet's reader names the layers of a multi-channel file: ``stem [ch0]``, ``stem [ch1]``..."""


def channel_group(layer, layers) -> list | None:
    """The layers holding the channels of ``layer``'s file, in channel order: the non-RGB image layers among
    ``layers`` named ``<stem> [ch<k>]`` like ``layer``, with its spatial shape, when all of channels 0..n-1
    (n >= 2) are there; else None."""
    match = CHANNEL_LAYER_NAME.match(layer.name)
    if match is None or getattr(layer, "rgb", False):
        return None
    members = {}
    for other in layers:
        found = CHANNEL_LAYER_NAME.match(other.name)
        if (
            found
            and found["stem"] == match["stem"]
            and not getattr(other, "rgb", False)
            and spatial_shape(other) == spatial_shape(layer)
        ):
            members[int(found["index"])] = other
    if len(members) < 2 or sorted(members) != list(range(len(members))):
        return None
    return [members[i] for i in range(len(members))]


def painted_pairs(images, labels_layers) -> list[tuple]:
    """``(image, labels)`` layer pairs to train on: every labels layer with strokes, with the image layer whose
    name is the longest prefix of its name (``nuclei1`` for ``nuclei1 strokes`` or ``nuclei1_labels``) among
    ``images`` of its spatial shape. Labels layers without strokes or without such an image are left out."""
    pairs = []
    for labels in labels_layers:
        data = layer_data(labels)
        candidates = [im for im in images if labels.name.startswith(im.name) and spatial_shape(im) == data.shape]
        if candidates and np.any(data):
            pairs.append((max(candidates, key=lambda im: len(im.name)), labels))
    return pairs


def image_channels(layer) -> int:
    """How many channels :func:`image_array` gives for ``layer`` (3 for RGB(A), else 1)."""
    return 3 if getattr(layer, "rgb", False) else 1


def output_role(layer) -> dict | None:
    """The ``{"role", "source"}`` marker of an output layer made by this widget, or None."""
    marker = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
    return marker if isinstance(marker, dict) and marker.get("role") in ROLES else None


def spatial_shape(layer) -> tuple[int, ...]:
    """The layer's data shape without the colour axis of an RGB image."""
    shape = tuple(layer_data(layer).shape)
    return shape[:-1] if getattr(layer, "rgb", False) else shape


def find_output(viewer, source, role: str):
    """The napari-unet ``role`` output layer for the image layer ``source``, or None."""
    for layer in viewer.layers:
        if output_role(layer) == {"role": role, "source": source.name}:
            return layer
    return None


def outputs_of(viewer, source_name: str) -> list:
    """The napari-unet output layers of the image layer named ``source_name`` (by their marker)."""
    return [layer for layer in viewer.layers if (output_role(layer) or {}).get("source") == source_name]


def follow_rename(viewer, old: str, new: str) -> list:
    """Make the output layers of the image once named ``old`` the outputs of ``new`` (their marker), renaming those
    that still carry their default name ``"<old> <role>"``; returns them. Re-running then updates these layers
    instead of adding a second set beside them."""
    moved = outputs_of(viewer, old)
    for layer in moved:
        role = output_role(layer)["role"]
        layer.metadata[META_KEY] = {"role": role, "source": new}
        if layer.name == f"{old} {role}":
            layer.name = f"{new} {role}"
    return moved


def output_layer(viewer, source, role, shape=None, dtype=None, *, data=None, class_ids=None, class_names=()):
    """Find or make the ``role`` output of ``source``; with ``data`` replace its data.

    Without ``data`` an existing layer of the right shape is kept as it is (previews write regions
    into it), otherwise it gets zeros of ``shape``/``dtype``. The layer takes the source's scale and
    translate (with a leading 1/0 for the class axis of the probabilities). ``class_ids`` and
    ``class_names`` colour a segmentation.
    """
    layer = find_output(viewer, source, role)
    if data is None:
        if layer is not None and layer.data.shape == tuple(shape) and layer.data.dtype == dtype:
            return layer
        data = output_array(shape, dtype)
    spatial = len(spatial_shape(source))
    lead = data.ndim - spatial
    scale = (1.0,) * lead + tuple(source.scale[-spatial:])
    translate = (0.0,) * lead + tuple(source.translate[-spatial:])
    if layer is not None and layer.ndim == data.ndim:
        layer.data = data
        layer.scale, layer.translate = scale, translate
        if class_ids is not None:
            layer.colormap = segmentation_colormap(class_ids, class_names)
        return layer
    if layer is not None:
        viewer.layers.remove(layer)
    kwargs = {
        "name": f"{source.name} {role}",
        "scale": scale,
        "translate": translate,
        "metadata": {META_KEY: {"role": role, "source": source.name}},
    }
    active = viewer.layers.selection.active
    if role == "segmentation":
        layer = viewer.add_labels(data, colormap=segmentation_colormap(class_ids, class_names), opacity=0.6, **kwargs)
    elif role == "uncertainty":
        layer = viewer.add_image(
            data, colormap="magma", contrast_limits=(0.0, 1.0), visible=False, blending="additive", **kwargs
        )
    else:
        layer = viewer.add_image(
            data,
            colormap="inferno",
            contrast_limits=(0.0, 1.0),
            blending="additive",
            opacity=0.7,
            visible=False,
            **kwargs,
        )
        # Show the last class (the foreground of a two-class model) on the class slider.
        viewer.dims.set_current_step(viewer.dims.ndim - layer.ndim, data.shape[0] - 1)
    # Keep outputs just above their image (under the user's painting layers) and keep the user's
    # selection, so painting goes on where it was.
    layers = viewer.layers
    if source in layers:
        layers.move(layers.index(layer), layers.index(source) + 1)
    if active is not None and active in layers:
        layers.selection.active = active
    return layer
