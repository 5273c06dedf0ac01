"""The built site in a real browser (headless Chromium), page by page, as a reader uses it.

Every page of `_toc.yml` (never a fixed list): it loads with no console error and no request to
another host, its images have a size, its math is typeset by the site's own MathJax, its Colab
button opens its own notebook, the repository and issue buttons are there, and next/previous
reach the neighbouring pages. Then search, the numbered table of contents, and screenshots of the
landing page and a chapter in test-artifacts/site/.
"""
from __future__ import annotations

import re

import pytest
import yaml

from tools import book_site as site

PAGES = site.pages()
REPO_URL = site.config()["repository"]["url"]
TOC = yaml.safe_load((site.ROOT / "_toc.yml").read_text())

# JavaScript run in the page. MathJax 3 exposes startup.promise, which settles when the first
# typesetting pass is over; window.MathJax is only the config object until MathJax has loaded.
WAIT_FOR_MATH = """async () => {
    if (!document.querySelector('script[src*="mathjax/"]')) return 'no MathJax on this page';
    const deadline = Date.now() + 10000;
    while (!(window.MathJax && window.MathJax.startup && window.MathJax.startup.promise)) {
        if (Date.now() > deadline) return false;
        await new Promise(r => setTimeout(r, 50));
    }
    await window.MathJax.startup.promise;
    return 'typeset';
}"""
IMAGES = """async () => {
    const imgs = Array.from(document.images);
    await Promise.all(imgs.map(i => { i.loading = 'eager'; return i.decode().catch(() => null); }));
    return imgs.map(i => ({src: i.getAttribute('src'), w: i.naturalWidth, h: i.naturalHeight}));
}"""
# The article's text outside code, outputs and typeset math: where untypeset TeX would show.
PROSE = """() => {
    const article = document.querySelector('article').cloneNode(true);
    article.querySelectorAll('pre, code, mjx-container, .math, .cell_output, script, style')
           .forEach(e => e.remove());
    return article.innerText;
}"""
MATH = """() => ({
    math: document.querySelectorAll('article .math').length,
    typeset: document.querySelectorAll('article .math mjx-container, article mjx-container').length,
    untypeset: Array.from(document.querySelectorAll('article .math'))
                    .filter(e => !e.querySelector('mjx-container')).map(e => e.textContent.slice(0, 60)),
    errors: Array.from(document.querySelectorAll('mjx-merror'))
                 .map(e => e.getAttribute('data-mjx-error') || e.textContent),
})"""


def source_has_math(page: site.Page) -> bool:
    """Whether the page's markdown holds $...$ or $$...$$ math (which the site must typeset)."""
    text = re.sub(r"```.*?```|`[^`\n]*`", "", page.markdown, flags=re.S)  # code is not math
    return re.search(r"\$[^$\s][^$]*?\$", text) is not None


def open_page(reader, page: site.Page) -> str:
    reader.page.goto(reader.url_of(page), wait_until="load")
    assert reader.page.wait_for_selector("article h1"), f"{page.html}: no title"
    state = reader.page.evaluate(WAIT_FOR_MATH)
    assert state, f"{page.html}: MathJax never started (the site's _static/mathjax missing?)"
    return state


