"""Device choice, thread count and AMP policy."""

import pytest
import torch

from napari_unet.devices import amp_dtype, cpu_has_native_bfloat16, default_cpu_threads, resolve_device


def test_auto_and_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="'cuda' is not available"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_unavailable_mps_is_a_clear_error():
    with pytest.raises(ValueError, match="'mps' is not available"):
        resolve_device("mps")


def test_unknown_device():
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu9")


def test_threads_and_amp():
    assert default_cpu_threads() >= 1
    assert amp_dtype("cpu") is None
    # bfloat16 on a CPU only when asked and where oneDNN runs it natively (emulated it is slower than float32)
    assert amp_dtype("cpu", cpu_bfloat16=True) is (torch.bfloat16 if cpu_has_native_bfloat16() else None)
    assert amp_dtype("cuda", cpu_bfloat16=True) is torch.float16
    assert amp_dtype(torch.device("mps")) is None  # never bfloat16 (or float16) autocast on MPS
    assert amp_dtype("cuda") is torch.float16
