"""Where a training step's time goes: the operators it dispatches (the host's share), the profiler's
busy time of the device and of the CPU, and the GPU-busy time the speed rounds report."""
from __future__ import annotations

import torch

from .. import memory
from ..train import set_checkpointing
from .step import Point, _free, _sync, train_step


def count_dispatched_ops(model, optimizer, input_ids) -> dict:
    """How many ATen operators one training step dispatches, by name: the host's share of a step.

    When the GPU waits for the host, a step costs roughly a fixed host time per operator; this
    count does not depend on timing noise. (A ``TorchDispatchMode`` sees every operator that
    reaches ATen, in the forward, the backward and the optimizer.)
    """
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    class Counting(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    with Counting() as mode:
        train_step(model, optimizer, input_ids)
    return dict(mode.counts.most_common())


def profile_steps(model, point: Point, device: torch.device, steps: int = 3, row_limit: int = 15) -> dict:
    """Where a few training steps spend their time (torch.profiler): the busy time of the device
    and of the CPU per step, and a table of the top operators."""
    from torch.profiler import ProfilerActivity, profile

    set_checkpointing(model, point.grad_ckpt)
    model.train()
    optimizer = torch.optim.AdamW(memory.trainable_parameters(model), lr=1e-5)
    input_ids = torch.randint(0, model.config.vocab_size, (point.batch, point.seq), device=device)
    train_step(model, optimizer, input_ids)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            train_step(model, optimizer, input_ids)
        _sync(device)
    del optimizer
    set_checkpointing(model, False)
    _free(device)
    averages = prof.key_averages()
    table = None
    for sort in (["device_time_total", "cuda_time_total"] if device.type == "cuda" else []) + ["cpu_time_total"]:
        try:
            table = averages.table(sort_by=sort, row_limit=row_limit, max_name_column_width=60)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    return {**table_totals(table, steps), "steps": steps, "table": table}


def table_totals(table: str, steps: int) -> dict:
    """Busy time per step of the device and of the CPU, read off the totals under a profiler table.

    (Those totals count kernels once; summing the averages' device times instead would also count
    the annotations, e.g. ``Optimizer.step``, that span kernels already counted.)
    """
    import re

    out = {}
    for key, pattern in (("cpu_ms_per_step", r"Self CPU time total: ([\d.]+)(ms|us|s)\b"),
                         ("device_ms_per_step", r"Self (?:CUDA|Device|XPU) time total: ([\d.]+)(ms|us|s)\b")):
        match = re.search(pattern, table or "")
        if match:
            value = float(match.group(1)) * {"s": 1000, "ms": 1, "us": 1e-3}[match.group(2)]
            out[key] = value / steps
        else:
            out[key] = None
    return out



def gpu_busy_ms(step, steps: int, device: torch.device, by_kind: bool = False):
    """Milliseconds per step the GPU spends running kernels (and copies), from the profiler.

    The sum of the device's own time over every event (the total under the profiler's table): idle
    gaps, where the GPU waits for the host, do not count. ``None`` on a CPU. ``by_kind=True`` returns
    ``(total, {kind: ms})`` instead, the same time split by ``kernel_kind``.
    """
    if device.type != "cuda":
        return (None, None) if by_kind else None
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    if by_kind:
        return device_ms_per_step(prof, steps), device_ms_by_kind(prof, steps)
    return device_ms_per_step(prof, steps)


# What a kernel does, read off its name; the first kind whose words the name holds (lower case).
# Attention comes before matmuls: some attention kernels are built on CUTLASS, whose name the matmuls share.
KERNEL_KINDS = (("attention", ("flash", "fmha", "attention")),
                ("dequantize", ("dequant",)),
                ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk")),
                ("copy", ("memcpy", "memset")),
                ("optimizer", ("multi_tensor_apply", "adam")))


def kernel_kind(name: str) -> str:
    """``"attention"``, ``"dequantize"``, ``"matmul"``, ``"copy"``, ``"optimizer"`` or ``"other"``
    (element-wise and reduction kernels: norms, activations, the loss, casts), by the kernel's name."""
    lower = name.lower()
    return next((kind for kind, words in KERNEL_KINDS if any(w in lower for w in words)), "other")


def device_ms_by_kind(prof, steps: int) -> dict[str, float]:
    """The device's own time per step in a finished profile, by ``kernel_kind`` (ms; every kind, 0 where none)."""
    out = {kind: 0.0 for kind, _ in KERNEL_KINDS} | {"other": 0.0}
    for event in prof.key_averages():
        out[kernel_kind(event.key)] += event.self_device_time_total / 1000 / steps
    return out


def device_ms_per_step(prof, steps: int) -> float:
    """The device's own time per step in a finished profile (the total under its table), in ms."""
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1000 / steps
