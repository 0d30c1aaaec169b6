"""Loss tables on disk: schema, atomic writes with provenance, cache keys, and the aligned loss matrix."""

from __future__ import annotations

import dataclasses

import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from mcl_utils.errors import UserError

LN2 = math.log(2.0)
PROVENANCE_KEY = b"mcl.provenance"
CONTENT_KEY = "content_sha256"  # provenance field: sha256 of the table's values, checked on every read
LOSS_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("nll_nats", pa.float64()),
    ("n_tokens", pa.int32()),
    ("n_bytes", pa.int32()),
])


@contextlib.contextmanager
def atomic_path(path: Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of `path` for the block to write (a file, or a folder when `folder`); it
    replaces `path` only if the block succeeds. Temporaries of dead writers are removed first, those of live
    ones are left alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if not _pid_alive(stale.name.rsplit("-", 1)[-1]):
            _remove(stale)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if folder:
            _remove(path)  # os.replace cannot rename onto a folder that has files
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    """Delete a file or a folder tree, if present."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _pid_alive(pid: str) -> bool:
    """Whether a process with this id (a temporary file's suffix) is running on this machine."""
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def cache_root() -> Path:
    """Where caches and locks are kept: $MCL_CACHE, else ~/.cache/mcl."""
    return Path(os.environ.get("MCL_CACHE", Path.home() / ".cache" / "mcl"))


def file_lock(path: Path) -> FileLock:
    """An inter-process lock for one cache entry (kept under the cache root, so the entry's own folder
    need not exist yet and is never littered)."""
    digest = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:32]
    lock_dir = cache_root() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    return FileLock(lock_dir / f"{digest}.lock")


def _nearest_existing(path: Path) -> tuple[Path, bool]:
    """The path or its nearest existing parent, and whether it is a folder (one stat each: another process
    may remove a folder it has just created between two)."""
    for candidate in (path, *path.parents):
        try:
            return candidate, stat.S_ISDIR(candidate.stat().st_mode)
        except (FileNotFoundError, NotADirectoryError):  # missing, or under a file
            continue
    raise UserError(f"no part of {path} exists; fix: pass a folder path")


def _write_probe(path: Path, attempts: int = 5) -> None:
    """Create the folder, write a probe file in it and remove it; retried while another process's check
    removes the folder it has just created (two workers checking one new folder at once)."""
    for attempt in range(attempts):
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".mcl-write-test-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
            return
        except (FileExistsError, FileNotFoundError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.01 * (attempt + 1))


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse a folder that cannot be created or written, before any work; leave nothing behind."""
    path = Path(path)
    existing, is_dir = _nearest_existing(path)
    if not is_dir:
        raise UserError(f"{what} {path} is {'a file' if existing == path else f'under the file {existing}'}; "
                        "fix: pass a folder path")
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        _write_probe(path)
    except OSError as exc:
        raise UserError(f"{what} {path} is not writable ({exc.strerror or exc}); fix: pass a folder you can "
                        "write to") from None
    finally:
        for p in created:  # innermost first
            with contextlib.suppress(OSError):
                p.rmdir()


def canonical_json(obj: object) -> str:
    """JSON with sorted keys and no whitespace, so equal objects hash equally."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def cache_key(model_identity: dict, corpus_fingerprint: str, settings: dict, scorer_version: str) -> str:
    """sha256 of everything a loss table depends on (DESIGN section 4)."""
    payload = {"model": model_identity, "corpus": corpus_fingerprint, "settings": settings,
               "scorer": scorer_version}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def strict_json(obj: object) -> str:
    """Indented JSON with sorted keys; NaN and infinities (which JSON lacks) are written as null."""
    def clean(value: object) -> object:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return json.dumps(clean(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def slug(name: str) -> str:
    """A file-name-safe version of a model name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")


def loss_table_path(out_dir: Path, model_name: str, key: str) -> Path:
    """Where the loss table of a model under a cache key lives: <out_dir>/<model>--<key16>.parquet."""
    return Path(out_dir) / f"{slug(model_name)}--{key[:16]}.parquet"


def bits_per_byte(nll_nats: np.ndarray | float, n_bytes: np.ndarray | float) -> np.ndarray | float:
    """Per-sample bits per byte: nll / (n_bytes * ln 2)."""
    return np.asarray(nll_nats) / (np.asarray(n_bytes) * LN2)


def corpus_bpb(nll_nats: np.ndarray, n_bytes: np.ndarray) -> float:
    """Byte-weighted corpus bits per byte: sum nll / (ln 2 * sum bytes)."""
    return float(np.sum(nll_nats) / (LN2 * np.sum(n_bytes)))


def check_losses(nll_nats: np.ndarray, sample_ids: Sequence[str], source: str) -> None:
    """Refuse NaN, infinite or negative losses, naming the first bad sample."""
    bad = ~np.isfinite(nll_nats) | (nll_nats < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise UserError(f"{source} has {int(bad.sum())} invalid losses (first: sample {sample_ids[i]!r} "
                        f"= {nll_nats[i]}); fix: rescore in float32 (--dtype float32) or drop the model")


def table_sha256(table: pd.DataFrame) -> str:
    """sha256 of a loss table's values: its columns in order, as fixed-width bytes (ids NUL-separated)."""
    h = hashlib.sha256()
    h.update("\0".join(table["sample_id"].astype(str)).encode("utf-8") + b"\0")
    h.update(np.ascontiguousarray(table["nll_nats"].to_numpy(), dtype="<f8").tobytes())
    for column in ("n_tokens", "n_bytes"):
        h.update(np.ascontiguousarray(table[column].to_numpy(), dtype="<i4").tobytes())
    return h.hexdigest()


def write_loss_table(path: Path, table: pd.DataFrame, provenance: dict) -> None:
    """Validate and atomically write a loss table, with its provenance and content hash in the metadata."""
    check_losses(table["nll_nats"].to_numpy(), table["sample_id"].tolist(), f"loss table {path}")
    arrow = pa.Table.from_pandas(table[LOSS_SCHEMA.names], schema=LOSS_SCHEMA, preserve_index=False)
    provenance = {**provenance, CONTENT_KEY: table_sha256(arrow.to_pandas())}
    arrow = arrow.replace_schema_metadata({PROVENANCE_KEY: canonical_json(provenance).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(arrow, tmp)


def record_content_hash(path: Path) -> None:
    """Add the content hash to a valid loss table written before tables carried one (a one-time upgrade of
    trusted, committed tables; anything else is simply rescored)."""
    table = pq.read_table(path)
    provenance = json.loads(table.schema.metadata[PROVENANCE_KEY])
    frame = table.to_pandas()
    check_losses(frame["nll_nats"].to_numpy(), frame["sample_id"].tolist(), f"loss table {path}")
    write_loss_table(path, frame, {k: v for k, v in provenance.items() if k != CONTENT_KEY})


def _damaged(path: Path, exc: Exception) -> UserError:
    """The one-line error for a loss table that cannot be read back."""
    return UserError(f"loss table {path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0][:150]}); "
                     "fix: delete it and rerun `mcl score` (or `mcl run`), which rescores it")


def read_provenance(path: Path) -> dict:
    """The provenance stored in a loss table, without reading its rows."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as exc:
        raise _damaged(path, exc) from None
    if PROVENANCE_KEY not in meta:
        raise UserError(f"{path} is not an mcl loss table (no provenance); fix: rescore it with `mcl score`")
    return json.loads(meta[PROVENANCE_KEY])


def read_loss_table(path: Path) -> tuple[pd.DataFrame, dict]:
    """A loss table and its provenance, refused unless its values match its recorded content hash."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"loss table {path} does not exist; fix: run `mcl score` for that model first")
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise _damaged(path, exc) from None
    if table.schema.remove_metadata() != LOSS_SCHEMA:
        raise UserError(f"{path} does not have the loss-table columns {LOSS_SCHEMA.names}; "
                        "fix: rescore it with `mcl score`")
    df, provenance = table.to_pandas(), read_provenance(path)
    if provenance.get(CONTENT_KEY) != table_sha256(df):
        what = "has no content hash" if CONTENT_KEY not in provenance else "was changed after it was written"
        raise UserError(f"loss table {path} {what} (its values cannot be trusted); fix: delete it and rerun "
                        "`mcl score` (or `mcl run`), which rescores it")
    return df, provenance


def is_intact(path: Path) -> bool:
    """True when a loss table exists, reads, and matches its content hash (the cache check)."""
    try:
        read_loss_table(path)
    except UserError:
        return False
    return True


@dataclass(frozen=True)
class LossMatrix:
    """Losses of several models on the same samples, aligned: nll_nats[sample, model]."""

    sample_ids: np.ndarray  # (n_samples,)
    models: list[str]  # (n_models,)
    nll_nats: np.ndarray  # (n_samples, n_models) float64
    n_bytes: np.ndarray  # (n_samples,) int64
    n_tokens: np.ndarray  # (n_samples, n_models) int64
    provenance: list[dict]

    def bpb(self) -> np.ndarray:
        """Per-sample bits per byte, (n_samples, n_models)."""
        return self.nll_nats / (self.n_bytes[:, None] * LN2)

    def corpus_bpb(self) -> pd.Series:
        """Byte-weighted bits per byte of each model."""
        return pd.Series(self.nll_nats.sum(0) / (LN2 * self.n_bytes.sum()), index=self.models)

    def cache_keys(self) -> dict[str, str]:
        """Each model's loss-table cache key: the inputs that a results file built from this matrix names."""
        return {m: p["cache_key"] for m, p in zip(self.models, self.provenance)}

    def subset(self, columns: Sequence[int]) -> LossMatrix:
        """The same samples with only these models (column indices, in this order)."""
        columns = list(columns)
        return dataclasses.replace(self, models=[self.models[j] for j in columns], nll_nats=self.nll_nats[:, columns],
                                   n_tokens=self.n_tokens[:, columns],
                                   provenance=[self.provenance[j] for j in columns])


def load_matrix(paths: Sequence[Path]) -> LossMatrix:
    """Align loss tables on sample_id; refuse differing sample sets, corpora or invalid values."""
    if not paths:
        raise UserError("no loss tables given; fix: pass at least one loss table")
    tables = [read_loss_table(p) for p in paths]
    names = [prov["model"]["name"] for _, prov in tables]
    if len(set(names)) != len(names):
        raise UserError(f"model names repeat among the loss tables ({names}); fix: pass each model once")
    ref_df, ref_prov = tables[0]
    fp0 = ref_prov["corpus"]["fingerprint"]
    ids0 = ref_df["sample_id"].to_numpy()
    for (df, prov), name in zip(tables[1:], names[1:]):
        if prov["corpus"]["fingerprint"] != fp0:
            raise UserError(f"{names[0]} and {name} were scored on different corpora (fingerprints "
                            f"{fp0[:12]} vs {prov['corpus']['fingerprint'][:12]}); fix: rescore on one corpus")
        if set(df["sample_id"]) != set(ids0) or len(df) != len(ids0):
            raise UserError(f"{names[0]} has {len(ids0)} samples and {name} has {len(df)}, and their sample "
                            "ids differ; fix: rescore both on the same corpus")
    order = pd.Index(ids0)
    nll = np.empty((len(ids0), len(tables)))
    n_tok = np.empty((len(ids0), len(tables)), dtype=np.int64)
    for j, ((df, _), name) in enumerate(zip(tables, names)):
        df = df.set_index("sample_id").reindex(order)
        check_losses(df["nll_nats"].to_numpy(), list(order), f"loss table of {name}")
        if not np.array_equal(df["n_bytes"].to_numpy(), ref_df["n_bytes"].to_numpy()):
            raise UserError(f"{name} and {names[0]} disagree on sample byte counts; "
                            "fix: rescore both on the same corpus")
        nll[:, j] = df["nll_nats"].to_numpy()
        n_tok[:, j] = df["n_tokens"].to_numpy()
    return LossMatrix(sample_ids=ids0, models=names, nll_nats=nll,
                      n_bytes=ref_df["n_bytes"].to_numpy().astype(np.int64), n_tokens=n_tok,
                      provenance=[prov for _, prov in tables])
