"""The published site: its own assets, and the facts about it that the README and the tests share.

``prepare()`` runs before ``jupyter-book build`` (``python3 tools/dev.py book`` calls it).
It puts in place what the site serves itself instead of taking it from a CDN, so that the site works
for readers behind a firewall and in the tests, which run with no network:

- MathJax 3, from the npm registry's ``mathjax`` package (version and checksum pinned below),
  unpacked into ``book/_static/mathjax/`` (ignored by git). ``_config.yml`` points Sphinx's
  ``mathjax_path`` at it. MathJax 3, not 4: Sphinx 7 configures MathJax 3, and MathJax 3's
  ``es5/`` folder holds its fonts, while MathJax 4 fetches its fonts from a CDN by default.

The rest answers questions about the site from ``_config.yml`` and ``_toc.yml``, the one place each
fact lives: the pages in reading order, the published URL, a chapter's Colab link, and the README's
chapter list, which ``python3 tools/book_site.py readme`` rewrites from the table of contents.
Only the standard library and PyYAML (a dependency of Jupyter Book) are used.
"""
from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "book" / "_static"
MATHJAX_DIR = STATIC / "mathjax"
NPM_CACHE = ROOT / "node_modules" / ".qlora-site"  # ignored by git, like all of node_modules/

MATHJAX_VERSION = "3.2.2"
# The registry's sha512 of mathjax-3.2.2.tgz (`npm view mathjax@3.2.2 dist.integrity`): what we
# unpack is exactly what was reviewed, whatever the registry serves later.
MATHJAX_INTEGRITY = ("sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZ"
                     "M1vO+geW0OhGw==")
MATHJAX_ENTRY = "tex-chtml.js"  # TeX in, HTML+CSS out; the name _config.yml's mathjax_path uses

COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
README_CHAPTERS = "## Chapters"


def log(msg: str) -> None:
    print(f"[site] {msg}", flush=True)


# ---------------------------------------------------------------- assets
def _integrity(path: Path) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(path.read_bytes()).digest()).decode()


def _mathjax_tarball() -> Path:
    """The pinned MathJax package as npm downloads it, checked against the pinned sha512."""
    tgz = NPM_CACHE / f"mathjax-{MATHJAX_VERSION}.tgz"
    if not (tgz.exists() and _integrity(tgz) == MATHJAX_INTEGRITY):
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is missing: the site serves MathJax from the npm package `mathjax`. "
                               "Install npm (Debian: apt-get install npm), or run "
                               "`python3 tools/dev.py setup`, which does.")
        NPM_CACHE.mkdir(parents=True, exist_ok=True)
        log(f"downloading mathjax@{MATHJAX_VERSION} with npm")
        subprocess.run([npm, "pack", f"mathjax@{MATHJAX_VERSION}", "--pack-destination", str(NPM_CACHE),
                        "--silent", "--no-fund", "--no-audit"], check=True, cwd=NPM_CACHE,
                       stdout=subprocess.DEVNULL)
        got = _integrity(tgz)
        if got != MATHJAX_INTEGRITY:
            tgz.unlink()
            raise RuntimeError(f"mathjax@{MATHJAX_VERSION} from npm has checksum {got}, "
                               f"not the pinned {MATHJAX_INTEGRITY}; refusing to serve it")
    return tgz


