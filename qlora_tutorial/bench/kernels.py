"""NF4 dequantization of one weight, timed: bitsandbytes' kernel against ours (the chunked eager
code, the one-shot code eager and ``torch.compile``d, our Triton kernel), in GB/s and as a fraction of
the device's copy bandwidth; and whether our quantization gives bitsandbytes' bytes."""
from __future__ import annotations

import math
import statistics
import time

import torch

from .. import memory
from ..nf4 import as_state
from .results import GIB
from .step import _sync


def time_fn(fn, args_list, device: torch.device, warmup: int = 5, repeat: int = 30, inner: int = 10) -> float:
    """Median seconds per call of ``fn(*args)``, cycling through ``args_list`` (different buffers, so
    each call reads from memory, not from the cache).

    On a GPU, ``inner`` calls are queued between two CUDA events and the time divided by ``inner``:
    that keeps the device busy, so the number is the kernels' time, not Python's launch overhead.
    """
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    _sync(device)
    times = []
    for i in range(repeat):
        batch = [args_list[(i * inner + j) % len(args_list)] for j in range(inner)]
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for args in batch:
                fn(*args)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1000 / inner)
        else:
            t0 = time.perf_counter()
            for args in batch:
                fn(*args)
            times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 2 * GIB, repeat: int = 20) -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    seconds = time_fn(lambda a, b: b.copy_(a), [(src, dst)], device, warmup=3, repeat=repeat, inner=5)
    del src, dst
    return 2 * nbytes / seconds


TRITON_CONFIGS = ((512, 4), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 4), (4096, 8), (8192, 8))


def kernel_benchmark(device: torch.device, shape=(4096, 11008), dtype: torch.dtype = torch.bfloat16,
                     compile: bool = True, copies: int = 4, repeat: int = 50, log=print, copy_bytes: int = 2 * GIB,
                     triton_configs=TRITON_CONFIGS) -> dict:
    """NF4 dequantization of one ``shape`` weight: ours (eager, one-shot, compiled) vs bitsandbytes.

    Bytes moved per dequantization: the packed weight (n/2), the absmax constants (4 bytes per
    block of 64) and the output (n * 2 bytes in bf16). Also checks that our quantization on the CPU
    gives bitsandbytes' bytes on ``device`` for the same weight.
    """
    import bitsandbytes.functional as bnbF

    from .. import nf4, nf4_triton

    generator = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(shape, device=device, generator=generator) * 0.02).to(dtype)
    checks = bytes_check(weight)
    packed_b, state_b = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    packed_o, state_o = nf4.quantize_nf4(weight)  # our from-scratch code, run on the same device
    reference = bnbF.dequantize_4bit(packed_b, state_b)
    moved = memory.dequantization_bytes(packed_b, state_b, dtype)
    # several copies of the inputs, used in turn, so each run reads from memory rather than the cache
    inputs_b = [(packed_b.clone(), _clone_state(state_b)) for _ in range(copies)]
    inputs_o = [(p.clone(), s) for p, s in [(packed_o, state_o)] * copies]
    oneshot_args = [(p, state_o.absmax.clone(), state_o.code, 64, tuple(shape), dtype) for p, _ in inputs_o]

    variants = [("bitsandbytes dequantize_4bit", lambda p, s: bnbF.dequantize_4bit(p, s), inputs_b),
                ("ours nf4.dequantize_nf4 (eager, chunked)", nf4.dequantize_nf4, inputs_o),
                ("ours one-shot (eager)", nf4.dequantize_4bit_oneshot, oneshot_args)]
    if compile:
        variants.append(("ours one-shot (torch.compile)", torch.compile(nf4.dequantize_4bit_oneshot), oneshot_args))
    triton_ok = device.type == "cuda" and nf4_triton.triton_available()
    if triton_ok:
        variants += triton_variants("ours Triton kernel", "custom op, default tiles", inputs_b, dtype, triton_configs)
    copy_bps = copy_bandwidth(device, copy_bytes) if device.type == "cuda" else float("nan")
    rows = time_variants(variants, moved, reference, device, repeat, copy_bps, log)
    # double quantization (QLoRA as the paper defines it): 8-bit absmax codes, float32 second-level scales
    packed_n, state_n = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    reference_n = bnbF.dequantize_4bit(packed_n, state_n)
    moved_n = memory.dequantization_bytes(packed_n, state_n, dtype)
    inputs_n = [(packed_n.clone(), _clone_state(state_n)) for _ in range(copies)]
    variants_n = [("bitsandbytes dequantize_4bit, double-quantized", lambda p, s: bnbF.dequantize_4bit(p, s), inputs_n)]
    if triton_ok:
        variants_n += triton_variants("ours Triton kernel, double-quantized", "custom op", inputs_n, dtype,
                                      triton_configs)
    rows_n = time_variants(variants_n, moved_n, reference_n, device, repeat, copy_bps, log)
    if triton_ok:
        checks["triton_equal_bnb"] = triton_exactness(device)
    return {"shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "blocksize": 64,
            "bytes_moved_per_dequantization": moved, "copy_GBps": copy_bps / 1e9 if math.isfinite(copy_bps) else None,
            "rows": rows, "double_quant": {"bytes_moved_per_dequantization": moved_n, "rows": rows_n},
            "bytes_check": checks}


