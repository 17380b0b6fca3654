"""Annotated datasets on disk: the VOC layout and a plain images/masks layout, read lazily.

Layouts (``open_dataset(root)``):

- VOC: ``JPEGImages/`` (or ``images/``) and ``SegmentationClass/`` (indexed/palette PNG masks); the samples are the
  stems of ``ImageSets/Segmentation/train.txt`` and ``val.txt`` when present, else every mask's stem (a VOC image
  folder also holds images that were never segmented: those are not samples).
- plain: ``images/`` and ``masks/`` (or ``labels/``) with matching stems, TIFF/PNG/JPEG images and TIFF/PNG
  masks (lossless), 2D or 3D (TIFF); every image needs a mask and every mask an image.
  ``ImageSets/Segmentation/*.txt`` are honoured here too.
- optional ``classes.txt``: one class name per line, in mask-value order (line k names value k).

Mask semantics (dense): value ``k`` is class ``k``, 0 included (e.g. background); :data:`IGNORE` (255, the VOC
boundary band) is "void" and weighs nothing. Palette PNGs are read as their indices (PIL mode "P"), never converted
to RGB; an RGB mask is refused, since its colours are not class values. Images may be grey or RGB and of different
sizes; a grey image in a dataset of RGB images is repeated over three channels, an alpha channel is dropped.

Laziness: opening a dataset reads the headers of the images (shape, channels: no pixels) and every mask once (the
value check and the per-class pixel counts that class balance needs; masks are small integer images), but no image;
:meth:`Dataset.read_image` opens an image when it is sampled. Every problem is a one-line :class:`DatasetError`.

PIL reads PNG/JPEG (it is the reader that keeps a palette PNG's indices); tifffile (through ``io.read_image``) TIFF.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

IGNORE = 255
"""The mask value that means "void / not annotated": no class, weight zero in the loss and the scores."""
IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
"""Image files a dataset folder may hold (case-insensitive)."""
MASK_SUFFIXES = (".tif", ".tiff", ".png")
"""Mask files: lossless only, JPEG's compression puts values between the classes (a 0/1 mask saved as JPEG holds
2s)."""
VOC_IMAGES, VOC_MASKS, SPLITS = "JPEGImages", "SegmentationClass", Path("ImageSets", "Segmentation")
IMAGE_FOLDERS, MASK_FOLDERS = ("images", VOC_IMAGES), ("masks", "labels", VOC_MASKS)


_CONVERTED_TO_RGB = ("CMYK", "YCbCr", "LAB", "HSV")
"""PIL image modes read as RGB."""


class DatasetError(ValueError):
    """A dataset that cannot be trained on, in one line naming the file and what is wrong."""


@dataclass(frozen=True)
class Sample:
    """One annotated image: its stem, files, spatial shape and channel count (from the headers)."""

    name: str
    image: Path
    mask: Path
    shape: tuple[int, ...]
    channels: int


@dataclass
class Dataset:
    """An opened dataset: the training and validation samples, the class values and names, the channel count.

    ``class_values[k]`` is the mask value of network class ``k`` (``class_names[k]`` its name); ``counts`` has, per
    training sample, its pixel count per class (rows follow ``train``, columns ``class_values``).
    """

    root: Path
    layout: str
    train: list[Sample]
    val: list[Sample]
    class_values: list[int]
    class_names: list[str]
    channels: int
    counts: np.ndarray

    def read_image(self, sample: Sample) -> np.ndarray:
        """The pixels of ``sample``'s image, channels first when the dataset has several channels (a grey image
        repeated over them)."""
        image, channel_axis = _read_pixels(sample.image)
        if channel_axis is None and self.channels > 1:
            return np.broadcast_to(image, (self.channels, *image.shape))
        if channel_axis is not None:
            image = np.moveaxis(image, channel_axis, 0)[: self.channels]
        return image

    def read_mask(self, sample: Sample) -> np.ndarray:
        """``sample``'s mask values (integers, :data:`IGNORE` where void)."""
        return _read_mask(sample.mask)

    def index_mask(self, sample: Sample) -> np.ndarray:
        """``sample``'s mask as network class indices (int16), -1 where void."""
        lookup = np.full(max(max(self.class_values), IGNORE) + 1, -1, np.int16)
        lookup[self.class_values] = np.arange(len(self.class_values))
        lookup[IGNORE] = -1
        return lookup[self.read_mask(sample)]


