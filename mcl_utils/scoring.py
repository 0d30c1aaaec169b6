"""Per-sample scoring: summed NLL in nats for every sample, comparable across tokenizers, resumable."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

import mcl_utils
from mcl_utils.corpus import Corpus
from mcl_utils.errors import UserError
from mcl_utils.models import (LoadedModel, ModelSpec, card_dict, load_model, model_identity, parse_device, parse_spec,
                              resolve_device, resolve_dtype)
from mcl_utils.store import (atomic_path, cache_key, cache_root, canonical_json, check_losses, check_writable_dir,
                             file_lock, is_intact, loss_table_path, read_provenance, write_loss_table)

# Bump when a change to this module can change any number it writes: every cached table is then rescored.
SCORER_VERSION = "2"
# What the numbers depend on besides the model, the corpus and the dtype (goes into the cache key).
CONVENTIONS = {
    "tokenize": "raw text, no special tokens",
    "prefix": "one unscored BOS token, else EOS",
    "windows": "lm-eval rolling windows, context_len=1",
    "log_softmax": "float32",
    "reduction": "sum over scored tokens, float64",
}


@dataclass(frozen=True)
class ScoringSettings:
    """How to score: context cap, batch token budget, device and dtype ('auto' picks for the hardware),
    and the GPUs of one node each model is spread over (not in the cache key: placement changes no number)."""

    max_length: int | None = None  # tokens per window; None means the model's context length
    batch_tokens: int | None = None  # padded tokens per batch; None picks from the vocabulary size
    device: str = "auto"
    dtype: str = "auto"
    gpus_per_model: int | dict[str, int] = 1  # one count for all, or {model spec: count} (others get 1)

    def gpus_for(self, spec: str) -> int:
        """How many GPUs of one node the model `spec` is spread over (more than one: device_map="auto")."""
        if isinstance(self.gpus_per_model, dict):
            return self.gpus_per_model.get(spec, 1)
        return self.gpus_per_model

    def __post_init__(self) -> None:
        """Refuse impossible settings here, before any work (a window of < 1 token never ends)."""
        for name in ("max_length", "batch_tokens"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise UserError(f"{name} must be a positive number of tokens, got {value!r}; fix: give "
                                f"{name} as an integer >= 1, or leave it unset for the default")
        if not isinstance(self.device, str):
            raise UserError(f"device must be a string, got {self.device!r}; fix: use auto, cpu or cuda")
        parse_device(self.device)
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"unknown dtype {self.dtype!r}; fix: use auto, float32, bfloat16 or float16")
        counts = self.gpus_per_model.values() if isinstance(self.gpus_per_model, dict) else [self.gpus_per_model]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
            raise UserError(f"gpus_per_model must be a positive integer or a mapping from model spec to one, "
                            f"not {self.gpus_per_model!r}; fix: e.g. gpus_per_model: 2")


@dataclass(frozen=True)
class Row:
    """One forward pass's worth of one sample: tokens[:-1] go in, the last n_pred targets are scored."""

    sample: int
    window: int
    tokens: tuple[int, ...]
    n_pred: int


def rolling_windows(tokens: Sequence[int], prefix_id: int, max_length: int,
                    n_scored: int | None = None) -> list[tuple[list[int], int]]:
    """Split a token list into lm-eval's disjoint rolling windows: (window tokens incl. target, n_pred).

    With n_scored, only the first n_scored tokens are scored, each with exactly the context it has when
    the whole list is scored (the windows of the whole list, cut after token n_scored)."""
    if n_scored is not None:
        windows, start = [], 0
        for seq, n_pred in rolling_windows(tokens, prefix_id, max_length):
            cut = max(0, start + n_pred - n_scored)
            if cut < n_pred:
                windows.append((seq[:len(seq) - cut], n_pred - cut))
            start += n_pred
        return windows
    if max_length < 1:
        raise ValueError(f"max_length must be at least 1, got {max_length}")
    tokens = list(tokens)
    n = len(tokens)
    first = min(max_length, n)
    windows = [([prefix_id] + tokens[:first], first)]
    done = first
    while done < n:
        k = min(n - done, max_length)
        end = done + k
        windows.append((tokens[max(0, end - max_length - 1):end], k))
        done = end
    return windows


