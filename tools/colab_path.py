"""Run every chapter on a CUDA GPU the way a Colab reader runs it, and record the runs.

    python3 tools/colab_path.py --dtypes bfloat16 float16 --jobs 6 --json book/data/colab_path.json

Each notebook's code cells (the Colab install cell left out: the packages are installed already)
are joined into one plain script and run with ``python3`` in ``book/``, with ``QLORA_DEVICE=cuda``
(so ``pick_device()`` gives the GPU) and ``QLORA_DTYPE`` set to the compute dtype: ``bfloat16``, and
``float16``, the path of a GPU without bfloat16 (Colab's T4), forced on the same GPU. Up to
``--jobs`` chapters run at once, sharing the GPU; a chapter's seconds are the wall time of its
whole script (Python's start and the imports included) and its peak the largest GPU memory its
process allocated. The offline model is converted once, before the chapters run.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
sys.path.insert(0, str(ROOT))

PEAK_FOOTER = """
import torch as _torch, os as _os
if _torch.cuda.is_available():
    with open(_os.environ["QLORA_PEAK_FILE"], "w") as _f:
        _f.write(str(_torch.cuda.max_memory_allocated()))
"""


def script_of(notebook: Path) -> str:
    cells = json.loads(notebook.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code" and "remove-cell" not in c.get("metadata", {}).get("tags", [])]
    return "\n\n".join("".join(c["source"]) for c in code) + "\n" + PEAK_FOOTER


def run_chapter(notebook: Path, dtype: str, folder: Path, timeout: int) -> dict:
    script = folder / f"{notebook.stem}.{dtype}.py"
    script.write_text(script_of(notebook))
    peak_file = folder / f"{notebook.stem}.{dtype}.peak"
    log = folder / f"{notebook.stem}.{dtype}.log"
    env = dict(os.environ, QLORA_DEVICE="cuda", QLORA_DTYPE=dtype, QLORA_PEAK_FILE=str(peak_file), MPLBACKEND="Agg",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    try:
        with log.open("w") as out:
            rc = subprocess.run([sys.executable, str(script)], cwd=BOOK, env=env, stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace").strip().splitlines()
    row = {"chapter": notebook.stem, "compute_dtype": dtype, "ok": rc == 0, "seconds": round(seconds, 1),
           "peak_gib": round(int(peak_file.read_text()) / 2**30, 2) if peak_file.is_file() else None}
    if rc != 0:
        row["error"] = f"exit {rc}: " + " | ".join(tail[-3:])[-600:]
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"], choices=["bfloat16", "float16"])
    parser.add_argument("--jobs", type=int, default=6)
    parser.add_argument("--timeout", type=int, default=480, help="seconds one chapter may take")
    parser.add_argument("--json", type=Path, default=BOOK / "data" / "colab_path.json")
    parser.add_argument("--logs", type=Path, default=None, help="keep each chapter's output in this folder")
    parser.add_argument("--update", action="store_true",
                        help="rerun only the chapters named, replacing their runs in --json; the rerun's "
                             "provenance is added to the record's provenance under 'reruns'")
    parser.add_argument("chapters", nargs="*", help="notebooks (default: every chapter)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("this records the GPU path: run it on a machine with a CUDA GPU", file=sys.stderr)
        return 2
    from qlora_tutorial.bench.results import provenance, shown_command
    from qlora_tutorial.models import offline_model_path

    notebooks = [Path(c).resolve() for c in args.chapters] or sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))
    start = time.perf_counter()
    offline_model_path()  # converted once, before the chapters share it
    setup_s = time.perf_counter() - start
    words = list(argv if argv is not None else sys.argv[1:])
    if "--logs" in words:  # a folder on the machine that ran it, as --json's is (shown_command drops that)
        del words[words.index("--logs"):words.index("--logs") + 2]
    command = shown_command("python3 tools/colab_path.py " + " ".join(words))
    folder = args.logs or Path(tempfile.mkdtemp())
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(nb, dtype) for dtype in args.dtypes for nb in notebooks]
    runs = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_chapter, nb, dtype, folder, args.timeout): (nb, dtype) for nb, dtype in jobs}
        for future in concurrent.futures.as_completed(futures):
            row = future.result()
            print(json.dumps(row), flush=True)
            runs.append(row)
    made = {**provenance(torch.device("cuda"), command), "jobs_at_once": args.jobs,
            "model_setup_seconds": round(setup_s, 1)}
    if args.update:  # the earlier record, with the named chapters' runs replaced by this run's
        record = json.loads(args.json.read_text())
        reruns = record["provenance"].setdefault("reruns", [])
        reruns.append(made)
        for row in runs:
            row["rerun"] = len(reruns) - 1  # index into provenance["reruns"]
        again = {(r["chapter"], r["compute_dtype"]) for r in runs}
        record["runs"] = [r for r in record["runs"] if (r["chapter"], r["compute_dtype"]) not in again] + runs
    else:
        record = {
            "what": "Every chapter run on a CUDA GPU as a Colab reader runs it, with bfloat16 compute and with "
                    "float16 forced (the T4's path).",
            "how": __doc__.split("\n\n", 2)[2].replace("\n", " ").strip(),
            "provenance": made,
            "runs": runs,
        }
    runs = record["runs"]
    runs.sort(key=lambda r: (r["compute_dtype"] != "bfloat16", r["chapter"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1) + "\n")
    failed = [f"{r['chapter']} ({r['compute_dtype']})" for r in runs if not r["ok"]]
    print(f"{len(runs) - len(failed)} of {len(runs)} runs passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
