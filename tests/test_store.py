"""Loss tables: atomic writes, provenance, cache keys and the aligned loss matrix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mcl_utils.errors import UserError
from mcl_utils.store import (atomic_path, cache_key, corpus_bpb, load_matrix, read_loss_table,
                             write_loss_table)


def _table(ids, nll, n_bytes=None):
    """A loss table frame."""
    n = len(ids)
    return pd.DataFrame({"sample_id": ids, "nll_nats": np.asarray(nll, float), "n_tokens": np.full(n, 5),
                         "n_bytes": n_bytes if n_bytes is not None else np.full(n, 10)})


def _write(path, name, ids, nll, fingerprint="fp", n_bytes=None):
    """Write a loss table with minimal provenance."""
    write_loss_table(path, _table(ids, nll, n_bytes),
                     {"model": {"name": name}, "corpus": {"fingerprint": fingerprint}})
    return path


def test_roundtrip_keeps_values_and_provenance(tmp_path):
    """What is written is read back exactly, provenance included."""
    path = _write(tmp_path / "a.parquet", "a", ["x", "y"], [1.5, 2.25])
    table, prov = read_loss_table(path)
    assert table["nll_nats"].tolist() == [1.5, 2.25] and prov["model"]["name"] == "a"


def test_failed_write_leaves_nothing(tmp_path):
    """An error inside an atomic write leaves neither the target nor a temporary file."""
    target = tmp_path / "t.parquet"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_removes_a_dead_writers_temporary_file_not_a_live_ones(tmp_path):
    """A killed writer's temporary file is cleaned up; one of a process still writing is left alone."""
    target = tmp_path / "t.parquet"
    dead, live = tmp_path / ".t.parquet.tmp-999999999", tmp_path / ".t.parquet.tmp-1"  # pid 1 always runs
    dead.write_bytes(b"x"), live.write_bytes(b"x")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "t.parquet"]


def test_atomic_folder_replaces_the_old_one_and_clears_a_dead_writers_folder(tmp_path):
    """A folder written atomically replaces the previous version whole; a killed writer's half-written
    folder is removed, and a failed write leaves the previous version in place."""
    target = tmp_path / "final"
    (tmp_path / ".final.tmp-999999999").mkdir()
    (tmp_path / ".final.tmp-999999999" / "half").write_text("x")
    for version in ("1", "2"):
        with atomic_path(target, folder=True) as tmp:
            tmp.mkdir()
            (tmp / f"weights-{version}").write_text(version)
    with pytest.raises(RuntimeError), atomic_path(target, folder=True) as tmp:
        tmp.mkdir()
        (tmp / "weights-3").write_text("3")
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["final"]
    assert [p.name for p in target.iterdir()] == ["weights-2"]


def test_invalid_losses_are_refused_before_writing(tmp_path):
    """NaN, infinite or negative losses never reach disk."""
    for bad in (np.nan, np.inf, -1.0):
        with pytest.raises(UserError, match="invalid losses.*'y'"):
            _write(tmp_path / "a.parquet", "a", ["x", "y"], [1.0, bad])
    assert list(tmp_path.iterdir()) == []


def test_cache_key_changes_with_every_input():
    """Model identity, corpus fingerprint, settings and scorer version each change the key."""
    base = ({"spec": "m", "sha256": "1"}, "fp", {"dtype": "float32"}, "1")
    keys = {cache_key(*base)}
    for i, other in enumerate([{"spec": "m", "sha256": "2"}, "fp2", {"dtype": "bfloat16"}, "2"]):
        args = list(base)
        args[i] = other
        keys.add(cache_key(*args))
    assert len(keys) == 5 and cache_key(*base) == cache_key(*base)


def test_matrix_aligns_on_sample_id(tmp_path):
    """Tables in different row orders align on sample_id; corpus bpb is byte-weighted."""
    a = _write(tmp_path / "a.parquet", "a", ["x", "y"], [1.0, 4.0], n_bytes=[10, 30])
    b = _write(tmp_path / "b.parquet", "b", ["y", "x"], [2.0, 3.0], n_bytes=[30, 10])
    m = load_matrix([a, b])
    np.testing.assert_array_equal(m.nll_nats, [[1.0, 3.0], [4.0, 2.0]])
    assert m.corpus_bpb()["a"] == pytest.approx(corpus_bpb(np.array([1.0, 4.0]), np.array([10, 30])))
    assert m.corpus_bpb()["a"] == pytest.approx(5.0 / (40 * np.log(2)))


@pytest.mark.parametrize("case,message", [
    ("ids", "their sample ids differ"),
    ("fingerprint", "different corpora"),
    ("bytes", "disagree on sample byte counts"),
    ("names", "names repeat"),
])
def test_matrix_refuses_mismatches(tmp_path, case, message):
    """Differing sample sets, corpora, byte counts or repeated names: a one-line error."""
    a = _write(tmp_path / "a.parquet", "a", ["x", "y"], [1.0, 2.0])
    b = _write(tmp_path / "b.parquet", "a" if case == "names" else "b",
               ["x", "z"] if case == "ids" else ["x", "y"], [1.0, 2.0],
               fingerprint="other" if case == "fingerprint" else "fp",
               n_bytes=[10, 11] if case == "bytes" else None)
    with pytest.raises(UserError, match=message):
        load_matrix([a, b])


def test_matrix_refuses_corrupted_values(tmp_path):
    """A table edited to hold NaN (or any other value) after writing is refused when loaded: its values no
    longer match the content hash recorded when it was written."""
    import pyarrow.parquet as pq

    for edited in ([1.0, float("nan")], [1.0, 2.5]):
        path = _write(tmp_path / "a.parquet", "a", ["x", "y"], [1.0, 2.0])
        table = pq.read_table(path)
        pq.write_table(table.set_column(1, "nll_nats", pa_array(edited)), path)
        with pytest.raises(UserError, match="was changed after it was written.*fix:"):
            load_matrix([path])


def pa_array(values):
    """A float64 arrow array."""
    import pyarrow as pa

    return pa.array(values, type=pa.float64())
