"""How much of the oracle is real: the winner's curse, the cross-fitted oracle, routers and mixtures.

Every method here turns the per-sample losses of a pool's members into the pool's per-sample loss. Like
the oracle (mcl_utils.oracle), each is computed for every pool at once from tables over the subsets of
each half of the models (built by doubling), so that all 2^n - 1 pools of up to 20 models cost a few
seconds. Two frames are used: the whole sample, and the rest of a sample after its head (the first
prefix_fraction of its bytes), which is what a router that reads the head may still choose a model for.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.model_selection import KFold, cross_val_predict

from mcl_utils import oracle
from mcl_utils.laws import LawResult, fit_points, resample_weights, weighted_bpb
from mcl_utils.store import LN2, LossMatrix

N_FOLDS = 5  # cross-fitting folds of the routers


# ---------------------------------------------------------------- pool rules over subset tables


def _popcount(masks: np.ndarray) -> np.ndarray:
    """Number of set bits of each mask."""
    masks = np.asarray(masks, dtype=np.int64)
    return np.array([bin(int(m)).count("1") for m in masks.ravel()]).reshape(masks.shape)


class Rule:
    """A way to turn the per-sample losses of a pool's members (samples x models) into the pool's
    per-sample loss, evaluated on blocks of pools that share the high half of their bit mask."""

    n_models: int
    half: int

    def block(self, lo: np.ndarray, h: int) -> np.ndarray:
        """Per-sample losses (len(lo) x samples) of the pools with low-half masks lo and high-half mask h."""
        raise NotImplementedError


class Selection(Rule):
    """Each sample goes to the member with the lowest score; the pool pays that member's charge. The
    oracle is score = charge = loss; the cross-fitted oracle scores on one part and charges another."""

    def __init__(self, score: np.ndarray, charge: np.ndarray):
        self.n_models = score.shape[1]
        self.half = (self.n_models + 1) // 2
        self.low = self._tables(score[:, :self.half], charge[:, :self.half])
        self.high = self._tables(score[:, self.half:], charge[:, self.half:])

    @staticmethod
    def _tables(score: np.ndarray, charge: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Best score and its charge for every subset of the columns, by doubling (ties: lower index)."""
        n, n_samples = score.shape[1], score.shape[0]
        best, paid = np.full((1 << n, n_samples), np.inf), np.zeros((1 << n, n_samples))
        for j in range(n):
            better = score[:, j] < best[:1 << j]
            best[1 << j:2 << j] = np.where(better, score[:, j], best[:1 << j])
            paid[1 << j:2 << j] = np.where(better, charge[:, j], paid[:1 << j])
        return best, paid

    def block(self, lo: np.ndarray, h: int) -> np.ndarray:
        """The charge of the lower-scoring side, low or high half, per sample."""
        (low_best, low_paid), (high_best, high_paid) = self.low, self.high
        return np.where(high_best[h] < low_best[lo], high_paid[h], low_paid[lo])


class Mixture(Rule):
    """The Bayesian mixture of whole-sample probabilities with uniform weights over the pool's K members:
    -log((1/K) sum_k exp(-nll_k)), a proper predictor needing no training, within ln K of the oracle."""

    def __init__(self, nll_nats: np.ndarray):
        self.n_models = nll_nats.shape[1]
        self.half = (self.n_models + 1) // 2
        self.low, self.high = self._tables(nll_nats[:, :self.half]), self._tables(nll_nats[:, self.half:])

    @staticmethod
    def _tables(nll_nats: np.ndarray) -> np.ndarray:
        """log sum_k exp(-nll_k) over every subset of the columns, by doubling (empty subset: -inf)."""
        out = np.full((1 << nll_nats.shape[1], nll_nats.shape[0]), -np.inf)
        for j in range(nll_nats.shape[1]):
            np.logaddexp(out[:1 << j], -nll_nats[:, j], out=out[1 << j:2 << j])
        return out

    def block(self, lo: np.ndarray, h: int) -> np.ndarray:
        """log K minus the log of the summed member probabilities."""
        k = _popcount(lo) + bin(h).count("1")
        return np.log(k)[:, None] - np.logaddexp(self.low[lo], self.high[h])