@pytest.mark.parametrize("index", range(len(PAGES)), ids=[p.docname for p in PAGES])
def test_page(reader, index):
    page = PAGES[index]
    tab = reader.page
    mathjax = open_page(reader, page)

    # The page is the one the table of contents promises, with its number.
    assert tab.locator("article h1").first.inner_text().strip().rstrip("#").strip() == page.shown_title

    # Images: every one loaded, with a real size (plots, the Colab logo, ...).
    broken = [img for img in tab.evaluate(IMAGES) if not (img["w"] > 0 and img["h"] > 0)]
    assert not broken, f"{page.html}: images with no size (not loaded): {broken}"

    # Plots are figures with a caption (cell metadata mystnb.figure.caption).
    bare = tab.evaluate("""() => Array.from(document.querySelectorAll('article .cell_output img'))
        .filter(i => !(i.closest('figure') && i.closest('figure').querySelector('figcaption')))
        .map(i => i.getAttribute('src'))""")
    assert not bare, f"{page.html}: plots without a caption: {bare}"

    # Math: typeset by MathJax, no TeX errors, no raw delimiters left in the prose.
    math = tab.evaluate(MATH)
    assert not math["untypeset"], f"{page.html}: math not typeset: {math['untypeset'][:3]}"
    assert not math["errors"], f"{page.html}: TeX errors: {math['errors'][:3]}"
    if math["math"]:
        assert mathjax == "typeset", f"{page.html} has math but does not load the site's MathJax"
    if source_has_math(page):
        assert math["typeset"] > 0, f"{page.html}: its source has $math$ but nothing was typeset"
    prose = tab.evaluate(PROSE)
    for raw in ("$$", "\\(", "\\[", "\\begin{"):
        assert raw not in prose, f"{page.html}: raw {raw!r} in the text: math that was not rendered"
    leftover = re.findall(r"\$[^$\s][^$\n]{0,80}?\$", prose)
    assert not leftover, f"{page.html}: $...$ not rendered: {leftover[:3]}"

    # Launch button: a notebook opens in Colab from this repository, at its own path.
    colab = [a.get_attribute("href") for a in tab.locator("a[href*='colab.research.google.com']").all()]
    if page.is_notebook:
        assert colab == [site.colab_url(page)], f"{page.html}: Colab links {colab}"
        tab.locator("button[aria-label='Launch interactive content']").click()
        assert tab.locator("a[href*='colab.research.google.com']").first.is_visible()
        tab.keyboard.press("Escape")
    else:
        assert colab == [], f"{page.html} is not a notebook, yet links to Colab: {colab}"

    # Repository and issue buttons.
    assert tab.locator(f"a[href='{REPO_URL}']").count() >= 1, f"{page.html}: no repository button"
    assert tab.locator(f"a[href^='{REPO_URL}/issues/new']").count() >= 1, f"{page.html}: no issue button"

    # Next and previous reach the neighbouring pages: "next" leads to page i+1, whose "previous"
    # leads back here (so over the run, every next and every previous link is followed once).
    if index + 1 < len(PAGES):
        tab.locator("a.right-next").click()
        tab.wait_for_url(reader.url_of(PAGES[index + 1]))
        tab.locator("a.left-prev").click()
        tab.wait_for_url(reader.url_of(page))
    else:
        assert tab.locator("a.right-next").count() == 0, f"{page.html} is last but has a next link"
    if index == 0:
        assert tab.locator("a.left-prev").count() == 0, f"{page.html} is first but has a previous link"

    assert not reader.errors, f"{page.html}: " + "\n".join(reader.errors)


def test_landing_page_is_the_root_with_a_numbered_toc_in_parts(reader, artifacts):
    """index.html leads to the root page; the sidebar shows the parts and numbered chapters."""
    tab = reader.page
    tab.goto(reader.base_url, wait_until="load")
    tab.wait_for_url(reader.url_of(PAGES[0]))
    tab.evaluate(WAIT_FOR_MATH)
    tab.screenshot(path=artifacts / "landing.png")

    captions = [c.strip() for c in tab.locator("nav.bd-docs-nav .caption-text").all_inner_texts()]
    assert captions == [part["caption"] for part in TOC["parts"]]
    links = [t.strip() for t in tab.locator("nav.bd-docs-nav a.reference").all_inner_texts()]
    assert links == [page.shown_title for page in PAGES]
    assert not reader.errors, "\n".join(reader.errors)


def chapter_to_show() -> site.Page:
    """The first chapter with a plot (else the first chapter): the screenshot shows it."""
    chapters = [p for p in PAGES if p.is_notebook]
    assert chapters, "_toc.yml lists no notebook chapter"
    for page in chapters:
        if '"image/png"' in page.source.read_text():
            return page
    return chapters[0]


def test_chapter_screenshot(reader, artifacts):
    page = chapter_to_show()
    open_page(reader, page)
    reader.page.screenshot(path=artifacts / "chapter.png")
    figure = reader.page.locator("article figure").first
    if figure.count():
        figure.scroll_into_view_if_needed()
        figure.screenshot(path=artifacts / "chapter-figure.png")
    assert not reader.errors, "\n".join(reader.errors)


def search_word(page: site.Page) -> str:
    """A word from the chapter's prose (not its title): the longest of its first paragraph."""
    paragraphs = [p for p in re.split(r"\n\s*\n", page.markdown) if p.strip() and not p.lstrip().startswith("#")]
    assert paragraphs, f"{page.source.name}: no prose to search for"
    prose = re.sub(r"`[^`]*`|\$[^$]*\$|\([^)]*\)", " ", paragraphs[0])  # no code, math or links
    words = re.findall(r"\b[A-Za-z]{6,}\b", prose)
    assert words, f"{page.source.name}: no word to search for in {paragraphs[0]!r}"
    return max(words, key=len).lower()


def test_search_finds_a_word_from_a_chapter(reader, artifacts):
    page = chapter_to_show()
    word = search_word(page)
    tab = reader.page
    open_page(reader, PAGES[0])
    tab.locator("button.search-button-field").first.click()  # the sidebar's "Search this book..."
    box = tab.locator("input[name='q']:visible").first
    box.fill(word)
    box.press("Enter")
    tab.wait_for_url(re.compile(r"search\.html\?q="))
    hits = tab.locator("#search-results ul.search li a")
    hits.first.wait_for()
    hrefs = [h.get_attribute("href") for h in hits.all()]
    tab.screenshot(path=artifacts / "search.png")
    assert any(h.split("?")[0].endswith(page.html) for h in hrefs), (
        f"searching {word!r} did not find {page.html}; results: {hrefs}")
    assert not reader.errors, "\n".join(reader.errors)
