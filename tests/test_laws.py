"""The law fitter: published anchors, recovery of known laws, bootstrap and its guarantees, and FitErrors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcl_utils import laws
from mcl_utils.store import LN2

PUBLISHED = Path(__file__).resolve().parent.parent / "data" / "published"
SIZES = pd.DataFrame({"x": np.logspace(7, 9.5, 8)})


def _points(form: laws.LawForm, params: dict, data: pd.DataFrame, name: str = "loss") -> pd.DataFrame:
    """Noise-free points of a law."""
    return data.assign(**{name: form.predict(params, data)})


@pytest.mark.parametrize(("n_billions", "k", "published"), [(0.5, 9, 0.736), (32, 9, 0.430)])
def test_merging_law_at_published_table3(n_billions, k, published):
    """Table 3 (Average) of arXiv 2509.24244, N in billions: the macro mean over nine domains."""
    table = pd.read_csv(PUBLISHED / "merging_law_table3_average.csv")
    point = {"N": np.array([n_billions]), "k": np.array([k])}
    macro = np.mean([laws.MERGING.predict(row, point)[0] for row in table.to_dict("records")])
    assert round(macro, 3) == published


def test_merging_law_fit_recovers_table3_code_domain():
    """A joint (N, k) fit with weights k recovers the code domain's published parameters from its own curve."""
    truth = pd.read_csv(PUBLISHED / "merging_law_table3_average.csv").set_index("domain").loc["code"]
    grid = pd.DataFrame([(n, k) for n in (0.5, 1.5, 3, 7, 14, 32) for k in range(1, 10)], columns=["N", "k"])
    fitted = laws.fit(laws.MERGING, _points(laws.MERGING, truth.to_dict(), grid, "ce"), "ce", weight="k")
    for name in laws.MERGING.param_names:
        assert fitted.params[name] == pytest.approx(truth[name], rel=1e-4)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(e=st.floats(0.2, 3.0), share=st.floats(0.05, 5.0), alpha=st.floats(0.1, 1.0))
def test_power_law_recovered_exactly_without_noise(e, share, alpha):
    """Noise-free points of any power law with floor give back its parameters (the power term is
    `share` times the floor at the smallest size, so the data determine the law)."""
    truth = {"E": e, "A": share * e * SIZES["x"].min() ** alpha, "alpha": alpha}
    fitted = laws.fit(laws.POWER_LAW, _points(laws.POWER_LAW, truth, SIZES), "loss")
    for name, value in truth.items():
        assert fitted.params[name] == pytest.approx(value, rel=1e-4)
    assert fitted.r2() == pytest.approx(1.0)


@settings(max_examples=10, deadline=None, derandomize=True)
@given(seed=st.integers(0, 10_000), noise=st.floats(0.01, 0.2))
def test_bootstrap_with_unit_weights_equals_point_estimate(seed, noise):
    """A resample that keeps every sample once refits to the point estimate."""
    nll, n_bytes = laws.simulate_samples(laws.POWER_LAW, {"E": 1.0, "A": 30.0, "alpha": 0.3}, SIZES, 200,
                                         noise, seed)
    points = SIZES.assign(bpb=nll.sum(axis=0) / (LN2 * n_bytes.sum()))
    point = laws.fit(laws.POWER_LAW, points, "bpb")
    boot = laws.bootstrap_samples(point, nll, n_bytes, np.ones((1, len(n_bytes))))
    assert boot.failures == {}
    for name, value in point.params.items():
        assert boot.params[name].iloc[0] == pytest.approx(value, rel=1e-6)  # the fit's own precision


def test_bootstrap_intervals_cover_the_true_parameters():
    """On noisy synthetic samples the 95% intervals contain the truth in most datasets (coverage check)."""
    truth = {"E": 1.0, "A": 30.0, "alpha": 0.3}
    covered = pd.concat([laws.recovery(laws.POWER_LAW, truth, SIZES, 400, 50, seed=seed)[2]["covered"]
                         for seed in range(12)], axis=1)
    # With true coverage 0.95, at most 2 misses in 12 has probability 0.98.
    assert (covered.sum(axis=1) >= 10).all(), covered


def test_resample_weights_draw_n_samples_each():
    """Each bootstrap row draws exactly n samples, seeded."""
    w = laws.resample_weights(50, 7, seed=3)
    assert w.shape == (7, 50) and (w.sum(axis=1) == 50).all()
    assert np.array_equal(w, laws.resample_weights(50, 7, seed=3))


