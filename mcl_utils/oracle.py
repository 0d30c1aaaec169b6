"""The min-loss oracle: each sample takes the lowest loss of any model in a pool."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd

from mcl_utils.store import LN2, LossMatrix

MAX_EXACT_MODELS = 20


def winners(nll_nats: np.ndarray, n_params: Sequence[int]) -> np.ndarray:
    """Column index of the lowest loss in each row; ties go to the model with fewer parameters."""
    by_size = np.argsort(np.asarray(n_params), kind="stable")
    return by_size[np.argmin(nll_nats[:, by_size], axis=1)]


def oracle_nll(nll_nats: np.ndarray, pool: Sequence[int]) -> np.ndarray:
    """Per-sample loss of a pool under the oracle: the minimum over its members."""
    return nll_nats[:, list(pool)].min(axis=1)


def all_pools(n_models: int) -> list[tuple[int, ...]]:
    """Every non-empty subset of n models, smallest pools first."""
    if n_models > MAX_EXACT_MODELS:
        raise ValueError(f"{n_models} models make 2^{n_models} pools; sample pools instead")
    return [c for k in range(1, n_models + 1) for c in itertools.combinations(range(n_models), k)]


def _single_bpb(matrix: LossMatrix) -> list[float]:
    """Each model's bits per byte, summed like pools are, so a pool of one has exactly zero gap."""
    denominator = LN2 * matrix.n_bytes.sum()
    return [oracle_nll(matrix.nll_nats, (j,)).sum() / denominator for j in range(len(matrix.models))]


def _pool_row(matrix: LossMatrix, n_params: Sequence[int], single: Sequence[float], pool: tuple[int, ...]) -> dict:
    """One pool's members, total parameters, oracle bpb, best single member and gap."""
    best = min(pool, key=lambda j: (single[j], n_params[j]))
    bpb = oracle_nll(matrix.nll_nats, pool).sum() / (LN2 * matrix.n_bytes.sum())
    return {"pool": " + ".join(matrix.models[j] for j in pool), "n_models": len(pool),
            "total_params": int(sum(n_params[j] for j in pool)), "oracle_bpb": bpb,
            "best_single": matrix.models[best], "best_single_bpb": single[best], "gap_bpb": single[best] - bpb}


def pool_table(matrix: LossMatrix, n_params: Sequence[int]) -> pd.DataFrame:
    """One row per pool: members, total parameters, oracle bpb, best single member, and the gap."""
    single = _single_bpb(matrix)
    return pd.DataFrame([_pool_row(matrix, n_params, single, pool) for pool in all_pools(len(matrix.models))])


def win_shares(matrix: LossMatrix, n_params: Sequence[int], groups: pd.Series | None = None) -> pd.DataFrame:
    """Share of samples each model wins in the full pool, overall or within each group (e.g. genre)."""
    won = pd.Series(np.asarray(matrix.models)[winners(matrix.nll_nats, n_params)], name="winner")
    keys = groups.reset_index(drop=True) if groups is not None else pd.Series("all", index=won.index)
    shares = pd.crosstab(keys, won, normalize="index")
    return shares.reindex(columns=matrix.models, fill_value=0.0)


def group_bpb(matrix: LossMatrix, groups: pd.Series) -> pd.DataFrame:
    """Bits per byte of each model and of the full-pool oracle within each group (long format)."""
    nll = pd.DataFrame(matrix.nll_nats, columns=matrix.models)
    nll["oracle (all models)"] = matrix.nll_nats.min(axis=1)
    nll["group"] = groups.to_numpy()
    sums = nll.groupby("group").sum()
    n_bytes = pd.Series(matrix.n_bytes).groupby(groups.to_numpy()).sum()
    bpb = sums.div(n_bytes * LN2, axis=0)
    return bpb.reset_index(names="group").melt(id_vars="group", var_name="series", value_name="bpb")


def headline(matrix: LossMatrix, n_params: Sequence[int]) -> dict:
    """The chapter's numbers: best single model, full-pool oracle, gap, and each model's win share."""
    full = _pool_row(matrix, n_params, _single_bpb(matrix), tuple(range(len(matrix.models))))
    shares = win_shares(matrix, n_params).iloc[0]
    return {"n_models": len(matrix.models), "n_samples": len(matrix.sample_ids),
            "best_single": full["best_single"], "best_single_bpb": float(full["best_single_bpb"]),
            "oracle_bpb": float(full["oracle_bpb"]), "gap_bpb": float(full["gap_bpb"]),
            "gap_pct": float(100 * full["gap_bpb"] / full["best_single_bpb"]),
            "best_single_win_share": float(shares[full["best_single"]]),
            "win_shares": {m: float(s) for m, s in shares.items()}}


def per_group_choice_bpb(matrix: LossMatrix, groups: pd.Series) -> float:
    """Bits per byte when one model is chosen per group (its best on that group) instead of per sample."""
    sums = pd.DataFrame(matrix.nll_nats, columns=matrix.models).groupby(groups.to_numpy()).sum()
    return float(sums.min(axis=1).sum() / (LN2 * matrix.n_bytes.sum()))