def triton_variants(name: str, op_label: str, inputs, dtype: torch.dtype, configs) -> list[tuple]:
    """Our Triton kernel as benchmark variants: launched directly at each tile of ``configs`` (packed
    bytes per program, warps), then through the custom operator at the default tiles."""
    from .. import nf4_triton
    from ..matmul4bit import dequantize

    out = [(f"{name} (nf4_triton, {nbytes} bytes x {warps} warps)",
            lambda p, s, nb=nbytes, w=warps: nf4_triton.dequantize_triton(
                p, as_state(s), dtype, bytes_per_program=nb, num_warps=w), inputs)
           for nbytes, warps in configs]
    # the 4-bit matmul's operator (what torch.compile calls), which picks the Triton kernel for NF4 on CUDA
    out.append((f"{name} ({op_label})", lambda p, s: dequantize(p, as_state(s), dtype, operator=True), inputs))
    return out


def bytes_check(weight: torch.Tensor) -> dict:
    """Whether our quantization of ``weight`` (on its device and on the CPU, plain and double-quantized)
    gives the bytes bitsandbytes' kernel gives on ``weight``'s device; counts of the bytes that differ."""
    import bitsandbytes.functional as bnbF

    from .. import nf4

    packed_b, state_b = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=False)
    packed_o, state_o = nf4.quantize_nf4(weight)  # our from-scratch code, run on the same device
    cpu_packed, cpu_state = nf4.quantize_nf4(weight.cpu())
    check = {
        "weight": f"randn{tuple(weight.shape)} * 0.02 in {str(weight.dtype).replace('torch.', '')}",
        "ours_on_device_equal_bnb_device": bool(torch.equal(packed_o, packed_b)
                                                and torch.equal(state_o.absmax, state_b.absmax)),
        "ours_cpu_equal_bnb_device_packed": bool(torch.equal(cpu_packed, packed_b.cpu())),
        "ours_cpu_equal_bnb_device_absmax": bool(torch.equal(cpu_state.absmax, state_b.absmax.cpu())),
        "differing_packed_bytes": int((cpu_packed != packed_b.cpu()).sum()),
        "packed_bytes": int(packed_b.numel()),
    }
    # double quantization: our CPU code against bitsandbytes on the device
    packed_b2, state_b2 = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    cpu_packed2, cpu_state2 = nf4.quantize_nf4(weight.cpu(), double_quant=True)
    check["double_quant_packed_equal"] = bool(torch.equal(cpu_packed2, packed_b2.cpu()))
    check["double_quant_absmax_codes_equal"] = bool(torch.equal(cpu_state2.absmax, state_b2.absmax.cpu()))
    check["double_quant_differing_absmax_codes"] = int((cpu_state2.absmax != state_b2.absmax.cpu()).sum())
    check["absmax_codes"] = int(state_b2.absmax.numel())
    # our CPU code reproduces bitsandbytes' CPU kernel, which rounds through a 65,536-entry table;
    # the textbook rule (nearest code value) is what a GPU kernel can afford to do exactly
    textbook, _, _ = nf4.double_quantize(cpu_state.absmax, lut=False)
    check["double_quant_textbook_differing_absmax_codes"] = int((textbook != state_b2.absmax.cpu()).sum())
    return check


def time_variants(variants, moved: int, reference: torch.Tensor, device, repeat: int, copy_bps: float,
                  log) -> list[dict]:
    """Each ``(name, fn, args_list)`` timed: seconds, GB/s, fraction of the copy bandwidth, and whether
    its output equals ``reference`` (bitsandbytes') to the bit."""
    rows = []
    for name, fn, args_list in variants:
        t0 = time.perf_counter()
        out = fn(*args_list[0])
        first_call_s = time.perf_counter() - t0
        equal = bool(torch.equal(out, reference))
        del out
        seconds = time_fn(fn, args_list, device, repeat=repeat)
        gbps = moved / seconds / 1e9
        rows.append({"implementation": name, "seconds": seconds, "GBps": gbps,
                     "fraction_of_copy": gbps * 1e9 / copy_bps if math.isfinite(copy_bps) else None,
                     "equal_to_bitsandbytes": equal, "first_call_s": first_call_s})
        log(f"  {name:56s} {seconds * 1e6:9.1f} us  {gbps:8.1f} GB/s  equal={equal}")
    return rows


def triton_exactness(device: torch.device, trials: int = 3) -> dict:
    """Our Triton kernel against bitsandbytes' CUDA dequantization, on fresh random weights of awkward
    shapes (odd counts, rows not a multiple of the block), each dtype, with and without double
    quantization, and a poisoned output buffer (every element must be written): exact equality."""
    import bitsandbytes.functional as bnbF

    from .. import nf4_triton

    results = {}
    shapes = [(4096, 11008), (256, 2048), (3, 65), (7, 333), (1, 1), (129, 64)]
    for shape in shapes:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for nested in (False, True):
                equal = True
                for t in range(trials):
                    g = torch.Generator(device=device).manual_seed(1000 * t + shape[0] + shape[1])
                    w = (torch.randn(shape, device=device, generator=g) * (0.01 + t)).to(dtype)
                    packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=nested)
                    ref = bnbF.dequantize_4bit(packed, state)
                    out = torch.full(shape, float("nan"), dtype=dtype, device=device)
                    nf4_triton.dequantize_triton(packed, as_state(state), dtype, out=out)
                    equal &= bool(torch.equal(out, ref))
                results[f"{shape[0]}x{shape[1]} {str(dtype).replace('torch.', '')} nested={nested}"] = equal
    return {"all_equal": all(results.values()), "cases": results}


def _clone_state(state):
    import copy

    s = copy.copy(state)
    s.absmax = state.absmax.clone()
    return s
