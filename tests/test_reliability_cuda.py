"""Issue 12's changes on a CUDA GPU: exact 4-bit results for rows that split a block, input checks,
state-dict and save_quantized round trips, every supported blocksize. Skipped without CUDA."""
import tempfile

import bitsandbytes.functional as F
import pytest
import torch
from torch import nn

from qlora_tutorial import Qlora_4_bit, adapters, quantize_model
from qlora_tutorial.models import tiny_llama
from qlora_tutorial.nf4 import State4bit, BLOCKSIZES, dequantize_nf4, quantize_nf4

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 101, 7, 250, 3]])


@pytest.mark.parametrize("in_features, blocksize, double_quant", [(48, 64, False), (100, 64, True), (200, 128, False),
                                                                  (96, 32, False), (128, 32, True)])
def test_cuda_layer_is_exact(in_features, blocksize, double_quant):
    torch.manual_seed(0)
    lin = nn.Linear(in_features, 24)
    packed, state = quantize_nf4(lin.weight.data, blocksize=blocksize, double_quant=double_quant)
    exact = dequantize_nf4(packed, state)
    layer = Qlora_4_bit.from_linear(lin.cuda(), 4, 2, blocksize=blocksize, double_quant=double_quant,
                                    compute_dtype=torch.float32)
    with torch.no_grad():
        layer.W_b.normal_()
    w = layer.quant_nn.weight
    assert torch.equal(w.data.cpu(), packed)
    # CUDA rounds the double-quantized block scales by the textbook rule, the CPU through a lookup table,
    # so the scales may differ in a few codes: compare our dequantization of CUDA's own state.
    exact = dequantize_nf4(w.data, State4bit.from_bnb(w.quant_state)).cpu()
    assert torch.equal(F.dequantize_4bit(w.data, w.quant_state).cpu(), exact)  # CUDA's kernel reads flat blocks
    assert torch.equal(layer.base_weight().cpu(), exact)
    x = torch.randn(5, in_features, device="cuda", requires_grad=True)
    y = layer(x)
    ref = x.detach() @ exact.cuda().T + lin.bias.detach() + layer.scale * (x.detach() @ layer.W_a.detach()) @ layer.W_b.detach()
    torch.testing.assert_close(y.detach(), ref, rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert x.grad.abs().sum() > 0 and layer.W_a.grad is not None


def test_cuda_input_checks():
    layer = Qlora_4_bit(128, 64, 4, 2, require_lora=False, bias=False, device="cuda")
    with pytest.raises(ValueError, match="in_features=128"):
        layer(torch.randn(3, 64, device="cuda"))
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(3, 128, dtype=torch.long, device="cuda"))


@pytest.mark.parametrize("double_quant", [False, True])
def test_cuda_state_dict_and_save_quantized_round_trips(double_quant):
    def wrapped(seed):
        return quantize_model(tiny_llama(seed=seed).cuda(), "all", alpha=8, r=4, compute_dtype=torch.bfloat16,
                              double_quant=double_quant).eval()

    model = wrapped(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("W_b"):
                p.normal_(0, 0.05)
    fresh = wrapped(1)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with tempfile.TemporaryDirectory() as folder:
        adapters.save_quantized(model, folder)
        back = adapters.load_quantized(tiny_llama(seed=2).cuda(), folder).eval()
    ids = IDS.cuda()
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert torch.equal(fresh(input_ids=ids).logits, ref)
        assert torch.equal(back(input_ids=ids).logits, ref)
    assert back.model.layers[0].mlp.up_proj.quant_nn.weight.device.type == "cuda"
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_cuda_every_supported_blocksize(blocksize):
    layer = Qlora_4_bit(256, 64, 4, 2, blocksize=blocksize, device="cuda")
    assert layer(torch.randn(2, 256, device="cuda")).shape == (2, 64)
