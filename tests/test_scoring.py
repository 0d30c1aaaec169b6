"""Scoring conventions: labels-loss equality, batch and window invariance, unit-free argmin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mcl_utils import scoring
from mcl_utils.models import load_model
from mcl_utils.scoring import make_rows, plan_batches, rolling_windows, score_texts, tokenize
from mcl_utils.store import bits_per_byte
from tests.conftest import TEXTS


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def loaded(request, tiny_llama, tiny_gpt2):
    """Each tiny model, loaded in float32 on the CPU."""
    path = tiny_llama if request.param == "llama" else tiny_gpt2
    return load_model(f"dir:{path}", device="cpu", dtype="float32")


def test_prefix_policy(loaded):
    """The prefix is BOS where the tokenizer has one (Llama), else EOS (GPT-2)."""
    expected = "bos" if loaded.card.family == "llama" else "eos"
    assert loaded.card.prefix_policy == expected


def test_nll_equals_labels_loss_times_tokens(loaded):
    """Our summed NLL equals the model's own mean `labels=` loss times the number of scored tokens."""
    nll, n_tokens = score_texts(loaded, TEXTS[:6])
    for text, ours, n in zip(TEXTS[:6], nll, n_tokens):
        toks = tokenize(loaded, [text])[0]
        ids = torch.tensor([[loaded.card.prefix_token_id] + toks])
        labels = ids.clone()
        labels[0, 0] = -100
        with torch.no_grad():
            loss = loaded.model(input_ids=ids, labels=labels).loss.item()
        assert n == len(toks)
        assert ours == pytest.approx(loss * len(toks), rel=1e-5)


def test_batch_size_one_vs_sixteen(loaded):
    """Per-sample losses do not depend on batching or padding (float32, 1e-5): sixteen rows of mixed
    lengths in one pass, padded to the widest row, give the losses of one row per pass."""
    texts = TEXTS * 2
    rows = make_rows(tokenize(loaded, texts), loaded.card.prefix_token_id, 64, list(map(str, texts)), "m")[:16]
    assert len({len(r.tokens) for r in rows}) > 4
    one = [scoring.score_batch(loaded, [r]) for r in rows]
    sixteen = scoring.score_batch(loaded, rows)
    assert sixteen[1] == [c for _, (c,) in one]
    np.testing.assert_allclose(sixteen[0], [x for (x,), _ in one], rtol=1e-5, atol=0)
    whole = score_texts(loaded, texts, batch_tokens=4096)
    assert max(len(b) for b in plan_batches(rows, 4096)) > 1
    np.testing.assert_allclose(whole[0], score_texts(loaded, texts, batch_tokens=1)[0], rtol=1e-5, atol=0)


def test_head_split_equals_the_models_own_logits(loaded, monkeypatch):
    """Hidden states through the output head on scored positions only give the losses of the model's full
    logits (float32, 1e-5 relative) on padded batches; a model whose config transforms its logits (here a
    logit scale) is scored through its own logits instead."""
    assert scoring.split_head(loaded) is not None
    texts = TEXTS * 2
    split = score_texts(loaded, texts, batch_tokens=4096)
    monkeypatch.setattr(scoring, "split_head", lambda loaded: None)
    full = score_texts(loaded, texts, batch_tokens=4096)
    np.testing.assert_allclose(split[0], full[0], rtol=1e-5, atol=0)
    monkeypatch.undo()
    scaled = load_model(loaded.card.name, device="cpu", dtype="float32")
    scaled.model.config.logit_scale = 0.5
    assert scoring.split_head(scaled) is None


def test_loss_chunks_do_not_change_losses(loaded, monkeypatch):
    """Computing a batch's head and loss three tokens at a time gives the losses of one chunk (the head's
    matrix product on fewer rows may round differently: float32, 1e-6 relative)."""
    whole = score_texts(loaded, TEXTS)
    monkeypatch.setitem(scoring.LOSS_CHUNK_BYTES, "cpu", 3 * 4 * loaded.card.vocab_size)
    chunked = score_texts(loaded, TEXTS)
    np.testing.assert_array_equal(whole[1], chunked[1])
    np.testing.assert_allclose(whole[0], chunked[0], rtol=1e-6, atol=0)


def _oom_above(max_rows: int, calls: list[int]):
    """A launch_batch that raises a GPU out-of-memory error on passes of more than max_rows rows."""
    real = scoring.launch_batch

    def launch_batch(loaded, rows):
        calls.append(len(rows))
        if len(rows) > max_rows:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(loaded, rows)
    return launch_batch


def test_out_of_memory_halves_the_batch(loaded, monkeypatch):
    """A pass that runs out of GPU memory is retried in halves, and later batches start from the cap that
    fitted; the losses are those of an unconstrained run."""
    texts = TEXTS * 4
    expected = score_texts(loaded, texts, batch_tokens=4096)
    calls: list[int] = []
    monkeypatch.setattr(scoring, "launch_batch", _oom_above(3, calls))
    nll, n_tokens = score_texts(loaded, texts, batch_tokens=4096)
    np.testing.assert_array_equal(n_tokens, expected[1])
    np.testing.assert_allclose(nll, expected[0], rtol=0, atol=1e-5)
    assert max(calls) > 3 and calls.count(max(calls)) == 1  # one failed pass, then halves only
    assert max(c for c in calls if c <= 3) == 2


