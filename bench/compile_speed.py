"""torch.compile (inductor) on the fixed tile shapes of ``predict_tiled``: compile time and seconds per pass against
eager mode, and after how many passes compiling pays (issue 19).

The network is the benchmarks' default (2D: depth 4, 16 filters; 3D: depth 3, 16 filters), as ``predict_tiled`` runs
it: ``inference_copy()`` (batch norm folded), channels-last, ``torch.inference_mode``, one batch of the tile that
``plan_tiles`` chooses for a 2048² image (2D) or a 128³ block (3D) under the default memory budget. ``dynamic=False``:
one compiled graph per tile shape, as the fixed tiles of a batch job would need.

    python bench/compile_speed.py [--ndim 2|3] [--threads 2] [--repeats 5] [--mode default|max-autotune-no-cudagraphs]
"""

import argparse
import platform
import time

import torch

from napari_unet import UNet
from napari_unet.devices import cpu_model
from napari_unet.tiling import plan_tiles


def best_seconds(function, x, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(x)
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ndim", type=int, choices=(2, 3), default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mode", default="default")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = UNet(ndim=args.ndim, depth=4 if args.ndim == 2 else 3, base_filters=16).eval()
    shape = (2048, 2048) if args.ndim == 2 else (128, 128, 128)
    plan = plan_tiles(model, shape)
    memory_format = torch.channels_last if args.ndim == 2 else torch.channels_last_3d
    net = model.inference_copy().to(memory_format=memory_format)
    x = torch.randn(1, 1, *plan.input_tile).contiguous(memory_format=memory_format)
    with torch.inference_mode():
        net(x)
        eager = best_seconds(net, x, args.repeats)
        reference = net(x)
        compiled = torch.compile(net, dynamic=False, mode=args.mode)
        start = time.perf_counter()
        out = compiled(x)
        compile_seconds = time.perf_counter() - start
        fast = best_seconds(compiled, x, args.repeats)
    difference = (out - reference).abs().max().item()
    gain = eager - fast
    print(
        f"# {args.ndim}D, input tile {'x'.join(map(str, plan.input_tile))}, {args.threads} threads, torch "
        f"{torch.__version__}, {cpu_model() or platform.machine()}, mode {args.mode}"
    )
    print(f"eager     {eager:.3f} s/pass")
    print(f"compiled  {fast:.3f} s/pass ({eager / fast:.2f}x), first call (compiling) {compile_seconds:.1f} s")
    print(f"max abs difference of the logits: {difference:.2e}")
    if gain > 0:
        passes = compile_seconds / gain
        print(f"compiling pays after {passes:.0f} passes ({passes / 8:.0f} tiles with flips)")
    else:
        print("compiling does not pay: the compiled pass is not faster")


if __name__ == "__main__":
    main()
