"""The napari shell's dock widget and its panels (the only package here, with ``_reader``/``_writer``/``_layers``,
that imports Qt or napari)."""

from .unet_widget import UNetWidget

__all__ = ["UNetWidget"]
