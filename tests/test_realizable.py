"""How much of the oracle is real: pool rules against brute force, and the controls on synthetic losses
whose truth is known (noise replicas, perfect routers, identical models, the ln K bound, no leakage)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.neighbors import KNeighborsRegressor

from mcl_utils import oracle, realizable as rz
from mcl_utils.corpus import head_text
from mcl_utils.models import load_model
from mcl_utils.scoring import per_sample, prepare, rolling_windows, score_rows, tokenize
from tests.conftest import TEXTS


def frame_of(head: np.ndarray, rest: np.ndarray, n_bytes: np.ndarray) -> rz.Frame:
    """A whole-sample frame from head and rest losses."""
    return rz.Frame("whole", [f"m{j}" for j in range(head.shape[1])], head + rest, n_bytes, head, rest)


def all_masks(n: int) -> np.ndarray:
    """Every non-empty pool of n models."""
    return np.arange(1, 1 << n)


def members(mask: int, n: int) -> list[int]:
    """Column indices of a pool's members."""
    return [j for j in range(n) if mask >> j & 1]


def test_rules_equal_brute_force():
    """Selection, mixture, signed sums and group means equal a pool-by-pool computation for every pool."""
    rng = np.random.default_rng(0)
    n, score, charge = 5, rng.gamma(3, 50, (40, 5)), rng.gamma(3, 50, (40, 5))
    selection, mixture = rz.Selection(score, charge), rz.Mixture(charge)
    masks = all_masks(n)
    got_sel, got_mix = rz.pool_losses(selection, masks), rz.pool_losses(mixture, masks)
    for i, m in enumerate(masks):
        cols = members(m, n)
        pick = np.asarray(cols)[np.argmin(score[:, cols], axis=1)]
        np.testing.assert_allclose(got_sel[:, i], charge[np.arange(40), pick])
        np.testing.assert_allclose(got_mix[:, i], np.log(len(cols)) - logsumexp(-charge[:, cols], axis=1), rtol=1e-12)
    np.testing.assert_allclose(rz.all_pool_sums(selection), got_sel.sum(axis=0))
    np.testing.assert_allclose(rz.all_pool_sums(rz.Combined((1.0, selection), (-1.0, mixture))),
                               (got_sel - got_mix).sum(axis=0))
    groups = rng.integers(0, 4, len(masks))
    expected = np.column_stack([got_sel[:, groups == g].mean(axis=1) for g in range(4)])
    np.testing.assert_allclose(rz.group_means(selection, masks, groups), expected)
    np.testing.assert_allclose(rz.all_pool_sums(rz.Selection(charge, charge)), oracle.all_pool_nll_sums(charge))


def test_noise_replicas_gain_nothing_honestly():
    """Replicas whose per-sample differences are pure noise: the oracle shows a gain, the cross-fitted
    oracle none (zero within its interval)."""
    rng = np.random.default_rng(1)
    n_samples, n_bytes = 3000, np.full(3000, 400)
    truth = rng.gamma(20, 6, (n_samples, 1))
    head = truth / 2 + rng.normal(0, 6, (n_samples, 3))
    rest = truth / 2 + rng.normal(0, 6, (n_samples, 3))
    frame = frame_of(head, rest, n_bytes)
    gains = rz.gain_intervals(frame, [7], {"oracle": frame.oracle(), "honest": rz.cross_fitted_oracle(frame)}, 300)
    gains = gains.set_index("method")
    assert gains.loc["oracle", "lo"] > 1  # percent: the oracle profits from the noise
    assert gains.loc["honest", "lo"] < 0 < gains.loc["honest", "hi"]


def test_real_complementarity_survives_cross_fitting():
    """Models that are better on different kinds of samples keep their gain under cross-fitting."""
    rng = np.random.default_rng(2)
    kind = rng.integers(0, 2, 1000)
    base = np.column_stack([np.where(kind == 0, 100.0, 130.0), np.where(kind == 0, 130.0, 100.0)])
    frame = frame_of(base + rng.normal(0, 3, base.shape), base + rng.normal(0, 3, base.shape), np.full(1000, 300))
    gains = rz.gain_intervals(frame, [3], {"honest": rz.cross_fitted_oracle(frame)}, 200).set_index("method")
    assert gains.loc["honest", "lo"] > 5


