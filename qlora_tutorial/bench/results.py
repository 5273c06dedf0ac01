"""The suite's results: the CSV (one row per measurement) and the JSON beside it, their provenance
(device, versions, date, command), and the book's copy of them in ``book/data/``."""
from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import torch

from ..device import device_name
from ..device import recorded_versions as versions

# Relative to the current directory: the installed package knows no checkout, so a book run is made
# from the repository's root (or given --csv/--json).
CSV_PATH = Path("book") / "data" / "gpu_benchmark.csv"
KERNELS_PATH = Path("book") / "data" / "gpu_kernels.json"
# adapter_dtype: what the LoRA matrices are stored in (empty for full fine-tuning)
CSV_COLUMNS = ["mode", "implementation", "compiled", "optimizer", "batch", "seq", "grad_ckpt", "step_s",
               "step_s_spread", "gpu_ms_per_step", "tokens_per_s", "peak_gib", "weights_gib", "trainable",
               "adapter_dtype", "device", "torch", "bitsandbytes", "transformers", "peft", "date", "command"]
# what identifies a row: a later run replaces the rows of an earlier one with the same key
ROW_KEY = ("mode", "implementation", "compiled", "optimizer", "batch", "seq", "grad_ckpt")
GIB = 2 ** 30  # the unit of the memory columns

# The repository (as in _config.yml; a test checks they agree): where Colab readers get book/data/ from.
REPOSITORY = "https://github.com/qlora-tutorial/qlora-tutorial"
RAW_DATA_URL = REPOSITORY.replace("https://github.com/", "https://raw.githubusercontent.com/") + "/main/book/data"


# ---------------------------------------------------------------- provenance
def provenance(device: torch.device, command: str) -> dict:
    """What every row carries: where, with which versions, when and by which command it was measured."""
    return {"device": device_name(device), **versions(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "command": command}


def shown_command(command: str) -> str:
    """A recorded command without its output locations (``--out``, ``--csv``, ``--json`` and their
    paths, which are paths on the machine that ran it): what a reader would type."""
    import shlex

    words = shlex.split(command)
    for option in ("--out", "--csv", "--json"):
        while option in words:
            i = words.index(option)
            del words[i:i + 2]
    return " ".join(map(shlex.quote, words))


def triton_version() -> str | None:
    from .. import nf4_triton

    if not nf4_triton.triton_available():
        return None
    import triton

    return triton.__version__


# ---------------------------------------------------------------- output
def data_text(name: str) -> str:
    """A file of ``book/data/`` as text: from the checkout the current directory is in (the root, or
    ``book/`` where chapters run), else (e.g. on Colab, where only the package is installed)
    downloaded from the repository. The data lives in one place."""
    for folder in (Path.cwd(), *Path.cwd().parents):
        local = folder / "book" / "data" / name
        if local.is_file():
            return local.read_text()
    import urllib.request

    url = f"{RAW_DATA_URL}/{name}"
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 (a fixed https address)
        return response.read().decode("utf-8")


def load_benchmark() -> list[dict]:
    """The measured rows of ``book/data/gpu_benchmark.csv``."""
    return parse_csv(data_text(CSV_PATH.name))


def load_kernels() -> dict:
    """``book/data/gpu_kernels.json``: kernel numbers, per-row extras, profiles, provenance."""
    return json.loads(data_text(KERNELS_PATH.name))


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in CSV_COLUMNS})


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")


def read_csv(path: Path) -> list[dict]:
    """The benchmark CSV back, with numbers as numbers and grad_ckpt as a bool."""
    return parse_csv(Path(path).read_text())


def parse_csv(text: str) -> list[dict]:
    """Rows of the benchmark CSV given as text (numbers as numbers, grad_ckpt as a bool)."""
    import io

    rows = list(csv.DictReader(io.StringIO(text)))
    if rows and list(rows[0]) != CSV_COLUMNS:
        raise ValueError(f"not a benchmark CSV: its columns are {list(rows[0])}, expected {CSV_COLUMNS}")
    for row in rows:
        for key in ("batch", "seq", "trainable"):
            row[key] = int(row[key])
        for key in ("step_s", "step_s_spread", "gpu_ms_per_step", "tokens_per_s", "peak_gib", "weights_gib"):
            row[key] = float(row[key]) if row[key] != "" else float("nan")
        row["grad_ckpt"] = row["grad_ckpt"] == "True"
    return rows


def _number(x) -> float:
    """A CSV cell as a float; an empty cell (no memory measured on a CPU) is NaN."""
    return float("nan") if x in ("", None) else float(x)


def compare(rows: list[dict], time_tol: float = 0.05, memory_tol: float = 0.02) -> list[dict]:
    """Ours against PEFT (as it comes, and with ``autocast_adapter_dtype=False``: ``against`` says which)
    at every point both measured: ratios and whether the targets hold.

    Target: our step time at most ``time_tol`` (5%) above PEFT's, our peak memory at most
    ``memory_tol`` (2%) above PEFT's.
    """
    def key(r, impl):
        return (r["mode"], impl, r.get("compiled", "eager"), r.get("optimizer", "adamw"), r["batch"], r["seq"],
                r["grad_ckpt"])

    index = {key(r, r["implementation"]): r for r in rows}
    out = []
    for k, ours in index.items():
        if ours["implementation"] != "ours":
            continue
        for against in ("peft", "peft-nocast"):
            peft = index.get(key(ours, against))
            if peft is None:
                continue
            time_ratio = ours["step_s"] / peft["step_s"]
            mem_ratio = _number(ours["peak_gib"]) / _number(peft["peak_gib"])
            out.append({"mode": ours["mode"], "compiled": ours.get("compiled", "eager"), "against": against,
                        "batch": ours["batch"], "seq": ours["seq"], "grad_ckpt": ours["grad_ckpt"],
                        "time_ratio": time_ratio, "memory_ratio": mem_ratio, "time_ok": time_ratio <= 1 + time_tol,
                        "memory_ok": not (mem_ratio > 1 + memory_tol)})
    return out


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with every row that ``new`` measures again replaced (same ``ROW_KEY``), plus ``new``'s others."""
    key = lambda r: tuple(str(r[k]) for k in ROW_KEY)  # noqa: E731
    fresh = {key(r): r for r in new}
    out = [fresh.pop(key(r), r) for r in old]
    return out + [r for r in new if key(r) in fresh]

