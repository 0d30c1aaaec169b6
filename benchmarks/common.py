"""What every benchmark shares: its command line, GPU synchronization and the JSON copy of its figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def parser(doc: str) -> argparse.ArgumentParser:
    """A command line described by the benchmark's docstring, with --json."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return ap


def write_json(result: dict, path: str | None) -> None:
    """Write the figures to `path` when one was given."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so timings are honest."""
    if device.type == "cuda":
        import torch  # only benchmarks that use a device pay for importing torch

        torch.cuda.synchronize(device)


def brown_texts(n_samples: int, seed: int = 0) -> list[str]:
    """A seeded sample of Brown paragraphs from every split (benchmarks measure speed, not results)."""
    import pandas as pd

    from mcl_utils.corpus import BROWN_PARQUET

    texts = pd.read_parquet(BROWN_PARQUET, columns=["text"])["text"]
    if n_samples > len(texts):
        raise SystemExit(f"--n-samples {n_samples}: the Brown corpus has {len(texts)} paragraphs")
    return texts.sample(n=n_samples, random_state=seed).tolist()


def random_checkpoint(shape_dir: Path, out_dir: Path, dtype: str) -> Path:
    """A checkpoint with the architecture and tokenizer saved in shape_dir and seeded random weights (a
    GPU machine needs only the config and tokenizer files, not the weights, to measure speed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(shape_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(shape_dir).save_pretrained(out_dir)
    return out_dir
