"""The npe2 manifest: valid, shipped with the package, its widget opens in napari and is in Layers > Segment."""

from __future__ import annotations

from pathlib import Path

import pytest

npe2 = pytest.importorskip("npe2")

ROOT = Path(__file__).resolve().parents[1]


def test_manifest_is_valid_and_complete():
    manifest = npe2.PluginManifest.from_file(ROOT / "napari.yaml")
    assert manifest.name == "napari-unet" and manifest.display_name == "U-Net"
    contributions = manifest.contributions
    assert [w.display_name for w in contributions.widgets] == ["U-Net"]
    assert {p for r in contributions.readers for p in r.filename_patterns} >= {"*.tif", "*.tiff", "*.ome.tif"}
    assert {t for w in contributions.writers for t in w.layer_types} == {"image", "labels"}
    assert len(contributions.sample_data) == 2
    # the widget is also in napari's Layers > Segment menu (the napari plugin template's convention)
    [widget] = contributions.widgets
    assert [item.command for item in contributions.menus["napari/layers/segment"]] == [widget.command]
    # every command points at an importable callable
    for command in contributions.commands:
        assert callable(command.python_name and _resolve(command.python_name)), command.id


def _resolve(python_name: str):
    from importlib import import_module

    module, name = python_name.split(":")
    return getattr(import_module(module), name)


def test_manifest_symlink_ships_in_the_package():
    link = ROOT / "src" / "napari_unet" / "napari.yaml"
    assert link.is_symlink() and link.resolve() == (ROOT / "napari.yaml").resolve()


def test_installed_plugin_is_discovered():
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("napari-unet")
    except PackageNotFoundError:
        pytest.skip("napari-unet is not installed (pip install -e .)")
    manifest = npe2.PluginManifest.from_distribution("napari-unet")
    assert manifest.name == "napari-unet"


def test_widget_loads_through_the_manifest(make_napari_viewer):
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("napari-unet")
    except PackageNotFoundError:
        pytest.skip("napari-unet is not installed (pip install -e .)")
    from napari_unet.widgets import UNetWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-unet", "U-Net")
    assert isinstance(widget, UNetWidget)
    assert widget.train_button.text() == "Train"


def test_widget_is_in_the_layers_segment_menu(make_napari_viewer):
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("napari-unet")
    except PackageNotFoundError:
        pytest.skip("napari-unet is not installed (pip install -e .)")
    app_model = pytest.importorskip("napari._app_model")  # napari's (private) menu registry

    make_napari_viewer()
    items = app_model.get_app_model().menus.get_menu("napari/layers/segment")
    assert "napari-unet.make_widget" in [item.command.id for item in items if hasattr(item, "command")]


def test_the_engine_and_the_workers_import_no_qt_and_no_napari():
    """The layering of docs/architecture.md: the engine, the CLI and the worker generators run without Qt."""
    import subprocess
    import sys

    code = (
        "import sys, napari_unet.cli, napari_unet.predict, napari_unet.training, napari_unet._workers; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'qtpy', 'PyQt5', 'PyQt6', 'PySide6', 'napari',"
        " 'magicgui', 'superqt'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "[]"
