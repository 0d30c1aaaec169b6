"""The min-loss oracle: each sample takes the lowest loss of any model in a pool."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import numpy as np
import pandas as pd

from mcl_utils.store import LN2, LossMatrix

MAX_EXACT_MODELS = 20
BINS_PER_DECADE = 4  # budget bins for frontier and mean points
CARD_COLUMNS = ("name", "family", "n_params_total", "n_params_non_embedding")


def model_cards(matrix: LossMatrix) -> pd.DataFrame:
    """Name, family and parameter counts of each model of a loss matrix, in matrix order."""
    return pd.DataFrame([{c: prov["model"][c] for c in CARD_COLUMNS} for prov in matrix.provenance])


def winners(nll_nats: np.ndarray, n_params: Sequence[int]) -> np.ndarray:
    """Column index of the lowest loss in each row; ties go to the model with fewer parameters."""
    by_size = np.argsort(np.asarray(n_params), kind="stable")
    return by_size[np.argmin(nll_nats[:, by_size], axis=1)]


def oracle_nll(nll_nats: np.ndarray, pool: Sequence[int]) -> np.ndarray:
    """Per-sample loss of a pool under the oracle: the minimum over its members."""
    return nll_nats[:, list(pool)].min(axis=1)


# ---------------------------------------------------------------- pools as bit masks


def _subset_minima(columns: np.ndarray) -> np.ndarray:
    """Per-sample minimum over every subset of the rows of `columns` (items x samples), indexed by bit
    mask (bit j = item j); entry 0, the empty subset, is +inf.

    Doubling: the subsets containing item j are those without it, combined with item j."""
    out = np.empty((1 << len(columns), columns.shape[1]))
    out[0] = np.inf
    for j in range(len(columns)):
        np.minimum(out[:1 << j], columns[j], out=out[1 << j:2 << j])
    return out


def _half_tables(nll_nats: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    """The number of models in the low half, and the per-sample minima of every subset of each half
    (rows indexed by the subset's bit mask within its half)."""
    n_models = nll_nats.shape[1]
    if n_models > MAX_EXACT_MODELS:
        raise ValueError(f"{n_models} models make 2^{n_models} pools; use sample_pools instead")
    half = (n_models + 1) // 2
    columns = np.ascontiguousarray(nll_nats.T, dtype=np.float64)
    return half, _subset_minima(columns[:half]), _subset_minima(columns[half:])


def all_pool_nll_sums(nll_nats: np.ndarray, threads: int | None = None) -> np.ndarray:
    """Summed oracle loss of every pool, indexed by bit mask minus one: exact, 2^n - 1 values.

    The models are split in two halves; the per-sample minima of every subset of each half are built by
    doubling (2^(n/2) rows each), and each pool is the minimum of one row from each half, summed over
    samples. Work is n_samples x 2^n elementwise minima, spread over threads; memory is 2 x 2^(n/2) rows."""
    _, low, high = _half_tables(nll_nats)
    sums = np.empty((len(high), len(low)))

    def work(rows: np.ndarray) -> None:
        buffer = np.empty_like(low)
        for h in rows:
            np.minimum(low, high[h], out=buffer)
            sums[h] = buffer.sum(axis=1)

    threads = threads or min(os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, np.array_split(np.arange(len(high)), 4 * threads)))
    return sums.reshape(-1)[1:]


def all_pool_budgets(n_params: Sequence[int]) -> np.ndarray:
    """Summed parameters of every pool, indexed by bit mask minus one (as all_pool_nll_sums)."""
    n_params = np.asarray(n_params, dtype=np.int64)
    out = np.zeros(1 << len(n_params), dtype=np.int64)
    for j, n in enumerate(n_params):
        out[1 << j:2 << j] = out[:1 << j] + n
    return out[1:]


def sample_pools(n_models: int, per_size: int, seed: int = 0) -> list[tuple[int, ...]]:
    """A seeded sample of pools stratified by size: every pool of a size with at most `per_size` pools,
    else `per_size` distinct pools of that size drawn uniformly."""
    rng = np.random.default_rng(seed)
    pools: list[tuple[int, ...]] = []
    for k in range(1, n_models + 1):
        if math.comb(n_models, k) <= per_size:
            pools += combinations(range(n_models), k)
            continue
        chosen: set[tuple[int, ...]] = set()
        while len(chosen) < per_size:
            chosen.add(tuple(sorted(int(j) for j in rng.choice(n_models, size=k, replace=False))))
        pools += sorted(chosen)
    return pools


