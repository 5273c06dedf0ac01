"""One training step, its shape, and the device helpers every measurement shares (synchronise the
GPU around a timed step, free what is no longer referenced, read what is allocated)."""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Point:
    """One measured shape: ``batch`` sequences of ``seq`` tokens, with or without checkpointing."""
    batch: int
    seq: int
    grad_ckpt: bool


def train_step(model, optimizer, input_ids, autocast: torch.dtype | None = None) -> torch.Tensor:
    """Forward with the language-model loss, backward, AdamW step, gradients freed.

    ``autocast``: run the forward (and the loss) under ``torch.autocast`` in that dtype (mixed precision).
    """
    if autocast is not None:
        with torch.autocast(input_ids.device.type, dtype=autocast):
            loss = model(input_ids=input_ids, labels=input_ids).loss
    else:
        loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _free(device: torch.device, workspaces: bool = False) -> None:
    """Collect garbage and give cached GPU memory back. ``workspaces``: also free cuBLAS's workspaces,
    which it keeps in PyTorch's allocator once a matmul has run (one per stream, 32 MiB on an H100),
    so that what comes next allocates and counts its own; only where no recorded CUDA graph lives,
    since a graph's kernels keep the workspace's address."""
    gc.collect()
    if device.type == "cuda":
        if workspaces:
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def median_step_s(step, steps: int, device: torch.device) -> float:
    """The median wall-clock seconds of ``steps`` calls of ``step()``, the device synchronised around each."""
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
