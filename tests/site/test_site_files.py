"""Checks of the site that need no browser: README against _config.yml and _toc.yml, chapters'
figures and citations, the bibliography, and the built HTML's own assets."""
from __future__ import annotations

import json
import re

import pytest

from tools import book_site as site

ROOT = site.ROOT
README = (ROOT / "README.md").read_text()
NOTEBOOKS = [p for p in site.pages() if p.is_notebook]
# Keys the chapters cite; other chapters rely on them being there.
BIB_KEYS = ["hu2021lora", "dettmers2023qlora", "dettmers2022llmint8", "dettmers2022optimizers",
            "kalajdzievski2023rslora", "peft", "bitsandbytes"]


def test_published_url_follows_the_repository():
    assert site.published_url("https://github.com/qlora-tutorial/qlora-tutorial") == \
        "https://qlora-tutorial.github.io/qlora-tutorial/"
    assert site.published_url("https://github.com/Someone/someone.github.io") == "https://someone.github.io/"
    with pytest.raises(ValueError, match="repository.url"):
        site.published_url("https://gitlab.com/a/b")


def test_readme_gives_the_published_url_from_config():
    section = site.readme_section(README, "## Published site")
    assert section, "README.md has no '## Published site' section"
    url = site.published_url()
    assert url in section, f"README's published site should be {url} (from _config.yml's repository.url)"
    others = set(re.findall(r"https://[\w.-]+\.github\.io/[\w./-]*", README)) - {url}
    assert all(o.startswith(url) for o in others), f"README names other site addresses: {others}"


def test_readme_lists_every_chapter_with_its_colab_badge():
    section = site.readme_section(README, site.README_CHAPTERS)
    assert section is not None, f"README.md has no '{site.README_CHAPTERS}' section"
    assert section.strip() == site.readme_chapters().strip(), (
        "README's chapter list is not the table of contents: run `python3 tools/book_site.py readme`")
    for page in NOTEBOOKS:
        assert f"]({site.colab_url(page)})" in section


@pytest.mark.parametrize("page", NOTEBOOKS, ids=lambda p: p.docname)
def test_every_plot_has_a_caption(page):
    """A plot on the site is a numbered figure with a caption, set in its cell's metadata."""
    cells = json.loads(page.source.read_text())["cells"]
    for i, cell in enumerate(cells):
        images = [o for o in cell.get("outputs", []) if {"image/png", "image/svg+xml"} & set(o.get("data", {}))]
        if not images:
            continue
        figure = cell.get("metadata", {}).get("mystnb", {}).get("figure", {})
        assert str(figure.get("caption", "")).strip(), (
            f"{page.source.name}, cell {i}: a plot without a caption. Set the cell's metadata to "
            '{"mystnb": {"figure": {"caption": "What it shows.", "name": "fig-<chapter>-<what>"}}}')
        assert len(images) == 1, f"{page.source.name}, cell {i}: one figure per cell, so each has its caption"


def test_bibliography_has_the_keys_chapters_cite():
    bib = (ROOT / "book" / "references.bib").read_text()
    keys = re.findall(r"^@\w+\{([^,\s]+),", bib, re.M)
    assert len(keys) == len(set(keys)), "duplicate keys in book/references.bib"
    missing = [k for k in BIB_KEYS if k not in keys]
    assert not missing, f"book/references.bib lacks {missing}"


def test_one_bibliography_page_lists_every_entry():
    """One `{bibliography}` with :all: (uncited entries without warnings, no duplicate citations)."""
    sources = [p.source for p in site.pages()]
    with_bib = [s.name for s in sources if "{bibliography}" in s.read_text()]
    assert with_bib == ["references.md"], f"a bibliography directive outside references.md: {with_bib}"
    assert ":all:" in (ROOT / "book" / "references.md").read_text()


def test_labels_are_author_year_and_unique():
    from pybtex.database import parse_file

    site._register_bibtex_style()
    from pybtex.plugin import find_plugin

    entries = parse_file(ROOT / "book" / "references.bib").entries
    style = find_plugin("pybtex.style.formatting", site.BIBTEX_STYLE)()
    labels = [e.label for e in style.format_entries(entries.values())]
    assert len(labels) == len(set(labels)), labels
    assert "Hu et al., 2022" in labels and "Kalajdzievski, 2023" in labels
    assert {"Dettmers et al., 2022a", "Dettmers et al., 2022b"} <= set(labels)


def test_numbered_parts():
    import yaml

    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    for part in toc["parts"]:
        files = [c["file"] for c in part.get("chapters", [])]
        if any((ROOT / f"{f}.ipynb").exists() for f in files):
            assert part.get("numbered") is True, f"part {part['caption']!r} holds chapters: add `numbered: true`"


def test_built_site_serves_its_own_assets(built_site):
    """No page of the built site loads a script, style or image from another host."""
    pattern = re.compile(r"<(?:script|img)\b[^>]*\bsrc=\"((?:https?:)?//[^\"]+)\"|"
                         r"<link\b[^>]*\brel=\"(?:stylesheet|preload|icon)\"[^>]*\bhref=\"((?:https?:)?//[^\"]+)\"")
    remote = {}
    for html in built_site.rglob("*.html"):
        found = [a or b for a, b in pattern.findall(html.read_text(errors="replace"))]
        if found:
            remote[str(html.relative_to(built_site))] = found
    assert not remote, f"pages load assets from other hosts: {remote}"
    mathjax = built_site / "_static" / site.MATHJAX_DIR.name / site.MATHJAX_ENTRY
    assert mathjax.exists(), f"{mathjax} is missing: the site's MathJax was not copied"
