"""The min-loss oracle: winners, pools and the properties any oracle must have."""

from __future__ import annotations

import numpy as np
import pandas as pd
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


losses = st.integers(2, 5).flatmap(lambda m: arrays(np.float64, (12, m), elements=st.floats(0.1, 50)))


def test_ties_go_to_fewer_parameters():
    """Equal losses credit the smaller model, whatever its column."""
    nll = np.array([[1.0, 1.0, 2.0], [3.0, 2.0, 2.0], [3.0, 3.0, 2.0]])
    assert oracle.winners(nll, [300, 100, 200]).tolist() == [1, 1, 2]


@settings(max_examples=50, deadline=None)
@given(losses)
def test_adding_a_model_never_raises_the_oracle_loss(nll):
    """Every pool's oracle loss is at most that of each of its sub-pools."""
    table = oracle.pool_table(_matrix(nll), list(range(1, nll.shape[1] + 1))).set_index("pool")["oracle_bpb"]
    for pool in table.index:
        members = pool.split(" + ")
        for drop in members if len(members) > 1 else []:
            assert table[pool] <= table[" + ".join(m for m in members if m != drop)] + 1e-12


@settings(max_examples=50, deadline=None)
@given(losses)
def test_pool_of_one_is_that_model(nll):
    """A single-model pool's oracle bits per byte is the model's own, with zero gap."""
    matrix = _matrix(nll)
    table = oracle.pool_table(matrix, [1] * nll.shape[1])
    singles = table[table["n_models"] == 1]
    np.testing.assert_allclose(singles["oracle_bpb"], matrix.corpus_bpb().to_numpy())
    assert (singles["gap_bpb"] == 0).all()


def test_pool_table_and_shares_by_group():
    """All 2^n - 1 pools with total parameters; win shares per group sum to one."""
    nll = np.array([[1.0, 2.0], [2.0, 1.0], [1.0, 3.0]])
    matrix = _matrix(nll, np.array([10, 20, 30]))
    table = oracle.pool_table(matrix, [5, 7])
    assert table["total_params"].tolist() == [5, 7, 12]
    assert table["oracle_bpb"].iloc[-1] == (1 + 1 + 1) / (LN2 * 60)
    shares = oracle.win_shares(matrix, [5, 7], pd.Series(["a", "a", "b"]))
    assert shares.loc["a"].tolist() == [0.5, 0.5] and shares.loc["b"].tolist() == [1.0, 0.0]
    assert oracle.per_group_choice_bpb(matrix, pd.Series(["a", "a", "b"])) == (3 + 1) / (LN2 * 60)
