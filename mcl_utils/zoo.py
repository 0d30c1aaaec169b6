"""The model zoo: families as data, their tokenizers and training text, a readable training loop with
checkpoints that resume bit-identically, zoo cards, the learning-rate sweep and the budget estimator."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import math
import os
import platform
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import yaml

from mcl_utils.corpus import REPO_ROOT, domain_documents, table_fingerprint, training_documents
from mcl_utils.errors import UserError
from mcl_utils.models import cache_root, count_parameters, sha256_file
from mcl_utils.store import atomic_path, canonical_json, file_lock, strict_json

# Bump when a change to this module can change trained weights: every zoo card then needs retraining.
TRAINER_VERSION = "1"
ZOO_RESULTS = REPO_ROOT / "results" / "zoo"
TRAIN_STATE = "mcl-train.json"  # the training log and wall time, saved beside the final weights
LOG_EVERY = 10  # steps per row of the training log (the mean training loss over those steps)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")  # what save_pretrained writes for a fast tokenizer
SPECIALS = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "unk_token": "<|unk|>"}
ARCHITECTURES = ("llama", "gpt2", "gpt_neox", "bloom")
TOKENIZERS = ("bpe", "unigram", "bytes")
REFERENCE_WIDTH = 64  # learning rates are quoted at this width
MAX_EPOCHS = 4.0  # DESIGN section 7: more passes over the few offline megabytes than this overfit
# Training throughput in 6N-FLOP tokens/s by compute parameters N, for the budget estimate. CPU: a power law
# through the default zoo trained end to end (results/zoo/timed-run/: 2 cores of an AMD EPYC, one thread per
# model, two side by side; slope -0.59), levelled so that the estimates sum to its 188 model-minutes; the third
# point extends the line beyond the zoo. CUDA: DESIGN section 7 (H100, recipe v1).
THROUGHPUT = {"cpu": ((2e4, 4.066e4), (5.3e5, 5.823e3), (5e6, 1.539e3)),
              "cuda": ((1e5, 1.2e7), (8.4e5, 4.3e6), (4.8e6, 1.65e6), (1.4e7, 8.5e5), (2.5e7, 6.4e5))}


@dataclass(frozen=True)
class Size:
    """A model shape: width (d_model), depth (layers) and attention heads."""

    width: int
    depth: int
    heads: int


# One ladder of shapes for every family (head dimensions 8 or 16, as fused GPU attention kernels want). s5 is
# 80 wide, not 96, to keep the default zoo within its time budget (results/zoo/s5-width96/).
SIZES = {
    "s0": Size(16, 2, 2), "s1": Size(24, 2, 3), "s2": Size(32, 2, 2), "s3": Size(48, 2, 3), "s4": Size(64, 3, 4),
    "s5": Size(80, 3, 5), "s6": Size(128, 4, 8), "s7": Size(192, 4, 12), "s8": Size(256, 5, 16),
}


@dataclass(frozen=True)
class Family:
    """A family of models: architecture, tokenizer, data mixture, and hyperparameters as rules of width."""

    name: str
    architecture: str  # a transformers model type: llama, gpt2, gpt_neox
    tokenizer: str  # bpe, unigram or bytes
    vocab_size: int  # of a trained tokenizer (bytes: 256 + specials, whatever is given here)
    mixture: tuple[tuple[str, float], ...]  # (domain, share of training tokens)
    context: int = 256
    lr_ref: float = 3e-3  # peak learning rate at REFERENCE_WIDTH (a sweep file overrides it)
    lr_exponent: float = 1.0  # peak lr = lr_ref * (REFERENCE_WIDTH / width) ** lr_exponent
    tokens_per_param: float = 20.0  # of compute parameters: non-embedding plus the output head
    warmup_fraction: float = 0.2  # recipe v2: long warmup; at 0.05, seeds of one model differed by 5% in loss
    min_lr_fraction: float = 0.1  # cosine decay to this fraction of the peak
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    data_seed: int = 0  # the order of documents; seed replicas differ only in initialization
    rows_per_width: float = 0.125  # batch rows per unit of width: fewer rows make more steps of the same tokens
    heads: tuple[tuple[str, int], ...] = ()  # (size, heads) where the family's head count differs from the ladder's

    def batch_rows(self, width: int) -> int:
        """Rows of `context` tokens per optimizer step: grows with width (at 1/8 row per unit, at least
        4 rows: 1k tokens up to width 32, 4k at 128)."""
        return int(np.clip(round(width * self.rows_per_width), 4, 256))

    def warmup_steps(self, total_steps: int) -> int:
        """Linear warmup length: a short fixed fraction of the run."""
        return max(1, round(self.warmup_fraction * total_steps))

    def shape(self, size_name: str) -> Size:
        """The ladder's shape for this size, with the family's own head count where it sets one."""
        heads = dict(self.heads)
        return dataclasses.replace(SIZES[size_name], heads=heads[size_name]) if size_name in heads else SIZES[size_name]

    def record(self) -> dict:
        """The family's fields for recipes: all but its head counts, which enter as each size's resolved heads
        (so that the field, added after llama and neox were trained, leaves their recipes unchanged)."""
        fields = dataclasses.asdict(self)
        fields.pop("heads")
        return fields


# Three families that differ in architecture, tokenizer and data mixture (shares of training tokens).
# Shares sit near each family's natural proportions so that its largest size (s6) repeats no domain much more
# than 4 times. The third family was GPT-2-style until it missed the quality bars twice: on bytes its smallest
# sizes stayed near the byte-bigram plateau (results/zoo/gpt2-bytes/), and on a 1,024-token BPE its learned
# position table bent its curve (results/zoo/gpt2-v2/); Bloom's ALiBi attention learns smoothly on the same data.
# Bloom has heads of 8 up to s4: ALiBi sets one distance penalty per head from the head count, and with the
# ladder's few heads of 16 s2 (2 heads) and s4 (4 heads) fell behind the family's law. s5 keeps the ladder's
# heads of 16: at 96 wide, 6 of them came within 0.4% of 12 heads of 8, which make a step about 1.5x as long
# (results/zoo/bloom-heads/).
FAMILIES = {
    "llama": Family("llama", "llama", "bpe", 2048, (("brown", 0.18), ("sotu", 0.48), ("code", 0.34))),
    "bloom": Family("bloom", "bloom", "bpe", 1024, (("brown", 0.3), ("sotu", 0.7)),
                    heads=(("s2", 4), ("s3", 6), ("s4", 8))),
    "neox": Family("neox", "gpt_neox", "unigram", 2048, (("brown", 0.25), ("sotu", 0.35), ("code", 0.4))),
    # Not in the default zoo: the GPT-2 architecture on bloom's data and vocabulary, which misses the quality bars
    # (results/zoo/gpt2-v2/README.md); kept so that its probes can be rerun.
    "gpt2": Family("gpt2", "gpt2", "bpe", 1024, (("brown", 0.3), ("sotu", 0.7))),
}


@dataclass(frozen=True)
class ZooModel:
    """One model of the zoo: a family, a size and an initialization seed."""

    family: Family
    size_name: str
    seed: int = 0

    @property
    def name(self) -> str:
        """`<family>-<size>` for seed 0, else `<family>-<size>-s<seed>`."""
        return f"{self.family.name}-{self.size_name}" + (f"-s{self.seed}" if self.seed else "")

    @property
    def size(self) -> Size:
        """The model's shape."""
        return self.family.shape(self.size_name)

    @property
    def spec(self) -> str:
        """The model spec that scores it."""
        return f"zoo:{self.name}"


