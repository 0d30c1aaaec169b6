"""A tiny zoo for tests: four small families on a few hundred Brown and code passages, short context.

`install(results)` patches mcl_utils.zoo in this process (also usable from a subprocess)."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import torch

from mcl_utils import corpus, zoo

FAMILIES = {
    "tinyllama": zoo.Family("tinyllama", "llama", "bpe", 320, (("brown", 0.5), ("code", 0.5)), context=32,
                            tokens_per_param=0.5),
    "tinygpt2": zoo.Family("tinygpt2", "gpt2", "bytes", 259, (("brown", 1.0),), context=32, tokens_per_param=1.0),
    "tinybloom": zoo.Family("tinybloom", "bloom", "bpe", 320, (("brown", 1.0),), context=32, tokens_per_param=1.0),
    # more steps: long enough for a test to kill it mid-run
    "tinyneox": zoo.Family("tinyneox", "gpt_neox", "unigram", 320, (("code", 1.0),), context=32, tokens_per_param=5.0),
}


@functools.cache
def _documents(domain: str, split: str) -> pd.DataFrame:
    """The first 150 passages of a domain's split."""
    return corpus.domain_documents(domain, split).head(150)


def install(results: Path) -> None:
    """Register the tiny families, shrink the training text and send cards to `results`."""
    zoo.FAMILIES.update(FAMILIES)
    zoo.training_documents = lambda domain: _documents(domain, "train")
    zoo._split_documents = lambda domain, split: _documents(domain, split)["text"].tolist()
    zoo.ZOO_RESULTS = Path(results)
    zoo._fingerprint.cache_clear()
    zoo._count.cache_clear()
    torch.set_num_threads(1)  # the same in a test's subprocess, so resumed weights match bit for bit


def installed(tmp_path: Path, monkeypatch) -> Iterator[Path]:
    """For a fixture: the tiny zoo installed with its own cache (tmp_path/cache) and results directory
    (tmp_path/results); everything it patched is restored afterwards."""
    for name in ("FAMILIES", "training_documents", "_split_documents", "ZOO_RESULTS"):
        value = getattr(zoo, name)
        monkeypatch.setattr(zoo, name, dict(value) if name == "FAMILIES" else value)
    monkeypatch.setenv("MCL_CACHE", str(tmp_path / "cache"))
    install(tmp_path / "results")
    yield tmp_path
    zoo._fingerprint.cache_clear()
    zoo._count.cache_clear()
