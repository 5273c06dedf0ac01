"""Speed, measured honestly: every setup built once and kept resident, then timed in interleaved
rounds (eager, ``torch.compile``d, recorded as CUDA graphs; PyTorch's AdamW or bitsandbytes' paged
and 8-bit ones), with the GPU's busy time per step beside the wall clock."""
from __future__ import annotations

import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import memory
from .profiling import gpu_busy_ms
from .results import GIB, provenance
from .step import Point, _allocated, _free, _sync, median_step_s, train_step
from .suite import SETUPS, adapter_dtype, build, save_random_model

COMPILED = ("eager", "compile", "cudagraphs")
OPTIMIZERS = ("adamw", "paged_adamw", "adamw8bit", "paged_adamw8bit")


# ---------------------------------------------------------------- speed, measured honestly
@dataclass(frozen=True)
class Setup:
    """One configuration of the speed runs: what trains, whose layers, how it runs, which optimizer.

    ``compiled``: ``eager``; ``compile`` (``fast.compile_for_training``: each decoder layer
    compiled); ``cudagraphs`` (compiled as well, and the whole step recorded as one CUDA graph with
    ``fast.CapturedStep``).
    """
    mode: str
    implementation: str
    compiled: str = "eager"
    optimizer: str = "adamw"

    @property
    def label(self) -> str:
        return f"{self.mode}/{self.implementation}/{self.compiled}/{self.optimizer}"


def parse_speed_setups(text: str) -> list[Setup]:
    """'qlora/ours/cudagraphs,full/torch-amp' -> Setups (compiled defaults to eager, optimizer to adamw)."""
    out = []
    for item in text.split(","):
        parts = item.strip().split("/")
        if len(parts) < 2 or len(parts) > 4 or tuple(parts[:2]) not in SETUPS:
            raise ValueError(f"unknown setup {item!r}: MODE/IMPLEMENTATION[/COMPILED[/OPTIMIZER]] with MODE/"
                             f"IMPLEMENTATION one of {', '.join(m + '/' + i for m, i in SETUPS)}")
        setup = Setup(*parts)
        if setup.compiled not in COMPILED:
            raise ValueError(f"{item!r}: compiled must be one of {COMPILED}")
        if setup.optimizer not in OPTIMIZERS:
            raise ValueError(f"{item!r}: optimizer must be one of {OPTIMIZERS}")
        if setup.optimizer != "adamw" and setup.compiled == "cudagraphs":
            raise ValueError(f"{item!r}: bitsandbytes' optimizers are not recorded in CUDA graphs here; use adamw")
        out.append(setup)
    return out


# the default speed comparison: every setup in every mode that applies; optimizer variants for memory
# (most important first: a run cut short by its time budget still has them)
DEFAULT_SPEED_SETUPS = ",".join(
    ["qlora/ours/compile", "lora/ours/compile", "qlora/peft/compile", "lora/peft/compile", "qlora/ours/eager",
     "lora/ours/eager", "qlora/peft/eager", "lora/peft/eager", "full/torch-amp", "full/torch",
     "qlora/ours/eager/paged_adamw", "qlora/ours/eager/adamw8bit", "full/torch-amp/eager/adamw8bit",
     "full/torch-amp/eager/paged_adamw8bit",
     # last: a recording that fails leaves the CUDA random generator unusable for later setups' init
     "qlora/ours/cudagraphs", "lora/ours/cudagraphs", "qlora/peft/cudagraphs", "lora/peft/cudagraphs"])