def _pool_masks(n_models: int) -> np.ndarray:
    """Every non-empty pool as a boolean membership row, indexed by bit mask minus one."""
    masks = np.arange(1, 1 << n_models)
    return (masks[:, None] >> np.arange(n_models)) & 1 == 1


# ---------------------------------------------------------------- the pool table


def pool_table(matrix: LossMatrix, cards: pd.DataFrame, per_size: int = 200, seed: int = 0) -> pd.DataFrame:
    """One row per pool: members, total and non-embedding parameters, families, homogeneous or
    heterogeneous, oracle bits per byte, best single member and the gap.

    All 2^n - 1 pools when n <= 20 (attrs["sampled"] False); else `sample_pools(n, per_size, seed)`."""
    n_models = len(matrix.models)
    exact = n_models <= MAX_EXACT_MODELS
    if exact:
        members = _pool_masks(n_models)
        nll_sums = all_pool_nll_sums(matrix.nll_nats)
    else:
        pools = sample_pools(n_models, per_size, seed)
        members = np.zeros((len(pools), n_models), dtype=bool)
        for i, p in enumerate(pools):
            members[i, list(p)] = True
        nll_sums = np.array([oracle_nll(matrix.nll_nats, p).sum() for p in pools])
    table = _describe_pools(matrix, cards, members, nll_sums)
    table = table.sort_values("n_models", kind="stable").reset_index(drop=True)
    table.attrs["sampled"] = not exact
    return table


def _describe_pools(matrix: LossMatrix, cards: pd.DataFrame, members: np.ndarray,
                    nll_sums: np.ndarray) -> pd.DataFrame:
    """Pool rows from membership rows (n_pools x n_models) and each pool's summed oracle loss."""
    names = np.asarray(matrix.models, dtype=object)
    total_bytes = LN2 * matrix.n_bytes.sum()
    single = np.ascontiguousarray(matrix.nll_nats.T).sum(axis=1) / total_bytes  # summed as pools are
    n_params = cards["n_params_total"].to_numpy(np.int64)
    rank = np.lexsort((n_params, single))  # best single member: lowest bpb, ties to fewer parameters
    position = np.empty(len(rank), dtype=np.int64)
    position[rank] = np.arange(len(rank))
    best = rank[np.where(members, position, len(rank)).min(axis=1)]
    codes, family_names = pd.factorize(cards["family"])
    has_family = members.astype(np.int64) @ np.eye(len(family_names), dtype=np.int64)[codes] > 0
    family_key = has_family @ (1 << np.arange(len(family_names)))
    labels = {k: " + ".join(family_names[(k >> np.arange(len(family_names))) & 1 == 1]) for k in set(family_key)}
    bpb = nll_sums / total_bytes
    return pd.DataFrame({
        "pool": [" + ".join(names[row]) for row in members],
        "n_models": members.sum(axis=1),
        "total_params": members.astype(np.int64) @ n_params,
        "non_embedding_params": members.astype(np.int64) @ cards["n_params_non_embedding"].to_numpy(np.int64),
        "families": [labels[k] for k in family_key],
        "kind": np.where(has_family.sum(axis=1) > 1, "heterogeneous", "homogeneous"),
        "oracle_bpb": bpb,
        "best_single": names[best],
        "best_single_bpb": single[best],
        "gap_bpb": single[best] - bpb,
    })


def single_table(matrix: LossMatrix, cards: pd.DataFrame) -> pd.DataFrame:
    """The pool table's rows of the one-model pools."""
    eye = np.eye(len(matrix.models), dtype=bool)
    return _describe_pools(matrix, cards, eye, matrix.nll_nats.sum(axis=0))


def pool_minima(matrix: LossMatrix, pools: Sequence[str]) -> np.ndarray:
    """Per-sample oracle losses (n_samples x n_pools) of pools named as in the pool table ("a + b")."""
    index = {m: j for j, m in enumerate(matrix.models)}
    return np.column_stack([oracle_nll(matrix.nll_nats, [index[m] for m in p.split(" + ")]) for p in pools])


def pool_masks(matrix: LossMatrix, pools: Sequence[str]) -> np.ndarray:
    """Bit mask of each pool named as in the pool table ("a + b"): bit j is the matrix's model j."""
    index = {m: j for j, m in enumerate(matrix.models)}
    return np.array([sum(1 << index[m] for m in p.split(" + ")) for p in pools], dtype=np.int64)