def make_rows(token_lists: Sequence[Sequence[int]], prefix_id: int, max_length: int,
              sample_ids: Sequence[str], model_name: str, n_scored: Sequence[int] | None = None) -> list[Row]:
    """All windows of all samples (of each sample's first n_scored tokens, if given); a sample without
    tokens is an error naming it."""
    rows = []
    for i, toks in enumerate(token_lists):
        if not toks or (n_scored is not None and n_scored[i] < 1):
            raise UserError(f"sample {sample_ids[i]!r} has no tokens under {model_name}; "
                            "fix: drop empty samples from the corpus")
        limit = None if n_scored is None else n_scored[i]
        for w, (seq, n_pred) in enumerate(rolling_windows(toks, prefix_id, max_length, limit)):
            rows.append(Row(i, w, tuple(seq), n_pred))
    return rows


def plan_batches(rows: Sequence[Row], batch_tokens: int) -> list[list[int]]:
    """Group row indices into batches sorted by length (longest first) under a padded-token budget."""
    order = sorted(range(len(rows)), key=lambda r: (-len(rows[r].tokens), rows[r].sample, rows[r].window))
    batches: list[list[int]] = []
    for r in order:
        if batches and (len(batches[-1]) + 1) * (len(rows[batches[-1][0]].tokens) - 1) <= batch_tokens:
            batches[-1].append(r)  # rows come longest first, so the batch's first row sets its width
        else:
            batches.append([r])
    return batches


def default_batch_tokens(vocab_size: int, device: torch.device, dtype: torch.dtype, full_logits: bool) -> int:
    """A padded-token budget. On a GPU, 65,536 tokens, fewer when the model's full logits must be held
    (within 8 GiB); on a CPU, small batches (at most 1,024 tokens, logits within 1 GiB) are fastest
    (benchmarks/scoring.py measures it)."""
    budget_bytes, cap = ((8 << 30), 65536) if device.type == "cuda" else ((1 << 30), 1024)
    if not full_logits and device.type == "cuda":
        return cap
    itemsize = torch.finfo(dtype).bits // 8
    return int(np.clip(budget_bytes // (vocab_size * itemsize), 256, cap))


# Float32 logits handled at once in the loss of one batch: on a CPU, chunks above glibc's 32 MiB mmap
# threshold cost page faults on every allocation; a GPU's caching allocator makes big chunks cheap.
LOSS_CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 2 << 30}
# Config fields of architectures that transform the head's output (or its input) beyond the base model:
# for these the scorer takes the model's own logits.
HEAD_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale",
                   "dim_model_base", "scale_emb")
