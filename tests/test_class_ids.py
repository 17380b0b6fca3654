"""Network class indices map back to the painted ids, in the smallest dtype, from any array-like."""

import numpy as np

from napari_unet.class_ids import labels_dtype, segmentation_from_probabilities


def test_labels_dtype_is_the_smallest_unsigned_type():
    assert labels_dtype([1, 2]) == np.uint8
    assert labels_dtype([1, 255]) == np.uint8
    assert labels_dtype([1, 300]) == np.uint16
    assert labels_dtype([2, 70000]) == np.uint32


def test_segmentation_uses_the_painted_ids_plane_by_plane(tmp_path):
    rng = np.random.default_rng(0)
    probabilities = rng.random((3, 4, 9, 7)).astype(np.float32)  # 3 classes, a stack of 4 planes
    class_ids = [1, 3, 300]
    expected = np.asarray(class_ids)[probabilities.argmax(0)]
    on_disk = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=probabilities.shape)
    on_disk[:] = probabilities
    for source in (probabilities, on_disk, probabilities[:, 0]):
        segmentation = segmentation_from_probabilities(source, class_ids)
        assert segmentation.dtype == np.uint16 and segmentation.shape == source.shape[1:]
        np.testing.assert_array_equal(segmentation, expected if source.ndim == 4 else expected[0])
