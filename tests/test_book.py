"""The book: strict build from committed results, and every page rendered offline in headless Chromium."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# No network at all: every host resolves to nothing and every proxied request goes to a closed port.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=http://127.0.0.1:9",
                  "--virtual-time-budget=15000", "--dump-dom"]
ERROR_MARKERS = ["Javascript Error", "Error loading script", "Traceback (most recent call last)",
                 "Error in chart", "NameError", "Exception"]


@pytest.fixture(scope="module")
def built_book(tmp_path_factory) -> Path:
    """Run the default experiment from committed results and build the book strictly."""
    experiments = ("experiments/offline-llms.yaml", "experiments/zoo.yaml", "experiments/merging.yaml")
    run = subprocess.run([BIN / "mcl", "run", *experiments], cwd=REPO, capture_output=True, text=True)  # as make book
    assert run.returncode == 0, run.stderr[-3000:]
    assert not any(word in run.stdout for word in ("scored", "trained in", "fine-tuned", "merges in")), \
        "committed results must make training, scoring and merging unnecessary:\n" + run.stdout
    out = tmp_path_factory.mktemp("book")
    build = subprocess.run([BIN / "jupyter-book", "build", ".", "-W", "-n", "--keep-going", "--path-output",
                            str(out)], cwd=REPO, capture_output=True, text=True)
    assert build.returncode == 0, (build.stdout + build.stderr)[-5000:]
    assert "Executing notebook" not in build.stdout + build.stderr, "the book build must not execute stages"
    return out / "_build" / "html"


def _pages(html: Path) -> list[Path]:
    """Every content page of the built book (Sphinx's search and index pages excluded)."""
    return sorted(p for p in html.rglob("*.html") if p.name not in {"search.html", "genindex.html"}
                  and "_static" not in p.parts)


def test_book_has_every_chapter(built_book):
    """The table of contents' pages are all built, with glued numbers filled in."""
    names = {p.relative_to(built_book).as_posix() for p in _pages(built_book)}
    for page in ("index.html", "book/intro.html", "book/measuring.html", "book/coming.html", "book/data.html",
                 "book/architecture.html", "book/api.html", "book/glossary.html", "book/references.html",
                 "book/generated/offline-llms/oracle.html", "book/generated/offline-llms/laws.html",
                 "book/generated/offline-llms/status.html", "book/generated/zoo-laws/scaling.html",
                 "book/generated/zoo-laws/collaboration.html", "book/generated/zoo-laws/diversity.html",
                 "book/generated/zoo-laws/realizable.html", "book/generated/zoo-laws/status.html",
                 "book/generated/merging-laws/merge_operators.html", "book/generated/merging-laws/merging_law.html",
                 "book/generated/merging-laws/merging_ensembling.html", "book/generated/merging-laws/status.html"):
        assert page in names
    oracle = (built_book / "book/generated/offline-llms/oracle.html").read_text()
    assert re.search(r"reaches\s*<span[^>]*>\s*1\.\d{4}", oracle), "glued bits per byte missing"
    fitting = (built_book / "book/generated/offline-llms/laws.html").read_text()
    assert re.search(r"are fitted back to\s*<span[^>]*>.*?</span>\s*<span[^>]*>0\.3\d\d</span>", fitting), \
        "glued exponent missing"
    assert "score-" not in " ".join(names), "scoring notebooks are stages, not chapters"
    assert re.search(r"on the exponents|Chinchilla.s own training runs", fitting)
    assert re.search(r"this book.s fitter gives\s*<span[^>]*>.*?</span>\s*<span[^>]*>1\.\d{3}</span>", fitting), \
        "glued fit of Chinchilla's runs missing"
    collaboration = (built_book / "book/generated/zoo-laws/collaboration.html").read_text()
    assert re.search(r"reaches\s*<span[^>]*>\s*\d\.\d{4}", collaboration), "glued zoo bits per byte missing"
    assert len(re.findall(r"reproduced|contradicted|not resolved", collaboration)) >= 4, "verdicts missing"


def public_members(module_name: str) -> list[str]:
    """Functions and classes a module defines whose names do not start with an underscore."""
    module = importlib.import_module(module_name)
    return sorted(f"{module_name}.{name}" for name in dir(module) if not name.startswith("_")
                  and (inspect.isfunction(obj := getattr(module, name)) or inspect.isclass(obj))
                  and obj.__module__ == module_name)


def test_api_page_lists_every_public_function(built_book):
    """The API reference has an entry for every public function and class of every mcl_utils module."""
    import mcl_utils

    api = (built_book / "book" / "api.html").read_text()
    modules = [f"mcl_utils.{m.name}" for m in pkgutil.iter_modules(mcl_utils.__path__)]
    expected = [name for m in modules for name in public_members(m)]
    assert len(expected) > 50
    missing = [name for name in expected if f'id="{name}"' not in api]
    assert not missing, f"the API page lacks {missing}; fix: add `automodule` sections to book/api.md"


def test_citations_and_glossary_links(built_book):
    """Chapters link their citations to the bibliography and their terms to the glossary."""
    intro = (built_book / "book" / "intro.html").read_text()
    assert re.search(r'href="references.html#[^"]+"[^>]*>Lu <em>et al.</em>', intro), "seed paper A not cited"
    assert re.search(r'href="references.html#[^"]+"[^>]*>Wang <em>et al.</em>', intro), "seed paper B not cited"
    references = (built_book / "book" / "references.html").read_text()
    for author in ("Hoffmann", "Besiroglu", "Francis", "Gao", "Wolf", "Chowdhery"):
        assert author in references
    fitting = (built_book / "book/generated/offline-llms/laws.html").read_text()
    assert "../../references.html#" in fitting and "../../glossary.html#term-Huber-loss" in fitting


def test_no_page_loads_anything_remote(built_book):
    """No page loads a script, style, image or frame from the network (links a reader clicks may)."""
    for page in _pages(built_book):
        loaded = re.findall(r'<(?:script|link|img|iframe)\b[^>]*\b(?:src|href)="(https?:)?//[^"]*"', page.read_text())
        assert not loaded, f"{page.relative_to(built_book)} loads remote resources"


@pytest.fixture(scope="module")
def chromium() -> str:
    """The headless browser (installed by `make browser`)."""
    path = shutil.which("chromium")
    assert path, "chromium is missing; fix: run `make browser` (Debian package chromium)"
    return path


def test_every_page_renders_offline(built_book, chromium, tmp_path):
    """Each page, opened with all network blocked, shows no error and draws every chart it holds."""
    n_charts_total = 0
    for page in _pages(built_book):
        source = page.read_text()
        n_charts = source.count("maybeLoadScript(\"vega\"")
        dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                              page.as_uri()], capture_output=True, text=True, timeout=120).stdout
        assert "</html>" in dom, f"{page.name}: chromium returned no page"
        visible = re.sub(r"<script.*?</script>|<style.*?</style>", "", dom, flags=re.S)
        for marker in ERROR_MARKERS:
            assert marker not in visible, f"{page.relative_to(built_book)} shows {marker!r}"
        drawn = len(re.findall(r'<(?:canvas|svg)[^>]*class="marks"', dom))
        assert drawn == n_charts, f"{page.relative_to(built_book)}: {drawn} of {n_charts} charts drawn"
        n_charts_total += n_charts
        if 'class="math' in source:
            assert "mjx-container" in dom, f"{page.relative_to(built_book)}: MathJax did not typeset"
    assert n_charts_total >= 4