def test_perfectly_informed_router_reaches_the_oracle():
    """A kNN router whose feature says which model wins each sample routes like the oracle."""
    rng = np.random.default_rng(3)
    winner = rng.integers(0, 3, 600)
    n_bytes = rng.integers(200, 800, 600)
    bpb = np.where(np.arange(3)[None, :] == winner[:, None], 1.0, 1.5) + rng.uniform(0, 0.1, (600, 3))
    frame = rz.Frame("rest", ["a", "b", "c"], bpb * n_bytes[:, None] * np.log(2), n_bytes, bpb, bpb)
    predicted = rz.cross_fitted_predictions(KNeighborsRegressor(5), winner[:, None].astype(float), bpb)
    np.testing.assert_array_equal(rz.pool_losses(rz.routed(predicted, frame), [7]),
                                  rz.pool_losses(frame.oracle(), [7]))


def test_mixture_of_identical_models_is_either():
    """The uniform mixture of two identical models is that model, sample by sample."""
    losses = np.random.default_rng(4).gamma(3, 50, (50, 1))
    np.testing.assert_allclose(rz.pool_losses(rz.Mixture(np.hstack([losses, losses])), [3])[:, 0], losses[:, 0])


def test_mixture_within_ln_k_of_the_oracle():
    """On every sample of every pool the mixture lies between the oracle and the oracle plus ln K."""
    rng = np.random.default_rng(5)
    frame = frame_of(rng.gamma(2, 30, (200, 6)), rng.gamma(2, 30, (200, 6)), np.full(200, 100))
    assert 0 < rz.max_mixture_excess(frame) <= 1 + 1e-9  # float rounding at the bound


class Spy(BaseEstimator, RegressorMixin):
    """A regressor that records which samples (column 0 of X holds the sample index) it fits and predicts."""

    log: list = []

    def fit(self, X, y):
        """Remember the training samples."""
        self.seen_ = set(X[:, 0].astype(int))
        return self

    def predict(self, X):
        """Log (training samples, predicted samples) and predict zeros."""
        Spy.log.append((self.seen_, set(X[:, 0].astype(int))))
        return np.zeros((len(X), 2))


def test_routers_never_see_the_evaluation_split():
    """Cross-fitting predicts every sample once, from an estimator that never trained on it."""
    Spy.log = []
    X = np.arange(100)[:, None].astype(float)
    rz.cross_fitted_predictions(Spy(), X, np.zeros((100, 2)))
    assert len(Spy.log) == rz.N_FOLDS
    assert all(not (seen & predicted) for seen, predicted in Spy.log)
    assert set().union(*(p for _, p in Spy.log)) == set(range(100))


def test_winner_labels_keep_only_frequent_winners():
    """Models winning fewer samples than there are folds are merged into their best frequent rival."""
    losses = np.array([[1.0, 2, 3]] * 10 + [[2.0, 1, 3]] * 6 + [[3.0, 2, 1]] * 2)
    labels = rz.winner_labels(losses, min_count=5)
    assert list(labels) == [0] * 10 + [1] * 6 + [1] * 2


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def loaded(request, tiny_llama, tiny_gpt2):
    """Each tiny model, loaded in float32 on the CPU."""
    path = tiny_llama if request.param == "llama" else tiny_gpt2
    return load_model(f"dir:{path}", device="cpu", dtype="float32")


def test_heads_score_with_the_context_of_the_whole_text(loaded):
    """A head is scored token for token as inside its whole text, windows included: its loss is the sum of
    the whole text's per-token losses over the head's tokens."""
    texts = [TEXTS[6] * 2, TEXTS[1]]
    heads = [head_text(t, 0.6) for t in texts]
    max_len = 16
    rows, batches, _ = prepare(loaded, heads, ["a", "b"], max_len, 4096, full_texts=texts)
    nll, n = per_sample(rows, batches, score_rows(loaded, rows, batches), 2)
    for i, (head, text) in enumerate(zip(heads, texts)):
        n_head, toks = len(tokenize(loaded, [head])[0]), tokenize(loaded, [text])[0]
        assert toks[:n_head] == tokenize(loaded, [head])[0]
        expected, start = 0.0, 0
        for seq, k in rolling_windows(toks, loaded.card.prefix_token_id, max_len):
            with torch.no_grad():
                logits = loaded.model(input_ids=torch.tensor([seq[:-1]])).logits[0].float()
            logp = torch.log_softmax(logits[-k:], dim=-1).gather(1, torch.tensor(seq[-k:])[:, None])[:, 0]
            expected -= logp[:max(0, min(k, n_head - start))].sum().item()
            start += k
        assert n[i] == n_head
        assert nll[i] == pytest.approx(expected, abs=1e-5 * n_head)


