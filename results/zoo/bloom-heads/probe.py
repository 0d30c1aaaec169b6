"""Probe: does bloom-s2 lag because its two heads miss ALiBi's most local slope? Train it with 4 heads of 8.

Usage: python probe.py [SIZE=HEADS ...] (default s2=4); cards and logs go beside this file."""
import dataclasses
import sys
from pathlib import Path

from mcl_utils import zoo

for arg in sys.argv[1:] or ["s2=4"]:
    size, heads = arg.split("=")
    zoo.SIZES[size] = dataclasses.replace(zoo.SIZES[size], heads=int(heads))
    card = zoo.train(f"bloom-{size}", progress=False, threads=1, out=Path(__file__).parent)
    print(size, heads, card["val_bpb"], flush=True)