def test_fit_errors():
    """Too few points, an exponent beyond the grid, and no scaling at all are each refused."""
    with pytest.raises(laws.FitError, match="needs at least 4 points"):
        laws.fit(laws.POWER_LAW, _points(laws.POWER_LAW, {"E": 1, "A": 5, "alpha": 0.3}, SIZES.head(3)), "loss")
    steep = _points(laws.POWER_LAW, {"E": 1, "A": 1e20, "alpha": 2.5}, SIZES)
    with pytest.raises(laws.FitError, match="upper search bound"):
        laws.fit(laws.POWER_LAW, steep, "loss")
    flat = SIZES.assign(loss=2.0 + 1e-9 * np.arange(len(SIZES)))
    with pytest.raises(laws.FitError, match="lower search bound"):
        laws.fit(laws.POWER_LAW, flat, "loss")


def test_excluded_points_holdout_and_card():
    """Excluded points are listed with reasons; extrapolation to the largest size is exact on exact data."""
    points = _points(laws.POWER_LAW, {"E": 1, "A": 50, "alpha": 0.4}, SIZES)
    points.loc[0, "loss"] *= 3  # an outlier
    fitted = laws.fit(laws.POWER_LAW, points, "loss", exclude={0: "diverged in training"})
    assert fitted.params["alpha"] == pytest.approx(0.4, rel=1e-5) and len(fitted.used) == 7
    held = laws.holdout(laws.POWER_LAW, points.drop(index=0), "loss", "x")
    assert abs(held["relative_error"].iloc[0]) < 1e-6
    boot = laws.Bootstrap("evaluation samples", 3, pd.DataFrame([fitted.params] * 2), {"grid edge": 1})
    card = laws.fit_card(fitted, [boot], held).set_index("item")["value"]
    assert card["points excluded"] == "0: diverged in training"
    assert "1 failed: grid edge" in card["bootstrap over evaluation samples"]
    assert card["extrapolation error at x = 3.16e+09"].endswith("%")


def test_chinchilla_fit_beats_or_matches_the_published_recipe():
    """On data simulated from the Epoch refit, our fit finds an objective no worse than Chinchilla's
    L-BFGS recipe from one start, and averaging the Huber terms makes that recipe stop early."""
    truth = pd.read_csv(PUBLISHED / "chinchilla_fits.csv").iloc[1].drop("source").astype(float).to_dict()
    rng = np.random.default_rng(0)
    grid = pd.DataFrame([(n, d) for n in np.logspace(7.6, 10.2, 9) for d in np.logspace(9.7, 11.7, 8)],
                        columns=["N", "D"])
    points = grid.assign(loss=laws.CHINCHILLA.predict(truth, grid) * np.exp(rng.normal(0, 0.01, len(grid))))
    ours = laws.fit(laws.CHINCHILLA, points, "loss")
    summed = laws.chinchilla_recipe(points, reduce="sum", starts="single")
    averaged = laws.chinchilla_recipe(points, reduce="mean", starts="single")
    assert ours.objective <= summed["objective"] * (1 + 1e-6)
    assert averaged["iterations"] < summed["iterations"] and averaged["objective"] > 2 * ours.objective
    assert ours.params["alpha"] == pytest.approx(truth["alpha"], abs=0.03)


def test_bootstrap_over_models_counts_failures():
    """Model resamples too small to fit are counted as failures, not silently dropped."""
    sizes = np.logspace(7, 9.5, 8)

    def refit_models(models: np.ndarray) -> dict:
        data = pd.DataFrame({"x": sizes[models]})
        return laws.fit(laws.POWER_LAW, _points(laws.POWER_LAW, {"E": 1, "A": 50, "alpha": 0.4}, data),
                        "loss").params

    boot = laws.bootstrap_models(refit_models, len(sizes), 40, seed=1)
    assert len(boot.params) + sum(boot.failures.values()) == 40 and len(boot.params) > 30
    assert np.allclose(boot.params["alpha"], 0.4, rtol=1e-4)