_SPLIT_HEADS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def attention_kernels(device: torch.device) -> contextlib.AbstractContextManager:
    """On a GPU, scaled-dot-product attention by the flash or memory-efficient kernels, not cuDNN's: cuDNN
    builds a plan for every new batch shape, about 80 ms each on an H100, most of a first (cold) run."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of each target under its row of logits, with the log-softmax in float32
    (even for bf16 models): logsumexp minus the target's logit, without writing the log-softmax out."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets[:, None]).squeeze(-1)


@torch.inference_mode()
def split_head(loaded: LoadedModel) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """The model as (base model, output head) when its logits are exactly head(base(ids)), else None.

    Checked once per model: no known head transform in its config, the model on one device (a model
    spread by device_map returns only its own outputs to the input device), and a probe's logits agree."""
    model = loaded.model
    if model in _SPLIT_HEADS:
        return _SPLIT_HEADS[model]
    base, head = getattr(model, "base_model", None), model.get_output_embeddings()
    split = None
    configs = [model.config, getattr(model.config, "text_config", None)]
    one_device = len(set(getattr(model, "hf_device_map", {}).values())) <= 1
    if one_device and base is not None and base is not model and head is not None and not any(
            getattr(c, f, None) not in (None, 1, 1.0) for c in configs if c is not None for f in HEAD_TRANSFORMS):
        ids = torch.randint(0, loaded.card.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        with attention_kernels(loaded.device):
            ids = ids.to(loaded.device)
            full = model(input_ids=ids, use_cache=False).logits.float()
            mine = head(base(input_ids=ids, use_cache=False).last_hidden_state).float()
        if full.shape == mine.shape and (full - mine).abs().max() <= 1e-3 * max(1.0, full.abs().max().item()):
            split = (base, head)
    _SPLIT_HEADS[model] = split
    return split


def batch_ids(rows: Sequence[Row], device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    """Input ids of one right-padded batch on the device (through pinned memory on a GPU), and each row's
    length."""
    lengths = np.array([len(r.tokens) - 1 for r in rows])
    ids = torch.zeros((len(rows), int(lengths.max())), dtype=torch.long,
                      pin_memory=device.type == "cuda")
    ids_np = ids.numpy()
    for b, r in enumerate(rows):
        ids_np[b, : lengths[b]] = r.tokens[:-1]
    return ids.to(device, non_blocking=True), lengths


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on the device, through pinned memory and a non-blocking copy on a GPU."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@torch.inference_mode()
def forward(loaded: LoadedModel, rows: Sequence[Row]) -> tuple[torch.Tensor, np.ndarray]:
    """The model's own logits of one right-padded batch of rows, and each row's input length.

    No attention mask: padding is on the right, so causal attention never lets a real position see it."""
    ids, lengths = batch_ids(rows, loaded.device)
    with attention_kernels(loaded.device):
        return loaded.model(input_ids=ids, use_cache=False).logits, lengths


@dataclass
class Launched:
    """One batch whose token losses are on their way to the host (done once `event` has completed)."""

    token_nll: torch.Tensor  # float32 per scored token, in row order, on the host
    event: torch.cuda.Event | None
    counts: list[int]


@torch.inference_mode()
def launch_batch(loaded: LoadedModel, rows: Sequence[Row]) -> Launched:
    """Queue one batch: a forward pass, a float32 cross-entropy over the scored positions of all rows (in
    chunks; through the output head alone where the model splits), and a non-blocking copy to the host."""
    device = loaded.device
    split = split_head(loaded)
    counts = [r.n_pred for r in rows]
    ids, lengths = batch_ids(rows, device)
    row_of = np.repeat(np.arange(len(rows)), counts)
    position = np.concatenate([np.arange(n - k, n) for n, k in zip(lengths, counts)])
    targets = _to_device(np.concatenate([r.tokens[-r.n_pred:] for r in rows]), device)
    row_t, pos_t = _to_device(row_of, device), _to_device(position, device)
    with attention_kernels(device):
        if split is not None:
            base, head = split
            hidden = base(input_ids=ids, use_cache=False).last_hidden_state[row_t, pos_t]
            def scored_logits(sl: slice) -> torch.Tensor:
                return head(hidden[sl])
        else:
            logits = loaded.model(input_ids=ids, use_cache=False).logits
            def scored_logits(sl: slice) -> torch.Tensor:
                return logits[row_t[sl], pos_t[sl]]
    chunk = max(1, LOSS_CHUNK_BYTES.get(device.type, LOSS_CHUNK_BYTES["cpu"]) // (4 * loaded.card.vocab_size))
    nll = torch.cat([token_nll(scored_logits(slice(s, s + chunk)), targets[s:s + chunk])
                     for s in range(0, len(targets), chunk)])
    if device.type != "cuda":
        return Launched(nll, None, counts)
    host = torch.empty(nll.shape, dtype=nll.dtype, pin_memory=True)
    host.copy_(nll, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return Launched(host, event, counts)


def collect(parts: Sequence[Launched]) -> tuple[list[float], list[int]]:
    """Wait for launched passes; each row's token losses summed in float64, in token order."""
    nll: list[float] = []
    counts: list[int] = []
    for part in parts:
        if part.event is not None:
            part.event.synchronize()
        token_nll = part.token_nll.numpy().astype(np.float64)
        nll += np.add.reduceat(token_nll, np.cumsum([0] + part.counts[:-1])).tolist()
        counts += part.counts
    return nll, counts


def score_batch(loaded: LoadedModel, rows: Sequence[Row]) -> tuple[list[float], list[int]]:
    """Summed NLL (nats, float64) and scored-token count of each row of one batch, synchronously."""
    return collect([launch_batch(loaded, rows)])


def launch_fitting(loaded: LoadedModel, rows: Sequence[Row], max_rows: int | None = None
                   ) -> tuple[list[Launched], int | None]:
    """launch_batch in passes of at most max_rows rows, halving them on a GPU out-of-memory error; also
    return the row cap that fitted, so later batches start from it."""
    step = min(len(rows), max_rows or len(rows))
    parts: list[Launched] = []
    done = 0
    while done < len(rows):
        part = rows[done:done + step]
        try:
            launched = launch_batch(loaded, part)
        except torch.OutOfMemoryError:
            launched = None
        if launched is None:  # outside the except block, so the failed pass's tensors are already freed
            if step == 1:
                raise UserError(f"{loaded.card.name}: one window of {len(part[0].tokens)} tokens does not fit "
                                "in GPU memory; fix: score with a smaller --max-length")
            step //= 2
            torch.cuda.empty_cache()
            continue
        parts.append(launched)
        done += len(part)
    return parts, step if step < len(rows) else max_rows


def score_rows(loaded: LoadedModel, rows: Sequence[Row], batches: Sequence[list[int]],
               done: dict[int, tuple[list[float], list[int]]] | None = None,
               on_batch: Callable[[int, list[float], list[int], float], None] | None = None,
               progress: bool = True) -> dict[int, tuple[list[float], list[int]]]:
    """Score every batch not already in `done`; call on_batch after each one (for checkpoints).

    The next batch is queued on the GPU before the last one's losses are collected and checkpointed, so
    host work overlaps device work; on_batch's seconds are wall-clock increments (they sum to the run)."""
    results = dict(done or {})
    n_total = sum(rows[r].n_pred for batch in batches for r in batch)
    n_done = sum(rows[r].n_pred for b in results for r in batches[b])
    with tqdm(total=n_total, initial=n_done, unit="tok", unit_scale=True, desc=loaded.card.name,
              disable=not progress, dynamic_ncols=True) as bar:
        max_rows = None  # lowered after an out-of-memory error, for the rest of the run
        clock = [time.perf_counter()]

        def finish(b: int, parts: list[Launched]) -> None:
            nll, counts = collect(parts)
            results[b] = (nll, counts)
            now = time.perf_counter()
            if on_batch is not None:
                on_batch(b, nll, counts, now - clock[0])
            clock[0] = now
            bar.update(sum(counts))

        pending = None
        for b, batch in enumerate(batches):
            if b in results:
                continue
            parts, max_rows = launch_fitting(loaded, [rows[r] for r in batch], max_rows)
            if pending is not None:
                finish(*pending)
            pending = (b, parts)
        if pending is not None:
            finish(*pending)
    return results


def per_sample(rows: Sequence[Row], batches: Sequence[list[int]],
               results: dict[int, tuple[list[float], list[int]]], n_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Sum window results per sample, in window order (so the sum is the same however batches ran)."""
    by_row: dict[int, tuple[float, int]] = {}
    for b, batch in enumerate(batches):
        nll, counts = results[b]
        by_row.update({r: (x, c) for r, x, c in zip(batch, nll, counts)})
    nll_nats = np.zeros(n_samples)
    n_tokens = np.zeros(n_samples, dtype=np.int64)
    for r in sorted(by_row, key=lambda r: (rows[r].sample, rows[r].window)):
        nll_nats[rows[r].sample] += by_row[r][0]
        n_tokens[rows[r].sample] += by_row[r][1]
    return nll_nats, n_tokens


def tokenize(loaded: LoadedModel, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of raw texts with no special tokens added."""
    return loaded.tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def score_texts(loaded: LoadedModel, texts: Sequence[str], max_length: int | None = None,
                batch_tokens: int | None = None, progress: bool = False,
                sample_ids: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL in nats and scored-token count per text (no caching: the core used by score_model)."""
    sample_ids = sample_ids or [str(i) for i in range(len(texts))]
    rows, batches, _ = prepare(loaded, texts, sample_ids, max_length, batch_tokens)
    results = score_rows(loaded, rows, batches, progress=progress)
    return per_sample(rows, batches, results, len(texts))


def head_token_counts(heads: Sequence[Sequence[int]], wholes: Sequence[Sequence[int]]) -> list[int]:
    """How many leading tokens each head shares with its whole text's tokens (all of them unless the
    tokenizer merges across the cut)."""
    return [next((i for i, (a, b) in enumerate(zip(h, w)) if a != b), min(len(h), len(w)))
            for h, w in zip(heads, wholes)]


def prepare(loaded: LoadedModel, texts: Sequence[str], sample_ids: Sequence[str], max_length: int | None,
            batch_tokens: int | None, full_texts: Sequence[str] | None = None
            ) -> tuple[list[Row], list[list[int]], int]:
    """Tokenize, cut into windows and plan batches; also return the batch token budget used.

    With full_texts (texts are then their heads), each head is scored as part of its full text: its
    tokens get the context they have when the full text is scored, so head + rest = full exactly."""
    card = loaded.card
    max_length = min(max_length or card.context_length, card.context_length)
    param = next(loaded.model.parameters())
    budget = batch_tokens or default_batch_tokens(card.vocab_size, loaded.device, param.dtype,
                                                  full_logits=split_head(loaded) is None)
    tokens, n_scored = tokenize(loaded, texts), None
    if full_texts is not None:
        heads, tokens = tokens, tokenize(loaded, full_texts)
        n_scored = head_token_counts(heads, tokens)
    rows = make_rows(tokens, card.prefix_token_id, max_length, sample_ids, card.name, n_scored)
    return rows, plan_batches(rows, budget), budget


def token_losses(loaded: LoadedModel, texts: Sequence[str], max_length: int | None = None,
                 batch_tokens: int | None = None, progress: bool = False) -> list[np.ndarray]:
    """Each text's per-token NLL in nats (float32, in token order), scored as score_texts scores them."""
    rows, batches, _ = prepare(loaded, texts, [str(i) for i in range(len(texts))], max_length, batch_tokens)
    per_row: dict[int, np.ndarray] = {}
    for batch in tqdm(batches, desc=loaded.card.name, unit="batch", disable=not progress):
        part = launch_batch(loaded, [rows[r] for r in batch])
        if part.event is not None:
            part.event.synchronize()
        for r, values in zip(batch, np.split(part.token_nll.numpy(), np.cumsum(part.counts)[:-1])):
            per_row[r] = values
    out: list[list[np.ndarray]] = [[] for _ in texts]
    for r in sorted(per_row, key=lambda r: (rows[r].sample, rows[r].window)):
        out[rows[r].sample].append(per_row[r])
    return [np.concatenate(parts).astype(np.float32) for parts in out]


# ---------------------------------------------------------------- cached, resumable scoring of a corpus


def key_settings(settings: ScoringSettings) -> dict:
    """The settings that can change the numbers, with 'auto' resolved for this machine."""
    dtype = resolve_dtype(settings.dtype, resolve_device(settings.device))
    return {"dtype": str(dtype).removeprefix("torch."), "max_length": settings.max_length, **CONVENTIONS}


def _device_name(device: torch.device) -> str:
    """A human-readable name of the device that scored."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def _record_sum(header: dict, record: dict) -> str:
    """Checksum of one checkpoint record, bound to its run's header (cache key and batch plan)."""
    return hashlib.sha256(canonical_json([header, record]).encode()).hexdigest()[:16]


class Checkpoint:
    """Completed batches of an interrupted run, one JSON line each, after a header with key and plan.

    Each record carries a checksum over itself and the header, so a record from another plan or a damaged
    line is never used; a header for another plan refuses the whole file (it is started afresh)."""

    def __init__(self, path: Path, header: dict):
        self.path = path
        self.header = header

    def load(self) -> tuple[dict[int, tuple[list[float], list[int]]], float]:
        """Completed batches and their summed compute seconds; from the first bad line on, the file is cut."""
        if not self.path.exists():
            return {}, 0.0
        lines = self.path.read_bytes().split(b"\n")
        try:
            same_run = json.loads(lines[0]) == self.header
        except (json.JSONDecodeError, UnicodeDecodeError):
            same_run = False
        if not same_run:
            self.path.unlink()
            return {}, 0.0
        done, seconds, good_bytes = {}, 0.0, len(lines[0]) + 1
        for line in lines[1:]:
            rec = self._verified(line)
            if rec is None:
                break
            done[rec["b"]] = (rec["nll"], rec["n"])
            seconds += rec["s"]
            good_bytes += len(line) + 1
        with open(self.path, "r+b") as f:  # cut a torn or bad tail so appends start on a clean line
            f.truncate(min(good_bytes, self.path.stat().st_size))
        return done, seconds

    def _verified(self, line: bytes) -> dict | None:
        """One record if it parses and its checksum matches this run, else None."""
        try:
            rec = json.loads(line)
            body = {k: rec[k] for k in ("b", "nll", "n", "s")}
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
            return None
        return body if rec.get("sum") == _record_sum(self.header, body) else None

    def append(self, b: int, nll: list[float], counts: list[int], seconds: float) -> None:
        """Record one completed batch durably (JSON floats round-trip float64 exactly)."""
        new = not self.path.exists()
        body = {"b": b, "nll": nll, "n": counts, "s": seconds}
        with open(self.path, "a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps(self.header) + "\n")
            f.write(json.dumps({**body, "sum": _record_sum(self.header, body)}) + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclass(frozen=True)
class Target:
    """Where a model's loss table on a corpus lives, and the cache key it must carry."""

    path: Path
    key: str
    identity: dict

    @property
    def cached(self) -> bool:
        """True when the table exists with this exact cache key and its values match their content hash."""
        return is_intact(self.path) and read_provenance(self.path).get("cache_key") == self.key

    @property
    def checkpoint_path(self) -> Path:
        """The checkpoint of an interrupted run of this target."""
        return self.path.with_name(self.path.name + ".partial.jsonl")


def target(spec: str, corpus: Corpus, out_dir: Path, settings: ScoringSettings = ScoringSettings()) -> Target:
    """Compute a model's cache key and table path without loading the model."""
    model_spec = parse_spec(spec)
    identity = model_identity(model_spec)
    key = cache_key(identity, corpus.fingerprint, key_settings(settings), SCORER_VERSION)
    return Target(loss_table_path(out_dir, model_spec.short_name, key), key, identity)


def score_model(spec: str, corpus: Corpus, out_dir: Path, settings: ScoringSettings = ScoringSettings(),
                force: bool = False, progress: bool = True) -> Path:
    """Score every corpus sample with one model into a cached loss table; resume if interrupted.

    One process at a time works on a cache entry (a file lock); the output folder is checked before the
    model loads, and is created only when there is something to write."""
    tgt = target(spec, corpus, out_dir, settings)
    check_writable_dir(Path(out_dir), "output folder")
    with file_lock(tgt.path):
        if not force and tgt.cached:
            tgt.checkpoint_path.unlink(missing_ok=True)  # left by a run killed after its table was written
            return tgt.path
        return _score_locked(parse_spec(spec), tgt, corpus, settings, force, progress)


def _score_locked(model_spec: ModelSpec, tgt: Target, corpus: Corpus, settings: ScoringSettings, force: bool,
                  progress: bool) -> Path:
    """score_model's work, with the cache entry's lock held."""
    out_path, key, identity = tgt.path, tgt.key, tgt.identity
    loaded = load_model(model_spec, settings.device, settings.dtype, identity=identity,
                        device_map="auto" if settings.gpus_for(model_spec.name) > 1 else None)
    texts = corpus.samples["text"].tolist()
    sample_ids = corpus.samples["sample_id"].tolist()
    full_texts = corpus.samples["full_text"].tolist() if "full_text" in corpus.samples else None
    rows, batches, budget = prepare(loaded, texts, sample_ids, settings.max_length, settings.batch_tokens,
                                    full_texts)
    plan_hash = hashlib.sha256(json.dumps([[(rows[r].sample, rows[r].window) for r in b] for b in batches])
                               .encode()).hexdigest()
    checkpoint = Checkpoint(tgt.checkpoint_path, {"cache_key": key, "plan": plan_hash})
    if force and checkpoint.path.exists():
        checkpoint.path.unlink()
    done, seconds_before = checkpoint.load()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = score_rows(loaded, rows, batches, done=done, on_batch=checkpoint.append, progress=progress)
    wall_s = seconds_before + (time.perf_counter() - start)
    nll_nats, n_tokens = per_sample(rows, batches, results, len(texts))
    check_losses(nll_nats, sample_ids, f"scoring with {model_spec.name}")
    table = pd.DataFrame({"sample_id": sample_ids, "nll_nats": nll_nats, "n_tokens": n_tokens.astype(np.int32),
                          "n_bytes": corpus.samples["text"].str.encode("utf-8").str.len().astype(np.int32)})
    provenance = {
        "model": card_dict(loaded.card), "model_identity": identity, "corpus": corpus.describe(),
        "settings": {**key_settings(settings), "batch_tokens": budget, "device": str(loaded.device)},
        "scorer_version": SCORER_VERSION, "cache_key": key, "device": _device_name(loaded.device),
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__, "mcl_utils": mcl_utils.__version__},
        "wall_time_s": wall_s, "tokens_per_s": float(n_tokens.sum() / wall_s) if wall_s > 0 else None,
        "resumed_batches": len(done), "created_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    write_loss_table(out_path, table, provenance)
    checkpoint.path.unlink(missing_ok=True)
    return out_path


def cached_token_losses(spec: str, corpus: Corpus, settings: ScoringSettings = ScoringSettings(),
                        progress: bool = True) -> list[np.ndarray]:
    """Per-token losses of every corpus sample under one model, cached (not committed: they are large) under
    the cache root by the same key as the model's loss table."""
    tgt = target(spec, corpus, Path("."), settings)
    path = cache_root() / "tokens" / tgt.path.with_suffix(".npz").name
    with file_lock(path):
        if not path.exists():
            loaded = load_model(parse_spec(spec), settings.device, settings.dtype, identity=tgt.identity)
            losses = token_losses(loaded, corpus.samples["text"].tolist(), settings.max_length,
                                  settings.batch_tokens, progress=progress)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, nll=np.concatenate(losses), offsets=np.cumsum([0] + [len(x) for x in losses]))
        with np.load(path) as data:
            nll, offsets = data["nll"], data["offsets"]
    return [nll[a:b] for a, b in zip(offsets[:-1], offsets[1:])]

