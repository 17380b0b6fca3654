"""The "Data" panel: which image and labels to train on and predict, channel groups, class names, a new painting
layer, and the image/labels pairs of *Train on every painted image*. Main thread only.

Channels are decided here: an RGB(A) layer is three channels, a channel group (the layers ``name [chK]`` that the
reader makes of a file's channel axis) is one image with *Combine channel layers*, any other layer one channel. A
file's axes can be read wrong (``tifffile.imwrite(path, stack)`` without metadata stores a 3- or 4-slice stack as
the samples of an RGB page, so it opens as channel layers; a few channels stored as pages open as a stack), and
napari's reader cannot ask, so the panel offers the other reading of the chosen layer: *Channel layers are Z
slices* makes one stack of a group of 2D channel layers, *Z slices are channels* makes channel layers of a short
stack's slices (at most :data:`MAX_SLICES_AS_CHANNELS`). Neither copies pixels."""

from __future__ import annotations

import numpy as np
from napari.layers import Image, Labels
from napari.utils.notifications import show_warning
from qtpy.QtWidgets import QCheckBox, QComboBox, QFormLayout, QGroupBox, QLineEdit, QPushButton

from .._layers import (
    CHANNEL_LAYER_NAME,
    channel_group,
    image_array,
    image_channels,
    output_role,
    painted_pairs,
    painting_layer_kwargs,
    spatial_shape,
    stacked_channels,
)
from ..arrays import output_array

DEFAULT_CLASS_NAMES = "background, foreground"
MAX_SLICES_AS_CHANNELS = 8
"""*Z slices are channels* is offered for stacks of at most this many slices."""
STACK_CHANNELS = "Channel layers are Z slices"
SPLIT_SLICES = "Z slices are channels"


def parse_class_names(text: str) -> list[str]:
    """``"background, nuclei"`` -> ``["background", "nuclei"]`` (class ids 1, 2, ...)."""
    return [name.strip() for name in text.split(",") if name.strip()]


