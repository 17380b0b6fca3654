"""Overlap-tile prediction throughput vs MONAI's sliding_window_inference (issue 2 performance floor).

napari-unet runs the valid-padding U-Net (depth 4, 16 base filters) with `predict_tiled`. MONAI runs the
same-width padded twin of the same network (same weights, every 3x3 convolution padded by 1, so the output has
the input's size) with `sliding_window_inference(roi 512, overlap 0.25, gaussian, sw_batch_size 4)`.
Both on a 2048x2048 image, 2 CPU threads, runs interleaved; the figure is output pixels per second. A third
contender is `predict_tiled(tile_tuning=True)`, what `predict_image` does by default: tiles no larger than the fastest
measured on this machine (the tuning itself is timed once, before the runs, in a fresh cache folder; an image the
memory budget predicts in one tile is not tuned: choose a larger ``--size`` to time the tuning). After the
runs, ``--default-command`` times what ``napari-unet predict`` does by default, once: ``predict_image`` with the
default ``PredictionSettings`` (robust normalization, tuned tiles, the 8 test-time flips, the edge refinement).

    python bench/tiling_speed.py [--size 2048] [--repeats 3] [--threads 2] [--device cpu] [--default-command]
"""

import argparse
import copy
import os
import platform
import tempfile
import time

import numpy as np
import torch

from napari_unet import UNet, predict_tiled


def padded_twin(model: UNet) -> torch.nn.Module:
    """The same network with padded 3x3 convolutions (what MONAI and most tools run)."""
    twin = copy.deepcopy(model).eval()
    for module in twin.modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3):
            module.padding = (1, 1)
    return twin


def monai_predict(twin, image, device):
    from monai.inferers import sliding_window_inference

    with torch.inference_mode():
        x = torch.from_numpy(image)[None, None].to(device)
        logits = sliding_window_inference(
            x, roi_size=(512, 512), sw_batch_size=4, predictor=twin, overlap=0.25, mode="gaussian"
        )
        return torch.softmax(logits, 1)[0].cpu().numpy()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="float16 autocast for both (CUDA only)")
    parser.add_argument("--default-command", action="store_true", help="also time predict_image's defaults once")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = UNet(depth=4, base_filters=16).eval().to(device)
    twin = padded_twin(model)
    image = np.random.default_rng(0).normal(size=(args.size, args.size)).astype(np.float32)
    pixels = args.size**2

    def ours():
        return predict_tiled(
            model, image, device=device, precision="float16" if args.amp and device.type == "cuda" else "float32"
        )

    def tuned():
        return predict_tiled(model, image, device=device, tile_tuning=True)

    from napari_unet.machine_cache import CACHE_DIR_VARIABLE, cache_path

    os.environ[CACHE_DIR_VARIABLE] = tempfile.mkdtemp(prefix="napari-unet-bench-cache-")

    start = time.perf_counter()
    tuned()
    tuning_seconds = time.perf_counter() - start
    print(f"# first tuned prediction (tuning included): {tuning_seconds:.1f} s; kept: {cache_path().read_text()}")

    def theirs():
        with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp and device.type == "cuda"):
            return monai_predict(twin, image, device)

    ours(), theirs()  # warm-up
    contenders = {
        "napari-unet predict_tiled": ours,
        "napari-unet tuned tiles": tuned,
        "MONAI sliding_window_inference": theirs,
    }
    times = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, run in contenders.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)

    print(
        f"# {args.size}x{args.size}, depth 4, 16 filters, {args.threads} threads, device {device}"
        f"{' AMP' if args.amp else ''}, torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    rates = {}
    for name, values in times.items():
        best = min(values)
        rates[name] = pixels / best
        print(f"{name:34s} best {best:7.2f} s  median {np.median(values):7.2f} s  {rates[name] / 1e6:6.3f} Mpx/s")
    for name in ("napari-unet predict_tiled", "napari-unet tuned tiles"):
        print(f"throughput ratio {name} / MONAI: {rates[name] / rates['MONAI sliding_window_inference']:.2f}x")
    if args.default_command:
        from napari_unet.normalization import DEFAULT_RECIPE
        from napari_unet.predict import PredictionSettings, predict_image

        metadata = {"class_ids": [1, 2], "normalization": dict(DEFAULT_RECIPE)}
        start = time.perf_counter()
        predict_image(model, metadata, image, PredictionSettings(device=str(device)))
        seconds = time.perf_counter() - start
        print(
            f"default command (predict_image, flips + refinement): {seconds:.1f} s, {pixels / seconds / 1e6:.3f} Mpx/s"
        )


if __name__ == "__main__":
    main()
