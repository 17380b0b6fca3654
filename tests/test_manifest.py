"""The npe2 manifest: valid, shipped with the package, and its widget opens in napari."""

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
    from napari_unet._widget import UNetWidget

    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget("napari-unet", "U-Net")
    assert isinstance(widget, UNetWidget)
    assert widget.train_button.text() == "Train"
