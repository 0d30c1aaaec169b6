"""Probe: does bloom-s2 lag because its two heads miss ALiBi's most local slope? Train it with 4 heads of 8.

It ran before the family took heads of 8: it restores the ladder's heads (no head counts of the family's own)
and the learning rate of the ladder-heads run (`ladder/`), then changes the heads of the sizes given.
Usage: python probe.py [SIZE=HEADS ...] (default s2=4); cards and logs go beside this file."""
import dataclasses
import json
import sys
from pathlib import Path

from mcl_utils import zoo

here = Path(__file__).parent
zoo.FAMILIES["bloom"] = dataclasses.replace(zoo.FAMILIES["bloom"], heads=())
for arg in sys.argv[1:] or ["s2=4"]:
    size, heads = arg.split("=")
    zoo.SIZES[size] = dataclasses.replace(zoo.SIZES[size], heads=int(heads))
    lr = json.loads((here / "ladder" / f"bloom-{size}.json").read_text())["peak_lr"]
    card = zoo.train(f"bloom-{size}", lr=lr, progress=False, threads=1, out=here)
    print(size, heads, card["val_bpb"], flush=True)