def make_optimizer(name: str, params, capturable: bool = False, lr: float = 1e-5):
    """AdamW (PyTorch's), or bitsandbytes' paged / 8-bit AdamW (its states in managed memory / 8 bits)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, capturable=capturable)
    import bitsandbytes as bnb

    cls = {"paged_adamw": bnb.optim.PagedAdamW, "adamw8bit": bnb.optim.AdamW8bit,
           "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(params, lr=lr)


class Prepared:
    """A setup built, compiled and warmed up: ``step()`` runs one training step on the fixed batch."""

    def __init__(self, setup: Setup, folder: Path, device: torch.device, dtype: torch.dtype, point: Point,
                 r: int, alpha: float, warmup: int, seed: int = 0):
        from .. import fast
        from ..quantize import count_parameters

        self.setup = setup
        base = _allocated(device)
        self._load(folder, device, dtype, r, alpha, base)
        if device.type == "cuda":  # the peak of training, not of loading (which may briefly hold more)
            torch.cuda.reset_peak_memory_stats(device)
        self.trainable, self.total = count_parameters(self.model)
        self.adapter_dtype = adapter_dtype(self.model)
        self.autocast = dtype if setup.implementation == "torch-amp" else None
        generator = torch.Generator(device=device).manual_seed(seed)
        self.input_ids = torch.randint(0, self.model.config.vocab_size, (point.batch, point.seq), device=device,
                                       generator=generator)
        t0 = time.perf_counter()
        # cudagraphs records the compiled model, unless QLORA_BENCH_CUDAGRAPHS_OVER=eager says to record it eager
        over = os.environ.get("QLORA_BENCH_CUDAGRAPHS_OVER", "compile")
        if setup.compiled == "compile" or (setup.compiled == "cudagraphs" and over == "compile"):
            fast.compile_for_training(self.model)
        self.optimizer = make_optimizer(setup.optimizer, memory.trainable_parameters(self.model),
                                        capturable=setup.compiled == "cudagraphs")
        self.note = None
        if setup.compiled == "cudagraphs":
            self._record(folder, device, dtype, r, alpha, base, warmup, over)
            self.step = lambda: self.captured(input_ids=self.input_ids, labels=self.input_ids)
        else:
            self.step = lambda: train_step(self.model, self.optimizer, self.input_ids, self.autocast)
            for _ in range(warmup):
                self.step()
        self.step()
        _sync(device)
        self.prepare_s = time.perf_counter() - t0
        # everything this setup allocated at its peak: weights, optimizer states, activations (and a
        # CUDA graph's memory pool); other setups stay resident but do not allocate meanwhile
        self.peak = (torch.cuda.max_memory_allocated(device) - base) if device.type == "cuda" else 0
        self.loss = float(self.step())
        if not math.isfinite(self.loss):
            raise RuntimeError(f"{setup.label}: the loss is {self.loss}: the setup is broken")

    def _load(self, folder, device, dtype, r, alpha, base) -> None:
        """The setup's model, in training mode, and the bytes its weights take."""
        self.model = build(self.setup.mode, self.setup.implementation, folder, device, dtype, r=r, alpha=alpha)
        _free(device)
        self.weights = _allocated(device) - base
        self.model.train()

    def _record(self, folder, device, dtype, r, alpha, base, warmup, over) -> None:
        """The whole step recorded as one CUDA graph; where recording the compiled model fails, the
        eager model is recorded instead, and ``note`` says so."""
        from .. import fast

        try:
            self.captured = fast.CapturedStep(self.model, self.optimizer, warmup=warmup, autocast=self.autocast,
                                              input_ids=self.input_ids, labels=self.input_ids)
        except Exception as exc:
            if over != "compile":
                raise
            self.note = f"recorded eager: recording the compiled model failed with {type(exc).__name__}: {exc}"[:600]
            del self.optimizer, self.model
            _free(device)
            if device.type == "cuda":  # the failed attempt's peak is not this setup's
                torch.cuda.reset_peak_memory_stats(device)
            self._load(folder, device, dtype, r, alpha, base)
            self.optimizer = make_optimizer(self.setup.optimizer, memory.trainable_parameters(self.model),
                                            capturable=True)
            self.captured = fast.CapturedStep(self.model, self.optimizer, warmup=warmup, autocast=self.autocast,
                                              input_ids=self.input_ids, labels=self.input_ids)


