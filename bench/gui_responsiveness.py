"""GUI responsiveness while the U-Net widget trains (issue 4); results in docs/benchmarks.md.

    xvfb-run -s "-screen 0 1600x1000x24" python bench/gui_responsiveness.py [--seconds 30]

Opens napari (shown, so the canvas really renders) with the bundled "nuclei with strokes" sample, trains with
the widget's DEFAULT settings on the CPU while a 10 ms QTimer heartbeat records when the event loop runs, and
prints the gaps between beats while training iterates (and overall, including preparation and the creation of
the preview layers). Then measures how long Stop takes to bring the widget back to idle, three times.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=30, help="training time budget (default 30)")
    args = parser.parse_args()

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_unet._workers import Progress

    app = QApplication.instance() or QApplication([])
    viewer = napari.Viewer(show=True)
    viewer.open_sample("napari-unet", "nuclei_strokes")
    _, widget = viewer.window.add_plugin_dock_widget("napari-unet", "U-Net")
    widget.training.basic["time_budget"].value = args.seconds
    widget.device_combo.setCurrentText("cpu")

    def pump_until_idle():
        while widget.busy:
            app.processEvents()
            time.sleep(0.002)

    beats, iterations = [], []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: beats.append(time.perf_counter()))
    timer.start()
    widget.train()
    widget._worker.yielded.connect(lambda m: isinstance(m, Progress) and iterations.append(time.perf_counter()))
    pump_until_idle()
    timer.stop()
    beats = np.asarray(beats)
    gaps = np.diff(beats[(beats >= iterations[0]) & (beats <= iterations[-1])]) * 1000
    print(f"default settings, {args.seconds} s budget: {len(iterations)} iterations, {widget.previews_shown} previews")
    print(
        f"heartbeat gaps while training: max {gaps.max():.1f} ms, 99th percentile {np.percentile(gaps, 99):.1f} ms, "
        f"median {np.median(gaps):.1f} ms; overall (with preparation) max {np.diff(beats).max() * 1000:.1f} ms"
    )

    latencies = []
    for wait in (4, 5, 6):
        widget.training.basic["time_budget"].value = 600
        widget.train()
        end = time.time() + wait
        while time.time() < end:
            app.processEvents()
            time.sleep(0.005)
        started = time.perf_counter()
        widget.stop()
        pump_until_idle()
        latencies.append(time.perf_counter() - started)
    print("Stop -> idle (s):", ", ".join(f"{t:.2f}" for t in latencies))
    print(f"{os.cpu_count()} CPU cores")
    viewer.close()


if __name__ == "__main__":
    main()