def group_mean_minima(nll_nats: np.ndarray, masks: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per-sample mean oracle loss over the pools of each group (samples x groups); pools are bit masks,
    groups are integer labels 0..G-1 (one per pool).

    As in all_pool_nll_sums, each pool is the minimum of one subset-minimum row from each half of the
    models; pools sharing a high half are taken together, sorted by group, and summed segment by segment."""
    half, low, high = _half_tables(nll_nats)
    masks, groups = np.asarray(masks, dtype=np.int64), np.asarray(groups, dtype=np.int64)
    order = np.lexsort((groups, masks >> half))  # by high half, then by group
    hi, lo, grp = masks[order] >> half, masks[order] & ((1 << half) - 1), groups[order]
    sums = np.zeros((groups.max() + 1, nll_nats.shape[0]))
    for h, start, stop in _runs(hi):
        starts = start + _run_starts(grp[start:stop])
        sums[grp[starts]] += np.add.reduceat(np.minimum(low[lo[start:stop]], high[h]), starts - start, axis=0)
    return (sums / np.bincount(groups, minlength=len(sums))[:, None]).T


def _run_starts(values: np.ndarray) -> np.ndarray:
    """Positions where a run of equal values starts in a sorted array."""
    return np.flatnonzero(np.r_[True, values[1:] != values[:-1]])


def _runs(values: np.ndarray) -> list[tuple[int, int, int]]:
    """(value, start, stop) of each run of equal values in a sorted array."""
    starts = _run_starts(values)
    return [(int(values[a]), int(a), int(b)) for a, b in zip(starts, np.r_[starts[1:], len(values)])]


def budget_minima(matrix: LossMatrix, pools: pd.Series, bins: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Per-sample mean, over the pools of each bin, of the pools' per-sample oracle losses (samples x bins):
    the per-sample losses behind budget_points(..., "mean"). Up to MAX_EXACT_MODELS models by half tables
    (group_mean_minima), else pool by pool in chunks to bound memory."""
    if len(matrix.models) <= MAX_EXACT_MODELS:
        _, groups = np.unique(bins, return_inverse=True)
        return group_mean_minima(matrix.nll_nats, pool_masks(matrix, pools.tolist()), groups)
    out = np.zeros((len(matrix.sample_ids), len(np.unique(bins))))
    for column, b in enumerate(np.unique(bins)):
        members = pools[bins == b].tolist()
        for start in range(0, len(members), chunk):
            out[:, column] += pool_minima(matrix, members[start:start + chunk]).sum(axis=1)
        out[:, column] /= len(members)
    return out


def budget_bins(table: pd.DataFrame, budget: str = "total_params", bins_per_decade: int = BINS_PER_DECADE
                ) -> np.ndarray:
    """Index of each pool's log-spaced budget bin."""
    return np.floor(np.log10(table[budget].to_numpy(float)) * bins_per_decade + 1e-9).astype(int)


def budget_points(table: pd.DataFrame, stat: str, budget: str = "total_params",
                  bins_per_decade: int = BINS_PER_DECADE) -> pd.DataFrame:
    """Pools grouped into log-spaced bins of parameter budget: the best pool of each bin ("frontier")
    or the bin's mean bits per byte at its geometric-mean budget ("mean")."""
    if stat not in ("frontier", "mean"):
        raise ValueError(f"stat must be 'frontier' or 'mean', not {stat!r}")
    bins = budget_bins(table, budget, bins_per_decade)
    grouped = table.assign(bin=bins).groupby("bin")
    if stat == "frontier":
        best = table.loc[grouped["oracle_bpb"].idxmin()]
        return pd.DataFrame({"params": best[budget].to_numpy(float), "bpb": best["oracle_bpb"].to_numpy(),
                             "n_pools": grouped.size().to_numpy(), "pool": best["pool"].to_numpy()})
    return pd.DataFrame({"params": np.exp(grouped[budget].apply(lambda s: np.log(s.to_numpy(float)).mean())),
                         "bpb": grouped["oracle_bpb"].mean(), "n_pools": grouped.size()}).reset_index(drop=True)


# ---------------------------------------------------------------- who wins, where


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


def headline(matrix: LossMatrix, cards: pd.DataFrame) -> dict:
    """The chapter's numbers: best single model, full-pool oracle, gap, and each model's win share."""
    everyone = np.ones((1, len(matrix.models)), dtype=bool)
    full = _describe_pools(matrix, cards, everyone, np.array([matrix.nll_nats.min(axis=1).sum()])).iloc[0]
    shares = win_shares(matrix, cards["n_params_total"]).iloc[0]
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


def per_token_winner_flips(matrix: LossMatrix) -> float:
    """Share of samples whose winner changes when models are compared by mean loss per token instead of
    by summed loss (the per-token comparison is wrong across tokenizers)."""
    by_sum = np.argmin(matrix.nll_nats, axis=1)
    by_token = np.argmin(matrix.nll_nats / matrix.n_tokens, axis=1)
    return float(np.mean(by_sum != by_token))


# ---------------------------------------------------------------- homogeneous versus heterogeneous pools


def matched_pools(table: pd.DataFrame, tolerance: float = 0.25, per_pool: int = 32, seed: int = 0
                  ) -> pd.DataFrame:
    """For each homogeneous pool of two or more models, up to `per_pool` heterogeneous pools (seeded draw)
    with as many models and total parameters within a factor 1 + tolerance: one row per (pool, match)."""
    rng = np.random.default_rng(seed)
    homogeneous = table[(table["kind"] == "homogeneous") & (table["n_models"] >= 2)]
    heterogeneous = table[table["kind"] == "heterogeneous"]
    log_params = np.log(heterogeneous["total_params"].to_numpy(float))
    sizes = heterogeneous["n_models"].to_numpy()
    rows = []
    for pool in homogeneous.itertuples():
        close = np.flatnonzero((sizes == pool.n_models)
                               & (np.abs(log_params - math.log(pool.total_params)) <= math.log1p(tolerance)))
        for j in rng.choice(close, min(per_pool, len(close)), replace=False) if len(close) else ():
            match = heterogeneous.iloc[j]
            rows.append({"homogeneous": pool.pool, "family": pool.families, "n_models": pool.n_models,
                         "total_params": pool.total_params, "heterogeneous": match["pool"],
                         "match_params": match["total_params"]})
    return pd.DataFrame(rows)


def matched_losses(matrix: LossMatrix, pairs: pd.DataFrame) -> tuple[list[str], np.ndarray, np.ndarray]:
    """The homogeneous pools of `pairs`, their per-sample oracle losses, and the per-sample mean oracle
    loss of their matched heterogeneous pools (samples x pools, both)."""
    pools = list(dict.fromkeys(pairs["homogeneous"]))
    groups = pd.Categorical(pairs["homogeneous"], categories=pools).codes
    matched = group_mean_minima(matrix.nll_nats, pool_masks(matrix, pairs["heterogeneous"].tolist()), groups)
    return pools, pool_minima(matrix, pools), matched


# ---------------------------------------------------------------- diversity


DIVERSITY_MEASURES = {
    "loss_correlation": "mean correlation of members' per-sample bits per byte (lower: more diverse)",
    "win_entropy_bits": "entropy of the members' win shares, in bits (higher: wins spread more evenly)",
    "upset_share": "share of samples the best member does not win",
    "n_families": "number of families in the pool",
    "size_spread": "standard deviation of members' log10 total parameters",
}


class PoolDiversity:
    """Diversity measures and oracle gain of a set of pools, recomputable under any weighting of the
    samples (a bootstrap draw) without recomputing per-sample minima or winners."""

    def __init__(self, matrix: LossMatrix, cards: pd.DataFrame, pools: Sequence[Sequence[int]]):
        from scipy import sparse

        self.matrix, self.cards = matrix, cards
        n_samples, n_models = matrix.nll_nats.shape
        self.members = np.zeros((len(pools), n_models), dtype=bool)
        for i, p in enumerate(pools):
            self.members[i, list(p)] = True
        n_params = cards["n_params_total"].to_numpy(np.int64)
        self.minima = np.column_stack([oracle_nll(matrix.nll_nats, p) for p in pools])
        won = np.column_stack([np.asarray(p)[winners(matrix.nll_nats[:, list(p)], n_params[list(p)])] for p in pools])
        columns = (np.arange(len(pools))[None, :] * n_models + won).ravel()
        self.wins = sparse.csr_matrix((np.ones(won.size), (np.repeat(np.arange(n_samples), len(pools)), columns)),
                                      shape=(n_samples, len(pools) * n_models))
        codes = pd.factorize(cards["family"])[0]
        self.static = pd.DataFrame({
            "pool": [" + ".join(np.asarray(matrix.models)[m]) for m in self.members],
            "n_models": self.members.sum(axis=1),
            "total_params": self.members.astype(np.int64) @ n_params,
            "n_families": [len(set(codes[m])) for m in self.members],
            "size_spread": [float(np.std(np.log10(n_params[m]))) for m in self.members]})
        self.static["kind"] = np.where(self.static["n_families"] > 1, "heterogeneous", "homogeneous")

    def measures(self, weights: np.ndarray | None = None) -> pd.DataFrame:
        """One row per pool: oracle and best-member bits per byte, relative gain, diversity measures."""
        nll, n_bytes = self.matrix.nll_nats, self.matrix.n_bytes.astype(float)
        w = np.ones(len(n_bytes)) if weights is None else np.asarray(weights, dtype=float)
        scale = LN2 * (w @ n_bytes)
        single = (w @ nll) / scale
        best = np.where(self.members, single[None, :], np.inf)
        best_member = best.argmin(axis=1)
        oracle_bpb, best_bpb = (w @ self.minima) / scale, best.min(axis=1)
        shares = (self.wins.T @ w).reshape(len(self.members), -1) / w.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy = -np.where(shares > 0, shares * np.log2(shares), 0.0).sum(axis=1)
        bpb = nll / (LN2 * n_bytes[:, None])
        mean = (w @ bpb) / w.sum()
        cov = ((bpb - mean) * w[:, None]).T @ (bpb - mean) / w.sum()
        corr = cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
        k = self.members.sum(axis=1)
        pair_sum = ((self.members @ corr) * self.members).sum(axis=1) - k
        return self.static.assign(
            oracle_bpb=oracle_bpb, best_single_bpb=best_bpb,
            gain_pct=100 * (best_bpb - oracle_bpb) / best_bpb,
            loss_correlation=np.where(k > 1, pair_sum / np.maximum(k * (k - 1), 1), np.nan),
            win_entropy_bits=entropy, upset_share=1 - shares[np.arange(len(shares)), best_member])


def rank_correlations(table: pd.DataFrame, target: str = "gain_pct",
                      measures: Sequence[str] = tuple(DIVERSITY_MEASURES)) -> dict[str, dict[str, float]]:
    """Spearman correlation of each measure with `target` over pools of two or more models: across all
    of them, and within each pool size (the mean over sizes, weighted by the number of pools).

    Spearman is Pearson on ranks; within sizes the ranks are taken and centred per size, all at once."""
    multi = table.loc[table["n_models"] >= 2, [*measures, target, "n_models"]]
    size = multi["n_models"]
    out = {}
    for scope, ranks in (("all_sizes", multi[[*measures, target]].rank()),
                         ("within_size", multi.groupby(size)[[*measures, target]].rank())):
        centred = ranks - (ranks.groupby(size).transform("mean") if scope == "within_size" else ranks.mean())
        by = size if scope == "within_size" else np.zeros(len(size))
        cross = centred[list(measures)].mul(centred[target], axis=0).groupby(by).sum()
        squares = (centred ** 2).groupby(by).sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            rho = cross / np.sqrt(squares[list(measures)].mul(squares[target], axis=0))
        counts = size.groupby(by).size()
        for m in measures:
            ok = np.isfinite(rho[m]) & (counts > 2)
            value = float(np.average(rho[m][ok], weights=counts[ok])) if ok.any() else float("nan")
            out.setdefault(m, {})[scope] = value
    return out


def diversity_intervals(diversity: PoolDiversity, weights: np.ndarray, level: float = 0.95) -> pd.DataFrame:
    """rank_correlations of the measures with the gain, with percentile intervals over bootstrap weight
    rows (laws.resample_weights): one row per measure and scope."""
    point = rank_correlations(diversity.measures())
    draws = [rank_correlations(diversity.measures(w)) for w in weights]
    tail = 100 * (1 - level) / 2
    rows = []
    for m, scopes in point.items():
        for scope, rho in scopes.items():
            values = np.array([d[m][scope] for d in draws])
            values = values[np.isfinite(values)]
            rows.append({"measure": m, "scope": scope, "spearman": rho,
                         "lo": np.percentile(values, tail) if len(values) else np.nan,
                         "hi": np.percentile(values, 100 - tail) if len(values) else np.nan})
    return pd.DataFrame(rows)
