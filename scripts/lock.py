"""Regenerate requirements/lock.txt (`make lock`): pip resolves pyproject.toml's dependencies with the
versions already locked as constraints (so only new or changed dependencies move), and each wheel pip
would install is recorded with its sha256, for `pip install --require-hashes -r requirements/lock.txt`.

Hashes are those of the files this machine's pip selects (Linux x86_64, CPython 3.11, the CPU build of
torch), which is every machine of this project and its CI."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements" / "lock.txt"
# Installed besides the project's extras: the build backend, so the project installs without build isolation.
EXTRA_REQUIREMENTS = ("setuptools>=69",)
HEADER = """\
# Exact versions and wheel sha256 of everything the project installs (with its dev, bench and ray extras);
# installed by `make setup` with: pip install --require-hashes -r requirements/lock.txt
# Regenerate with `make lock` (scripts/lock.py) after changing dependencies in pyproject.toml.
"""


def locked_pins(path: Path) -> list[str]:
    """The `name==version` lines of an existing lock (hashes, extras and comments dropped: constraints
    cannot carry extras)."""
    if not path.exists():
        return []
    pins = re.findall(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?(==[^\s\\;]+)", path.read_text(), flags=re.M)
    return [name + version for name, version in pins]


def resolve(pins: list[str]) -> list[dict]:
    """What pip would install into an empty environment, as its installation report's entries."""
    with tempfile.TemporaryDirectory() as tmp:
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(pins) + "\n")
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--report", str(report), "-c", str(constraints), f"{REPO}[dev,bench,ray]",
                        *EXTRA_REQUIREMENTS], check=True)
        return json.loads(report.read_text())["install"]


def wheel_sha256(entry: dict) -> str:
    """The sha256 of the file pip chose: from the index when it gave one, else hashed from a local file."""
    info = entry["download_info"]
    hashes = info.get("archive_info", {}).get("hashes", {})
    if "sha256" in hashes:
        return hashes["sha256"]
    url = urlparse(info["url"])
    if url.scheme != "file":
        raise SystemExit(f"no sha256 for {info['url']}; cannot lock it")
    return hashlib.sha256(Path(unquote(url.path)).read_bytes()).hexdigest()


def requested_extras(entries: list[dict]) -> dict[str, set[str]]:
    """Extras that the resolved packages ask of each other (e.g. typepy[datetime]): pip's hash-checking
    mode accepts such a requirement only when the lock pins it with its extras too."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    extras: dict[str, set[str]] = {}
    for entry in entries:
        for spec in entry["metadata"].get("requires_dist") or []:
            req = Requirement(spec)
            if req.extras and (req.marker is None or req.marker.evaluate({"extra": ""})):
                extras.setdefault(canonicalize_name(req.name), set()).update(req.extras)
    return extras


def main() -> None:
    """Resolve, hash, and write the lock file."""
    from packaging.utils import canonicalize_name

    lines = []
    entries = resolve(locked_pins(LOCK))
    extras = requested_extras(entries)
    for entry in entries:
        if "dir_info" in entry["download_info"]:  # the project itself, installed from the checkout
            continue
        meta = entry["metadata"]
        wanted = sorted(extras.get(canonicalize_name(meta["name"]), ()))
        names = [meta["name"]] + ([f"{meta['name']}[{','.join(wanted)}]"] if wanted else [])
        lines += [f"{name}=={meta['version']} \\\n    --hash=sha256:{wheel_sha256(entry)}" for name in names]
    LOCK.write_text(HEADER + "\n".join(sorted(lines, key=str.lower)) + "\n")
    print(f"wrote {LOCK} ({len(lines)} packages)")


if __name__ == "__main__":
    main()
