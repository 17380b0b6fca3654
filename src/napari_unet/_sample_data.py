"""napari sample data: the bundled CC0 DSB 2018 nuclei images (the files of ``napari-unet demo``).

"Nuclei with painted strokes" opens ``nuclei1`` with the demo's simulated strokes as a Labels layer
(1 = background, 2 = nucleus), so a new user can open the U-Net widget and click Train at once.
"""

from __future__ import annotations

from ._reader import layer_geometry
from .demo import sample_paths
from .io import read_image

STROKE_CLASSES = ["background", "nucleus"]


def _image_layer(path) -> tuple:
    array, info = read_image(path)
    return array, {"name": path.stem, **layer_geometry(info)}, "image"


def nuclei() -> list[tuple]:
    """The four bundled nuclei images as Image layers."""
    return [_image_layer(path) for path in sample_paths()["images"]]


def nuclei_with_strokes() -> list[tuple]:
    """``nuclei1`` and its simulated strokes (Labels: 1 = background, 2 = nucleus), ready to Train."""
    from ._layers import painting_layer_kwargs

    paths = sample_paths()
    image = _image_layer(paths["images"][0])
    strokes, info = read_image(paths["strokes"])
    kwargs = {"name": f"{image[1]['name']} strokes", **layer_geometry(info), **painting_layer_kwargs(STROKE_CLASSES)}
    return [image, (strokes, kwargs, "labels")]
