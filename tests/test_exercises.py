"""Every exercise's solution runs and checks its own answer.

The book's exercises use sphinx-exercise: an ``{exercise}`` directive (with a ``:label:``) and a
``{solution}`` directive naming that label, in a markdown cell of a chapter notebook or in a .md page.
A solution holds one or more ```python code blocks; this test runs them in order, in a fresh namespace,
and each solution must end its check with an ``assert`` (predict a number, then compute it and assert).
Solutions must be self-contained: they import what they need from qlora_tutorial and the libraries.
"""
import json
import re
from pathlib import Path

import pytest
from markdown_it import MarkdownIt
from mdit_py_plugins.colon_fence import colon_fence_plugin

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "book").glob("*.ipynb")) + sorted((ROOT / "book").glob("*.md"))
pytestmark = pytest.mark.slow  # each solution loads what it needs (models, datasets): seconds, together
MD = MarkdownIt("commonmark").use(colon_fence_plugin)
DIRECTIVE = re.compile(r"^\{(exercise|solution)(?:-start)?\}\s*(.*)$")


def markdown_of(path: Path) -> str:
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text())["cells"]
        return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return path.read_text()


def directives(text: str):
    """(kind, argument, body, options) for every {exercise} / {solution} fence in ``text``."""
    for token in MD.parse(text):
        if token.type not in ("fence", "colon_fence"):
            continue
        match = DIRECTIVE.match(token.info.strip())
        if match:
            body = token.content
            options = dict(re.findall(r"^:(\w[\w-]*):\s*(.*)$", body, re.M))
            yield match.group(1), match.group(2).strip(), body, options


def python_blocks(body: str) -> list[str]:
    return [t.content for t in MD.parse(body) if t.type == "fence" and t.info.strip().split()[:1] == ["python"]]


def collect():
    exercises, solutions = {}, []
    for path in PAGES:
        for kind, argument, body, options in directives(markdown_of(path)):
            if kind == "exercise":
                exercises[options.get("label")] = path.name
            else:
                solutions.append(pytest.param(path.name, argument, python_blocks(body),
                                              id=f"{path.name}::{argument or '?'}"))
    return exercises, solutions


EXERCISES, SOLUTIONS = collect()


def test_the_book_has_exercises():
    assert SOLUTIONS, "no {solution} directive found in book/*.ipynb or book/*.md"


def test_every_exercise_has_a_label_and_one_solution():
    assert None not in EXERCISES, f"an exercise in {EXERCISES.get(None)} has no :label:"
    labels = [p.values[1] for p in SOLUTIONS]
    for label, page in EXERCISES.items():
        assert labels.count(label) == 1, f"exercise {label} ({page}) has {labels.count(label)} solutions, expected 1"
    for page, label, _ in (p.values for p in SOLUTIONS):
        assert label in EXERCISES, f"{page}: solution {label!r} names no exercise label"


@pytest.mark.parametrize("page, label, blocks", SOLUTIONS)
def test_solution_runs_and_checks_its_answer(page, label, blocks):
    assert blocks, f"{page}: solution {label} has no ```python block to run"
    code = "\n\n".join(blocks)
    assert re.search(r"^\s*assert\b", code, re.M), f"{page}: solution {label} asserts nothing"
    namespace = {"__name__": f"solution_{label}"}
    exec(compile(code, f"<{page}: solution {label}>", "exec"), namespace)