def run_rounds(config, point: Point, setups: list[Setup], device, dtype, rounds: int = 5, steps: int = 10,
               warmup: int = 3, profile_steps_per_round: int = 3, r: int = 16, alpha: float = 32, log=print,
               command: str = "python -m qlora_tutorial.bench --speed", on_round_done=None,
               time_budget_s: float | None = None, profile_rounds=(0,)) -> dict:
    """Every setup built once and kept resident, then timed in ``rounds`` interleaved rounds.

    In each round every setup runs ``steps`` steps, each timed on the wall clock (the GPU
    synchronised around it), in an order that rotates from round to round; in the rounds listed in
    ``profile_rounds`` the profiler then records ``profile_steps_per_round`` more to get the GPU's
    busy time (the GPU's work per step hardly varies; the profiler's start-up costs seconds). A row reports the median
    over rounds of each round's median step, its spread (largest minus smallest round median), and
    the median GPU-busy time. Slow drifts of the host (other load, clocks) hit every setup alike.

    ``time_budget_s``: no further setup is prepared after 60% of it, no further round started after
    90% (each round's results are saved as they come, through ``on_round_done``).
    """
    started = time.perf_counter()
    over = lambda fraction: time_budget_s is not None and time.perf_counter() - started > fraction * time_budget_s  # noqa: E731
    result = {"rows": [], "failures": [], "provenance": provenance(device, command)}
    failures = result["failures"]
    times = {s: [] for s in setups}
    gpu = {s: [] for s in setups}
    with tempfile.TemporaryDirectory(prefix="qlora-bench-") as tmp:
        folder = save_random_model(config, Path(tmp) / "model", dtype, device)
        prepared = prepare_all(setups, folder, device, dtype, point, r, alpha, warmup, failures, log,
                               out_of_time=lambda: over(0.6))
    for k in range(rounds):
        if k and over(0.9):
            log(f"stopped after {k} rounds: time budget")
            break
        order = prepared[k % len(prepared):] + prepared[:k % len(prepared)] if prepared else []
        for p in order:
            profile = profile_steps_per_round if k in profile_rounds else 0
            time_round(p, k, steps, device, times[p.setup], gpu[p.setup], profile, failures, log)
        result["rows"] = [_speed_row(p, times[p.setup], gpu[p.setup], point, device, result["provenance"])
                          for p in prepared if times[p.setup]]
        result["round_times"] = {p.setup.label: times[p.setup] for p in prepared}
        result["round_gpu_ms"] = {p.setup.label: gpu[p.setup] for p in prepared}
        log(f"round {k + 1}/{rounds} done")
        if on_round_done is not None:
            on_round_done(result)
    return result


def prepare_all(setups, folder, device, dtype, point, r, alpha, warmup, failures, log, out_of_time) -> list[Prepared]:
    """Every setup prepared, in order, while ``out_of_time()`` says no; one that fails is recorded and skipped."""
    prepared = []
    for setup in setups:
        if out_of_time():
            failures.append({"setup": setup.label, "what": "skipped: time budget"})
            log(f"[{setup.label}] skipped: time budget")
            continue
        try:
            p = Prepared(setup, folder, device, dtype, point, r, alpha, warmup)
        except Exception as exc:  # a mode that does not work for a setup: record it and go on
            failures.append({"setup": setup.label, "what": "prepare", "error": f"{type(exc).__name__}: {exc}"[:800]})
            log(f"[{setup.label}] FAILED to prepare: {type(exc).__name__}: {str(exc)[:300]}")
            _free(device)
            continue
        prepared.append(p)
        if p.note:
            failures.append({"setup": setup.label, "what": "note", "error": p.note})
        log(f"[{setup.label}] ready in {p.prepare_s:.1f} s: weights {p.weights / GIB:.3f} GiB, "
            f"peak {p.peak / GIB:.3f} GiB, loss {p.loss:.3f}")
    return prepared


def time_round(p: Prepared, k: int, steps: int, device, round_times: list, round_gpu: list, profile_steps: int,
               failures: list, log) -> None:
    """Round ``k`` of one setup: the median of ``steps`` wall-clock steps into ``round_times``, then
    (if ``profile_steps``) the GPU-busy time of that many more into ``round_gpu``."""
    try:
        round_times.append(median_step_s(p.step, steps, device))
        if profile_steps:
            round_gpu.append(gpu_busy_ms(p.step, profile_steps, device))
    except Exception as exc:
        failures.append({"setup": p.setup.label, "what": f"round {k}", "error": f"{type(exc).__name__}: {exc}"[:800]})
        log(f"[{p.setup.label}] FAILED in round {k}: {type(exc).__name__}: {str(exc)[:300]}")


