"""How fast, and in how much memory, our NF4 quantizer and bitsandbytes' CPU path quantize a weight.

    python3 tools/nf4_benchmark.py          # print the results
    python3 tools/nf4_benchmark.py --save   # and write them to book/data/nf4_quantize_benchmark.json

Each measurement runs in a fresh process, so that the peak resident memory (``ru_maxrss``) of one
does not hide another's. Run it with the project's environment (``.venv/bin/python``); chapter 5
reads the saved file. It lives in ``tools/``, outside the installed package, because it writes
into the book.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA_FILE = ROOT / "book" / "data" / "nf4_quantize_benchmark.json"
SHAPE = (4096, 11008)  # Llama-2-7B's MLP weight


def peak_rss_of(method: str, shape: tuple[int, int], double_quant: bool, repeats: int = 5) -> dict:
    """Run one quantization in this (fresh) process; report its time and peak extra resident memory."""
    import resource

    import bitsandbytes.functional as bnbf
    import torch

    from qlora_tutorial.nf4 import quantize_nf4

    def run(w):
        if method == "ours":
            return quantize_nf4(w, double_quant=double_quant)
        return bnbf.quantize_4bit(w, quant_type="nf4", compress_statistics=double_quant)

    run(torch.randn(4096))  # warm up both code paths
    torch.manual_seed(0)
    weight = torch.randn(shape).mul_(0.02)  # in place: no second weight-sized tensor before the baseline
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    run(weight)
    first = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = [first]
    for _ in range(repeats - 1):
        start = time.perf_counter()
        run(weight)
        times.append(time.perf_counter() - start)
    return {"method": method, "double_quant": double_quant, "seconds_min": min(times), "seconds_all": times,
            "peak_extra_MiB": (peak_kib - base_kib) / 1024, "weight_MiB": weight.numel() * 4 / 2 ** 20}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def benchmark(shape=SHAPE) -> list[dict]:
    """Time ours and bitsandbytes' CPU path on a float32 weight, each run in its own process."""
    rows = []
    for method in ("ours", "bitsandbytes"):
        for dq in (False, True):
            out = subprocess.run([sys.executable, __file__, "--one", method, f"{shape[0]}x{shape[1]}", str(dq)],
                                 check=True, capture_output=True, text=True,
                                 env={**os.environ, "PYTHONWARNINGS": "ignore"})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def benchmark_record(shape=SHAPE) -> dict:
    """``benchmark(shape)`` with its provenance: machine, versions, date, machine load, command."""
    import bitsandbytes
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    rows = benchmark(shape)
    return {
        "provenance": {
            "command": "python3 tools/nf4_benchmark.py --save",
            "date": time.strftime("%Y-%m-%d"),
            "device": f"CPU ({cpu_name()}), {torch.get_num_threads()} torch threads",
            "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__,
            "python": platform.python_version(),
            "load_average_1min_before": load,  # other work on the machine slows the timings
            "what": f"NF4 quantization of a {shape[0]}x{shape[1]} float32 weight (randn * 0.02): best of 5 runs, "
                    "peak resident memory above the process's level before the first run (ru_maxrss)",
        },
        "rows": rows,
    }


def main(argv: list[str]) -> int:
    if argv[:1] == ["--one"]:  # a child process: one measurement, printed as JSON
        method, shape, dq = argv[1], tuple(int(x) for x in argv[2].split("x")), argv[3] == "True"
        print(json.dumps(peak_rss_of(method, shape, dq)))
        return 0
    if argv not in ([], ["--save"]):
        print(__doc__)
        return 2
    record = benchmark_record()
    for row in record["rows"]:
        print(f"{row['method']:>13} double_quant={row['double_quant']!s:5}: {row['seconds_min']:.3f} s, "
              f"peak extra {row['peak_extra_MiB']:.0f} MiB (weight {row['weight_MiB']:.0f} MiB)")
    if argv == ["--save"]:
        DATA_FILE.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {DATA_FILE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