def train_command(name: str) -> str:
    """The command that trains one zoo model (named in errors)."""
    return f"mcl zoo train {name}"


def parse_name(name: str) -> ZooModel:
    """`<family>-<size>[-s<seed>]` (with or without `zoo:`) to a ZooModel; anything else is a one-line error."""
    name = name.removeprefix("zoo:")
    m = re.fullmatch(r"(?P<family>[a-z0-9_]+)-(?P<size>s\d+)(?:-s(?P<seed>\d+))?", name)
    if not m:
        raise UserError(f"bad zoo model name {name!r}; fix: write <family>-<size>[-s<seed>], e.g. llama-s3-s1")
    family = m["family"]
    if family not in FAMILIES:
        raise UserError(f"unknown zoo family {family!r}; fix: use one of {sorted(FAMILIES)}")
    if m["size"] not in SIZES:
        raise UserError(f"unknown zoo size {m['size']!r}; fix: use one of {list(SIZES)}")
    model = ZooModel(FAMILIES[family], m["size"], int(m["seed"] or 0))
    check_shape(model.family, model.size)
    return model


def check_shape(family: Family, size: Size) -> None:
    """Refuse shapes that the architecture cannot build (one-line errors)."""
    if family.architecture not in ARCHITECTURES:
        raise UserError(f"family {family.name}: unknown architecture {family.architecture!r}; "
                        f"fix: use one of {ARCHITECTURES}")
    if family.tokenizer not in TOKENIZERS:
        raise UserError(f"family {family.name}: unknown tokenizer {family.tokenizer!r}; fix: use one of {TOKENIZERS}")
    if size.heads < 1 or size.width % size.heads:
        raise UserError(f"width {size.width} does not divide into {size.heads} heads; fix: choose a width that "
                        "is a multiple of the number of heads")
    if (size.width // size.heads) % 2:
        raise UserError(f"head dimension {size.width // size.heads} is odd (width {size.width}, {size.heads} "
                        "heads); fix: rotary embeddings need an even head dimension")


# ---------------------------------------------------------------- tokenizers and training text


def domain_fingerprint(domain: str) -> str:
    """Fingerprint of a domain's training documents (its train split)."""
    return _fingerprint(domain)


@functools.cache
def _fingerprint(domain: str) -> str:
    """Cached fingerprint of one domain's train split."""
    return table_fingerprint(training_documents(domain), ("doc_id", "text"))


def tokenizer_recipe(family: Family) -> dict:
    """Everything a family's tokenizer depends on."""
    return {"kind": family.tokenizer, "vocab_size": family.vocab_size if family.tokenizer != "bytes" else None,
            "specials": SPECIALS,
            "text": {d: domain_fingerprint(d) for d, _ in family.mixture}, "trainer": TRAINER_VERSION}


def _train_tokenizer(family: Family, texts: Iterable[str]) -> object:
    """Train the family's tokenizer with the `tokenizers` library (byte-level: no merges at all)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = list(SPECIALS.values())
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if family.tokenizer == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=family.vocab_size, special_tokens=specials,
                                          unk_token=SPECIALS["unk_token"], initial_alphabet=alphabet,
                                          show_progress=False)
    else:
        tok = Tokenizer(models.BPE())
        vocab = family.vocab_size if family.tokenizer == "bpe" else len(alphabet) + len(specials)  # bytes: no merges
        trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=specials, initial_alphabet=alphabet,
                                      show_progress=False)
    # Byte-level pre-tokenization maps every byte to one of 256 symbols, all in the alphabet: no unknowns.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainer)
    return tok


def family_tokenizer(family: Family) -> Path:
    """The family's tokenizer directory in the cache: a copy of the committed one under results/zoo/tokenizers/
    where there is one (the unigram trainer is not deterministic, so a trained tokenizer is a result, like a
    card), else trained once on the family's training text. Token caches of the text are kept beside it."""
    path = cache_root() / "zoo" / "tokenizers" / tokenizer_name(family)
    committed = committed_tokenizer(family)
    if (path / "tokenizer.json").exists() and not _differs(committed, path):
        return path
    with file_lock(path):  # processes training side by side wait for the first to train it
        if _differs(committed, path):
            _copy_tokenizer(committed, path)  # drops token caches made with another tokenizer
        elif not (path / "tokenizer.json").exists():
            _save_tokenizer(family, path)
    return path


def tokenizer_name(family: Family) -> str:
    """`<family>-<hash of its tokenizer recipe>`: the folder name of its tokenizer, cached and committed."""
    return f"{family.name}-{hashlib.sha256(canonical_json(tokenizer_recipe(family)).encode()).hexdigest()[:16]}"


def committed_tokenizer(family: Family) -> Path:
    """Where the family's trained tokenizer is committed (results/zoo/tokenizers/), whether or not it is."""
    return results_dir() / "tokenizers" / tokenizer_name(family)


def _differs(committed: Path, cached: Path) -> bool:
    """True when a committed tokenizer exists and the cached one is missing or not the same file."""
    return (committed / "tokenizer.json").exists() and (
        not (cached / "tokenizer.json").exists()
        or sha256_file(committed / "tokenizer.json") != sha256_file(cached / "tokenizer.json"))


def publish_tokenizer(family: Family) -> None:
    """Commit the family's cached tokenizer under results/zoo/tokenizers/ (once, when its first card is written)."""
    committed = committed_tokenizer(family)
    if not (committed / "tokenizer.json").exists():
        _copy_tokenizer(family_tokenizer(family), committed)


def _copy_tokenizer(source: Path, dest: Path) -> None:
    """Replace folder `dest` atomically with the tokenizer files of `source`."""
    with atomic_path(dest, folder=True) as tmp:
        tmp.mkdir()
        for file in TOKENIZER_FILES:
            shutil.copy2(source / file, tmp / file)


def _save_tokenizer(family: Family, path: Path) -> None:
    """Train the family's tokenizer, check that it round-trips its training text, save it atomically."""
    from transformers import PreTrainedTokenizerFast

    texts = [t for d, _ in family.mixture for t in training_documents(d)["text"]]
    tok = _train_tokenizer(family, texts)
    sample = "\n".join(texts[:: max(1, len(texts) // 200)])
    ids = tok.encode(sample).ids
    unk = tok.token_to_id(SPECIALS["unk_token"])
    if unk in ids or tok.decode(ids) != sample:
        raise UserError(f"the {family.tokenizer} tokenizer of family {family.name} does not round-trip its own "
                        "training text; fix: use a byte-level pre-tokenizer (this is a bug to report)")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIALS)  # the context comes from the model config
    with atomic_path(path, folder=True) as tmp:
        fast.save_pretrained(tmp)


def _load_tokenizer(path: Path) -> object:
    """A saved zoo tokenizer as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(path)


def domain_tokens(family: Family, domain: str, split: str = "train") -> list[np.ndarray]:
    """Token ids of each document of a domain's split, each starting with BOS (cached as .npz)."""
    tok_dir = family_tokenizer(family)
    path = tok_dir / f"tokens-{domain}-{split}-{domain_fingerprint(domain)[:16]}.npz"
    if not path.exists():
        if split == "train":
            docs = training_documents(domain)["text"].tolist()
        else:
            docs = _split_documents(domain, split)
        tokenizer = _load_tokenizer(tok_dir)
        encoded = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)]
        bos = tokenizer.bos_token_id
        flat = np.concatenate([np.array([bos] + ids, dtype=np.int32) for ids in encoded])
        lengths = np.array([len(ids) + 1 for ids in encoded], dtype=np.int64)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, flat=flat, lengths=lengths, n_bytes=np.array([len(d.encode()) for d in docs]))
    data = np.load(path)
    return np.split(data["flat"], np.cumsum(data["lengths"])[:-1])


