"""The min-loss oracle: winners, pools and the properties any oracle must have."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mcl_utils import oracle
from mcl_utils.store import LN2, LossMatrix


def _matrix(nll: np.ndarray, n_bytes: np.ndarray | None = None) -> LossMatrix:
    """A loss matrix of synthetic losses."""
    n, m = nll.shape
    return LossMatrix(sample_ids=np.array([f"s{i}" for i in range(n)]), models=[f"m{j}" for j in range(m)],
                      nll_nats=nll, n_bytes=n_bytes if n_bytes is not None else np.full(n, 100),
                      n_tokens=np.full((n, m), 10), provenance=[{}] * m)


def _cards(n_params: list[int], families: list[str] | None = None) -> pd.DataFrame:
    """Model cards for synthetic models m0, m1, ...: non-embedding parameters are half the total."""
    return pd.DataFrame({"name": [f"m{j}" for j in range(len(n_params))],
                         "family": families or ["f"] * len(n_params), "n_params_total": n_params,
                         "n_params_non_embedding": [p // 2 for p in n_params]})


losses = st.integers(2, 5).flatmap(lambda m: arrays(np.float64, (12, m), elements=st.floats(0.1, 50)))


def test_ties_go_to_fewer_parameters():
    """Equal losses credit the smaller model, whatever its column."""
    nll = np.array([[1.0, 1.0, 2.0], [3.0, 2.0, 2.0], [3.0, 3.0, 2.0]])
    assert oracle.winners(nll, [300, 100, 200]).tolist() == [1, 1, 2]


@settings(max_examples=50, deadline=None)
@given(losses)
def test_adding_a_model_never_raises_the_oracle_loss(nll):
    """Every pool's oracle loss is at most that of each of its sub-pools."""
    table = oracle.pool_table(_matrix(nll), _cards(list(range(1, nll.shape[1] + 1)))).set_index("pool")["oracle_bpb"]
    for pool in table.index:
        members = pool.split(" + ")
        for drop in members if len(members) > 1 else []:
            assert table[pool] <= table[" + ".join(m for m in members if m != drop)] + 1e-12


@settings(max_examples=50, deadline=None)
@given(losses)
def test_pool_of_one_is_that_model(nll):
    """A single-model pool's oracle bits per byte is the model's own, with zero gap."""
    matrix = _matrix(nll)
    table = oracle.pool_table(matrix, _cards([1] * nll.shape[1]))
    singles = table[table["n_models"] == 1]
    np.testing.assert_allclose(singles["oracle_bpb"], matrix.corpus_bpb().to_numpy())
    assert (singles["gap_bpb"] == 0).all()


def test_pool_table_and_shares_by_group():
    """All 2^n - 1 pools with total and non-embedding parameters; win shares per group sum to one."""
    nll = np.array([[1.0, 2.0], [2.0, 1.0], [1.0, 3.0]])
    matrix = _matrix(nll, np.array([10, 20, 30]))
    table = oracle.pool_table(matrix, _cards([6, 8]))
    assert table["total_params"].tolist() == [6, 8, 14] and table["non_embedding_params"].tolist() == [3, 4, 7]
    assert table["oracle_bpb"].iloc[-1] == (1 + 1 + 1) / (LN2 * 60) and not table.attrs["sampled"]
    shares = oracle.win_shares(matrix, [5, 7], pd.Series(["a", "a", "b"]))
    assert shares.loc["a"].tolist() == [0.5, 0.5] and shares.loc["b"].tolist() == [1.0, 0.0]
    assert oracle.per_group_choice_bpb(matrix, pd.Series(["a", "a", "b"])) == (3 + 1) / (LN2 * 60)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 7).flatmap(lambda m: arrays(np.float64, (9, m), elements=st.floats(0.1, 50))))
def test_all_pools_engine_equals_a_loop_over_pools(nll):
    """The split-and-double engine gives each pool exactly the sum a per-pool loop gives."""
    sums = oracle.all_pool_nll_sums(nll, threads=2)
    for mask in range(1, 2 ** nll.shape[1]):
        members = [j for j in range(nll.shape[1]) if mask >> j & 1]
        assert sums[mask - 1] == nll[:, members].min(axis=1).sum()