def test_window_that_never_fits_is_a_clear_error(loaded, monkeypatch):
    """When even one row runs out of memory the error names the fix."""
    from mcl_utils.errors import UserError

    monkeypatch.setattr(scoring, "launch_batch", _oom_above(0, []))
    with pytest.raises(UserError, match="does not fit in GPU memory; fix: score with a smaller --max-length"):
        score_texts(loaded, TEXTS[:2])


def test_rolling_windows_follow_lm_eval():
    """Windows equal lm-evaluation-harness's get_rolling_token_windows with context_len=1."""
    from lm_eval.utils import get_rolling_token_windows

    for n, max_len in [(1, 4), (4, 4), (5, 4), (17, 4), (30, 7), (12, 64)]:
        tokens = list(range(100, 100 + n))
        ours = rolling_windows(tokens, 0, max_len)
        ref = list(get_rolling_token_windows(tokens, 0, max_len, 1))
        assert [(seq[:-1], seq[-k:]) for seq, k in ours] == [(list(a), list(b)) for a, b in ref]
        assert sum(k for _, k in ours) == n  # every token is scored exactly once


def test_windowed_equals_direct_window_losses(loaded):
    """A sample longer than the context scores as the sum of its windows, each computed directly."""
    text = TEXTS[6] * 2
    toks = tokenize(loaded, [text])[0]
    max_len = 16
    assert len(toks) > 3 * max_len
    nll, n = score_texts(loaded, [text], max_length=max_len)
    expected = 0.0
    for seq, k in rolling_windows(toks, loaded.card.prefix_token_id, max_len):
        with torch.no_grad():
            logits = loaded.model(input_ids=torch.tensor([seq[:-1]])).logits[0].float()
        logp = torch.log_softmax(logits[-k:], dim=-1)
        expected -= logp.gather(1, torch.tensor(seq[-k:])[:, None]).sum().item()
    assert n[0] == len(toks)
    assert nll[0] == pytest.approx(expected, abs=1e-5 * len(toks))


def test_windowed_vs_whole_when_it_fits(loaded):
    """A window as long as the sample gives the whole-sample score: windowing only starts past the cap."""
    lengths = [len(t) for t in tokenize(loaded, TEXTS[:6])]
    whole = score_texts(loaded, TEXTS[:6])
    capped = score_texts(loaded, TEXTS[:6], max_length=max(lengths))
    np.testing.assert_allclose(whole[0], capped[0], rtol=0, atol=1e-5)
    windowed = score_texts(loaded, TEXTS[:6], max_length=min(lengths) - 1)
    assert not np.allclose(whole[0], windowed[0], atol=1e-5)  # shorter context: a different number


def test_argmin_same_in_nats_and_bits_per_byte(tiny_llama, tiny_gpt2):
    """The per-sample best model is the same whether losses are in nats or in bits per byte."""
    nll = np.stack([score_texts(load_model(f"dir:{p}", "cpu", "float32"), TEXTS)[0]
                    for p in (tiny_llama, tiny_gpt2)], axis=1)
    n_bytes = np.array([len(t.encode()) for t in TEXTS])
    bpb = bits_per_byte(nll, n_bytes[:, None])
    np.testing.assert_array_equal(nll.argmin(1), bpb.argmin(1))


def test_sample_without_tokens_is_named():
    """A sample that tokenizes to nothing cannot be scored: the error names it and the fix."""
    from mcl_utils.errors import UserError

    with pytest.raises(UserError, match="sample 'b' has no tokens under m; fix: drop empty samples"):
        make_rows([[5, 6], []], prefix_id=0, max_length=8, sample_ids=["a", "b"], model_name="m")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_bfloat16_path_takes_the_loss_in_float32(arch, tiny_llama, tiny_gpt2):
    """The bf16 path (what a GPU runs) loads in bf16, takes the log-softmax of its logits in float32, and
    stays within 1% of float32 scoring."""
    spec = f"dir:{tiny_llama if arch == 'llama' else tiny_gpt2}"
    bf16 = load_model(spec, device="cpu", dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16 and bf16.card.dtype == "bfloat16"
    nll, n_tokens = score_texts(bf16, TEXTS[:6], batch_tokens=1)  # one row per pass: the reference's shapes
    for text, ours in zip(TEXTS[:6], nll):
        ids = torch.tensor([[bf16.card.prefix_token_id] + tokenize(bf16, [text])[0]])
        with torch.no_grad():
            logits = bf16.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1].float()
        expected = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        assert ours == pytest.approx(expected, rel=1e-6)
    high, n_high = score_texts(load_model(spec, device="cpu", dtype="float32"), TEXTS[:6])
    np.testing.assert_array_equal(n_tokens, n_high)
    np.testing.assert_allclose(nll, high, rtol=1e-2)
