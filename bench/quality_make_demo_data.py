"""Write the bundled demo data (``src/napari_unet/data/``) from the DSB 2018 subset (run once).

Four 256x256 DSB 2018 fluorescence images with their instance ground truth, and simulated strokes
(``quality_strokes.simulate_strokes``: 1 = background, 2 = nucleus, 3 % of each class) for the first one.

    python bench/quality_make_demo_data.py [--data /work/shared/data]
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import tifffile

sys.path.insert(0, str(Path(__file__).parent))
from quality_strokes import simulate_strokes

IMAGE_IDS = [  # varied: dense textured clusters (training image), sparse, dense and dim, small and elongated
    "3b3f516ebc9a16cff287a5ffd3a1861a345a6d38bedbba74f1c0b0e0eac62afd",
    "0e5edb072788c7b1da8829b02a49ba25668b09f7201cf2b70b111fc3b853d14f",
    "4c465a54e329ec7b0f4bc5f6acdfd3192707d6c0fbdf557339485581c5a6b3c1",
    "91cc2e0d4d6e2c1ad59a8d63bcbe3e2ea8bc7f8e642e942a0113450181e73379",
]
OUT = Path(__file__).parents[1] / "src" / "napari_unet" / "data"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    folder = parser.parse_args().data / "dsb2018_nuclei_subset"
    OUT.mkdir(parents=True, exist_ok=True)
    for number, image_id in enumerate(IMAGE_IDS, start=1):
        image = tifffile.imread(folder / "images" / f"{image_id}.tif")
        truth = tifffile.imread(folder / "labels" / f"{image_id}.tif")
        tifffile.imwrite(OUT / f"nuclei{number}.tif", image, compression="zlib")
        tifffile.imwrite(OUT / f"nuclei{number}_truth.tif", truth, compression="zlib")
        if number == 1:
            strokes = simulate_strokes((truth > 0).astype(np.uint8), {0: 1, 1: 2}, fraction=0.03, seed=1)
            tifffile.imwrite(OUT / f"nuclei{number}_strokes.tif", strokes, compression="zlib")
        print(number, image_id[:12], image.shape, int(truth.max()), "nuclei")


if __name__ == "__main__":
    main()
