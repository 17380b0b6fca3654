"""``SettingsScroll``: the scroll area that holds the dock widget's panels.

napari docks a plugin's widget as it is: its minimum height becomes the window's, so a widget taller than the screen
pushes the window (and the widget's own buttons) past the screen's edge. Inside this area the panels scroll instead.
"""

from __future__ import annotations

from qtpy.QtCore import QSize, Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QWidget

MINIMUM_HEIGHT = 160
"""Pixels of the panels shown at the least (a few rows), however short the dock."""


class SettingsScroll(QScrollArea):
    """A frameless vertical scroll area around ``content`` that asks for the content's full height (so a dock with
    room shows every panel unscrolled) but needs only ``MINIMUM_HEIGHT`` (so a short one scrolls)."""

    def __init__(self, content: QWidget, parent=None):
        super().__init__(parent)
        self.setWidget(content)
        self.setWidgetResizable(True)
        self.setFrameShape(QFrame.Shape.NoFrame)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

    def sizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        """The content's preferred size (QScrollArea's own hint caps it at a few dozen text lines)."""
        hint = self.widget().sizeHint()
        return QSize(hint.width() + self.verticalScrollBar().sizeHint().width(), hint.height())

    def minimumSizeHint(self) -> QSize:  # noqa: N802 (Qt API)
        """As wide as the content needs, ``MINIMUM_HEIGHT`` high."""
        width = self.widget().minimumSizeHint().width() + self.verticalScrollBar().sizeHint().width()
        return QSize(width, MINIMUM_HEIGHT)
