"""A tiny loss curve: a QWidget that paints the training loss as a polyline (no plotting library)."""

from __future__ import annotations

import math

from qtpy.QtCore import QPointF, Qt
from qtpy.QtGui import QColor, QPainter, QPen, QPolygonF
from qtpy.QtWidgets import QSizePolicy, QWidget

MAX_POINTS = 2000
"""Points kept; older ones are thinned by half when exceeded, so painting stays cheap."""


class LossPlot(QWidget):
    """Training loss against iteration; the y axis spans the minimum to the maximum loss seen."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self._points: list[tuple[int, float]] = []
        self.setMinimumHeight(70)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("Training loss (cross-entropy + Dice over painted pixels) per iteration")

    @property
    def points(self) -> list[tuple[int, float]]:
        """The (iteration, loss) pairs drawn."""
        return list(self._points)

    def clear(self) -> None:
        """Forget all points."""
        self._points.clear()
        self.update()

    def add(self, iteration: int, loss: float) -> None:
        """Append one point (non-finite losses are skipped) and schedule a repaint."""
        if not math.isfinite(loss):
            return
        self._points.append((int(iteration), float(loss)))
        if len(self._points) > MAX_POINTS:
            self._points = self._points[::2]
        self.update()

    def paintEvent(self, event):  # noqa: N802 (Qt API)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        rect = self.rect().adjusted(4, 4, -4, -14)
        painter.fillRect(self.rect(), self.palette().base())
        text_pen = QPen(self.palette().text().color())
        painter.setPen(text_pen)
        if len(self._points) < 2:
            painter.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "loss curve appears while training")
            painter.end()
            return
        xs = [p[0] for p in self._points]
        ys = [p[1] for p in self._points]
        x0, x1 = xs[0], max(xs[-1], xs[0] + 1)
        y0, y1 = min(ys), max(ys)
        if y1 - y0 < 1e-12:
            y0, y1 = y0 - 0.5, y1 + 0.5
        polygon = QPolygonF(
            [
                QPointF(
                    rect.left() + (x - x0) / (x1 - x0) * rect.width(),
                    rect.bottom() - (y - y0) / (y1 - y0) * rect.height(),
                )
                for x, y in self._points
            ]
        )
        painter.setPen(QPen(QColor("#ffb000"), 1.5))
        painter.drawPolyline(polygon)
        painter.setPen(text_pen)
        painter.drawText(4, self.height() - 2, f"it {xs[-1]}   loss {ys[-1]:.4f}   (min {y0:.4f}, max {y1:.4f})")
        painter.end()