class DataPanel(QGroupBox):
    """Pickers for the image and labels layers that follow the viewer's layer list (this plugin's outputs are left
    out), and what the other parts of the widget ask about the data: a layer's channel group and channels, the
    array a worker reads, class names by painted id, the pairs to train on."""

    def __init__(self, viewer, parent=None):
        super().__init__("Data", parent)
        self.viewer = viewer
        form = QFormLayout(self)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip(
            "Image to train on and to predict (2D or 3D; one channel, RGB, or with "
            "'Combine channel layers' the channels of a file)"
        )
        self.labels_combo = QComboBox()
        self.labels_combo.setToolTip("Painted labels: 0 = unpainted, 1, 2, ... = classes")
        self.channels_check = QCheckBox("Combine channel layers")
        self.channels_check.setToolTip(
            "Treat the layers of a multi-channel file (named 'name [ch0]', 'name [ch1]'... as napari-unet's reader "
            "opens them) as one image with all its channels: Train, Predict and Segment all then use every "
            "channel (results go with the [ch0] layer)"
        )
        self.class_names_edit = QLineEdit(DEFAULT_CLASS_NAMES)
        self.class_names_edit.setToolTip("Class names for label ids 1, 2, ... (comma separated)")
        self.axes_button = QPushButton()
        self.axes_button.setToolTip(
            "The file's axes were read wrong: make one Z stack of the chosen image's channel layers, or channel "
            "layers of its Z slices (the layers are replaced; no pixels are copied)"
        )
        self.new_labels_button = QPushButton("New labels layer")
        self.new_labels_button.setToolTip("Add an empty labels layer for painting, with the class colours and names")
        self.all_images_check = QCheckBox("Train on every painted image")
        self.all_images_check.setToolTip(
            "Train one model on the chosen image and every other image with a painted labels layer (a labels layer "
            "pairs with the image whose name starts its name, e.g. 'cells2 strokes' with 'cells2'); "
            "previews follow the chosen image, and strokes painted in any of them during training are used"
        )
        form.addRow("Image", self.image_combo)
        form.addRow(self.channels_check)
        form.addRow(self.axes_button)
        form.addRow("Labels", self.labels_combo)
        form.addRow("Classes", self.class_names_edit)
        form.addRow(self.new_labels_button)
        form.addRow(self.all_images_check)
        self.dense_check = QCheckBox("Labels are complete (0 is a class)")
        self.dense_check.setToolTip(
            "The labels layer holds a class at every pixel (an imported ground truth, a corrected prediction): "
            "0 is a class such as background, 255 means no label; predictions then come back with these values"
        )
        form.addRow(self.dense_check)

        self.image_combo.currentIndexChanged.connect(self._fill_labels)
        self.image_combo.currentIndexChanged.connect(self._update_channels_label)
        self.labels_combo.currentIndexChanged.connect(self._show_layer_class_names)
        self.channels_check.toggled.connect(self._update_channels_label)
        self.new_labels_button.clicked.connect(self.new_labels_layer)
        self.axes_button.clicked.connect(self.switch_axes)
        layers = viewer.layers
        layers.events.inserted.connect(self._on_layer_inserted)
        layers.events.removed.connect(self.refresh)
        layers.events.moved.connect(self.refresh)
        for layer in layers:
            layer.events.name.connect(self.refresh)
        self.refresh()

    # --- the layers -------------------------------------------------------------------------------

    def image_layers(self) -> list[Image]:
        """Image layers the user can train on or predict (not this widget's outputs)."""
        return [la for la in self.viewer.layers if isinstance(la, Image) and output_role(la) is None]

    def labels_layers(self) -> list[Labels]:
        """Labels layers the user painted (not this widget's segmentations)."""
        return [la for la in self.viewer.layers if isinstance(la, Labels) and output_role(la) is None]

    @property
    def image_layer(self) -> Image | None:
        """The chosen image layer."""
        return self._layer_named(self.image_combo.currentText(), Image)

    @property
    def labels_layer(self) -> Labels | None:
        """The chosen labels layer."""
        return self._layer_named(self.labels_combo.currentText(), Labels)

    def _layer_named(self, name: str, kind):
        layer = self.viewer.layers[name] if name in self.viewer.layers else None
        return layer if isinstance(layer, kind) else None

    def input_layers(self, layer) -> list[Image]:
        """The layers ``layer``'s image is made of: its channel group (``_layers.channel_group``) when *Combine
        channel layers* is ticked and it has one, else ``[layer]``. The first is where results go."""
        group = channel_group(layer, self.image_layers()) if self.channels_check.isChecked() else None
        return group or [layer]

    def input_channels(self, layer) -> int:
        """The channels the engine sees for ``layer`` (its channel group's, with *Combine channel layers*)."""
        return sum(image_channels(la) for la in self.input_layers(layer))

    def input_image(self, layer):
        """The image a worker reads for ``layer``: a view of its data (``_layers.image_array``), or a channel
        group's layers stacked channels first, lazily (``_layers.stacked_channels``: the GUI copies nothing)."""
        layers = self.input_layers(layer)
        return image_array(layers[0]) if len(layers) == 1 else stacked_channels([image_array(la) for la in layers])

    def class_names(self, labels) -> dict[int, str]:
        """Class names by painted id: the labels layer's own (``metadata["class_names"]``), else the Classes field."""
        names = labels.metadata.get("class_names") if isinstance(labels.metadata, dict) else None
        if isinstance(names, dict) and names:
            return {int(k): str(v) for k, v in names.items()}
        return dict(enumerate(parse_class_names(self.class_names_edit.text()), start=1))

    def training_problem(self, image, labels, finetune_config: dict | None) -> str | None:
        """Why Train cannot start on ``image`` and ``labels`` (``finetune_config``: the config of the model to
        fine-tune, or None for a new one), or None."""
        if image is None:
            return "choose an image layer to train on"
        if labels is None:
            return "choose a labels layer (or click 'New labels layer' and paint a few strokes)"
        if labels.data.shape != spatial_shape(image):
            return (
                f"labels '{labels.name}' {labels.data.shape} and image '{image.name}' "
                f"{spatial_shape(image)} differ in shape"
            )
        if finetune_config is not None:
            channels, model_channels = self.input_channels(image), finetune_config["in_channels"]
            if channels != model_channels:
                fix = self._axes_fix(image, model_channels)
                return (
                    f"the model to fine-tune takes {model_channels} channel(s), '{image.name}' has {channels}: "
                    'untick "Train on from the current model" to train a new one' + (f"; or, {fix}" if fix else "")
                )
        return None

    def fit_problem(self, layer, config: dict) -> str | None:
        """Why a model of ``config`` cannot predict ``layer`` (channels, dimensions), or None."""
        channels, model_channels = self.input_channels(layer), config["in_channels"]
        if channels != model_channels:
            group = channel_group(layer, self.image_layers())
            hint = (
                f": tick 'Combine channel layers' to use its file's {len(group)} channels"
                if group and len(group) == model_channels and not self.channels_check.isChecked()
                else ""
            )
            return (
                f"'{layer.name}' has {channels} channel{'s' * (channels > 1)} (RGB: 3); "
                f"the model takes {model_channels}{hint or self._axes_fix(layer, model_channels, ': ')}"
            )
        ndim = len(spatial_shape(layer))
        allowed = (2, 3) if config["ndim"] == 2 else (3,)
        if ndim not in allowed:
            return f"'{layer.name}' has {ndim} dimensions; a {config['ndim']}D model takes " + " or ".join(
                map(str, allowed)
            )
        return None

    # --- the other reading of a file's axes ---------------------------------------------------------

    def axes_choice(self, layer) -> str | None:
        """What the axes button offers for ``layer``: :data:`STACK_CHANNELS` for a layer of a group of 2D channel
        layers, :data:`SPLIT_SLICES` for a short 3D stack that is not RGB nor in a group, else None."""
        if layer is None:
            return None
        group = channel_group(layer, self.image_layers())
        if group:
            return STACK_CHANNELS if len(spatial_shape(layer)) == 2 else None
        shape = spatial_shape(layer)
        if len(shape) == 3 and shape[0] <= MAX_SLICES_AS_CHANNELS and not getattr(layer, "rgb", False):
            return SPLIT_SLICES
        return None

    def switch_axes(self) -> list[Image]:
        """Apply the axes button's choice to the chosen image (see the module docstring); returns the new layers."""
        layer = self.image_layer
        choice = self.axes_choice(layer)
        if choice == STACK_CHANNELS:
            return [self._stack_channels(channel_group(layer, self.image_layers()))]
        if choice == SPLIT_SLICES:
            return self._split_slices(layer)
        return []

    def _stack_channels(self, group: list[Image]) -> Image:
        """One Z stack of the channel layers ``group`` (lazily stacked, ``_layers.stacked_channels``), in their place
        and with their pixel size (Z: 1.0 in the same unit, unknown); the channel layers go."""
        first, layers = group[0], self.viewer.layers
        stem = CHANNEL_LAYER_NAME.match(first.name)["stem"]
        stack = Image(
            stacked_channels([image_array(la) for la in group]),
            name=stem,
            scale=(1.0, *first.scale),
            translate=(0.0, *first.translate),
            axis_labels=("z", *first.axis_labels),
            units=(first.units[0], *first.units),
            metadata={**first.metadata, "axes": "ZYX"},
            colormap="gray",
        )
        index = min(layers.index(la) for la in group)
        for member in group:
            layers.remove(member)
        layers.insert(index, stack)
        self.image_combo.setCurrentText(stack.name)
        return stack

    def _split_slices(self, layer: Image) -> list[Image]:
        """Channel layers ``name [chK]`` of the stack ``layer``'s slices (views of its data), as the reader makes of
        a file's channel axis, in its place; *Combine channel layers* is ticked."""
        data, n = image_array(layer), spatial_shape(layer)[0]
        index = self.viewer.layers.index(layer)
        channels = self.viewer.add_image(
            data,
            channel_axis=0,
            name=[f"{layer.name} [ch{k}]" for k in range(n)],
            scale=tuple(layer.scale[1:]),
            translate=tuple(layer.translate[1:]),
            axis_labels=tuple(layer.axis_labels[1:]),
            units=tuple(layer.units[1:]),
            metadata={**layer.metadata, "axes": "CYX"},
        )
        self.viewer.layers.remove(layer)
        for offset, channel in enumerate(channels):
            self.viewer.layers.move(self.viewer.layers.index(channel), index + offset)
        self.channels_check.setChecked(True)
        self.image_combo.setCurrentText(channels[0].name)
        return channels

    def _axes_fix(self, layer, model_channels: int, lead: str = "") -> str:
        """The pointer to the axes button (after ``lead``) when its other reading gives the model's channels, or
        ``""``: for ``fit_problem`` and ``training_problem``."""
        choice = self.axes_choice(layer)
        if choice == STACK_CHANNELS and model_channels == 1 and self.channels_check.isChecked():
            return f"{lead}if its channel layers are Z slices, click '{STACK_CHANNELS}'"
        if choice == SPLIT_SLICES and spatial_shape(layer)[0] == model_channels:
            return f"{lead}if its {model_channels} slices are channels, click '{SPLIT_SLICES}'"
        return ""

    def training_pairs(self, image, labels) -> list[tuple]:
        """The chosen (image, labels) pair first, then with *Train on every painted image* the other painted pairs
        (``_layers.painted_pairs``; a channel group once, by its first layer) that fit the first one."""
        pairs = [(image, labels)]
        if self.all_images_check.isChecked():
            for other, other_labels in painted_pairs(self.image_layers(), self.labels_layers()):
                other = self.input_layers(other)[0]
                if other_labels is labels or any(other is im for im, _ in pairs):
                    continue
                if self.input_channels(other) != self.input_channels(image):
                    show_warning(
                        f"U-Net: '{other_labels.name}' left out: '{other.name}' has other channels than '{image.name}'"
                    )
                    continue
                pairs.append((other, other_labels))
        return pairs

    def new_labels_layer(self) -> Labels | None:
        """Add an empty uint8 labels layer matching the chosen image, with class colours and names."""
        image = self.image_layer
        if image is None:
            show_warning("U-Net: open or choose an image first")
            return None
        names = parse_class_names(self.class_names_edit.text()) or parse_class_names(DEFAULT_CLASS_NAMES)
        shape = spatial_shape(image)
        layer = self.viewer.add_labels(
            output_array(shape, np.uint8),  # beyond 1 GiB a memory-mapped temporary file: paint a huge stack
            name=f"{image.name} strokes",
            scale=image.scale[-len(shape) :],
            translate=image.translate[-len(shape) :],
            **painting_layer_kwargs(names),
        )
        layer.brush_size = 4
        layer.selected_label = 1
        layer.mode = "paint"
        self.labels_combo.setCurrentText(layer.name)
        self.viewer.layers.selection.active = layer
        return layer

    # --- keeping the pickers current --------------------------------------------------------------

    def _on_layer_inserted(self, event) -> None:
        event.value.events.name.connect(self.refresh)
        self.refresh()

    def refresh(self, event=None) -> None:
        """Refill the pickers from the viewer's layers, keeping the choices that still exist."""
        images = self.image_layers()
        active = self.viewer.layers.selection.active
        _fill(self.image_combo, images, active if active in images else (images[0] if images else None))
        self._fill_labels()
        self._update_channels_label()

    def _fill_labels(self, index=None) -> None:
        labels = self.labels_layers()
        image = self.image_layer
        matching = [la for la in labels if image is not None and la.data.shape == spatial_shape(image)]
        _fill(self.labels_combo, labels, (matching or labels or [None])[0])

    def _show_layer_class_names(self, index=None) -> None:
        """Show the class names a painting layer carries (``metadata["class_names"]``)."""
        layer = self.labels_layer
        names = layer.metadata.get("class_names") if layer is not None else None
        if isinstance(names, dict) and names:
            self.class_names_edit.setText(", ".join(str(names[k]) for k in sorted(names)))

    def _update_channels_label(self, *args) -> None:
        layer = self.image_layer
        group = channel_group(layer, self.image_layers()) if layer is not None else None
        self.channels_check.setText(
            f"Combine channel layers ({len(group)} channels)" if group else "Combine channel layers"
        )
        choice = self.axes_choice(layer)
        self.axes_button.setText(choice or "")
        self.axes_button.setVisible(choice is not None)


def _fill(combo: QComboBox, layers, preferred) -> None:
    """Refill ``combo``; keep its current choice when it still exists, else choose ``preferred``."""
    names = [la.name for la in layers]
    current = combo.currentText()
    if [combo.itemText(i) for i in range(combo.count())] == names and current in names:
        return
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(names)
    keep = current if current in names else (preferred.name if preferred is not None else "")
    combo.setCurrentIndex(names.index(keep) if keep in names else -1)
    combo.blockSignals(False)
    combo.currentIndexChanged.emit(combo.currentIndex())