def install_mathjax() -> Path:
    """Unpack MathJax's browser build (the package's ``es5/`` folder) into ``book/_static/mathjax``."""
    stamp = MATHJAX_DIR / ".version"
    if stamp.exists() and stamp.read_text() == MATHJAX_INTEGRITY and (MATHJAX_DIR / MATHJAX_ENTRY).exists():
        return MATHJAX_DIR
    tgz = _mathjax_tarball()
    shutil.rmtree(MATHJAX_DIR, ignore_errors=True)
    prefix = "package/es5/"
    with tarfile.open(tgz) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
        for member in members:
            target = MATHJAX_DIR / member.name[len(prefix):]
            if MATHJAX_DIR.resolve() not in target.resolve().parents:
                raise RuntimeError(f"unsafe path in the MathJax package: {member.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src:
                target.write_bytes(src.read())
    if not (MATHJAX_DIR / MATHJAX_ENTRY).exists():
        raise RuntimeError(f"mathjax@{MATHJAX_VERSION} has no es5/{MATHJAX_ENTRY}")
    stamp.write_text(MATHJAX_INTEGRITY)
    log(f"MathJax {MATHJAX_VERSION}: {len(members)} files in {MATHJAX_DIR.relative_to(ROOT)}")
    return MATHJAX_DIR


def prepare() -> None:
    """Put every asset the site serves itself in place (called before `jupyter-book build`)."""
    STATIC.mkdir(parents=True, exist_ok=True)
    install_mathjax()


# ---------------------------------------------------------------- Sphinx extension
def _unique_scripts(app, pagename, templatename, context, doctree) -> None:
    """Drop second copies of a page's inline scripts.

    With Sphinx 7, an extension that adds an inline script once the build has started (sphinx-thebe,
    sphinx-togglebutton) gets it written twice into every page; sphinx-thebe's `const THEBE_JS_URL`
    declared twice is a JavaScript error in every reader's console. The first copy stays.
    """
    seen, unique = set(), []
    for script in context.get("script_files", []):
        attributes = {k: v for k, v in script.attributes.items() if k != "priority"}
        key = (script.filename or "", tuple(sorted(attributes.items())))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique


BIBTEX_STYLE = "qlora"  # _config.yml: bibtex_default_style


def _person(person) -> str:
    from pybtex.richtext import Text

    name = " ".join(person.prelast_names + person.last_names)
    return str(Text.from_latex(name)).replace("{", "").replace("}", "")


def author_year(entry) -> str:
    """'Hu et al., 2022', 'Kalajdzievski, 2023', 'A and B, 2020': how a reader names a reference."""
    persons = list(entry.persons.get("author") or entry.persons.get("editor") or [])
    et_al = len(persons) > 2 or (persons and str(persons[-1]) == "others")
    names = [_person(p) for p in persons if str(p) != "others"]
    if not names:
        raise ValueError(f"bibliography entry {entry.key} has no author: add `author = {{...}}`")
    who = f"{names[0]} et al." if et_al else " and ".join(names)
    return f"{who}, {entry.fields.get('year', 'n.d.')}"


def _register_bibtex_style() -> None:
    """A pybtex style whose labels are author-year, made unique with a, b, ... (2022a, 2022b).

    The same label is shown where a chapter cites ({cite:p}`key` -> [Hu et al., 2022]) and in front
    of the entry on the references page, so the two always match; two papers of one first author
    and year (Dettmers et al., 2022a and 2022b) stay apart.
    """
    from collections import Counter

    from pybtex.plugin import register_plugin
    from pybtex.style.formatting.plain import Style as Plain
    from pybtex.style.labels import BaseLabelStyle

    class AuthorYearLabels(BaseLabelStyle):
        def format_labels(self, sorted_entries):
            labels = [author_year(entry) for entry in sorted_entries]
            total, seen = Counter(labels), Counter()
            for label in labels:
                if total[label] > 1:
                    seen[label] += 1
                    label = f"{label}{'abcdefghijklmnopqrstuvwxyz'[seen[label] - 1]}"
                yield label

    class Style(Plain):
        default_label_style = f"{BIBTEX_STYLE}-author-year"

    register_plugin("pybtex.style.labels", f"{BIBTEX_STYLE}-author-year", AuthorYearLabels, force=True)
    register_plugin("pybtex.style.formatting", BIBTEX_STYLE, Style, force=True)


def setup(app) -> dict:
    """This module is also a Sphinx extension (``sphinx.local_extensions`` in _config.yml)."""
    app.connect("html-page-context", _unique_scripts, priority=900)
    _register_bibtex_style()
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# ---------------------------------------------------------------- config and table of contents
def _yaml(name: str) -> dict:
    import yaml  # PyYAML, installed with Jupyter Book

    return yaml.safe_load((ROOT / name).read_text())


def config() -> dict:
    return _yaml("_config.yml")


@dataclass(frozen=True)
class Page:
    """One page of the table of contents, in reading order."""

    docname: str  # path without suffix, as in _toc.yml: "book/04_nf4"
    part: str  # the part's caption; "" for the root page
    number: str = ""  # "4" for the 4th chapter of the numbered parts, as the site shows it

    @property
    def source(self) -> Path:
        for suffix in (".ipynb", ".md"):
            if (ROOT / f"{self.docname}{suffix}").exists():
                return ROOT / f"{self.docname}{suffix}"
        raise FileNotFoundError(f"_toc.yml lists {self.docname}, but neither .ipynb nor .md exists")

    @property
    def is_notebook(self) -> bool:
        return self.source.suffix == ".ipynb"

    @property
    def html(self) -> str:
        """The page's path inside _build/html."""
        return f"{self.docname}.html"

    @property
    def shown_title(self) -> str:
        """The title as the site shows it, numbered: "4. NF4, from normal quantiles"."""
        return f"{self.number}. {self.title}" if self.number else self.title

    @property
    def markdown(self) -> str:
        """The page's markdown: a notebook's markdown cells, or the .md file."""
        if self.is_notebook:
            cells = json.loads(self.source.read_text())["cells"]
            return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        return self.source.read_text()

    @property
    def title_markdown(self) -> str:
        """The first '# ' heading of the page, as written: "The `Qlora_4_bit` layer"."""
        match = re.search(r"^# (.+)$", self.markdown, re.M)
        if match is None:
            raise ValueError(f"{self.source.name} has no '# Title' heading")
        return match.group(1).strip()

    @property
    def title(self) -> str:
        """The title as text, as a browser shows it: "The Qlora_4_bit layer"."""
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", self.title_markdown)  # [text](link) -> text
        text = re.sub(r"`([^`]*)`", r"\1", text)
        return re.sub(r"(\*\*|\*)(.+?)\1", r"\2", text)


def pages() -> list[Page]:
    """Every page of the book in reading order (the root page first), from _toc.yml.

    Chapters of parts with `numbered: true` are numbered 1, 2, ... across parts, as Jupyter Book
    numbers them; a chapter's sections get "4.1", "4.2", ...
    """
    toc = _yaml("_toc.yml")
    result = [Page(toc["root"], "")]
    count = 0

    def walk(items: list[dict], part: str, numbered: bool, prefix: str) -> None:
        nonlocal count
        for i, item in enumerate(items or [], start=1):
            if "file" not in item:
                raise ValueError(f"_toc.yml entry {item} has no `file:`; the site knows only files")
            number = ""
            if numbered and not prefix:
                count += 1
                number = str(count)
            elif numbered:
                number = f"{prefix}.{i}"
            result.append(Page(item["file"], part, number))
            walk(item.get("sections", []), part, numbered, number)

    for part in toc.get("parts", []):
        walk(part.get("chapters", []), part.get("caption", ""), bool(part.get("numbered")), "")
    walk(toc.get("chapters", []), "", bool(toc.get("numbered")), "")
    return result


def repository(url: str | None = None) -> tuple[str, str, str]:
    """(owner, name, branch) of the GitHub repository that _config.yml names (or of the URL given)."""
    repo = config()["repository"]
    url = url or repo["url"]
    match = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?", url)
    if match is None:
        raise ValueError(f"repository URL {url!r} is not https://github.com/OWNER/NAME; "
                         "set repository.url in _config.yml to the GitHub repository")
    return match.group(1), match.group(2), repo.get("branch", "main")


def published_url(repository_url: str | None = None) -> str:
    """Where GitHub Pages publishes the site of the repository in _config.yml (or of the URL given)."""
    owner, name, _ = repository(repository_url)
    if name.lower() == f"{owner.lower()}.github.io":
        return f"https://{owner.lower()}.github.io/"
    return f"https://{owner.lower()}.github.io/{name}/"


def repo_path(page: Page) -> str:
    """The page's source path inside the repository (path_to_book + the file)."""
    base = (config()["repository"].get("path_to_book") or "").strip("/")
    rel = page.source.relative_to(ROOT).as_posix()
    return f"{base}/{rel}" if base else rel


def colab_url(page: Page) -> str:
    """The Colab link of a notebook page, the way the site's launch button builds it."""
    owner, name, branch = repository()
    colab = config()["launch_buttons"]["colab_url"].strip("/")
    return f"{colab}/github/{owner}/{name}/blob/{branch}/{repo_path(page)}"


# ---------------------------------------------------------------- README
def readme_chapters() -> str:
    """The README's "Chapters" section: each chapter by part, with its page and a Colab badge."""
    lines = [README_CHAPTERS, "",
             "Each chapter is a page of the site and a notebook in `book/`; the badge opens it in Colab.",
             "This list is made from `_toc.yml` by `python3 tools/book_site.py readme`.", ""]
    site = published_url()
    part = None
    for page in pages()[1:]:
        if page.part != part:
            part = page.part
            lines += ["", f"**{part}**" if part else "**More**", ""]
        shown = f"{page.number}. {page.title_markdown}" if page.number else page.title_markdown
        link = f"[{shown}]({site}{page.html})"
        badge = f" [![Open in Colab]({COLAB_BADGE})]({colab_url(page)})" if page.is_notebook else ""
        lines.append(f"- {link}{badge}")
    return "\n".join(lines).replace("\n\n\n", "\n\n").rstrip() + "\n"


def readme_section(text: str, heading: str) -> str | None:
    """The section of a markdown text from `heading` up to the next '## ' heading, or None."""
    match = re.search(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", text, re.M | re.S)
    return match.group(0) if match else None


def write_readme() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    old = readme_section(text, README_CHAPTERS)
    new = readme_chapters()
    if old is None:
        raise ValueError(f"README.md has no '{README_CHAPTERS}' section to rewrite")
    # A section followed by another keeps one blank line before the next heading.
    readme.write_text(text.replace(old, new if text.endswith(old) else new + "\n", 1))
    log("README.md: chapter list rewritten from _toc.yml")


if __name__ == "__main__":
    if sys.argv[1:] == ["prepare"]:
        prepare()
    elif sys.argv[1:] == ["readme"]:
        write_readme()
    else:
        print("usage: python3 tools/book_site.py prepare|readme")
        raise SystemExit(2)