def test_families_and_kinds():
    """A pool is homogeneous when all its members share a family, else heterogeneous."""
    table = oracle.pool_table(_matrix(np.ones((4, 3))), _cards([1, 2, 3], ["qwen", "qwen", "llama"]))
    kinds = table.set_index("pool")[["families", "kind"]]
    assert kinds.loc["m0 + m1"].tolist() == ["qwen", "homogeneous"]
    assert kinds.loc["m1 + m2"].tolist() == ["qwen + llama", "heterogeneous"]
    assert kinds.loc["m2"].tolist() == ["llama", "homogeneous"]


def test_more_than_twenty_models_are_sampled_by_size():
    """Above 20 models the table holds a seeded sample: all pools of small sizes, per_size of the others."""
    rng = np.random.default_rng(0)
    nll = rng.gamma(3.0, 10.0, (30, 22))
    matrix = _matrix(nll)
    table = oracle.pool_table(matrix, _cards(list(range(1, 23))), per_size=40, seed=5)
    counts = table["n_models"].value_counts().sort_index()
    assert table.attrs["sampled"] and counts[1] == 22 and counts[2] == 40 and counts[21] == 22 and counts[22] == 1
    assert table["pool"].is_unique
    assert table.equals(oracle.pool_table(matrix, _cards(list(range(1, 23))), per_size=40, seed=5))
    row = table.iloc[100]
    assert row["oracle_bpb"] == pytest.approx(oracle.pool_minima(matrix, [row["pool"]]).sum() / (LN2 * 3000))


def test_budget_points():
    """The frontier takes each budget bin's best pool; the mean averages the bin."""
    table = pd.DataFrame({"pool": list("abcd"), "total_params": [100, 120, 1000, 1100],
                          "oracle_bpb": [1.0, 0.8, 0.5, 0.7]})
    frontier = oracle.budget_points(table, "frontier", bins_per_decade=1)
    assert frontier["pool"].tolist() == ["b", "c"] and frontier["params"].tolist() == [120, 1000]
    mean = oracle.budget_points(table, "mean", bins_per_decade=1)
    assert mean["bpb"].tolist() == pytest.approx([0.9, 0.6]) and mean["n_pools"].tolist() == [2, 2]


def test_per_token_comparison_flips_winners():
    """Per-token means favour the model with more tokens per text; summed losses do not."""
    matrix = LossMatrix(sample_ids=np.array(["s0", "s1"]), models=["fine", "coarse"],
                        nll_nats=np.array([[30.0, 25.0], [10.0, 12.0]]), n_bytes=np.array([50, 50]),
                        n_tokens=np.array([[20, 10], [20, 10]]), provenance=[{}, {}])
    assert oracle.per_token_winner_flips(matrix) == 0.5


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 7).flatmap(lambda m: arrays(np.float64, (9, m), elements=st.floats(0.1, 50))),
       st.integers(0, 2**32 - 1))
def test_group_means_equal_a_loop_over_pools(nll, seed):
    """Per-sample mean oracle loss of each group of pools, by half tables, equals a loop over pools."""
    rng = np.random.default_rng(seed)
    masks = rng.choice(np.arange(1, 2 ** nll.shape[1]), size=min(20, 2 ** nll.shape[1] - 1), replace=False)
    groups = rng.integers(0, 3, len(masks))
    groups[:3] = [0, 1, 2][:len(groups)]  # every group has a pool when there are three or more pools
    got = oracle.group_mean_minima(nll, masks, groups)
    for g in range(groups.max() + 1):
        pools = [[j for j in range(nll.shape[1]) if mask >> j & 1] for mask in masks[groups == g]]
        np.testing.assert_allclose(got[:, g], np.mean([nll[:, p].min(axis=1) for p in pools], axis=0), rtol=1e-12)


def test_budget_minima_by_half_tables_equal_pool_by_pool():
    """The fast path of budget_minima (up to 20 models) equals the chunked pool-by-pool path."""
    rng = np.random.default_rng(3)
    matrix = _matrix(rng.gamma(3.0, 10.0, (40, 6)))
    table = oracle.pool_table(matrix, _cards([10, 20, 40, 80, 160, 320]))
    bins = oracle.budget_bins(table)
    slow = np.column_stack([oracle.pool_minima(matrix, table["pool"][bins == b].tolist()).mean(axis=1)
                            for b in np.unique(bins)])
    np.testing.assert_allclose(oracle.budget_minima(matrix, table["pool"], bins), slow, rtol=1e-12)


