"""What a bug report needs: versions, the device, and a live check that 4-bit NF4 works."""
from __future__ import annotations

from .device import pick_device, versions


def check_4bit(device) -> str:
    """Quantize a small weight to NF4 with bitsandbytes and run a Linear4bit forward on ``device``."""
    import torch
    import bitsandbytes as bnb

    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 64, bias=False)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer = layer.to(device)
    x = torch.randn(4, 128, device=device)
    ref = dense.to(device)(x)
    rel = ((layer(x).float() - ref).norm() / ref.norm()).item()
    # NF4 keeps about 10% relative error on random weights; far more means 4-bit is broken.
    if not rel < 0.2:
        raise RuntimeError(f"Linear4bit output differs from the dense layer by {rel:.1%} (relative)")
    return f"ok (NF4 Linear4bit forward on {device}; relative error vs the fp32 layer {rel:.1%})"


def report() -> bool:
    for name, version in versions().items():
        print(f"{name:>13}: {version}")
    runtime = pick_device()
    print(f"{'device':>13}: {runtime}")
    try:
        status = check_4bit(runtime.device)
        good = True
    except Exception as exc:  # a report, not a crash: say what failed
        status, good = f"FAILED: {type(exc).__name__}: {exc}", False
    print(f"{'4-bit NF4':>13}: {status}")
    return good