def _split_documents(domain: str, split: str) -> list[str]:
    """Texts of a domain's validation split (training code never reads a test split)."""
    if split != "validation":
        raise UserError(f"zoo training reads only train and validation text, not {split!r}")
    return domain_documents(domain, split)["text"].tolist()


class TokenStream:
    """Training rows of context+1 tokens, a pure function of the step: the data position is the step.

    Each domain's documents are shuffled per epoch (seeded by the family's data seed and the epoch),
    concatenated and cut into rows; which domain feeds each row is drawn once from the mixture shares."""

    def __init__(self, family: Family, n_rows: int, docs: dict[str, list[np.ndarray]] | None = None):
        self.family, self.row_len = family, family.context + 1
        self.docs = docs or {d: domain_tokens(family, d) for d, _ in family.mixture}
        shares = np.array([w for _, w in family.mixture], dtype=np.float64)
        rng = np.random.default_rng([family.data_seed, 1])
        self.row_domain = rng.choice(len(shares), size=n_rows, p=shares / shares.sum())
        self.row_index = np.zeros(n_rows, dtype=np.int64)  # k-th row drawn from its domain
        for j in range(len(shares)):
            mask = self.row_domain == j
            self.row_index[mask] = np.arange(mask.sum())
        self._n_tokens = [sum(len(d) for d in self.docs[name]) for name, _ in family.mixture]
        self._epoch_cache: dict[tuple[int, int], np.ndarray] = {}
        for j in range(len(shares)):  # the first epoch of every domain now, not inside the timed loop
            self._epoch(j, 0)

    @staticmethod
    def planned_epochs(family: Family, n_rows: int) -> dict[str, float]:
        """Passes over each domain's training text that n_rows rows make (from the mixture shares)."""
        shares = np.array([w for _, w in family.mixture], dtype=np.float64)
        shares /= shares.sum()
        return {d: float(n_rows * shares[j] * (family.context + 1) / sum(len(t) for t in domain_tokens(family, d)))
                for j, (d, _) in enumerate(family.mixture)}

    def rows_per_epoch(self, j: int) -> int:
        """Rows one pass over domain j yields."""
        return self._n_tokens[j] // self.row_len

    def epochs(self) -> dict[str, float]:
        """Passes over each domain's training text that the whole run makes."""
        return {d: float((self.row_domain == j).sum() / self.rows_per_epoch(j))
                for j, (d, _) in enumerate(self.family.mixture)}

    def _epoch(self, j: int, epoch: int) -> np.ndarray:
        """Domain j's documents in the order of one epoch, as rows."""
        key = (j, epoch)
        if key not in self._epoch_cache:
            docs = self.docs[self.family.mixture[j][0]]
            order = np.random.default_rng([self.family.data_seed, 2, j, epoch]).permutation(len(docs))
            flat = np.concatenate([docs[i] for i in order])
            n = len(flat) // self.row_len
            self._epoch_cache = {k: v for k, v in self._epoch_cache.items() if k[0] != j}
            self._epoch_cache[key] = flat[: n * self.row_len].reshape(n, self.row_len)
        return self._epoch_cache[key]

    def rows(self, start: int, count: int) -> torch.Tensor:
        """Rows start..start+count-1 of the run, as an int64 tensor."""
        out = np.empty((count, self.row_len), dtype=np.int64)
        domains, index = self.row_domain[start:start + count], self.row_index[start:start + count]
        for j in np.unique(domains):
            per_epoch = self.rows_per_epoch(int(j))
            for epoch in np.unique(index[domains == j] // per_epoch):
                mask = (domains == j) & (index // per_epoch == epoch)
                out[mask] = self._epoch(int(j), int(epoch))[index[mask] % per_epoch]
        return torch.from_numpy(out)


def validation_rows(family: Family, max_rows_per_domain: int = 32) -> tuple[torch.Tensor, int]:
    """Fixed rows of each domain's validation text, and their UTF-8 bytes (for bits per byte)."""
    rows, n_bytes = [], 0
    tok_dir = family_tokenizer(family)
    for domain, _ in family.mixture:
        docs = domain_tokens(family, domain, "validation")
        flat = np.concatenate(docs)
        n = min(max_rows_per_domain, len(flat) // (family.context + 1))
        rows.append(flat[: n * (family.context + 1)].reshape(n, family.context + 1))
        path = next(tok_dir.glob(f"tokens-{domain}-validation-*.npz"))
        per_doc_bytes = np.load(path)["n_bytes"]
        per_doc_tokens = np.array([len(d) for d in docs])
        # bytes of the text covered by the rows: whole documents, plus a share of the last one
        covered = n * (family.context + 1)
        cum = np.cumsum(per_doc_tokens)
        full = int(np.searchsorted(cum, covered, side="right"))
        partial = (covered - (cum[full - 1] if full else 0)) / per_doc_tokens[full] if full < len(docs) else 0
        n_bytes += int(per_doc_bytes[:full].sum() + partial * (per_doc_bytes[full] if full < len(docs) else 0))
    return torch.from_numpy(np.concatenate(rows).astype(np.int64)), n_bytes


# ---------------------------------------------------------------- models, recipes and hyperparameters


def build_config(family: Family, size: Size, vocab_size: int, bos_id: int, eos_id: int) -> object:
    """A transformers config of the family's architecture at this size (no dropout)."""
    from transformers import BloomConfig, GPT2Config, GPTNeoXConfig, LlamaConfig

    common = {"vocab_size": vocab_size, "bos_token_id": bos_id, "eos_token_id": eos_id}
    if family.architecture == "llama":
        return LlamaConfig(hidden_size=size.width, intermediate_size=_multiple(8 * size.width / 3, 8),
                           num_hidden_layers=size.depth, num_attention_heads=size.heads,
                           num_key_value_heads=size.heads, max_position_embeddings=family.context,
                           tie_word_embeddings=True, **common)
    if family.architecture == "gpt2":
        return GPT2Config(n_embd=size.width, n_layer=size.depth, n_head=size.heads, n_positions=family.context,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if family.architecture == "bloom":  # ALiBi has no position table: the trained context is recorded for scoring
        return BloomConfig(hidden_size=size.width, n_layer=size.depth, n_head=size.heads,
                           max_position_embeddings=family.context, hidden_dropout=0.0, attention_dropout=0.0,
                           **common)
    return GPTNeoXConfig(hidden_size=size.width, num_hidden_layers=size.depth, num_attention_heads=size.heads,
                         intermediate_size=4 * size.width, max_position_embeddings=family.context,
                         hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False, **common)


def _multiple(x: float, k: int) -> int:
    """x rounded up to a multiple of k."""
    return int(math.ceil(x / k) * k)


def build_model(model: ZooModel, tokenizer: object) -> torch.nn.Module:
    """A freshly initialized model of the zoo (seeded), built with transformers' own classes."""
    from transformers import AutoModelForCausalLM

    config = build_config(model.family, model.size, len(tokenizer), tokenizer.bos_token_id,
                          tokenizer.eos_token_id)
    torch.manual_seed(model.seed)
    return AutoModelForCausalLM.from_config(config)


def results_dir(out: Path | None = None) -> Path:
    """Where zoo cards, logs and sweeps go: `out`, else results/zoo/ of the repository."""
    return Path(out) if out is not None else ZOO_RESULTS


def sweep_path(family: str, out: Path | None = None) -> Path:
    """Where a family's learning-rate sweep is recorded."""
    return results_dir(out) / "sweeps" / f"{family}.json"


def lr_rule(family: Family) -> dict:
    """The peak learning-rate rule of a family: tuned by its sweep file where one exists, else the default."""
    path = sweep_path(family.name)
    if path.exists():
        rule = json.loads(path.read_text())["rule"]
        return {"lr_ref": rule["lr_ref"], "lr_exponent": rule["lr_exponent"], "source": path.name}
    return {"lr_ref": family.lr_ref, "lr_exponent": family.lr_exponent, "source": "family default"}


def peak_lr(family: Family, width: int, rule: dict | None = None) -> float:
    """Peak learning rate at a width."""
    rule = rule or lr_rule(family)
    return rule["lr_ref"] * (REFERENCE_WIDTH / width) ** rule["lr_exponent"]


def count_model(model: ZooModel) -> tuple[int, int]:
    """(total, non-embedding) parameters of a model of this family and size."""
    return _count(model.family, model.size_name)


@functools.cache
def _count(family: Family, size_name: str) -> tuple[int, int]:
    """Count parameters once per family and size, on a throwaway model."""
    from transformers import AutoModelForCausalLM

    vocab = len(SPECIALS) + 256 if family.tokenizer == "bytes" else family.vocab_size
    config = build_config(family, family.shape(size_name), vocab, 0, 1)
    return count_parameters(AutoModelForCausalLM.from_config(config))


def compute_params(model: ZooModel) -> int:
    """Parameters that do arithmetic on every token: non-embedding ones plus the output head."""
    _, non_embedding = count_model(model)
    vocab = len(SPECIALS) + 256 if model.family.tokenizer == "bytes" else model.family.vocab_size
    return non_embedding + vocab * model.size.width


def recipe(model: ZooModel, lr: float | None = None) -> dict:
    """Everything the trained weights depend on; its hash names checkpoints and enters cache keys."""
    family = model.family
    rows = family.batch_rows(model.size.width)
    steps = max(1, round(family.tokens_per_param * compute_params(model) / (rows * family.context)))
    return {"family": family.record(), "size": {"name": model.size_name, **dataclasses.asdict(model.size)},
            "seed": model.seed, "tokenizer": tokenizer_recipe(family),
            "data": {d: domain_fingerprint(d) for d, _ in family.mixture},
            "lr": lr if lr is not None else peak_lr(family, model.size.width), "steps": steps,
            "batch_rows": rows, "warmup_steps": family.warmup_steps(steps), "trainer": TRAINER_VERSION}


def recipe_hash(rec: dict) -> str:
    """sha256 of a recipe."""
    return hashlib.sha256(canonical_json(rec).encode()).hexdigest()


def lr_at(step: int, rec: dict) -> float:
    """Linear warmup, then cosine decay to min_lr_fraction of the peak."""
    peak, warmup, total = rec["lr"], rec["warmup_steps"], rec["steps"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = rec["family"]["min_lr_fraction"]
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ---------------------------------------------------------------- training


def checkpoint_dir(model: ZooModel, rec: dict) -> Path:
    """The cache directory of one training run (never committed)."""
    return cache_root() / "zoo" / "runs" / f"{model.name}-{recipe_hash(rec)[:16]}"


def card_path(name: str, out: Path | None = None) -> Path:
    """The committed zoo card of a model."""
    return results_dir(out) / f"{name}.json"


def _save_checkpoint(path: Path, state: dict) -> None:
    """torch.save atomically: a kill leaves the previous checkpoint intact."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _autocast(device: torch.device):
    """bf16 autocast on CUDA; plain fp32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _set_determinism(device: torch.device) -> None:
    """Deterministic kernels on CUDA (cuBLAS workspace, no nondeterministic algorithms; warns if one runs)."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


@torch.no_grad()
def evaluate(net: torch.nn.Module, rows: torch.Tensor, n_bytes: int, device: torch.device) -> dict:
    """Validation loss: nats per token and bits per byte over fixed validation rows."""
    net.eval()
    total = 0.0
    for batch in rows.split(16):
        batch = batch.to(device)
        with _autocast(device):
            logits = net(input_ids=batch[:, :-1]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
    net.train()
    n_tokens = rows.shape[0] * (rows.shape[1] - 1)
    return {"val_nats_per_token": total / n_tokens, "val_bpb": total / (math.log(2) * n_bytes)}


def train(name: str, device: str = "cpu", out: Path | None = None, lr: float | None = None,
          checkpoint_every: int = 50, progress: bool = True, stop_after: int | None = None,
          write: bool = True, threads: int | None = None, log: Callable[[str], None] = print) -> dict:
    """Train one zoo model (resuming from its last checkpoint); write its card and log under `out`.

    Returns the card (not written when `write` is false, as in a sweep). `lr` overrides the family's rule;
    `stop_after` stops after that many steps (tests); `threads` sets CPU threads. Checkpoints live in the
    cache; the final weights are a save_pretrained directory beside them."""
    model, dev = parse_name(name), torch.device(device)
    _set_determinism(dev)
    if threads:
        torch.set_num_threads(threads)
    rec = recipe(model, lr)
    run_dir = checkpoint_dir(model, rec)
    with file_lock(run_dir), hf_progress_bars(progress):  # a second process training it waits, then finds it
        return _train_locked(model, rec, run_dir, dev, out, checkpoint_every, progress, stop_after, write, log)


@contextlib.contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Show transformers' own progress bars (saving and loading weights) only when ours are shown."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled and was else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def _train_locked(model: ZooModel, rec: dict, run_dir: Path, dev: torch.device, out: Path | None,
                  checkpoint_every: int, progress: bool, stop_after: int | None, write: bool,
                  log: Callable[[str], None]) -> dict:
    """train() under the run's lock: finish from the final weights, or (re)start the loop from a checkpoint."""
    tokenizer = _load_tokenizer(family_tokenizer(model.family))
    if (run_dir / "final" / TRAIN_STATE).exists():  # trained before: only the card is missing
        from transformers import AutoModelForCausalLM

        # from_pretrained, not load_state_dict: transformers renames some tensors on saving (GPT-NeoX's
        # output head is saved as embed_out), and a silently unloaded head would score as random
        net = AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch.float32,
                                                   trust_remote_code=False).to(dev)
        state = json.loads((run_dir / "final" / TRAIN_STATE).read_text())
        return _finish(model, rec, net, run_dir / "final", state, dev, out, write, log)
    net = build_model(model, tokenizer).to(dev)
    stream = TokenStream(model.family, rec["steps"] * rec["batch_rows"])
    state = _train_loop(model.name, model.family, rec, net, dev, run_dir, stream, checkpoint_every, progress,
                        stop_after, log)
    if state["step"] < rec["steps"] and not state["diverged"]:
        return {"name": model.name, "stopped_at": state["step"]}
    _save_final(net, tokenizer, run_dir / "final", state)
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return _finish(model, rec, net, run_dir / "final", state, dev, out, write, log)


def _train_loop(name: str, family: Family, rec: dict, net: torch.nn.Module, dev: torch.device, run_dir: Path,
                stream: TokenStream, checkpoint_every: int, progress: bool, stop_after: int | None,
                log: Callable[[str], None]) -> dict:
    """AdamW with warmup and cosine decay, bf16 autocast on CUDA, an atomic checkpoint every N steps
    (a zoo model from scratch, or a merging expert from its base: `net` arrives initialized)."""
    from tqdm import tqdm

    steps, rows = rec["steps"], rec["batch_rows"]
    matrices = [p for p in net.parameters() if p.dim() >= 2]
    vectors = [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": family.weight_decay},
                             {"params": vectors, "weight_decay": 0.0}],
                            lr=rec["lr"], betas=family.betas, fused=True)  # one kernel per step, CPU and CUDA
    state = {"step": 0, "log": [], "elapsed_s": 0.0, "loss_sum": 0.0, "loss_count": 0}
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)  # RNG states must stay on the CPU
        net.load_state_dict(state.pop("model"))
        opt.load_state_dict(state.pop("optimizer"))
        torch.set_rng_state(state.pop("rng_cpu"))
        if dev.type == "cuda":
            torch.cuda.set_rng_state(state.pop("rng_cuda"), dev)
        log(f"[train] {name}: resuming at step {state['step']}/{steps}")
    state.update(device=_device_name(dev), precision="bf16 autocast" if dev.type == "cuda" else "float32",
                 diverged=False)
    start, tick = time.perf_counter() - state["elapsed_s"], (time.perf_counter(), state["step"])
    loss_sum = torch.tensor(state["loss_sum"], device=dev)  # summed on the device: no sync per step
    net.train()
    bar = tqdm(total=steps, initial=state["step"], desc=name, unit="step", disable=not progress,
               dynamic_ncols=True)
    while state["step"] < steps and (stop_after is None or state["step"] < stop_after):
        step = state["step"]
        batch = stream.rows(step * rows, rows).to(dev, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, rec)
        with _autocast(dev):
            logits = net(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), family.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        state["step"], state["loss_count"] = step + 1, state["loss_count"] + 1
        bar.update(1)
        if state["step"] % LOG_EVERY == 0 or state["step"] == steps:
            mean_loss = loss_sum.item() / state["loss_count"]
            now = time.perf_counter()
            speed = (state["step"] - tick[1]) * rows * family.context / max(now - tick[0], 1e-9)
            state["log"].append({"step": state["step"], "tokens": state["step"] * rows * family.context,
                                 "loss_nats": mean_loss, "lr": lr_at(step, rec), "elapsed_s": now - start})
            loss_sum.zero_()
            state["loss_count"], tick = 0, (now, state["step"])
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{speed:,.0f}")
            if not math.isfinite(mean_loss):
                state["diverged"] = True
                break
        if state["step"] % checkpoint_every == 0 and state["step"] < steps:
            state.update(elapsed_s=time.perf_counter() - start, loss_sum=loss_sum.item())
            _save_checkpoint(ckpt, {**state, "model": net.state_dict(), "optimizer": opt.state_dict(),
                                    "rng_cpu": torch.get_rng_state(),
                                    **({"rng_cuda": torch.cuda.get_rng_state(dev)} if dev.type == "cuda" else {})})
    bar.close()
    state["elapsed_s"] = time.perf_counter() - start
    return state


def _finish(model: ZooModel, rec: dict, net: torch.nn.Module, final_dir: Path, state: dict, dev: torch.device,
            out: Path | None, write: bool, log: Callable[[str], None]) -> dict:
    """Evaluate the trained model on validation text, write its card and log (if `write`), return the card."""
    wall = state["elapsed_s"]
    val_rows, val_bytes = validation_rows(model.family)
    card = zoo_card(model, rec, net, final_dir, state["log"], wall, state["device"], state["precision"],
                    evaluate(net, val_rows, val_bytes, dev))
    if write:
        write_card(card, state["log"], out)
        publish_tokenizer(model.family)
        log(f"[zoo] {model.name}: trained in {wall:.0f} s, final loss {card['final_train_loss_nats']:.3f} nats/token,"
            f" validation {card['val_bpb']:.3f} bits/byte -> {card_path(model.name, out)}")
    return card


def _save_final(net: torch.nn.Module, tokenizer: object, final_dir: Path, state: dict) -> None:
    """Save the trained model and tokenizer with save_pretrained (safetensors) and the training log, atomically."""
    with atomic_path(final_dir, folder=True) as tmp:
        net.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / TRAIN_STATE).write_text(json.dumps({k: state[k] for k in ("log", "elapsed_s", "device", "precision")}))


def _device_name(dev: torch.device) -> str:
    """The device in words."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor field."""
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else []
    return names[0].strip() if names else platform.processor() or platform.machine()


def zoo_card(model: ZooModel, rec: dict, net: torch.nn.Module, final_dir: Path, log_rows: list[dict],
             wall_s: float, device_name: str, precision: str, validation: dict) -> dict:
    """The zoo card: config, parameters, tokens seen, wall time, device, losses and the weights' sha256."""
    import transformers

    total, non_embedding = count_parameters(net)
    tokens = rec["steps"] * rec["batch_rows"] * model.family.context
    finite = [r["loss_nats"] for r in log_rows if math.isfinite(r["loss_nats"])]
    return {"name": model.name, "spec": model.spec, "family": model.family.name,
            "architecture": model.family.architecture, "tokenizer": model.family.tokenizer,
            "size": model.size_name, "seed": model.seed, **dataclasses.asdict(model.size),
            "n_params_total": total, "n_params_non_embedding": non_embedding,
            "tokens_seen": tokens, "steps": rec["steps"], "peak_lr": rec["lr"], "lr_rule": lr_rule(model.family),
            "epochs": TokenStream(model.family, rec["steps"] * rec["batch_rows"]).epochs(),
            "final_train_loss_nats": finite[-1] if finite else float("nan"),
            "diverged": len(finite) < len(log_rows), **validation,
            "wall_time_s": wall_s, "tokens_per_s": tokens / wall_s if wall_s else None,
            "device": device_name, "precision": precision,
            "recipe_hash": recipe_hash(rec), "recipe": rec,
            "weights_sha256": sha256_file(final_dir / "model.safetensors"),
            "tokenizer_sha256": sha256_file(final_dir / "tokenizer.json"),
            "config": net.config.to_diff_dict(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                         "python": platform.python_version()},
            "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}


def write_card(card: dict, log_rows: list[dict], out: Path | None = None) -> None:
    """Write a zoo card (JSON) and its training log (CSV: the loss curve) atomically."""
    out = results_dir(out)
    log_path = out / "logs" / f"{card['name']}.csv"
    with atomic_path(log_path) as tmp:
        pd.DataFrame(log_rows).to_csv(tmp, index=False, float_format="%.6g")
    card = {**card, "log_file": str(log_path.relative_to(out)), "log_sha256": sha256_file(log_path)}
    with atomic_path(card_path(card["name"], out)) as tmp:
        tmp.write_text(strict_json(card))


# ---------------------------------------------------------------- identity, loading, experiments


def read_card(name: str, out: Path | None = None) -> dict | None:
    """A model's committed zoo card, or None."""
    path = card_path(name, out)
    return json.loads(path.read_text()) if path.exists() else None


def card_is_current(model: ZooModel, card: dict | None) -> bool:
    """True when a card exists and was trained from the model's current recipe."""
    return card is not None and card.get("recipe_hash") == recipe_hash(recipe(model))


def identity(name: str) -> dict:
    """Cache identity of a zoo model from its committed card: spec, recipe hash and weights sha256."""
    model = parse_name(name)
    card = read_card(model.name)
    if card is None:
        path = card_path(model.name)
        shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
        raise UserError(f"zoo:{model.name} is not trained (no card {shown}); fix: run `{train_command(model.name)}`")
    if not card_is_current(model, card):
        raise UserError(f"zoo:{model.name}: its card was trained from an older recipe; fix: run "
                        f"`{train_command(model.name)}` to retrain it")
    return {"spec": model.spec, "recipe": card["recipe_hash"], "sha256": card["weights_sha256"]}


def weights_dir(name: str) -> Path:
    """The trained checkpoint of a zoo model, checked against its card's weights sha256."""
    model = parse_name(name)
    ident = identity(model.name)
    final = checkpoint_dir(model, recipe(model)) / "final"
    if not (final / "model.safetensors").exists():
        raise UserError(f"zoo:{model.name} has a card but no checkpoint on this machine ({final}); fix: run "
                        f"`{train_command(model.name)}`")
    if sha256_file(final / "model.safetensors") != ident["sha256"]:
        raise UserError(f"zoo:{model.name}: the checkpoint in {final} differs from its card's weights; fix: run "
                        f"`{train_command(model.name)}` (delete {final.parent} first)")
    return final


def expand(section: dict, where: str = "zoo") -> list[str]:
    """Model specs of an experiment's `zoo:` section: families x sizes, plus seed replicas."""
    if not isinstance(section, dict) or set(section) - {"families", "sizes", "replicas"}:
        raise UserError(f"{where}: the zoo section takes families, sizes and replicas; fix: see experiments/zoo.yaml")
    families, sizes = section.get("families") or [], section.get("sizes") or []
    if not families or not sizes:
        raise UserError(f"{where}: the zoo section needs families and sizes; fix: list e.g. families: [llama]")
    specs = [f"zoo:{f}-{s}" for f in families for s in sizes]
    for family, rep in (section.get("replicas") or {}).items():
        if not isinstance(rep, dict) or set(rep) != {"sizes", "seeds"}:
            raise UserError(f"{where}: replicas of {family} need sizes and seeds; fix: e.g. "
                            "{sizes: [s2, s4], seeds: [1, 2]}")
        specs += [f"zoo:{family}-{s}-s{seed}" for s in rep["sizes"] for seed in rep["seeds"] if seed]
    for spec in specs:
        parse_name(spec)
    return specs


def experiment_models(path: Path) -> list[str]:
    """The zoo specs an experiment file lists (its zoo section and any zoo: entries under models)."""
    if not path.exists():
        raise UserError(f"experiment file {path} does not exist; fix: pass a file from experiments/")
    raw = yaml.safe_load(path.read_text()) or {}
    listed = [m for m in raw.get("models") or [] if isinstance(m, str) and m.startswith("zoo:")]
    return list(dict.fromkeys(listed + (expand(raw["zoo"], str(path)) if raw.get("zoo") else [])))


def resolve_targets(targets: list[str]) -> list[str]:
    """Experiment files, family names or model names to zoo model names (deduplicated, in order)."""
    names: list[str] = []
    for t in targets:
        if t.endswith((".yaml", ".yml")):
            names += [s.removeprefix("zoo:") for s in experiment_models(Path(t))]
        elif t in FAMILIES:
            names += [f"{t}-{s}" for s in SIZES]
        else:
            names.append(parse_name(t).name)
    return list(dict.fromkeys(names))


def ensure_trained(specs: Iterable[str], device: str = "auto", force: bool = False,
                   log: Callable[[str], None] = print, progress: bool = True, out: Path | None = None,
                   threads: int | None = None, jobs: int = 1) -> None:
    """Train every zoo spec whose card is missing or stale (the pipeline's training stage); --force retrains.

    On a CPU, `jobs` > 1 trains that many models at once in separate processes, one thread each unless
    `threads` says otherwise, the longest first (tiny models use cores better side by side than together)."""
    from mcl_utils.models import resolve_device

    names = [s.removeprefix("zoo:") for s in specs if s.startswith("zoo:")]
    todo = [n for n in names if force or not card_is_current(parse_name(n), read_card(n, out))]
    for name in names:
        if name not in todo:
            log(f"[zoo] {name}: cached ({card_path(name, out).name})")
    if not todo:
        return
    dev = resolve_device(device)
    budget = budget_table(todo, dev.type)
    log(f"[zoo] budget estimate (measured throughput on {dev.type}):\n{budget.to_string(index=False)}")
    log(f"[zoo] about {wall_time_s(budget, jobs if dev.type == 'cpu' else 1) / 60:.0f} min in all")
    if force:
        for name in todo:
            model = parse_name(name)
            shutil.rmtree(checkpoint_dir(model, recipe(model)), ignore_errors=True)
    if jobs > 1 and dev.type == "cpu" and len(todo) > 1:
        _train_in_parallel(todo, jobs, out, threads or 1, log)
        return
    for name in todo:
        train(name, device=str(dev), progress=progress, log=log, out=out, threads=threads)


def _train_in_parallel(names: list[str], jobs: int, out: Path | None, threads: int,
                       log: Callable[[str], None]) -> None:
    """Train models on the CPU in `jobs` worker processes, the longest first; the first failure stops all."""
    log(f"[zoo] training {len(names)} models, {jobs} at a time ({threads} thread each)")
    in_processes(train, [dict(name=name, device="cpu", progress=False, out=out, threads=threads)
                         for name in longest_first_names(names)], jobs,
                 on_done=lambda card: log(f"[zoo] {card['name']}: trained in {card['wall_time_s']:.0f} s, "
                                          f"validation {card['val_bpb']:.3f} bits/byte"))


def in_processes(fn: Callable, kwargs_list: list[dict], jobs: int,
                 on_done: Callable[[object], None] | None = None) -> list:
    """Call fn with each mapping of keyword arguments in `jobs` spawned processes (fn must be a module-level
    function), calling on_done with each result as it arrives; the first failure is raised."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    results = []
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for done in as_completed([pool.submit(fn, **kwargs) for kwargs in kwargs_list]):
            results.append(done.result())
            if on_done is not None:
                on_done(results[-1])
    return results


# ---------------------------------------------------------------- budget and sweep


def flops_per_token(model: ZooModel) -> float:
    """Training FLOPs per token: 6 x compute parameters, plus attention scores (6 x 2 L T d)."""
    return 6 * compute_params(model) + 12 * model.size.depth * model.family.context * model.size.width


def tokens_per_s(n_params: float, device: str) -> float:
    """Measured training throughput at this size (log-log interpolation of THROUGHPUT)."""
    table = np.array(THROUGHPUT["cuda" if device == "cuda" else "cpu"])
    return float(np.exp(np.interp(np.log(n_params), np.log(table[:, 0]), np.log(table[:, 1]))))


def budget_table(names: list[str], device: str = "cpu", step_s: dict[str, float] | None = None) -> pd.DataFrame:
    """Per model: parameters, tokens, epochs, FLOPs and estimated seconds on `device`: seconds per step
    measured on this machine where `step_s` gives them (measure_step_s), else the THROUGHPUT table."""
    rows = []
    for name in names:
        model = parse_name(name)
        rec = recipe(model)
        total, non_embedding = count_model(model)
        n_compute = compute_params(model)
        tokens = rec["steps"] * rec["batch_rows"] * model.family.context
        flops = flops_per_token(model) * tokens
        if step_s and name in step_s:
            seconds = step_s[name] * rec["steps"]
        else:  # the table counts 6 N per token; charge attention at the same FLOP rate
            seconds = flops / (6 * n_compute * tokens_per_s(n_compute, device))
        epochs = TokenStream.planned_epochs(model.family, rec["steps"] * rec["batch_rows"])
        rows.append({"model": name, "params": total, "non_embedding": non_embedding, "tokens": tokens,
                     "steps": rec["steps"], "peak_lr": rec["lr"], "max_epochs": max(epochs.values()),
                     "tflops": flops / 1e12, "est_s": seconds})
    df = pd.DataFrame(rows)
    total_row = {"model": f"total ({device})", "params": df.params.sum(), "non_embedding": df.non_embedding.sum(),
                 "tokens": df.tokens.sum(), "steps": df.steps.sum(), "peak_lr": float("nan"),
                 "max_epochs": df.max_epochs.max(), "tflops": df.tflops.sum(), "est_s": df.est_s.sum()}
    return pd.concat([df, pd.DataFrame([total_row])], ignore_index=True).round(
        {"tflops": 3, "est_s": 0, "max_epochs": 2})


def wall_time_s(budget: pd.DataFrame, jobs: int) -> float:
    """Estimated seconds to train a budget table's models `jobs` at a time, longest first."""
    return longest_first_s(list(budget.est_s.iloc[:-1]), jobs)


def longest_first_names(names: list[str]) -> list[str]:
    """The models, the longest to train first (by the THROUGHPUT table's estimate)."""
    return budget_table(names).iloc[:-1].sort_values("est_s", ascending=False)["model"].tolist()


def longest_first_s(seconds: list[float], jobs: int) -> float:
    """Seconds until the last of these jobs ends when `jobs` workers take them longest first."""
    finish = [0.0] * max(1, jobs)
    for job_s in sorted(seconds, reverse=True):
        finish[finish.index(min(finish))] += job_s
    return max(finish)


def measure_step_s(name: str, seconds: float = 3.0, repeats: int = 3, threads: int | None = 1) -> dict:
    """Seconds per training step of one zoo model on this CPU: the median of `repeats` timings of the training
    loop on a fresh model, each of as many steps as fill about `seconds` (at least 4), after two warm-up steps
    (nothing is saved), at `threads` threads."""
    if threads:
        torch.set_num_threads(threads)
    model, dev = parse_name(name), torch.device("cpu")
    rec = recipe(model)
    net = build_model(model, _load_tokenizer(family_tokenizer(model.family)))
    stream = TokenStream(model.family, 200 * rec["batch_rows"])
    with tempfile.TemporaryDirectory() as tmp:
        loop = functools.partial(_train_loop, name, model.family, rec, net, dev, Path(tmp), stream,
                                 checkpoint_every=10**9, progress=False, log=lambda _: None)
        warm_s = loop(stop_after=2)["elapsed_s"] / 2
        steps = int(np.clip(seconds / warm_s, 4, 200))
        step_s = float(np.median([loop(stop_after=steps)["elapsed_s"] for _ in range(repeats)])) / steps
    return {"model": name, "recipe_hash": recipe_hash(rec), "step_s": step_s, "steps_timed": steps,
            "threads": threads}


def measure_budget(names: list[str], jobs: int) -> dict:
    """Time a few training steps of every model, `jobs` at a time in processes of one thread each, longest
    first (as the zoo trains them), and estimate the whole training: the measured budget, with its machine."""
    runs = [dict(name=name) for name in longest_first_names(names)]
    timed = {t["model"]: t for t in in_processes(measure_step_s, runs, jobs)}
    est_s = {name: timed[name]["step_s"] * recipe(parse_name(name))["steps"] for name in names}
    return {"machine": _cpu_name(), "cpu_cores": os.cpu_count(), "torch": torch.__version__, "jobs": jobs,
            "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "wall_s": longest_first_s(list(est_s.values()), jobs), "cpu_s": sum(est_s.values()),
            "models": {name: {"recipe_hash": timed[name]["recipe_hash"], "step_s": timed[name]["step_s"],
                              "steps_timed": timed[name]["steps_timed"], "est_s": est_s[name]} for name in names}}


def write_budget(names: list[str], jobs: int, out: Path | None = None, log: Callable[[str], None] = print) -> Path:
    """Measure the budget of `names` on this CPU (measure_budget), print it, write `budget-cpu.json` under `out`."""
    log(f"[zoo] timing {len(names)} models, {jobs} at a time (1 thread each)")
    measured = measure_budget(names, jobs)
    budget = budget_table(names, "cpu", {name: m["step_s"] for name, m in measured["models"].items()})
    log(f"{budget.to_string(index=False)}\nabout {measured['wall_s'] / 60:.0f} min, {jobs} at a time, on "
        f"{measured['machine']} ({measured['cpu_cores']} cores)")
    path = results_dir(out) / "budget-cpu.json"
    with atomic_path(path) as tmp:
        tmp.write_text(strict_json(measured))
    return path


def read_budget(names: list[str], out: Path | None = None) -> dict:
    """The measured budget (write_budget) of `names`, its wall and CPU seconds for just these models; refused
    where a model was not timed, or was timed under another recipe than its current one."""
    path = results_dir(out) / "budget-cpu.json"
    measured = json.loads(path.read_text()) if path.exists() else {"models": {}}
    stale = [n for n in names if measured["models"].get(n, {}).get("recipe_hash") != recipe_hash(recipe(parse_name(n)))]
    if stale:
        raise UserError(f"{path.name} has no timing of the current recipe of {', '.join(stale)}; fix: "
                        "mcl zoo train EXPERIMENT --measure, with the experiment file that lists them")
    est_s = [measured["models"][n]["est_s"] for n in names]
    return {**measured, "models": {n: measured["models"][n] for n in names},
            "wall_s": longest_first_s(est_s, measured["jobs"]), "cpu_s": sum(est_s)}


def read_timed_run(names: list[str], out: Path | None = None) -> dict:
    """The record of the default zoo trained from scratch end to end (results/zoo/timed-run/run.py): its wall
    time and whether each model's weights equalled its card's; refused where it trained another recipe."""
    path = results_dir(out) / "timed-run" / "timed-run.json"
    record = json.loads(path.read_text()) if path.exists() else {"models": {}}
    stale = [n for n in names if record["models"].get(n, {}).get("recipe_hash") != recipe_hash(recipe(parse_name(n)))]
    if stale:
        raise UserError(f"{path.name} has no run of the current recipe of {', '.join(stale)}; fix: "
                        "python results/zoo/timed-run/run.py (40 to 75 minutes on 2 cores)")
    return record


def fit_lr_rule(points: dict[int, list[tuple[float, float]]], default_exponent: float) -> dict:
    """Best learning rate per width (parabola in log lr through the grid minimum), and the power rule
    through the best learning rates of the two extreme widths. An exponent outside [0, 2] is clipped, and
    the rule then passes through the widest width's best rate (the one nearest the sizes that matter most)."""
    best = {}
    for width, runs in sorted(points.items()):
        runs = sorted((lr, loss) for lr, loss in runs if math.isfinite(loss))
        lrs, losses = np.log([r[0] for r in runs]), np.array([r[1] for r in runs])
        i = int(np.argmin(losses))
        edge = i in (0, len(runs) - 1)
        x = lrs[i]
        if not edge:
            a, b, _ = np.polyfit(lrs[i - 1:i + 2], losses[i - 1:i + 2], 2)
            x = float(np.clip(-b / (2 * a), lrs[i - 1], lrs[i + 1])) if a > 0 else lrs[i]
        best[width] = {"lr": float(np.exp(x)), "on_grid_edge": edge}
    widths = sorted(best)
    widest = widths[-1]
    if len(widths) >= 2:
        exponent = float(np.clip(-math.log(best[widest]["lr"] / best[widths[0]]["lr"]) / math.log(widest / widths[0]),
                                 0.0, 2.0))
    else:
        exponent = default_exponent
    return {"best": {str(w): v for w, v in best.items()}, "lr_exponent": exponent,
            "lr_ref": best[widest]["lr"] * (widest / REFERENCE_WIDTH) ** exponent}


def sweep(family: str, sizes: list[str], lrs: list[float], device: str = "cpu", progress: bool = True,
          out: Path | None = None, log: Callable[[str], None] = print, jobs: int = 1) -> dict:
    """Train each size at each peak learning rate (seed 0), record validation bits per byte, fit the rule.
    With jobs > 1 (CPU), the runs train side by side in that many processes of one thread each."""
    if family not in FAMILIES:
        raise UserError(f"unknown zoo family {family!r}; fix: use one of {sorted(FAMILIES)}")
    if not lrs or any(lr <= 0 for lr in lrs):
        raise UserError("learning rates must be positive numbers; fix: e.g. --lrs 1e-3,3e-3,1e-2")
    for size in sizes:
        parse_name(f"{family}-{size}")  # every size is valid before anything trains
    todo = [dict(name=f"{family}-{size}", lr=lr, write=False)
            for size in sorted(sizes, key=lambda s: -SIZES[s].width) for lr in lrs]  # widest first
    if jobs > 1 and device == "cpu":
        log(f"[sweep] {family}: {len(todo)} runs, {jobs} at a time (1 thread each)")
        cards = in_processes(train, [dict(run, progress=False, threads=1) for run in todo], jobs)
    else:
        cards = [train(**run, device=device, progress=progress, log=log) for run in todo]
    by_run = {(card["size"], card["peak_lr"]): card for card in cards}
    runs = []
    for size in sizes:
        for lr in lrs:
            card = by_run[(size, lr)]
            runs.append({"size": size, "width": SIZES[size].width, "n_params_total": card["n_params_total"],
                         "n_params_non_embedding": card["n_params_non_embedding"], "lr": lr,
                         "val_bpb": card["val_bpb"], "final_train_loss_nats": card["final_train_loss_nats"],
                         "diverged": card["diverged"], "tokens_seen": card["tokens_seen"],
                         "wall_time_s": card["wall_time_s"], "device": card["device"],
                         "recipe_hash": card["recipe_hash"]})
            log(f"[sweep] {family}-{size} lr {lr:g}: {card['val_bpb']:.4f} validation bits/byte")
    points: dict[int, list[tuple[float, float]]] = {}
    for r in runs:
        points.setdefault(r["width"], []).append((r["lr"], r["val_bpb"] if not r["diverged"] else float("inf")))
    result = {"family": family, "sizes": sizes, "lrs": lrs, "runs": runs,
              "rule": fit_lr_rule(points, FAMILIES[family].lr_exponent), "reference_width": REFERENCE_WIDTH,
              "trainer": TRAINER_VERSION, "created_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    path = sweep_path(family, out)
    with atomic_path(path) as tmp:
        tmp.write_text(strict_json(result))
    log(f"[sweep] {family}: lr = {result['rule']['lr_ref']:.3g} x (64/width)^{result['rule']['lr_exponent']:.2f}"
        f" -> {path}")
    return result


# ---------------------------------------------------------------- results for the chapters

CARD_FIELDS = ("name", "family", "architecture", "tokenizer", "size", "seed", "width", "depth", "heads",
               "n_params_total", "n_params_non_embedding", "tokens_seen", "steps", "peak_lr",
               "final_train_loss_nats", "val_bpb", "wall_time_s", "tokens_per_s", "device")


def cards_table(names: Iterable[str], out: Path | None = None) -> pd.DataFrame:
    """The committed zoo cards of these models, one row each (a missing card is a one-line error)."""
    rows = []
    for name in names:
        card = read_card(parse_name(name.removeprefix("zoo:")).name, out)
        if card is None:
            raise UserError(f"{name} has no zoo card; fix: run `{train_command(name.removeprefix('zoo:'))}`")
        rows.append({k: card[k] for k in CARD_FIELDS})
    return pd.DataFrame(rows)


def provenance_sizes(matrix: object) -> pd.DataFrame:
    """Family and non-embedding parameters of each zoo model of a loss matrix, read from its loss tables'
    provenance (so archived models, whose cards are not in results/zoo, can be fitted like current ones)."""
    return pd.DataFrame([{"family": parse_name(p["model"]["name"].removeprefix("zoo:")).family.name,
                          "n_params_non_embedding": p["model"]["n_params_non_embedding"]} for p in matrix.provenance])


def training_logs(names: Iterable[str], out: Path | None = None) -> pd.DataFrame:
    """The training logs (loss curves) of these models, long format with the model's family, size, seed."""
    frames = []
    for card in cards_table(names, out).itertuples():
        log = pd.read_csv(results_dir(out) / "logs" / f"{card.name}.csv")
        frames.append(log.assign(model=card.name, family=card.family, size=card.size, seed=card.seed))
    return pd.concat(frames, ignore_index=True)


def sweep_tables(families: Iterable[str], out: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The learning-rate sweeps of these families: every run, and each family's fitted rule with the best
    learning rate per width."""
    runs, rules = [], []
    for family in families:
        path = sweep_path(family, out)
        if not path.exists():
            raise UserError(f"no learning-rate sweep for {family} ({path}); fix: run `mcl zoo sweep {family}`")
        sweep_result = json.loads(path.read_text())
        runs += [{**r, "family": family} for r in sweep_result["runs"]]
        rule = sweep_result["rule"]
        rules += [{"family": family, "width": int(w), "best_lr": b["lr"], "on_grid_edge": b["on_grid_edge"],
                   "lr_ref": rule["lr_ref"], "lr_exponent": rule["lr_exponent"]} for w, b in rule["best"].items()]
    return pd.DataFrame(runs), pd.DataFrame(rules)
