"""Overlap-tile prediction throughput vs MONAI's sliding_window_inference (issue 2 performance floor).

napari-unet runs the valid-padding U-Net (depth 4, 16 base filters) with `predict_tiled`. MONAI runs the
same-width padded twin of the same network (same weights, every 3x3 convolution padded by 1, so the output has
the input's size) with `sliding_window_inference(roi 512, overlap 0.25, gaussian, sw_batch_size 4)`.
Both on a 2048x2048 image, 2 CPU threads, runs interleaved; the figure is output pixels per second.

    python bench/tiling_speed.py [--size 2048] [--repeats 3] [--threads 2] [--device cpu]
"""

import argparse
import copy
import platform
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

    def theirs():
        with torch.autocast("cuda", dtype=torch.float16, enabled=args.amp and device.type == "cuda"):
            return monai_predict(twin, image, device)

    ours(), theirs()  # warm-up
    times = {"napari-unet predict_tiled": [], "MONAI sliding_window_inference": []}
    for _ in range(args.repeats):
        for name, run in (("napari-unet predict_tiled", ours), ("MONAI sliding_window_inference", theirs)):
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
    ratio = rates["napari-unet predict_tiled"] / rates["MONAI sliding_window_inference"]
    print(f"throughput ratio napari-unet / MONAI: {ratio:.2f}x")


if __name__ == "__main__":
    main()