def _speed_row(p: Prepared, round_times: list, round_gpu: list, point: Point, device, provenance) -> dict:
    step_s = statistics.median(round_times)
    busy = [g for g in round_gpu if g is not None]
    s = p.setup
    return {"mode": s.mode, "implementation": s.implementation, "compiled": s.compiled, "optimizer": s.optimizer,
            "batch": point.batch, "seq": point.seq, "grad_ckpt": point.grad_ckpt, "step_s": round(step_s, 5),
            # a spread needs two rounds at least: one round leaves it empty rather than 0
            "step_s_spread": round(max(round_times) - min(round_times), 5) if len(round_times) > 1 else "",
            "gpu_ms_per_step": round(statistics.median(busy), 3) if busy else "",
            "tokens_per_s": round(point.batch * point.seq / step_s, 1),
            "peak_gib": round(p.peak / GIB, 4) if device.type == "cuda" else "",
            "weights_gib": round(p.weights / GIB, 4) if device.type == "cuda" else "",
            "trainable": p.trainable, "adapter_dtype": p.adapter_dtype, **provenance}


def speed_targets(rows: list[dict]) -> list[dict]:
    """The targets of the speed work, checked on rows of one run (ours vs PEFT, QLoRA vs LoRA, GPU floor)."""
    idx = {(r["mode"], r["implementation"], r["compiled"]): r for r in rows
           if r["optimizer"] == "adamw" and not r["grad_ckpt"]}
    out = []

    def check(name, value, limit):
        if value is not None and math.isfinite(value):
            out.append({"target": name, "value": round(value, 4), "limit": limit, "ok": value <= limit})

    def get(mode, impl, compiled, key="step_s"):
        r = idx.get((mode, impl, compiled))
        return None if r is None or r[key] in ("", None) else float(r[key])

    ours_q = {c: get("qlora", "ours", c) for c in COMPILED}
    fastest = min((c for c in COMPILED if ours_q[c] is not None), key=lambda c: ours_q[c], default=None)
    if fastest is not None:
        peft_compiled = get("qlora", "peft", "compile")
        if peft_compiled:
            check(f"ours QLoRA {fastest} step / PEFT QLoRA compile step", ours_q[fastest] / peft_compiled, 0.35)
        busy = get("qlora", "ours", fastest, "gpu_ms_per_step")
        if busy:
            check(f"ours QLoRA {fastest}: wall-clock / GPU-busy", ours_q[fastest] * 1000 / busy, 1.15)
        lora_busy = get("lora", "ours", fastest, "gpu_ms_per_step")
        if busy and lora_busy:
            check(f"ours QLoRA / ours LoRA GPU-busy ({fastest})", busy / lora_busy, 1.05)
    for mode in ("lora", "qlora"):
        for c in COMPILED:
            ours, peft = get(mode, "ours", c), get(mode, "peft", c)
            if ours and peft:
                check(f"{mode} {c}: ours / PEFT step", ours / peft, 0.95)
                om, pm = get(mode, "ours", c, "peak_gib"), get(mode, "peft", c, "peak_gib")
                if om and pm:
                    check(f"{mode} {c}: ours / PEFT peak memory", om / pm, 0.85)
    return out


def paired_ratio(round_times: dict, a: str, b: str) -> dict:
    """Setup ``a``'s wall-clock step over setup ``b``'s, round by round (the same round: the host's slow
    drifts hit both), from a speed run's ``round_times_s`` keyed by ``Setup.label``: the median, the
    smallest and largest of the per-round ratios, and in how many rounds ``a`` was faster."""
    ratios = [x / y for x, y in zip(round_times[a], round_times[b])]
    if not ratios:
        raise ValueError(f"no round has both {a!r} and {b!r}")
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
            "faster_rounds": sum(r < 1 for r in ratios), "rounds": len(ratios)}
