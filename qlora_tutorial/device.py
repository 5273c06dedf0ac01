"""One place that decides where the book's code runs and in which dtype it computes.

CPU: float32. How fast bfloat16 runs on a CPU depends on the processor (some have bfloat16
instructions, some do not): ``time_matmul`` measures it on yours, and the setup chapter shows the
result. float32 is fast on every CPU and takes the same code path on every CPU, which is what lets
the tests compare the chapters' printed outputs. It is not bit-identical across CPUs: the vector
instructions (AVX-512, AVX2, none) and the number of threads change how sums and matrix products
group their terms, so the last bits differ. Chapters therefore print exact values exactly and round
the rest past that difference (``python3 tools/dev.py test --portable`` checks it).
CUDA: bf16 where the GPU supports it (Ampere and newer), else fp16 (a Colab T4).
"""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import random
from dataclasses import dataclass

import torch

PACKAGES = ["torch", "bitsandbytes", "transformers", "accelerate", "peft", "datasets", "safetensors", "gguf"]


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype

    def __str__(self) -> str:  # what the chapters print up front
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "CPU"
        return f"device={self.device.type} ({name}), compute dtype={str(self.dtype).replace('torch.', '')}"


def pick_device(prefer: str | None = None) -> Runtime:
    """cuda if present (or asked for), else cpu; with the compute dtype that suits it.

    ``prefer`` may be "cpu" or "cuda"; the environment variable ``QLORA_DEVICE`` does the same
    for a whole notebook run. On a GPU, ``QLORA_DTYPE=float16`` forces float16 compute where
    bfloat16 would be chosen: the path of a GPU without bfloat16 (Colab's T4), on any GPU.
    """
    prefer = prefer or os.environ.get("QLORA_DEVICE")
    if prefer not in (None, "", "cpu", "cuda"):
        raise ValueError(f"unknown device {prefer!r}: use 'cpu' or 'cuda'")
    if prefer == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; use 'cpu' or a GPU runtime")
    if prefer != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        forced = os.environ.get("QLORA_DTYPE")
        if forced not in (None, "", "bfloat16", "float16"):
            raise ValueError(f"QLORA_DTYPE={forced!r}: use 'bfloat16' or 'float16'")
        if forced == "float16" or (forced == "bfloat16" and not torch.cuda.is_bf16_supported()):
            if forced == "bfloat16":
                raise RuntimeError("QLORA_DTYPE=bfloat16, but this GPU has no bfloat16; use float16")
            dtype = torch.float16
    else:
        device, dtype = torch.device("cpu"), torch.float32
    return Runtime(device, dtype)


def seed_everything(seed: int = 0) -> None:
    """Seed Python, torch (CPU and CUDA) so a chapter's random numbers repeat."""
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def versions(extra: tuple[str, ...] = ()) -> dict[str, str]:
    """Installed versions of the packages the book relies on, and of ``extra`` ("missing" where absent)."""
    out = {"python": platform.python_version()}
    for name in [*PACKAGES, *extra]:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


def recorded_versions() -> dict[str, str]:
    """The versions every measurement in ``book/data/`` records: torch, bitsandbytes, transformers, peft."""
    v = versions()
    return {k: v[k] for k in ("torch", "bitsandbytes", "transformers", "peft")}


def device_name(device: torch.device) -> str:
    """The device a measurement ran on, as ``book/data/`` records it: the GPU's name, or the CPU's kind."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def apply_num_threads() -> int:
    """Use ``QLORA_NUM_THREADS`` CPU threads if it is set; return torch's thread count.

    torch takes no more threads from ``OMP_NUM_THREADS`` than the machine has cores, so the
    portability matrix (``dev test --portable``) sets this variable to run chapters with more.
    """
    if os.environ.get("QLORA_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["QLORA_NUM_THREADS"]))
    return torch.get_num_threads()


def start_chapter(seed: int = 0) -> Runtime:
    """What every chapter does first: pick device and dtype, print them with versions, seed."""
    apply_num_threads()
    runtime = pick_device()
    v = versions()
    print(runtime)
    print(", ".join(f"{k} {v[k]}" for k in ("torch", "bitsandbytes", "transformers", "peft")))
    seed_everything(seed)
    return runtime


def time_matmul(dtype: torch.dtype, size: int = 1024, device: str | torch.device = "cpu", repeat: int = 5) -> float:
    """Median seconds of one (size x size) @ (size x size) matrix product in ``dtype`` on ``device``.

    The measurement behind the CPU's float32 choice: run it for float32 and bfloat16 and compare.
    """
    import time

    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    for _ in range(repeat + 1):  # the first call warms up and is not counted
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times[1:])[repeat // 2]


def glue(name: str, value, display: bool = False) -> None:
    """Hand a computed value to the book's prose (myst-nb's ``glue``), where myst-nb is installed.

    The book's build has myst-nb, and the prose's ``{glue:text}`` roles show what a cell computed.
    A notebook run elsewhere (Colab, a plain script) needs nothing of it: there the cell's own
    output shows the value, and this does nothing.
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return
    myst_glue(name, value, display=display)
