"""megatron_gopd.platform adapts megatron-core to a CPU-only torch, and must do nothing at all where
CUDA is present (the module docstring's promise)."""

import pytest
import torch

from megatron_gopd.testing import run_distributed


def _setup_with_cuda_reported():
    import torch

    from megatron_gopd import platform

    torch.cuda.is_available = lambda: True
    before = (
        torch.cuda.current_device,
        torch.Tensor.type,
        torch.cuda.synchronize,
        torch.Tensor.cuda,
    )
    platform._patched.clear()
    applied = platform.setup()
    after = (
        torch.cuda.current_device,
        torch.Tensor.type,
        torch.cuda.synchronize,
        torch.Tensor.cuda,
    )
    return (
        applied,
        all(a is b for a, b in zip(before, after)),
        platform.transformer_config_overrides(),
    )


def _shim_state():
    from megatron_gopd import platform

    return (
        platform.is_patched(),
        torch.cuda.current_device(),
        torch.zeros(1, device="cuda").device.type,
    )


def test_platform_shim_is_inert_when_cuda_is_present():
    """On a CUDA machine the shim must patch nothing. Simulated in a fresh forked process where
    torch.cuda.is_available() reports True before setup() runs."""
    import multiprocessing as mp

    with mp.get_context("fork").Pool(1) as pool:
        applied, unchanged, overrides = pool.apply(_setup_with_cuda_reported)
    assert applied is False and unchanged and overrides == {}
    # the control: in a CPU-only rank the shim is active and redirects "cuda" to the CPU
    (r,) = run_distributed(_shim_state, 1)
    assert r == (True, torch.device("cpu"), "cpu")


@pytest.mark.gpu
def test_platform_shim_is_inert_on_a_real_gpu():
    from megatron_gopd import platform

    before = torch.cuda.current_device
    assert platform.setup() is False
    assert torch.cuda.current_device is before
    assert torch.zeros(1, device="cuda").is_cuda
