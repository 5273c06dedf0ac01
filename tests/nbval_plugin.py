"""pytest plugin for ``pytest --nbval`` over the book (loaded with ``-p tests.nbval_plugin``).

stderr carries warnings and progress bars whose text depends on the machine, so it is not compared;
everything a chapter prints to stdout and every result it displays is.
"""


def pytest_collectstart(collector):
    if getattr(collector, "fspath", None) is not None and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("stderr", "text/html", "application/javascript", "application/vnd.jupyter.widget-view+json")
