"""Fixtures shared by the package tests."""
import pytest
import torch


@pytest.fixture(scope="module")
def eager_bitsandbytes():
    """Run a module's tests with torch.compile turned off.

    bitsandbytes' pure-torch CPU fallback (double quantization among it) is wrapped in torch.compile,
    which costs seconds per new shape; eager computes the same values.
    """
    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    yield
    torch._dynamo.config.disable = old