def open_dataset(root, *, val_fraction: float = 0.1, seed: int | None = 0, spatial_ndim: int | None = None) -> Dataset:
    """Open the dataset in folder ``root`` (see the module docstring); ``DatasetError`` for anything wrong.

    Without ``val.txt`` the validation images are a seeded random share ``val_fraction`` of the samples (at least one
    when ``val_fraction > 0``; 0: no validation), disjoint from the training images. ``spatial_ndim`` (2 or 3), when
    given, refuses samples of another number of spatial axes (3D stacks pass under 2D: they are trained slice by
    slice).
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder not found: {root}")
    if not 0.0 <= val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    images_dir = _first_folder(root, IMAGE_FOLDERS)
    masks_dir = _first_folder(root, MASK_FOLDERS)
    if images_dir is None or masks_dir is None:
        raise DatasetError(
            f"{root} is not a dataset: it needs images/ (or JPEGImages/) and masks/, labels/ (or SegmentationClass/)"
        )
    layout = "voc" if masks_dir.name == VOC_MASKS else "plain"
    images, masks = _files_by_stem(images_dir), _files_by_stem(masks_dir, masks=True)
    if not masks:
        raise DatasetError(f"{masks_dir} holds no masks (.png, .tif, .tiff)")
    train_list, val_list = (_read_split(root / SPLITS / f"{name}.txt") for name in ("train", "val"))
    if train_list is None and val_list is None:
        stems = sorted(masks) if layout == "voc" else sorted(set(images) | set(masks))
    else:
        stems = sorted(set(train_list or []) | set(val_list or []))
        if train_list is None:
            stems = sorted(set(masks) | set(val_list))
    for stem in stems:
        if stem not in images and stem not in masks:
            raise DatasetError(f"{stem}, listed in {root / SPLITS}, has neither an image nor a mask")
        if stem not in images:
            raise DatasetError(f"mask {masks[stem]} has no image in {images_dir}")
        if stem not in masks:
            raise DatasetError(f"image {images[stem]} has no mask in {masks_dir}")
    if not stems:
        raise DatasetError(f"{root} holds no annotated images")
    samples = {stem: _sample(stem, images[stem], masks[stem], spatial_ndim) for stem in stems}
    channels = max(s.channels for s in samples.values())
    val_stems = _validation_stems(stems, train_list, val_list, val_fraction, seed, root)
    train = [samples[s] for s in stems if s not in val_stems]
    val = [samples[s] for s in stems if s in val_stems]
    if not train:
        raise DatasetError(f"{root}: no training images are left after the validation split")
    names = _read_class_names(root / "classes.txt")
    counts, values = _mask_counts(train + val, names)
    if val and not counts[len(train) :].any():
        raise DatasetError(
            f"{root}: the validation images ({', '.join(s.name for s in val[:3])}{', ...' if len(val) > 3 else ''}) "
            f"hold no labelled pixel (all {IGNORE}, void): no epoch could be scored"
        )
    class_values = list(range(len(names))) if names else values
    if len(class_values) < 2:
        raise DatasetError(f"{root}: the masks hold one class only (value {class_values}); a segmentation needs two")
    lookup = np.searchsorted(values, class_values)
    train_counts = np.zeros((len(train), len(class_values)), np.int64)
    present = np.isin(class_values, values)
    train_counts[:, present] = counts[: len(train)][:, lookup[present]]
    return Dataset(
        root=root,
        layout=layout,
        train=train,
        val=val,
        class_values=[int(v) for v in class_values],
        class_names=names or [f"class {v}" for v in class_values],
        channels=channels,
        counts=train_counts,
    )


def _first_folder(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _files_by_stem(folder: Path, masks: bool = False) -> dict[str, Path]:
    """The image files of ``folder`` by stem (``masks``: of ``MASK_SUFFIXES``, a JPEG is an error); two files of one
    stem are an error."""
    found: dict[str, Path] = {}
    suffixes = MASK_SUFFIXES if masks else IMAGE_SUFFIXES
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        if masks and path.suffix.lower() in set(IMAGE_SUFFIXES) - set(MASK_SUFFIXES):
            raise DatasetError(
                f"mask {path} is a JPEG: its lossy compression puts values between the classes; save masks as PNG "
                "or TIFF"
            )
        if path.suffix.lower() in suffixes:
            if path.stem in found:
                raise DatasetError(f"{found[path.stem]} and {path} have the same name: keep one")
            found[path.stem] = path
    return found


def _read_split(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _read_class_names(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if len(names) < 2:
        raise DatasetError(f"{path} names {len(names)} class(es): a segmentation needs two")
    if len(names) > IGNORE:
        raise DatasetError(f"{path} names {len(names)} classes: at most {IGNORE} (value {IGNORE} means void)")
    return names


def _validation_stems(stems, train_list, val_list, fraction, seed, root) -> set[str]:
    if val_list is not None:
        shared = sorted(set(train_list or []) & set(val_list))
        if shared:
            raise DatasetError(f"{root / SPLITS}: train.txt and val.txt share images, e.g. {shared[0]}")
        return set(val_list)
    if fraction == 0:
        return set()
    if len(stems) < 2:
        raise DatasetError(f"{root} holds one annotated image: a validation split needs two (or --val-fraction 0)")
    count = min(len(stems) - 1, max(1, round(fraction * len(stems))))
    order = np.random.default_rng(seed).permutation(len(stems))
    return {stems[i] for i in order[:count]}


def _sample(stem: str, image: Path, mask: Path, spatial_ndim: int | None) -> Sample:
    shape, channels = _image_header(image, mask=False)
    mask_shape, mask_channels = _image_header(mask, mask=True)
    if mask_channels > 1:
        raise DatasetError(
            f"mask {mask} is an RGB image, not an indexed one: save masks as palette or greyscale PNG (value = class)"
        )
    if mask_shape != shape:
        raise DatasetError(f"mask {mask} has shape {mask_shape} but its image {image} has shape {shape}")
    if len(shape) not in (2, 3) or (spatial_ndim == 3 and len(shape) != 3):
        raise DatasetError(f"image {image} has {len(shape)} spatial axes; a {spatial_ndim or 2}D net needs 2 or 3")
    return Sample(stem, image, mask, shape, channels)


def _is_tiff(path: Path) -> bool:
    return path.suffix.lower() in (".tif", ".tiff")


def _image_header(path: Path, mask: bool) -> tuple[tuple[int, ...], int]:
    """Spatial shape and channel count of an image file, from its header (no pixels decoded): a palette image has
    one (its indices) as a mask, three (its colours) as an image; alpha does not count."""
    if _is_tiff(path):
        from .io import ImageFileError, open_image

        try:
            with open_image(path) as (array, info):
                shape, axis = tuple(array.shape), info["channel_axis"]
        except ImageFileError as e:
            raise DatasetError(str(e)) from None
        if axis is None:
            return shape, 1
        return shape[:axis] + shape[axis + 1 :], shape[axis]
    with _Opened(path) as image:
        if image.mode in ("P", "PA"):
            bands = 1 if mask else 3
        elif image.mode in _CONVERTED_TO_RGB:
            bands = 3
        else:
            bands = len(image.getbands()) - (image.mode in ("LA", "RGBA"))
        return (image.height, image.width), bands


class _Opened:
    """``PIL.Image.open`` as a context manager whose errors are one-line ``DatasetError``s."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        from PIL import Image, UnidentifiedImageError

        try:
            self.image = Image.open(self.path)
        except (OSError, UnidentifiedImageError) as e:
            raise DatasetError(f"cannot read {self.path}: {e}") from None
        return self.image

    def __exit__(self, *exc_info):
        self.image.close()