def _zoo_like(seed: int = 0):
    """A synthetic loss matrix of two families x five sizes whose bits per byte fall as power laws."""
    from mcl_utils.store import LossMatrix

    rng = np.random.default_rng(seed)
    n_samples, sizes = 400, np.logspace(4, 6, 5)
    n_bytes = rng.integers(300, 1500, n_samples).astype(float)
    hardness = rng.lognormal(0, 0.3, n_samples)
    columns, cards = [], []
    for f, (e, a) in enumerate([(1.0, 30.0), (1.2, 20.0)]):
        noise = rng.lognormal(0, 0.15, n_samples)
        for n in sizes:
            columns.append(LN2 * n_bytes * (e + a * n ** -0.3) * hardness * noise * rng.lognormal(0, 0.02, n_samples))
            cards.append({"name": f"f{f}-{int(n)}", "family": f"f{f}", "n_params_total": int(n),
                          "n_params_non_embedding": int(n // 2)})
    nll = np.column_stack(columns)
    matrix = LossMatrix(sample_ids=np.arange(n_samples).astype(str), models=[c["name"] for c in cards], nll_nats=nll,
                        n_bytes=n_bytes.astype(np.int64), n_tokens=np.ones_like(nll, dtype=np.int64),
                        provenance=[{}] * len(cards))
    return matrix, pd.DataFrame(cards)


def test_family_laws_and_quality_bars():
    """Each family gets its own law; clean power laws pass every bar, a non-monotone family fails one."""
    matrix, cards = _zoo_like()
    results = laws.family_laws(matrix, cards, n_resamples=20)
    assert set(results) == {"f0", "f1"} and all(r.fit is not None for r in results.values())
    bars = laws.quality_bars(results)
    assert bars["monotone"].all() and (bars["r2"] > 0.98).all()
    swapped = matrix.nll_nats.copy()
    swapped[:, [1, 2]] = swapped[:, [2, 1]]
    bars = laws.quality_bars(laws.family_laws(dataclasses.replace(matrix, nll_nats=swapped), cards, n_resamples=5))
    assert not bars.set_index("family").loc["f0", "monotone"] and not bars.set_index("family").loc["f0", "all_bars"]


def test_paired_differences_pair_resamples_and_verdicts():
    """Single-model and pool laws share resamples; a law compared with itself differs by exactly zero."""
    matrix, cards = _zoo_like(1)
    fits = laws.collaboration_laws(matrix, cards, n_resamples=15)
    assert set(fits) == {"single models (frontier)", "single models (mean)", "pools (frontier)", "pools (mean)"}
    same = laws.paired_differences(fits["pools (mean)"], fits["pools (mean)"])
    assert (same[["difference", "lo", "hi"]] == 0).all().all()
    assert laws.verdict(same, "alpha", +1) == "not resolved"
    diffs = laws.paired_differences(fits["single models (frontier)"], fits["pools (frontier)"])
    assert set(diffs["unit"]) == {"evaluation samples", "models"} and (diffs["n_pairs"] > 0).all()
    made_up = pd.DataFrame({"unit": ["a", "b"], "param": "E", "difference": -1.0, "lo": [-2.0, -3.0], "hi": [-0.5, -0.1]})
    assert laws.verdict(made_up, "E", -1) == "reproduced" and laws.verdict(made_up, "E", +1) == "contradicted"


def test_paired_bpb_difference_of_identical_columns_is_zero():
    """Comparing pools with themselves gives a zero difference and a zero-width interval."""
    rng = np.random.default_rng(0)
    nll, n_bytes = rng.gamma(3.0, 10.0, (50, 4)), rng.integers(10, 100, 50)
    same = laws.paired_bpb_difference(nll, nll, n_bytes, 30)
    assert same == {"difference": 0.0, "lo": 0.0, "hi": 0.0, "n_pairs": 4}
    shifted = laws.paired_bpb_difference(nll, nll + LN2 * n_bytes[:, None], n_bytes, 30)
    assert shifted["difference"] == pytest.approx(1.0) and shifted["lo"] == pytest.approx(1.0)


def test_budget_points_of_a_model_draw_equal_those_of_its_pool_table():
    """A bootstrap draw's budget points, from bare sums over bit masks, equal the full pool table's."""
    from mcl_utils import oracle

    matrix, cards = _zoo_like(2)
    draw = [0, 3, 4, 7, 9]
    table = oracle.pool_table(matrix.subset(draw), cards.iloc[draw].reset_index(drop=True))
    for singles in (False, True):
        points = laws.BudgetPoints(matrix, cards, singles)
        expected = table[table["n_models"] == 1] if singles else table
        for stat in ("frontier", "mean"):
            got, want = points.points(stat, draw), oracle.budget_points(expected, stat)
            np.testing.assert_allclose(got[["x", "bpb"]].to_numpy(float), want[["params", "bpb"]].to_numpy(float),
                                       rtol=1e-12)
