"""Shared test fixtures: tiny models and hostile files."""

import pickle

import pytest
import torch


@pytest.fixture(scope="session")
def make_model():
    """Factory for tiny UNets (depth 2, 4 filters, 3 classes by default) with non-trivial batch norm.

    A few training-mode passes move the batch-norm running statistics away from their
    defaults, so save/load and batch-norm folding are exercised for real. Returned in eval mode.
    """

    def make(seed=0, **kwargs):
        from napari_unet import UNet

        torch.manual_seed(seed)
        model = UNet(**{"n_classes": 3, "depth": 2, "base_filters": 4, **kwargs})
        model.train()
        shape = model.legal_input_shape(4)
        with torch.no_grad():
            for _ in range(3):
                model(torch.rand(2, model.in_channels, *shape) * 3 + 1)
        return model.eval()

    return make


class _Payload:
    """Unpickling this creates ``marker`` (what a malicious model file could do, harmlessly)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="session")
def malicious_pickle():
    """``write(path, marker, torch_zip=False)``: a pickle whose loading would create ``marker``.

    With ``torch_zip`` the pickle is wrapped in a ``torch.save`` zip archive (a ``.pt`` file).
    """

    def write(path, marker, torch_zip=False):
        payload = {"state_dict": _Payload(marker)}
        if torch_zip:
            torch.save(payload, path)
        else:
            path.write_bytes(pickle.dumps(payload))
        return path

    return write


@pytest.fixture(autouse=True)
def _fresh_widget_settings(tmp_path_factory, monkeypatch):
    """Each test's widgets remember their settings in a folder of their own, never in the user's configuration (a
    widget writes where it read, so a write after the test still lands in that folder)."""
    monkeypatch.setenv("NAPARI_UNET_CONFIG_DIR", str(tmp_path_factory.mktemp("napari-unet-config")))


@pytest.fixture(scope="session", autouse=True)
def _session_machine_cache(tmp_path_factory):
    """The suite's machine measurements (``machine_cache``) go to a folder of its own, never to the user's cache
    folder: a test must neither read what an earlier run measured on this machine nor leave its own there. The
    folder starts with a bfloat16 speedup of 1 for this CPU at every thread count (see the next fixture), which the
    processes that tests start (Dask workers) read too: beyond this process's patch they would measure the CPU."""
    import os

    from napari_unet import devices, machine_cache

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(machine_cache.CACHE_DIR_VARIABLE, str(tmp_path_factory.mktemp("napari-unet-cache")))
        machine_cache.forget()
        for threads in range(1, (os.cpu_count() or 1) + 1):
            machine_cache.cached(devices.bfloat16_speedup_key(threads), lambda: 1.0)
        yield
    machine_cache.forget()


@pytest.fixture(autouse=True)
def _bfloat16_measured_not_to_pay(request, monkeypatch):
    """Precision "auto" predicts in float32 on the CPU in every test: the suite's expected numbers must not depend
    on the host CPU, and "auto" takes bfloat16 where it measured faster (a CPU with native bfloat16, e.g. AMD Zen 4
    or Intel with AVX-512 BF16 / AMX), whose probabilities differ from a float32 composition's in the 4th digit.
    The measurement is replaced by a speedup of 1 (below ``devices.BFLOAT16_MIN_SPEEDUP``); tests of the choice
    replace it themselves, and a test marked ``real_bfloat16_measurement`` runs the real one."""
    if request.node.get_closest_marker("real_bfloat16_measurement") is None:
        from napari_unet import devices

        monkeypatch.setattr(devices, "measure_cpu_bfloat16_speedup", lambda *args, **kwargs: 1.0)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """``machine_cache`` in a fresh folder of its own (nothing measured on this machine is known), forgotten after."""
    from napari_unet import machine_cache

    monkeypatch.setenv(machine_cache.CACHE_DIR_VARIABLE, str(tmp_path))
    machine_cache.forget()
    yield tmp_path
    machine_cache.forget()
