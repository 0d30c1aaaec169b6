"""Rebuild data/code/passages.parquet from the Python source files of the wheel networkx-3.4.2.

Usage: python scripts/build_code.py             (needs `pip`; the wheel's sha256 is checked)

networkx is pure Python under the 3-clause BSD licence (its LICENSE.txt is kept in data/code/). Every
.py source file of the wheel is one document (tests included; empty files dropped); documents are split
80/10/10 into train / validation / test, and cut into passages of whole top-level blocks.
"""

from __future__ import annotations

import tempfile
import zipfile
from pathlib import Path

from fetch import pypi_wheel

from mcl_utils.corpus import DOMAINS, build_domain, table_fingerprint
from mcl_utils.store import atomic_path

WHEEL = "networkx==3.4.2"
WHEEL_SHA256 = "df5d4365b724cf81b8c6a7312509d0c22386097011ad1abe274afd5e9d3bbc5f"
LICENSE_MEMBER = "networkx-3.4.2.dist-info/LICENSE.txt"


def main() -> None:
    """Download, verify, read the source files and write the passages and the licence atomically."""
    out = DOMAINS["code"].parquet
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(pypi_wheel(WHEEL, WHEEL_SHA256, Path(tmp))) as wheel:
            sources = {name: wheel.read(name).decode("utf-8") for name in sorted(wheel.namelist())
                       if name.endswith(".py")}
            licence = wheel.read(LICENSE_MEMBER).decode("utf-8")
    sources = {name: text for name, text in sources.items() if text.strip()}
    df = build_domain("code", sources, {name: {"package": name.split("/")[1] if name.count("/") > 1 else "networkx"}
                                        for name in sources})
    with atomic_path(out) as tmp_path:
        df.to_parquet(tmp_path, index=False, compression="zstd", compression_level=19)
    with atomic_path(out.parent / "LICENSE.txt") as tmp_path:
        tmp_path.write_text(licence, encoding="utf-8")
    print(f"wrote {len(df)} passages of {len(sources)} source files to {out}; "
          f"{df.groupby('split').source_file.nunique().to_dict()} files per split; "
          f"fingerprint {table_fingerprint(df)}")


if __name__ == "__main__":
    main()
