"""Recipe v2 probe of the GPT-2 family's positions: train gpt2 sizes with one change, write cards and logs.

Usage (one thread, a cache of its own, so that runs with the same recipe but another architecture never
share a checkpoint):  MCL_CACHE=/tmp/probe-VARIANT python probe.py VARIANT [SIZES] [OUT]
VARIANT: sinusoidal-positions | untied-head | neox-architecture | neox-sequential-tied; SIZES: s3 (default) or
a comma-separated list; OUT: where cards go (default: the folder named VARIANT beside this file)."""
import dataclasses
import sys
from pathlib import Path

import torch

from mcl_utils import zoo

variant = sys.argv[1]
build_config, build_model = zoo.build_config, zoo.build_model


def config(family, size, vocab_size, bos_id, eos_id):
    """The family's config with the variant's change."""
    c = build_config(family, size, vocab_size, bos_id, eos_id)
    if variant == "untied-head":
        c.tie_word_embeddings = False
    if variant == "neox-sequential-tied":  # GPT-NeoX blocks in GPT-2's order, with GPT-2's tied head
        c.use_parallel_residual, c.tie_word_embeddings = False, True
    return c


def model(zoo_model, tokenizer):
    """The family's model; sinusoidal-positions starts GPT-2's position table as sinusoids of the init's scale."""
    net = build_model(zoo_model, tokenizer)
    if variant == "sinusoidal-positions":
        wpe = net.transformer.wpe.weight
        n, d = wpe.shape
        angle = torch.arange(n)[:, None] / 10000 ** (torch.arange(0, d, 2) / d)
        table = torch.zeros(n, d)
        table[:, 0::2], table[:, 1::2] = torch.sin(angle), torch.cos(angle)
        with torch.no_grad():
            wpe.copy_(table * 0.02 / table.std())
    return net


zoo.build_config, zoo.build_model = config, model
if variant.startswith("neox"):
    zoo.FAMILIES["gpt2"] = dataclasses.replace(zoo.FAMILIES["gpt2"], architecture="gpt_neox")
sizes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["s3"]
out = Path(sys.argv[3]) if len(sys.argv) > 3 else Path(__file__).parent / variant
for size in sizes:
    print(variant, size, zoo.train(f"gpt2-{size}", progress=False, threads=1, out=out)["val_bpb"], flush=True)
