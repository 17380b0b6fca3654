"""Share of a training step spent on patch sampling + augmentation (CPU), with the default settings.

The trainer prepares batches (sampling, augmentation, paste-mix, cropping) on a background thread a step ahead
(``prefetch.py``) and times how long each iteration waits for its batch (plus the tensor conversion); this runs
a short training on the bundled demo strokes and reports that share of the step, plus a direct timing of
sampler + augmenter alone, which is what the step would spend without the thread. Issue 3 asks for less than
15 %.

    python bench/quality_data_time.py [--iterations 30] [--threads 2]
"""

import argparse
import time

import tifffile

from napari_unet.demo import sample_paths
from napari_unet.training import Trainer, TrainingSettings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    paths = sample_paths()
    image, strokes = tifffile.imread(paths["images"][0]), tifffile.imread(paths["strokes"])
    settings = TrainingSettings(iterations=args.iterations, time_budget=None, device="cpu", cpu_threads=args.threads)
    trainer = Trainer(image, strokes, settings)
    for _ in trainer.run():
        pass
    record = trainer.metadata["training"]["history"][-1]
    start = time.perf_counter()
    for _ in range(args.iterations * settings.batch_size):
        trainer.augmenter(*trainer.sampler.sample())
    direct = (time.perf_counter() - start) / args.iterations
    step = record["seconds"] / record["iterations"]
    print(f"tiles {trainer.input_shape} -> {trainer.output_shape}, batch {settings.batch_size}, {args.threads} threads")
    print(
        f"step {step * 1000:.0f} ms, waiting for data {record['data_seconds'] / record['iterations'] * 1000:.0f} ms "
        f"({100 * record['data_seconds'] / record['seconds']:.1f} % of the step); "
        f"sampler + augmenter alone {direct * 1000:.0f} ms per batch ({100 * direct / step:.1f} %)"
    )


if __name__ == "__main__":
    main()
