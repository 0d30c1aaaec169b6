"""What every benchmark shares: its command line, GPU synchronization and the JSON copy of its figures."""

from __future__ import annotations

import argparse
import json
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