def test_truncated_windows_are_prefixes_of_the_whole_windows():
    """Cutting after n tokens keeps each window's context and drops only targets past n."""
    tokens = list(range(1, 60))
    whole = rolling_windows(tokens, 0, 16)
    for n in (1, 15, 16, 17, 40, 59):
        cut = rolling_windows(tokens, 0, 16, n_scored=n)
        assert sum(k for _, k in cut) == n
        for (seq, k), (full_seq, _) in zip(cut, whole):
            assert full_seq[:len(seq)] == seq


def test_head_text_cuts_before_a_space():
    """Heads end at a word boundary and keep at least one word."""
    assert head_text("The cat sat on the mat", 0.5) == "The cat"
    assert head_text("Supercalifragilistic expialidocious", 0.1) == "Supercalifragilistic"
    assert head_text("oneword", 0.5) == "oneword"


def test_replica_pools_and_matched_budgets():
    """Pools of r replicas for every r, and matched pools drawn only from the given models."""
    pools = rz.replica_pools([0, 3, 5])
    assert pools.groupby("r").size().to_dict() == {1: 3, 2: 3, 3: 1}
    masks = rz.matched_budget_masks([10, 20, 30, 40, 1000], 2, 50, among=[0, 1, 2, 3], tolerance=0.1)
    assert sorted(masks) == sorted([1 << 0 | 1 << 3, 1 << 1 | 1 << 2])
    assert all(sum(1 for j in range(5) if m >> j & 1) == 2 for m in masks)


def test_token_losses_sum_to_the_sample_losses(loaded):
    """Per-token losses, windows included, add up to the summed loss the loss tables hold."""
    from mcl_utils.scoring import score_texts, token_losses

    texts = [TEXTS[6] * 2, TEXTS[1], TEXTS[2]]
    per_token = token_losses(loaded, texts, max_length=16)
    nll, n = score_texts(loaded, texts, max_length=16)
    assert [len(x) for x in per_token] == list(n)
    np.testing.assert_allclose([x.sum(dtype=np.float64) for x in per_token], nll, rtol=1e-5)


def test_em_weights_and_token_mixtures():
    """EM puts all weight on a model better on every token; mixing identical models changes nothing; the
    uniform mixture's weights fit the likelihood less well than EM's."""
    rng = np.random.default_rng(6)
    good = rng.gamma(2, 1, (500, 1))
    tokens = np.hstack([good, good + 2.0])
    assert rz.em_weights(tokens)[0] > 0.99
    same = np.hstack([good, good])
    assert rz.token_mixture_nll(same, np.array([0.3, 0.7])) == pytest.approx(good.sum(), rel=1e-12)
    mixed = np.hstack([good, rng.gamma(2, 1, (500, 1))])
    weights = rz.em_weights(mixed)
    assert rz.token_mixture_nll(mixed, weights) <= rz.token_mixture_nll(mixed, np.array([0.5, 0.5])) + 1e-9


def test_token_mixture_weights_come_from_other_folds():
    """A sample's cross-fitted mixture uses weights fit without it: changing the sample's own tokens changes
    its loss only through its tokens, never through its weights."""
    from sklearn.model_selection import KFold

    rng = np.random.default_rng(7)
    per_sample = [rng.gamma(2, 1, (int(rng.integers(5, 20)), 3)) for _ in range(40)]
    changed = list(per_sample)
    changed[0] = per_sample[0] + np.array([0.0, 50.0, 50.0])  # sample 0 now strongly favours model 0
    out, _ = rz.cross_fitted_token_mixture(changed)
    train = next(tr for tr, te in KFold(rz.N_FOLDS, shuffle=True, random_state=0).split(np.arange(40)) if 0 in te)
    weights = rz.em_weights(np.concatenate([per_sample[i] for i in train]))
    assert out[0] == pytest.approx(rz.token_mixture_nll(changed[0], weights), rel=1e-10)
