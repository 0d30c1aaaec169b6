"""The book as a reference work, checked without building it: links, API coverage, citations, data hashes."""

from __future__ import annotations

import hashlib
import json
import pkgutil
import re
from pathlib import Path

import pytest
from pybtex.database import parse_file

import mcl_utils

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`([^`]+)`")


def library_modules() -> list[str]:
    """Every module of mcl_utils, as found on disk (so a module added later is included)."""
    return sorted(m.name for m in pkgutil.iter_modules(mcl_utils.__path__))


def local_links(path: Path) -> list[str]:
    """Targets of the markdown links in a file that point into the repository (not URLs or anchors)."""
    return [t.split("#")[0] for t in LINK.findall(path.read_text())
            if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("name", ["README.md", "CONTRIBUTING.md"])
def test_links_point_to_files_that_exist(name):
    """Every relative link of the README and CONTRIBUTING resolves to a file or folder in the repository."""
    links = local_links(REPO / name)
    assert links, f"{name} links to nothing in the repository"
    missing = [t for t in links if not (REPO / name).parent.joinpath(t).exists()]
    assert not missing, f"{name} links to missing files: {missing}"


def test_readme_has_no_dangling_design_reference():
    """The README points at the architecture page, not at a DESIGN.md the repository does not hold."""
    text = (REPO / "README.md").read_text()
    assert "book/architecture.md" in local_links(REPO / "README.md")
    assert "DESIGN.md" not in text or (REPO / "DESIGN.md").exists()


def test_api_page_documents_every_module():
    """book/api.md has an automodule directive for every module of mcl_utils, and none for a missing one."""
    documented = re.findall(r"automodule:: mcl_utils\.(\w+)", (REPO / "book" / "api.md").read_text())
    assert sorted(documented) == library_modules()


def _sources() -> dict[str, str]:
    """Text of every prose page and source notebook (markdown cells) of the book."""
    texts = {str(p.relative_to(REPO)): p.read_text() for p in (REPO / "book").glob("*.md")}
    for nb in (REPO / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text())["cells"]
        texts[str(nb.relative_to(REPO))] = "\n".join("".join(c["source"]) for c in cells
                                                     if c["cell_type"] == "markdown")
    return texts


def test_every_citation_is_in_the_bibliography():
    """Each key cited in the book exists in references.bib (the strict build checks the same, slowly)."""
    keys = set(parse_file(str(REPO / "references.bib")).entries)
    cited = {k.strip() for text in _sources().values() for group in CITE.findall(text) for k in group.split(",")}
    assert cited, "no citations found"
    assert not cited - keys, f"cited but not in references.bib: {sorted(cited - keys)}"


def test_preface_cites_both_seed_papers():
    """The preface cites the two papers the book reproduces."""
    cited = CITE.findall((REPO / "book" / "intro.md").read_text())
    assert {"lu2025multimodel", "wang2025merging"} <= {k.strip() for g in cited for k in g.split(",")}


def test_published_chinchilla_runs_match_their_recorded_hash():
    """Epoch AI's digitized runs are the file the README's sha256 names, unchanged."""
    readme = (REPO / "data" / "published" / "README.md").read_text()
    recorded = re.search(r"sha256\s*`([0-9a-f]{64})`", readme).group(1)
    data = (REPO / "data" / "published" / "chinchilla_svg_extracted_data.csv").read_bytes()
    assert hashlib.sha256(data).hexdigest() == recorded
    assert data.count(b"\n") == 246  # header + 245 runs
