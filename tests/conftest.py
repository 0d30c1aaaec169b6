"""Fixtures: tiny random Llama and GPT-2 checkpoints with a trained BPE tokenizer, built on the fly."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

TEXTS = [
    "The jury said it found the court had incorporated into its operating procedures the recommendations.",
    "It urged that the city take steps to remedy this problem.",
    "Implementation of the automobile title law was also recommended by the outgoing jury.",
    "Nevertheless, we feel that in the future the county should receive some portion of these funds.",
    "Wards protected: the jury said it found the court had acted properly in each case it examined.",
    "A short one.",
    "Maintenance of the status quo might seem to be the appropriate goal of this population today, " * 3,
    "What is new about it? To that question the answer is simple: utopian communism, in two words.",
]


def build_tokenizer(out_dir: Path, with_bos: bool) -> None:
    """Train a small byte-level BPE tokenizer and save it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "</s>", "<pad>"] if with_bos else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS * 4, trainer)
    kwargs = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"} if with_bos else \
        {"eos_token": "<|endoftext|>"}
    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(out_dir)


def build_tiny_model(out_dir: Path, arch: str, context: int = 64, seed: int = 0) -> Path:
    """Save a tiny random causal LM of architecture 'llama' or 'gpt2' with its tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out_dir, with_bos=arch == "llama")
    vocab = len(AutoTokenizer.from_pretrained(out_dir))
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                             tie_word_embeddings=False)
        model = LlamaForCausalLM(config)
    else:
        eos = AutoTokenizer.from_pretrained(out_dir).eos_token_id
        config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=context,
                            bos_token_id=eos, eos_token_id=eos)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (BOS token, untied head, 64-token context) saved to disk."""
    return build_tiny_model(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 (EOS only, tied head, learned positions, 64-token context) saved to disk."""
    return build_tiny_model(tmp_path_factory.mktemp("gpt2"), "gpt2")


@pytest.fixture()
def jsonl_corpus(tmp_path: Path) -> Path:
    """A small jsonl corpus of the test texts with explicit ids."""
    path = tmp_path / "texts.jsonl"
    pd.DataFrame({"id": [f"t{i}" for i in range(len(TEXTS))], "text": TEXTS}).to_json(
        path, orient="records", lines=True)
    return path



FAKE_GGUF_BYTES = b"GGUF" + bytes(range(256)) * 4


def register_fake(package_root: Path) -> None:
    """Register gguf:fake, an offline model whose 'GGUF file' is two parts of a package under package_root
    (tests replace models._dequantize, which would read it with transformers)."""
    import hashlib
    import sys

    from mcl_utils import models

    sys.path.insert(0, str(package_root))
    parts = (("fake_gguf_parts", "a.part"), ("fake_gguf_parts", "b.part"))
    models.OFFLINE_MODELS["fake"] = models.GgufPackage("fake", parts, hashlib.sha256(FAKE_GGUF_BYTES).hexdigest(),
                                                       "MIT")


@pytest.fixture()
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The folder holding package fake_gguf_parts (a two-part fake GGUF file), registered as gguf:fake."""
    from mcl_utils import models

    root = tmp_path / "site"
    pkg = root / "fake_gguf_parts"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('never import model packages')\n")
    (pkg / "a.part").write_bytes(FAKE_GGUF_BYTES[:500])
    (pkg / "b.part").write_bytes(FAKE_GGUF_BYTES[500:])
    monkeypatch.setattr(models, "OFFLINE_MODELS", dict(models.OFFLINE_MODELS))
    monkeypatch.setattr("sys.path", list(__import__("sys").path))
    monkeypatch.setenv("MCL_CACHE", str(tmp_path / "cache"))
    register_fake(root)
    return root