class Combined(Rule):
    """A signed sum of rules on the same models (e.g. a whole-sample rule minus the same rule on heads)."""

    def __init__(self, *terms: tuple[float, Rule]):
        self.terms = terms
        self.n_models, self.half = terms[0][1].n_models, terms[0][1].half

    def block(self, lo: np.ndarray, h: int) -> np.ndarray:
        """The signed sum of the terms' blocks."""
        return sum(sign * rule.block(lo, h) for sign, rule in self.terms)


def _by_high_half(rule: Rule, masks: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Pools grouped by the high half of their mask: (high mask, positions, low masks)."""
    masks = np.asarray(masks, dtype=np.int64)
    high, low = masks >> rule.half, masks & ((1 << rule.half) - 1)
    order = np.argsort(high, kind="stable")
    return [(h, order[a:b], low[order][a:b]) for h, a, b in oracle._runs(high[order])]


def pool_losses(rule: Rule, masks: Sequence[int]) -> np.ndarray:
    """Per-sample losses (samples x pools) of the pools given as bit masks."""
    masks = np.asarray(masks, dtype=np.int64)
    out = None
    for h, positions, lo in _by_high_half(rule, masks):
        values = rule.block(lo, h)
        out = np.empty((values.shape[1], len(masks))) if out is None else out
        out[:, positions] = values.T
    return out


def all_pool_sums(rule: Rule, threads: int | None = None) -> np.ndarray:
    """Summed loss of every pool, indexed by bit mask minus one (as oracle.all_pool_nll_sums)."""
    low = np.arange(1 << rule.half)
    n_high = 1 << (rule.n_models - rule.half)
    sums = np.empty((n_high, len(low)))

    def work(rows: np.ndarray) -> None:
        for h in rows:
            lo = low if h else low[1:]  # no empty pool
            sums[h, len(low) - len(lo):] = rule.block(lo, int(h)).sum(axis=1)

    threads = threads or min(os.cpu_count() or 1, 8)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, np.array_split(np.arange(n_high), 4 * threads)))
    return sums.reshape(-1)[1:]


def group_means(rule: Rule, masks: Sequence[int], groups: np.ndarray) -> np.ndarray:
    """Per-sample mean loss over the pools of each group (samples x groups); groups are labels 0..G-1."""
    groups = np.asarray(groups, dtype=np.int64)
    sums = None
    for h, positions, lo in _by_high_half(rule, masks):
        values = rule.block(lo, h)
        sums = np.zeros((groups.max() + 1, values.shape[1])) if sums is None else sums
        np.add.at(sums, groups[positions], values)
    return (sums / np.bincount(groups, minlength=len(sums))[:, None]).T


# ---------------------------------------------------------------- the two frames


@dataclass(frozen=True)
class Frame:
    """Per-sample losses of the same models on what a method is charged for: whole samples ("whole"), or
    the rest of each sample after its head ("rest"), with the head's losses alongside."""

    name: str
    models: list[str]
    nll_nats: np.ndarray  # samples x models: what the methods are charged
    n_bytes: np.ndarray  # samples
    head_nats: np.ndarray  # samples x models: each sample's head, scored in context
    rest_nats: np.ndarray  # samples x models: whole minus head

    def subset(self, columns: Sequence[int]) -> Frame:
        """The same samples with only these models (column indices, in this order)."""
        columns = list(columns)
        return Frame(self.name, [self.models[j] for j in columns], self.nll_nats[:, columns], self.n_bytes,
                     self.head_nats[:, columns], self.rest_nats[:, columns])

    def best_single(self) -> Selection:
        """Each pool's member with the lowest corpus loss, charged on every sample (the usual baseline)."""
        total = np.broadcast_to(self.nll_nats.sum(axis=0), self.nll_nats.shape)
        return Selection(np.ascontiguousarray(total), self.nll_nats)

    def oracle(self) -> Selection:
        """The per-sample minimum over the pool's members."""
        return Selection(self.nll_nats, self.nll_nats)


def frames(whole: LossMatrix, head: LossMatrix) -> dict[str, Frame]:
    """The whole-sample frame and the rest-of-sample frame of a loss matrix and its heads' matrix."""
    if list(whole.models) != list(head.models) or not np.array_equal(whole.sample_ids, head.sample_ids):
        head = _aligned(head, whole)
    rest = whole.nll_nats - head.nll_nats
    common = {"models": list(whole.models), "head_nats": head.nll_nats, "rest_nats": rest}
    return {"whole": Frame("whole", nll_nats=whole.nll_nats, n_bytes=whole.n_bytes, **common),
            "rest": Frame("rest", nll_nats=rest, n_bytes=whole.n_bytes - head.n_bytes, **common)}


def _aligned(head: LossMatrix, whole: LossMatrix) -> LossMatrix:
    """The heads' matrix in the whole matrix's model and sample order."""
    columns = [list(head.models).index(m) for m in whole.models]
    rows = pd.Index(head.sample_ids).get_indexer(whole.sample_ids)
    if (rows < 0).any():
        raise ValueError("the heads' loss tables lack samples of the whole-sample tables; rescore the heads")
    sub = head.subset(columns)
    return LossMatrix(whole.sample_ids, list(whole.models), sub.nll_nats[rows], head.n_bytes[rows],
                      sub.n_tokens[rows], sub.provenance)


def cross_fitted_oracle(frame: Frame) -> Combined:
    """The honest oracle on whole samples: each sample's model chosen on its head and charged on the rest,
    plus chosen on the rest and charged on the head. Selection on noise gains nothing here."""
    return Combined((1.0, Selection(frame.head_nats, frame.rest_nats)),
                    (1.0, Selection(frame.rest_nats, frame.head_nats)))


def sequential_mixture(frame: Frame) -> Combined:
    """The Bayesian mixture on the rest of each sample, its weights updated on the head: the uniform mixture
    of whole samples minus the uniform mixture of heads."""
    return Combined((1.0, Mixture(frame.head_nats + frame.rest_nats)), (-1.0, Mixture(frame.head_nats)))


def prefix_router(frame: Frame) -> Selection:
    """Score each sample's head with every member, then predict the rest with the member best on the head."""
    return Selection(frame.head_nats, frame.rest_nats)


# ---------------------------------------------------------------- routers fit on other samples


def cross_fitted_predictions(estimator, features, targets: np.ndarray, n_folds: int = N_FOLDS,
                             seed: int = 0) -> np.ndarray:
    """Predictions for every sample from a clone of `estimator` fit on the other folds only (so a router
    never sees the samples it is evaluated on)."""
    folds = KFold(n_folds, shuffle=True, random_state=seed)
    return cross_val_predict(clone(estimator), features, targets, cv=folds)


def knn_router(n_neighbors: int = 25, n_components: int = 64, seed: int = 0):
    """Nearest neighbours on a cheap embedding of the head's text (TF-IDF, reduced by SVD, unit length):
    predicts each model's bits per byte on the rest as its mean over the most similar training heads."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.neighbors import KNeighborsRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    return make_pipeline(TfidfVectorizer(sublinear_tf=True, min_df=2), TruncatedSVD(n_components, random_state=seed),
                         Normalizer(), KNeighborsRegressor(n_neighbors))


def linear_router(categorical: Sequence[str], numeric: Sequence[str]):
    """Ridge regression of each model's bits per byte on the rest from tabular features of the sample."""
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    columns = make_column_transformer((OneHotEncoder(handle_unknown="ignore"), list(categorical)),
                                      (StandardScaler(), list(numeric)))
    return make_pipeline(columns, RidgeCV(alphas=np.logspace(-3, 3, 13)))


def winner_classifier(categorical: Sequence[str], numeric: Sequence[str]):
    """Multinomial logistic regression of which model wins the rest of a sample, from tabular features."""
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    columns = make_column_transformer((OneHotEncoder(handle_unknown="ignore"), list(categorical)),
                                      (StandardScaler(), list(numeric)))
    return make_pipeline(columns, LogisticRegression(max_iter=2000))


def winner_labels(nll_nats: np.ndarray, min_count: int = N_FOLDS) -> np.ndarray:
    """Which model wins each sample, among the models that win at least min_count samples (so that every
    cross-fitting fold can hold each class): a sample won by a rarer model goes to its best frequent one."""
    counts = np.bincount(np.argmin(nll_nats, axis=1), minlength=nll_nats.shape[1])
    frequent = np.flatnonzero(counts >= min_count)
    return frequent[np.argmin(nll_nats[:, frequent], axis=1)]


def cross_fitted_probabilities(classifier, features, labels: np.ndarray, n_models: int, n_folds: int = N_FOLDS,
                               seed: int = 0) -> np.ndarray:
    """Win probabilities (samples x models; zero for models that never win) of each sample from a clone of
    the classifier fit on the other folds only, folds stratified by winner."""
    from sklearn.model_selection import StratifiedKFold

    folds = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    probabilities = cross_val_predict(clone(classifier), features, labels, cv=folds, method="predict_proba")
    out = np.zeros((len(labels), n_models))
    out[:, np.unique(labels)] = probabilities
    return out


def router_features(samples: pd.DataFrame, frame: Frame, n_params: Sequence[int]) -> pd.DataFrame:
    """Tabular features known once a sample's head is read: its genre, log length in bytes, and the
    smallest model's bits per byte on the head."""
    head_bytes = samples["text"].str.encode("utf-8").str.len().to_numpy() - frame.n_bytes
    smallest = int(np.argmin(n_params))
    return pd.DataFrame({"genre": samples.get("genre", pd.Series("all", index=samples.index)).to_numpy(),
                         "log_bytes": np.log(samples["text"].str.encode("utf-8").str.len().to_numpy()),
                         "smallest_head_bpb": frame.head_nats[:, smallest] / (LN2 * np.maximum(head_bytes, 1))})


def routed(predicted_bpb: np.ndarray, frame: Frame) -> Selection:
    """A router that sends each sample to the pool member with the lowest predicted bits per byte."""
    return Selection(predicted_bpb, frame.nll_nats)


def classified(probabilities: np.ndarray, frame: Frame) -> Selection:
    """A classifier router: each sample goes to the pool member with the highest predicted win chance; a
    pool none of whose members ever wins goes to its member with the lowest corpus loss."""
    rank = np.argsort(np.argsort(frame.nll_nats.sum(axis=0)))  # 0 = best corpus loss
    tie_break = 1e-6 * rank / len(rank)
    return Selection(np.ascontiguousarray(tie_break - probabilities), frame.nll_nats)


# ---------------------------------------------------------------- comparisons and laws


def share_of_gain(best_nats: np.ndarray, oracle_nats: np.ndarray, method_nats: np.ndarray, n_bytes: np.ndarray,
                  n_resamples: int, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Share of the oracle's gain over the best single model that a method keeps, (best - method) /
    (best - oracle), for one pool (per-sample vectors), with a percentile interval over samples."""
    weights = np.vstack([np.ones(len(n_bytes)), resample_weights(len(n_bytes), n_resamples, seed)])
    bpb = weighted_bpb(np.column_stack([best_nats, oracle_nats, method_nats]), n_bytes, weights)
    share = (bpb[:, 0] - bpb[:, 2]) / (bpb[:, 0] - bpb[:, 1])
    tail = 100 * (1 - level) / 2
    return {"share": float(share[0]), "lo": float(np.percentile(share[1:], tail)),
            "hi": float(np.percentile(share[1:], 100 - tail)), "bpb": float(bpb[0, 2])}


class MethodPoints:
    """Every pool's bits per byte under one method, and the budget points (each log-spaced budget bin's
    best pool, or its mean) that its law is fitted to."""

    def __init__(self, rule: Rule, n_params: Sequence[int], n_bytes: np.ndarray, singles: bool = False):
        self.rule, self.n_bytes = rule, n_bytes
        masks = np.arange(1, 1 << rule.n_models)
        if singles:
            masks = 1 << np.arange(rule.n_models)
        self.masks = masks
        n_params = np.asarray(n_params, dtype=np.int64)
        sums = all_pool_sums(rule)[masks - 1] if not singles else pool_losses(rule, masks).sum(axis=0)
        self.table = pd.DataFrame({"pool": masks, "total_params": oracle.all_pool_budgets(n_params)[masks - 1],
                                   "oracle_bpb": sums / (LN2 * n_bytes.sum())})

    def points(self, stat: str) -> pd.DataFrame:
        """Budget points: x = total parameters, bpb."""
        return oracle.budget_points(self.table, stat).rename(columns={"params": "x"})

    def per_sample(self, stat: str) -> np.ndarray:
        """Per-sample losses behind each budget point (samples x points)."""
        if stat == "frontier":
            return pool_losses(self.rule, self.points(stat)["pool"].to_numpy())
        _, groups = np.unique(oracle.budget_bins(self.table), return_inverse=True)
        return group_means(self.rule, self.table["pool"].to_numpy(), groups)

    def law(self, name: str, stat: str, n_resamples: int, seed: int = 0) -> LawResult:
        """The power law with floor of these points, with a bootstrap over evaluation samples."""
        return fit_points(name, self.points(stat), self.per_sample(stat), self.n_bytes, n_resamples, seed=seed)


def full_pool(n_models: int) -> int:
    """The bit mask of the pool of all models."""
    return (1 << n_models) - 1


def replica_pools(replicas: Sequence[int]) -> pd.DataFrame:
    """Every pool of r of the given seed replicas (column indices), r = 1..R: r and its bit mask."""
    return pd.DataFrame([{"r": r, "mask": sum(1 << j for j in c)}
                         for r in range(1, len(replicas) + 1) for c in combinations(replicas, r)])


def matched_budget_masks(n_params: Sequence[int], size: int, budget: float, among: Sequence[int],
                         tolerance: float = 0.25) -> np.ndarray:
    """Pools of `size` models drawn from `among` (column indices) whose total parameters lie within a
    factor (1 +- tolerance) of `budget`."""
    n_params = np.asarray(n_params, dtype=np.int64)
    pools = [c for c in combinations(among, size) if abs(n_params[list(c)].sum() / budget - 1) <= tolerance]
    return np.array([sum(1 << j for j in c) for c in pools], dtype=np.int64)


def gain_intervals(frame: Frame, masks: Sequence[int], rules: dict[str, Rule], n_resamples: int, seed: int = 0,
                   level: float = 0.95) -> pd.DataFrame:
    """Each rule's gain over the pool's best single member, in percent of the best member's bits per byte,
    averaged over the given pools, with a percentile interval from the bootstrap over evaluation samples."""
    masks = np.asarray(masks, dtype=np.int64)
    weights = np.vstack([np.ones(len(frame.n_bytes)), resample_weights(len(frame.n_bytes), n_resamples, seed)])
    best = weighted_bpb(pool_losses(frame.best_single(), masks), frame.n_bytes, weights)
    tail, rows = 100 * (1 - level) / 2, []
    for name, rule in rules.items():
        gain = (100 * (best - weighted_bpb(pool_losses(rule, masks), frame.n_bytes, weights)) / best).mean(axis=1)
        rows.append({"method": name, "gain_pct": float(gain[0]), "lo": float(np.percentile(gain[1:], tail)),
                     "hi": float(np.percentile(gain[1:], 100 - tail)), "n_pools": len(masks)})
    return pd.DataFrame(rows)


def max_mixture_excess(frame: Frame) -> float:
    """The largest excess, over every sample of every pool of two or more models, of the uniform mixture's
    loss above the oracle's, in units of ln K (at most 1 by theory); an error if the mixture ever beats it."""
    mixture, best, worst = Mixture(frame.nll_nats), frame.oracle(), 0.0
    masks = np.arange(1, 1 << frame.nll_nats.shape[1])
    masks = masks[_popcount(masks) > 1]
    for h, _, lo in _by_high_half(mixture, masks):
        gap = mixture.block(lo, h) - best.block(lo, h)
        if (gap < -1e-9).any():
            raise AssertionError("the mixture beat the per-sample oracle, which is impossible")
        k = _popcount(lo) + bin(h).count("1")
        worst = max(worst, float((gap / np.log(k)[:, None]).max()))
    return worst


def params_run_per_byte(head_params: np.ndarray | float, rest_params: np.ndarray | float, head_share: np.ndarray,
                        n_bytes: np.ndarray) -> float:
    """Parameters run per byte of text, byte-weighted over samples, by a method that runs head_params on
    each sample's head (share head_share of its bytes) and rest_params on the rest."""
    per_sample = head_share * head_params + (1 - head_share) * rest_params
    return float(np.average(np.broadcast_to(per_sample, np.shape(n_bytes)), weights=n_bytes))


# ---------------------------------------------------------------- per-token mixtures (models sharing a tokenizer)


def _shifted_probabilities(token_nll: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """exp(-(nll - the token's smallest nll)) (tokens x models) and that smallest nll per token: mixture
    responsibilities and likelihoods computed from them never underflow."""
    token_nll = np.asarray(token_nll, dtype=np.float64)
    shift = token_nll.min(axis=1)
    return np.exp(shift[:, None] - token_nll), shift


def em_weights(token_nll: np.ndarray, iterations: int = 1000, tol: float = 1e-9) -> np.ndarray:
    """Mixture weights over models (tokens x models of per-token NLL) maximizing the likelihood of
    sum_k w_k p_k(token), by expectation-maximization from uniform weights."""
    p, _ = _shifted_probabilities(token_nll)
    weights = np.full(p.shape[1], 1 / p.shape[1])
    for _ in range(iterations):
        updated = weights * (p.T @ (1 / (p @ weights))) / len(p)  # the mean responsibility of each model
        if np.abs(updated - weights).max() < tol:
            return updated
        weights = updated
    return weights


def token_mixture_nll(token_nll: np.ndarray, weights: np.ndarray) -> float:
    """Summed NLL (nats) of tokens under the per-token mixture sum_k w_k p_k."""
    p, shift = _shifted_probabilities(token_nll)
    return float((shift - np.log(p @ np.asarray(weights, dtype=np.float64))).sum())


def cross_fitted_token_mixture(per_sample: Sequence[np.ndarray], n_folds: int = N_FOLDS, seed: int = 0
                               ) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample NLL (nats) of the per-token mixture whose weights are fit by EM on the other folds' samples
    (each sample's tokens x models), and the weights fit on every sample (for display)."""
    out = np.empty(len(per_sample))
    for train, test in KFold(n_folds, shuffle=True, random_state=seed).split(np.arange(len(per_sample))):
        weights = em_weights(np.concatenate([per_sample[i] for i in train]))
        out[test] = [token_mixture_nll(per_sample[i], weights) for i in test]
    return out, em_weights(np.concatenate(per_sample))


def bpb_intervals(nll_nats: dict[str, np.ndarray], reference: str, n_bytes: np.ndarray, n_resamples: int,
                  seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Bits per byte of each method's per-sample losses and its gain over the reference method in percent
    of the reference's bits per byte, with a percentile interval over evaluation samples."""
    names = list(nll_nats)
    weights = np.vstack([np.ones(len(n_bytes)), resample_weights(len(n_bytes), n_resamples, seed)])
    bpb = weighted_bpb(np.column_stack([nll_nats[m] for m in names]), n_bytes, weights)
    ref = bpb[:, names.index(reference)][:, None]
    gain = 100 * (ref - bpb) / ref
    tail = 100 * (1 - level) / 2
    return pd.DataFrame({"method": names, "bpb": bpb[0], "gain_pct": gain[0],
                         "lo": np.percentile(gain[1:], tail, axis=0), "hi": np.percentile(gain[1:], 100 - tail, axis=0)})