def _decoded(path: Path, image) -> np.ndarray:
    try:
        return np.array(image)  # a writable copy (asarray of a PIL image is read-only)
    except (OSError, ValueError, SyntaxError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from None


def _read_pixels(path: Path) -> tuple[np.ndarray, int | None]:
    """An image's pixels and its channel axis (None: grey); palette images become RGB, alpha is dropped."""
    if _is_tiff(path):
        from .io import ImageFileError, read_image

        try:
            array, info = read_image(path)
        except ImageFileError as e:
            raise DatasetError(str(e)) from None
        return array, info["channel_axis"]
    with _Opened(path) as image:
        if image.mode in ("P", "PA", *_CONVERTED_TO_RGB):
            image = image.convert("RGB")
        elif image.mode in ("LA", "RGBA"):
            image = image.convert(image.mode[:-1])
        array = _decoded(path, image)
    return array, (array.ndim - 1 if array.ndim == 3 else None)


def _read_mask(path: Path) -> np.ndarray:
    """A mask's values: a palette PNG's indices (mode "P" is never converted), a grey image's values."""
    if _is_tiff(path):
        from .io import ImageFileError, read_image

        try:
            array, info = read_image(path)
        except ImageFileError as e:
            raise DatasetError(str(e)) from None
        if info["channel_axis"] is not None:
            raise DatasetError(f"mask {path} has channels (axes {info['axes']}): a mask holds one value per pixel")
    else:
        with _Opened(path) as image:
            if image.mode not in ("P", "L", "1", "I", "I;16", "I;16B", "I;16L"):
                raise DatasetError(
                    f"mask {path} is a {image.mode} image, not an indexed one: save masks as palette or greyscale PNG"
                )
            array = _decoded(path, image)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(array == np.round(array)):
            raise DatasetError(f"mask {path} holds non-integer values")
        array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise DatasetError(f"mask {path} holds negative values")
    return array


def _mask_counts(samples: list[Sample], names: list[str] | None) -> tuple[np.ndarray, list[int]]:
    """Per sample, the pixel count of every value found (columns: the sorted values found, :data:`IGNORE`
    left out), read mask by mask; values outside ``names`` (when given) are an error."""
    per_sample = []
    for sample in samples:
        values, counts = np.unique(_read_mask(sample.mask), return_counts=True)
        keep = values != IGNORE
        values, counts = values[keep], counts[keep]
        if names is not None and values.size and values.max() >= len(names):
            extra = [int(v) for v in values if v >= len(names)]
            raise DatasetError(
                f"mask {sample.mask} holds values {extra} outside classes.txt ({len(names)} classes: "
                f"0..{len(names) - 1}, {IGNORE} = void)"
            )
        per_sample.append(dict(zip(values.tolist(), counts.tolist())))
    found = sorted(set().union(*per_sample)) if per_sample else []
    table = np.zeros((len(samples), len(found)), np.int64)
    column = {v: k for k, v in enumerate(found)}
    for row, counts in enumerate(per_sample):
        for value, count in counts.items():
            table[row, column[value]] = count
    return table, found
