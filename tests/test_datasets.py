"""Datasets on disk: both layouts, palette masks read as indices, void, classes.txt, the split, every error."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from napari_unet.datasets import IGNORE, DatasetError, open_dataset


def disks(size: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A grey image of bright disks on a dark background and its dense mask (0 background, 1 disk, 255 void on
    the disks' rims)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[: size[0], : size[1]]
    mask = np.zeros(size, np.uint8)
    for _ in range(4):
        cy, cx, r = rng.integers(8, size[0] - 8), rng.integers(8, size[1] - 8), rng.integers(4, 8)
        d = np.hypot(yy - cy, xx - cx)
        mask[d < r] = 1
        mask[(d >= r) & (d < r + 1) & (mask == 0)] = IGNORE
    image = (40 + 150 * (mask == 1) + rng.normal(0, 10, size)).clip(0, 255).astype(np.uint8)
    return image, mask


def palette_png(path, mask: np.ndarray) -> None:
    """``mask`` as a VOC-style palette PNG: indices, with colours that differ from them."""
    image = Image.fromarray(mask, mode="P")
    palette = [0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * (256 * 3 - 9)
    palette[IGNORE * 3 : IGNORE * 3 + 3] = [224, 224, 192]
    image.putpalette(palette)
    image.save(path)


def make_voc(root, count: int = 6, sizes=((64, 80), (72, 64)), split: bool = True, rgb: bool = True):
    """A VOC-layout dataset of ``count`` images (sizes alternate); ImageSets when ``split``."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    names = [f"2007_{i:06d}" for i in range(count)]
    for i, name in enumerate(names):
        image, mask = disks(sizes[i % len(sizes)], i)
        pixels = np.stack([image, image // 2, image], -1) if rgb else image
        Image.fromarray(pixels).save(root / "JPEGImages" / f"{name}.png")  # PNG: lossless for exact tests
        palette_png(root / "SegmentationClass" / f"{name}.png", mask)
    (root / "JPEGImages" / "unsegmented.jpg").write_bytes(b"")  # VOC holds images never segmented: not samples
    if split:
        (root / "ImageSets" / "Segmentation").mkdir(parents=True)
        (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names[:-2]) + "\n")
        (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(names[-2:]) + "\n")
    return names


def make_plain(root, count: int = 5, masks: str = "masks", suffix: str = ".tif", size=(64, 64)):
    (root / "images").mkdir(parents=True)
    (root / masks).mkdir()
    for i in range(count):
        image, mask = disks(size, 10 + i)
        if suffix == ".tif":
            tifffile.imwrite(root / "images" / f"cell{i}.tif", image.astype(np.uint16) * 100)
            tifffile.imwrite(root / masks / f"cell{i}.tif", mask)
        else:
            Image.fromarray(image).save(root / "images" / f"cell{i}{suffix}")
            Image.fromarray(mask).save(root / masks / f"cell{i}.png")


def test_voc_layout_reads_palette_indices_splits_and_sizes(tmp_path):
    names = make_voc(tmp_path)
    (tmp_path / "classes.txt").write_text("background\nnucleus\n")
    dataset = open_dataset(tmp_path)
    assert dataset.layout == "voc"
    assert [s.name for s in dataset.train] == names[:-2] and [s.name for s in dataset.val] == names[-2:]
    assert dataset.class_values == [0, 1] and dataset.class_names == ["background", "nucleus"]
    assert dataset.channels == 3
    assert {s.shape for s in dataset.train} == {(64, 80), (72, 64)}  # images of different sizes
    sample = dataset.train[0]
    mask = dataset.read_mask(sample)
    assert mask.ndim == 2 and set(np.unique(mask)) == {0, 1, IGNORE}  # indices, not the palette's colours
    np.testing.assert_array_equal(mask, disks((64, 80), 0)[1])
    target = dataset.index_mask(sample)
    assert target.dtype == np.int16 and set(np.unique(target)) == {-1, 0, 1}
    assert dataset.read_image(sample).shape == (3, 64, 80)
    # per-class pixel counts of the training images, void left out
    expected = [np.bincount(disks(s.shape, i)[1].ravel(), minlength=256)[:2] for i, s in enumerate(dataset.train)]
    np.testing.assert_array_equal(dataset.counts, expected)


def test_plain_layout_tiff_and_png_grey(tmp_path):
    make_plain(tmp_path / "a")
    dataset = open_dataset(tmp_path / "a", val_fraction=0.4)
    assert dataset.layout == "plain" and dataset.channels == 1 and dataset.class_names == ["class 0", "class 1"]
    assert len(dataset.val) == 2 and len(dataset.train) == 3
    assert dataset.read_image(dataset.train[0]).dtype == np.uint16
    make_plain(tmp_path / "b", masks="labels", suffix=".png")
    dataset = open_dataset(tmp_path / "b")
    assert len(dataset.val) == 1 and dataset.read_image(dataset.val[0]).shape == (64, 64)


def test_plain_layout_3d_stacks(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for i in range(2):
        planes = [disks((48, 48), 3 * i + z) for z in range(3)]
        tifffile.imwrite(
            tmp_path / "images" / f"s{i}.tif",
            np.stack([p[0] for p in planes]),
            metadata={"axes": "ZYX"},
            photometric="minisblack",
        )
        tifffile.imwrite(
            tmp_path / "masks" / f"s{i}.tif",
            np.stack([p[1] for p in planes]),
            metadata={"axes": "ZYX"},
            photometric="minisblack",
        )
    dataset = open_dataset(tmp_path, spatial_ndim=3)
    assert dataset.train[0].shape == (3, 48, 48) and dataset.index_mask(dataset.train[0]).shape == (3, 48, 48)


def test_split_is_seeded_and_disjoint(tmp_path):
    make_plain(tmp_path, count=20, suffix=".png")
    first = open_dataset(tmp_path, val_fraction=0.25, seed=3)
    again = open_dataset(tmp_path, val_fraction=0.25, seed=3)
    other = open_dataset(tmp_path, val_fraction=0.25, seed=4)
    val = {s.name for s in first.val}
    assert len(val) == 5 and val == {s.name for s in again.val} and val != {s.name for s in other.val}
    assert not val & {s.name for s in first.train} and len(first.train) == 15
    assert len(open_dataset(tmp_path, val_fraction=0.01).val) == 1  # at least one
    assert open_dataset(tmp_path, val_fraction=0).val == []


def _broken(tmp_path, what: str):
    make_plain(tmp_path, count=3, suffix=".png")
    images, masks = tmp_path / "images", tmp_path / "masks"
    if what == "empty":
        for p in [*images.iterdir(), *masks.iterdir()]:
            p.unlink()
    elif what == "image_without_mask":
        (masks / "cell1.png").unlink()
    elif what == "mask_without_image":
        (images / "cell2.png").unlink()
    elif what == "shape":
        Image.fromarray(np.zeros((32, 64), np.uint8)).save(masks / "cell0.png")
    elif what == "values":
        (tmp_path / "classes.txt").write_text("background\nnucleus\n")
        Image.fromarray(np.full((64, 64), 7, np.uint8)).save(masks / "cell0.png")
    elif what == "rgb":
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(masks / "cell0.png")
    elif what == "unreadable":
        (images / "cell1.png").write_bytes(b"not a png")
    elif what == "no_folders":
        images.rename(tmp_path / "pictures")
    elif what == "void_validation":
        (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
        (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("cell0\ncell1\n")
        (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("cell2\n")
        Image.fromarray(np.full((64, 64), 255, np.uint8)).save(masks / "cell2.png")
    elif what == "jpeg_mask":
        (masks / "cell0.png").rename(masks / "cell0.jpg")
    elif what == "listed_nowhere":
        (tmp_path / "ImageSets" / "Segmentation").mkdir(parents=True)
        (tmp_path / "ImageSets" / "Segmentation" / "train.txt").write_text("cell0\ncell9\n")


@pytest.mark.parametrize(
    ("what", "message"),
    [
        ("empty", "holds no masks"),
        ("image_without_mask", "cell1.png has no mask"),
        ("mask_without_image", "cell2.png has no image"),
        ("shape", "has shape (32, 64) but its image"),
        ("values", "holds values [7] outside classes.txt"),
        ("rgb", "is an RGB image, not an indexed one"),
        ("unreadable", "cannot read"),
        ("no_folders", "is not a dataset"),
        ("jpeg_mask", "cell0.jpg is a JPEG: its lossy compression puts values between the classes"),
        ("listed_nowhere", "cell9, listed in"),
        ("void_validation", "the validation images (cell2) hold no labelled pixel (all 255, void)"),
    ],
)
def test_every_problem_is_one_line(tmp_path, what, message):
    _broken(tmp_path, what)
    with pytest.raises(DatasetError) as error:
        open_dataset(tmp_path)
    assert message in str(error.value) and "\n" not in str(error.value)