def test_matched_pools_share_size_and_budget():
    """Each homogeneous pool is matched only with heterogeneous pools of as many models and a close budget."""
    rng = np.random.default_rng(0)
    matrix = _matrix(rng.gamma(3.0, 10.0, (20, 6)))
    cards = _cards([10, 20, 40, 11, 21, 41], ["a", "a", "a", "b", "b", "b"])
    table = oracle.pool_table(matrix, cards)
    pairs = oracle.matched_pools(table, tolerance=0.25, per_pool=3)
    by_pool = table.set_index("pool")
    assert set(pairs["homogeneous"]) <= set(by_pool.index[(by_pool["kind"] == "homogeneous") & (by_pool["n_models"] > 1)])
    for row in pairs.itertuples():
        assert by_pool.loc[row.heterogeneous, "kind"] == "heterogeneous"
        assert by_pool.loc[row.heterogeneous, "n_models"] == row.n_models
        assert abs(np.log(row.match_params / row.total_params)) <= np.log(1.25)
    assert pairs.groupby("homogeneous").size().max() <= 3
    pools, own, matched = oracle.matched_losses(matrix, pairs)
    first = pairs[pairs["homogeneous"] == pools[0]]["heterogeneous"]
    np.testing.assert_allclose(matched[:, 0], oracle.pool_minima(matrix, first.tolist()).mean(axis=1))
    np.testing.assert_allclose(own[:, 0], oracle.pool_minima(matrix, [pools[0]])[:, 0])


def test_pool_diversity_measures_by_hand():
    """Gain, win entropy, upset share and loss correlation of a two-model pool, computed by hand."""
    nll = np.array([[1.0, 2.0], [3.0, 1.0], [2.0, 4.0], [5.0, 1.0]])
    matrix = _matrix(nll, np.array([10, 10, 10, 10]))
    row = oracle.PoolDiversity(matrix, _cards([1, 2], ["a", "b"]), [(0, 1)]).measures().iloc[0]
    single = nll.sum(axis=0) / (LN2 * 40)
    oracle_bpb = nll.min(axis=1).sum() / (LN2 * 40)
    assert row["oracle_bpb"] == pytest.approx(oracle_bpb) and row["best_single_bpb"] == pytest.approx(single.min())
    assert row["gain_pct"] == pytest.approx(100 * (single.min() - oracle_bpb) / single.min())
    assert row["win_entropy_bits"] == pytest.approx(1.0) and row["upset_share"] == pytest.approx(0.5)
    assert row["loss_correlation"] == pytest.approx(np.corrcoef(nll.T)[0, 1])
    assert row["n_families"] == 2 and row["kind"] == "heterogeneous"
    weighted = oracle.PoolDiversity(matrix, _cards([1, 2], ["a", "b"]), [(0, 1)]).measures(np.array([2, 0, 1, 1.0]))
    repeated = oracle.PoolDiversity(_matrix(nll[[0, 0, 2, 3]], np.full(4, 10)), _cards([1, 2], ["a", "b"]), [(0, 1)])
    np.testing.assert_allclose(weighted.drop(columns=["pool", "kind"]).to_numpy(float),
                               repeated.measures().drop(columns=["pool", "kind"]).to_numpy(float))


def test_rank_correlations_equal_scipy():
    """Spearman over all pools and the size-weighted mean of Spearman within sizes, as scipy computes them."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(2)
    table = pd.DataFrame({"n_models": rng.integers(1, 5, 300), "gain_pct": rng.normal(size=300)})
    for m in oracle.DIVERSITY_MEASURES:
        table[m] = table["gain_pct"] * rng.uniform() + rng.normal(size=300)
    got = oracle.rank_correlations(table)
    multi = table[table["n_models"] >= 2]
    for m in oracle.DIVERSITY_MEASURES:
        within = [(spearmanr(g[m], g["gain_pct"]).statistic, len(g)) for _, g in multi.groupby("n_models")]
        assert got[m]["all_sizes"] == pytest.approx(spearmanr(multi[m], multi["gain_pct"]).statistic)
        assert got[m]["within_size"] == pytest.approx(np.average([r for r, _ in within], weights=[n for _, n in within]))
