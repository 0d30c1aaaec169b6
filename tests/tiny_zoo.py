"""A tiny zoo for tests: three small families on a few hundred Brown and code passages, short context.

`install(results)` patches mcl_utils.zoo in this process (also usable from a subprocess)."""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd
import torch

from mcl_utils import corpus, zoo

FAMILIES = {
    "tinyllama": zoo.Family("tinyllama", "llama", "bpe", 320, (("brown", 0.5), ("code", 0.5)), context=32,
                            tokens_per_param=0.5),
    "tinygpt2": zoo.Family("tinygpt2", "gpt2", "bytes", 259, (("brown", 1.0),), context=32, tokens_per_param=1.0),
    # more steps: long enough for a test to kill it mid-run
    "tinyneox": zoo.Family("tinyneox", "gpt_neox", "unigram", 320, (("code", 1.0),), context=32, tokens_per_param=5.0),
}


@functools.cache
def _documents(domain: str, split: str) -> pd.DataFrame:
    """The first 150 passages of a domain's split."""
    df = corpus.load_brown() if domain == "brown" else corpus.load_domain(domain)
    return df.loc[df["split"] == split, ["doc_id", "text"]].head(150).reset_index(drop=True)


def install(results: Path) -> None:
    """Register the tiny families, shrink the training text and send cards to `results`."""
    zoo.FAMILIES.update(FAMILIES)
    zoo.training_documents = lambda domain: _documents(domain, "train")
    zoo._split_documents = lambda domain, split: _documents(domain, split)["text"].tolist()
    zoo.ZOO_RESULTS = Path(results)
    zoo._fingerprint.cache_clear()
    zoo._count.cache_clear()
    torch.set_num_threads(1)  # the same in a test's subprocess, so resumed weights match bit for bit
