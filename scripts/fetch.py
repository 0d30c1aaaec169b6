"""Fetch a package archive from its registry's ordinary client and refuse it unless its sha256 matches."""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
from pathlib import Path


def check_sha256(path: Path, expected: str) -> None:
    """Refuse a downloaded archive whose sha256 differs from the pinned one."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise SystemExit(f"{path.name} has sha256 {digest}, expected {expected}; refusing it")


def npm_package(spec: str, sha256: str, workdir: Path) -> Path:
    """`npm pack` an npm package into workdir, verify the archive and unpack it; returns package/."""
    subprocess.run(["npm", "pack", spec, "--silent"], cwd=workdir, check=True, stdout=subprocess.DEVNULL)
    (tgz,) = workdir.glob("*.tgz")
    check_sha256(tgz, sha256)
    with tarfile.open(tgz) as archive:
        archive.extractall(workdir, filter="data")
    return workdir / "package"


def pypi_wheel(spec: str, sha256: str, workdir: Path) -> Path:
    """`pip download --no-deps` one pinned wheel into workdir and verify it; returns the wheel's path."""
    subprocess.run(["pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(workdir), spec],
                   check=True)
    (wheel,) = workdir.glob("*.whl")
    check_sha256(wheel, sha256)
    return wheel
