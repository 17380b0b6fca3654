"""napari-unet: interactive valid-padding U-Net segmentation for napari.

The public API is imported lazily so that ``import napari_unet`` (done by napari when it
reads the plugin manifest) stays cheap and does not import torch.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-unet")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

_PUBLIC = {
    "UNet": "model",
    "predict_tiled": "tiling",
    "PredictionStopped": "tiling",
    "predict_image": "predict",
    "PredictionSettings": "predict",
    "save_model": "io",
    "load_model": "io",
    "percentile_params": "normalization",
    "normalize": "normalization",
    "normalize_image": "normalization",
    "read_image": "io",
    "write_tiff": "io",
    "Trainer": "training",
    "TrainingSettings": "training_settings",
    "TrainingEvent": "training",
    "train": "training",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'napari_unet' has no attribute {name!r}")
    return getattr(import_module(f"napari_unet.{module}"), name)


def __dir__():
    return __all__
