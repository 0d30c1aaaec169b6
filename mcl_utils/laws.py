"""Scaling-law fitting: law forms as data, a Huber fit on log residuals by variable projection, bootstrap
confidence intervals over evaluation samples and over models, held-out extrapolation, and fit cards."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy.ndimage import label, minimum_filter
from scipy.optimize import least_squares, minimize, nnls

from mcl_utils import oracle
from mcl_utils.errors import UserError
from mcl_utils.store import LN2, LossMatrix

HUBER_DELTA = 1e-3
MAX_NFEV = 500  # residual evaluations per refined start
BOUND_TOLERANCE = 1e-4  # a parameter within this fraction of its search range of a bound is "on" it


class FitError(UserError):
    """A fit that cannot be trusted: its optimum lies on a search bound, or a value is not finite."""


@dataclass(frozen=True)
class Param:
    """A nonlinear parameter: searched on a grid over [lo, hi], then refined within those bounds.

    `lower_is_physical` marks a lower bound that belongs to the law (b >= 0), which a fit may reach;
    reaching any other bound means the search range, not the data, decided the value."""

    name: str
    lo: float
    hi: float
    n_grid: int = 41
    lower_is_physical: bool = False

    def grid(self) -> np.ndarray:
        """The grid points, evenly spaced, edges included."""
        return np.linspace(self.lo, self.hi, self.n_grid)


@dataclass(frozen=True)
class LawForm:
    """A law L = sum_j c_j * phi_j(theta, X): non-negative linear coefficients c, nonlinear parameters theta."""

    name: str
    formula: str  # plain text, for cards and tables
    variables: tuple[str, ...]
    linear: tuple[str, ...]
    nonlinear: tuple[Param, ...]
    basis: Callable[[Sequence[float], Mapping[str, np.ndarray]], np.ndarray]  # -> (n_points, n_linear)
    basis_grad: Callable[[Sequence[float], Mapping[str, np.ndarray]], np.ndarray]  # -> (n_nonlinear, n_points, n_linear)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Nonlinear parameters first, then linear ones (the order of parameter vectors)."""
        return tuple(p.name for p in self.nonlinear) + self.linear

    def predict(self, params: Mapping[str, float], data: Mapping[str, np.ndarray]) -> np.ndarray:
        """The law's value at each point of `data` (a mapping or DataFrame holding the variables)."""
        theta = [params[p.name] for p in self.nonlinear]
        coefficients = np.array([params[c] for c in self.linear])
        return self.basis(theta, _columns(self, data)) @ coefficients


def _columns(form: LawForm, data: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The form's variables as float arrays, refusing missing or non-positive values."""
    missing = [v for v in form.variables if v not in data]
    if missing:
        raise UserError(f"{form.name} needs variable(s) {missing}; fix: add those columns to the points")
    columns = {v: np.asarray(data[v], dtype=float) for v in form.variables}
    for v, x in columns.items():
        if not np.all(np.isfinite(x) & (x > 0)):
            raise UserError(f"variable {v!r} has non-positive or non-finite values; fix: drop those points")
    return columns


def _power_basis(theta: Sequence[float], x: Mapping[str, np.ndarray]) -> np.ndarray:
    """[1, x^-alpha]."""
    return np.column_stack([np.ones_like(x["x"]), x["x"] ** -theta[0]])


def _power_grad(theta: Sequence[float], x: Mapping[str, np.ndarray]) -> np.ndarray:
    """d/d alpha of [1, x^-alpha]."""
    return np.column_stack([np.zeros_like(x["x"]), -np.log(x["x"]) * x["x"] ** -theta[0]])[None]


def _chinchilla_basis(theta: Sequence[float], x: Mapping[str, np.ndarray]) -> np.ndarray:
    """[1, N^-alpha, D^-beta]."""
    return np.column_stack([np.ones_like(x["N"]), x["N"] ** -theta[0], x["D"] ** -theta[1]])


def _chinchilla_grad(theta: Sequence[float], x: Mapping[str, np.ndarray]) -> np.ndarray:
    """d/d alpha and d/d beta of [1, N^-alpha, D^-beta]."""
    zero = np.zeros_like(x["N"])
    return np.stack([np.column_stack([zero, -np.log(x["N"]) * x["N"] ** -theta[0], zero]),
                     np.column_stack([zero, zero, -np.log(x["D"]) * x["D"] ** -theta[1]])])


def _merging_basis(theta: Sequence[float], x: Mapping[str, np.ndarray]) -> np.ndarray:
    """[1, N^-beta, N^-gamma / (k + b)]."""
    beta, gamma, b = theta
    return np.column_stack([np.ones_like(x["N"]), x["N"] ** -beta, x["N"] ** -gamma / (x["k"] + b)])


def _merging_grad(theta: Sequence[float], x: Mapping[str, np.ndarray]) -> np.ndarray:
    """d/d beta, d/d gamma and d/d b of [1, N^-beta, N^-gamma / (k + b)]."""
    beta, gamma, b = theta
    zero, log_n, tail = np.zeros_like(x["N"]), np.log(x["N"]), x["N"] ** -gamma / (x["k"] + b)
    return np.stack([np.column_stack([zero, -log_n * x["N"] ** -beta, zero]),
                     np.column_stack([zero, zero, -log_n * tail]),
                     np.column_stack([zero, zero, -tail / (x["k"] + b)])])


POWER_LAW = LawForm(
    name="power law with floor", formula="L(x) = E + A x^-alpha", variables=("x",), linear=("E", "A"),
    nonlinear=(Param("alpha", 0.0, 2.0, n_grid=201),), basis=_power_basis, basis_grad=_power_grad)
CHINCHILLA = LawForm(
    name="Chinchilla", formula="L(N, D) = E + A N^-alpha + B D^-beta", variables=("N", "D"),
    linear=("E", "A", "B"), nonlinear=(Param("alpha", 0.0, 2.0), Param("beta", 0.0, 2.0)),
    basis=_chinchilla_basis, basis_grad=_chinchilla_grad)
MERGING = LawForm(
    name="merging law", formula="L(N, k) = L_star + B N^-beta + A0 N^-gamma / (k + b)",
    variables=("N", "k"), linear=("L_star", "B", "A0"),
    nonlinear=(Param("beta", 0.0, 2.0, n_grid=21), Param("gamma", 0.0, 2.0, n_grid=21, lower_is_physical=True),
               Param("b", 0.0, 5.0, n_grid=11, lower_is_physical=True)),
    basis=_merging_basis, basis_grad=_merging_grad)


# ---------------------------------------------------------------- the objective


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Huber loss: r^2/2 inside [-delta, delta], linear outside."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r**2, delta * (a - 0.5 * delta))


def objective(pred: np.ndarray, y: np.ndarray, weights: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    """Weighted sum of Huber losses of log residuals, along the last axis (inf where a prediction is <= 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log(pred) - np.log(y)
    value = (weights * huber(r, delta)).sum(axis=-1)
    return np.where(np.all(pred > 0, axis=-1), value, np.inf)


def _huber_rho(weights: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """least_squares loss for residuals scaled by 1/delta: w * (z if z <= 1 else 2 sqrt(z) - 1), z = f^2.

    Then 0.5 * sum rho = (1/delta^2) * sum w * Huber_delta(r): the same minimizer, at a scale of order one,
    so the optimizer's tolerances do not stop it early (Epoch's diagnosis of the Chinchilla fit)."""
    def rho(z: np.ndarray) -> np.ndarray:
        inside = z <= 1
        root = np.sqrt(np.maximum(z, 1e-300))
        return np.stack([weights * np.where(inside, z, 2 * root - 1),
                         weights * np.where(inside, 1.0, 1 / root),
                         weights * np.where(inside, 0.0, -0.5 / (root * z + 1e-300))])
    return rho


# ---------------------------------------------------------------- the fitter


_GRID_BASES: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _grid_basis(form: LawForm, x: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The grid of the nonlinear parameters and the basis at every grid point (G x n x p), computed once
    per form and points: bootstrap refits change only the targets, so they share it."""
    key = (form.name, tuple((k, v.tobytes()) for k, v in sorted(x.items())))
    if key not in _GRID_BASES:
        if len(_GRID_BASES) >= 64:
            _GRID_BASES.pop(next(iter(_GRID_BASES)))
        grid = np.array(list(itertools.product(*(p.grid() for p in form.nonlinear))))
        _GRID_BASES[key] = grid, np.stack([form.basis(theta, x) for theta in grid])
    return _GRID_BASES[key]


def _grid_starts(form: LawForm, x: Mapping[str, np.ndarray], y: np.ndarray, w: np.ndarray,
                 delta: float, n_starts: int) -> list[np.ndarray]:
    """Variable projection on the grid: for every grid point of the nonlinear parameters, the
    non-negative linear coefficients minimizing weighted squared relative error (a first-order log
    residual), solved exactly; the best grid point of each basin (a local minimum of the grid's Huber
    objective), best `n_starts` basins first, as start vectors."""
    grid, phi = _grid_basis(form, x)
    scale = np.sqrt(w) / y
    a = phi * scale[None, :, None]
    a_t = a.transpose(0, 2, 1)
    gram = a_t @ a
    rhs = a_t @ np.sqrt(w)
    norms = np.sqrt(np.maximum(np.einsum("gpp->gp", gram), 1e-300))  # Jacobi scaling: columns differ by 1e10
    scaled = gram / (norms[:, :, None] * norms[:, None, :]) + 1e-12 * np.eye(gram.shape[1])
    coefficients = np.linalg.solve(scaled, (rhs / norms)[..., None])[..., 0] / norms
    for g in np.flatnonzero(np.any(coefficients < 0, axis=1) | ~np.all(np.isfinite(coefficients), axis=1)):
        coefficients[g] = nnls(a[g], np.sqrt(w), maxiter=50 * a.shape[2])[0]
    values = objective((phi @ coefficients[..., None])[..., 0], y, w, delta)
    shaped = values.reshape([p.n_grid for p in form.nonlinear])
    is_min = (minimum_filter(shaped, size=3, mode="nearest") == shaped) & np.isfinite(shaped)
    basin_of, n_basins = label(is_min, structure=np.ones([3] * shaped.ndim))  # a plateau is one basin
    flat_basin = basin_of.ravel()
    firsts = [np.flatnonzero(flat_basin == b)[0] for b in range(1, n_basins + 1)]
    order = sorted(firsts, key=lambda g: values[g])
    return [np.concatenate([grid[g], coefficients[g]]) for g in order[:n_starts]]


def _refine(form: LawForm, x: Mapping[str, np.ndarray], y: np.ndarray, w: np.ndarray, delta: float,
            start: np.ndarray) -> tuple[np.ndarray, bool]:
    """Minimize the weighted Huber objective over all parameters from `start`, within bounds; converged?"""
    k = len(form.nonlinear)
    lo = np.array([p.lo for p in form.nonlinear] + [0.0] * len(form.linear))
    hi = np.array([p.hi for p in form.nonlinear] + [np.inf] * len(form.linear))
    log_y = np.log(y)
    ref = {v: np.exp(np.log(values).mean(keepdims=True)) for v, values in x.items()}

    def normalized(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Basis columns divided by their value at the reference point (so each coefficient is its term's
        value there, of order one), and their derivatives in theta."""
        phi, phi_ref = form.basis(theta, x), form.basis(theta, ref)[0]
        grad, grad_ref = form.basis_grad(theta, x), form.basis_grad(theta, ref)[:, 0]
        return phi / phi_ref, (grad * phi_ref - phi[None] * grad_ref[:, None, :]) / phi_ref**2

    def residuals(z: np.ndarray) -> np.ndarray:
        pred = normalized(z[:k])[0] @ z[k:]
        return (np.log(np.maximum(pred, 1e-300)) - log_y) / delta

    def jacobian(z: np.ndarray) -> np.ndarray:
        phi, grad = normalized(z[:k])
        return np.column_stack([(grad @ z[k:]).T, phi]) / (np.maximum(phi @ z[k:], 1e-300) * delta)[:, None]

    start = np.clip(start, lo, hi)
    start[k:] *= form.basis(start[:k], ref)[0]
    result = least_squares(residuals, start, jac=jacobian, bounds=(lo, hi), loss=_huber_rho(w), x_scale="jac",
                           method="trf", xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=MAX_NFEV)
    z = result.x.copy()
    z[k:] /= form.basis(z[:k], ref)[0]
    return z, result.status > 0


def _fit_vector(form: LawForm, x: Mapping[str, np.ndarray], y: np.ndarray, w: np.ndarray, delta: float,
                n_starts: int) -> tuple[np.ndarray, float]:
    """Best parameter vector over the refined grid starts, and its objective; FitError if none is usable."""
    n_free = len(form.param_names)
    if len(y) < n_free + 1:
        raise FitError(f"{form.name} has {n_free} parameters and needs at least {n_free + 1} points, got "
                       f"{len(y)}; fix: add points (more model sizes or pools)")
    if not np.all(np.isfinite(y) & (y > 0)):
        raise FitError("the fitted values must be positive and finite; fix: drop invalid points")
    best, best_value, converged = None, np.inf, False
    for start in _grid_starts(form, x, y, w, delta, n_starts):
        z, ok = _refine(form, x, y, w, delta, start)
        value = float(objective(form.basis(z[:len(form.nonlinear)], x) @ z[len(form.nonlinear):], y, w, delta))
        if value < best_value:
            best, best_value, converged = z, value, ok
    if best is None or not np.all(np.isfinite(best)):
        raise FitError(f"{form.name}: no grid start gives a finite fit; fix: check the points for outliers")
    if not converged:
        raise FitError(f"{form.name}: the best start did not converge in {MAX_NFEV} evaluations; fix: check "
                       "the points, or fix a parameter the data cannot identify")
    _check_bounds(form, best)
    return best, best_value


def _check_bounds(form: LawForm, z: np.ndarray) -> None:
    """FitError when a nonlinear parameter ends on a bound of its search range that the law does not impose."""
    for p, value in zip(form.nonlinear, z):
        span = BOUND_TOLERANCE * (p.hi - p.lo)
        if value >= p.hi - span:
            raise FitError(f"{form.name}: {p.name} = {value:.4g} is on its upper search bound {p.hi}, so the "
                           "range, not the data, set it; fix: widen the range or add points that constrain it")
        if value <= p.lo + span and not p.lower_is_physical:
            raise FitError(f"{form.name}: {p.name} = {value:.4g} is on its lower search bound {p.lo}: the "
                           "points show no such scaling; fix: add points over a wider range")


@dataclass(frozen=True)
class Fit:
    """A fitted law: parameters, the points used and excluded, goodness of fit, and how it was fitted."""

    form: LawForm
    params: dict[str, float]
    objective: float
    points: pd.DataFrame  # every point given, with columns `target`, "weight", "used", "excluded_because"
    target: str
    delta: float
    n_starts: int

    @property
    def used(self) -> pd.DataFrame:
        """The points the fit used."""
        return self.points[self.points["used"]]

    def predict(self, data: Mapping[str, np.ndarray]) -> np.ndarray:
        """The fitted law at new points."""
        return self.form.predict(self.params, data)

    def residuals(self) -> pd.DataFrame:
        """Used points with prediction and log residual log(pred) - log(observed)."""
        used = self.used.copy()
        used["predicted"] = self.predict(used)
        used["log_residual"] = np.log(used["predicted"]) - np.log(used[self.target])
        return used

    def r2(self) -> float:
        """Coefficient of determination of the law on the used points, in the target's own units."""
        res = self.residuals()
        observed = res[self.target].to_numpy()
        return float(1 - ((observed - res["predicted"]) ** 2).sum() / ((observed - observed.mean()) ** 2).sum())


def fit(form: LawForm, points: pd.DataFrame, target: str, weight: str | None = None,
        exclude: Mapping[int, str] | None = None, delta: float = HUBER_DELTA, n_starts: int = 4) -> Fit:
    """Fit `form` to `points[target]` by weighted Huber on log residuals (summed, never averaged).

    Variable projection over the grid of the nonlinear parameters gives one start per basin of the grid
    objective; each of the best `n_starts` is refined by trust-region least squares within bounds, and the
    best refined optimum wins. `exclude` maps row labels to the reason they are left out (on the fit card)."""
    exclude = dict(exclude or {})
    table = points.copy()
    table["weight"] = table[weight].astype(float) if weight else 1.0
    table["used"] = ~table.index.isin(list(exclude))
    table["excluded_because"] = [exclude.get(i, "") for i in table.index]
    used = table[table["used"]]
    z, value = _fit_vector(form, _columns(form, used), used[target].to_numpy(float), used["weight"].to_numpy(),
                           delta, n_starts)
    return Fit(form=form, params=dict(zip(form.param_names, map(float, z))), objective=value, points=table,
               target=target, delta=delta, n_starts=n_starts)


def refit(base: Fit, y: np.ndarray) -> dict[str, float]:
    """Parameters of the same fit (form, used points, weights, settings) on new target values."""
    used = base.used
    z, _ = _fit_vector(base.form, _columns(base.form, used), np.asarray(y, dtype=float),
                       used["weight"].to_numpy(), base.delta, base.n_starts)
    return dict(zip(base.form.param_names, map(float, z)))


# ---------------------------------------------------------------- uncertainty


@dataclass(frozen=True)
class Bootstrap:
    """Refits of one fit under resampling: one row of parameters per successful resample."""

    unit: str
    n_resamples: int
    params: pd.DataFrame
    failures: dict[str, int] = field(default_factory=dict)

    def ci(self, level: float = 0.95) -> pd.DataFrame:
        """Percentile confidence interval of each parameter."""
        tail = 100 * (1 - level) / 2
        return pd.DataFrame({"lo": np.percentile(self.params, tail, axis=0),
                             "hi": np.percentile(self.params, 100 - tail, axis=0)}, index=self.params.columns)


def resample_weights(n_samples: int, n_resamples: int, seed: int = 0) -> np.ndarray:
    """Bootstrap weight matrix (n_resamples x n_samples): how often each sample is drawn, n draws each."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_samples, np.full(n_samples, 1 / n_samples), size=n_resamples).astype(float)


def weighted_bpb(nll_nats: np.ndarray, n_bytes: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Byte-weighted bits per byte of each column of nll_nats (samples x points) under each weight row."""
    return (weights @ nll_nats) / (LN2 * (weights @ n_bytes))[:, None]


def _collect(unit: str, refits: Sequence[Callable[[], dict[str, float]]]) -> Bootstrap:
    """Run refits, keeping parameters of the successful ones (indexed by resample number, so that two
    bootstraps with the same draws pair up) and counting failures by reason."""
    rows, kept, failures = [], [], Counter()
    for i, attempt in enumerate(refits):
        try:
            rows.append(attempt())
            kept.append(i)
        except FitError as exc:
            failures[str(exc).split(";")[0]] += 1
    return Bootstrap(unit=unit, n_resamples=len(refits), params=pd.DataFrame(rows, index=kept),
                     failures=dict(failures))


def bootstrap_samples(base: Fit, nll_nats: np.ndarray, n_bytes: np.ndarray,
                      weights: np.ndarray) -> Bootstrap:
    """Refit under each row of a bootstrap weight matrix over evaluation samples.

    nll_nats holds the per-sample losses (samples x used points, in the fit's order) whose byte-weighted
    bits per byte are the fit's targets; each resample's targets are weighted sums, never recomputed pools."""
    targets = weighted_bpb(nll_nats, n_bytes, weights)
    return _collect("evaluation samples", [lambda y=y: refit(base, y) for y in targets])


def bootstrap_models(refit_models: Callable[[np.ndarray], dict[str, float]], n_models: int,
                     n_resamples: int, seed: int = 0) -> Bootstrap:
    """Refit on model sets resampled with replacement (duplicates dropped): uncertainty from which models
    happen to form the pools. `refit_models(indices)` builds the points from those models and fits."""
    rng = np.random.default_rng(seed)
    draws = [np.unique(rng.integers(0, n_models, n_models)) for _ in range(n_resamples)]
    return _collect("models", [lambda d=d: refit_models(d) for d in draws])


def holdout(form: LawForm, points: pd.DataFrame, target: str, variable: str, n_held: int = 1,
            weight: str | None = None) -> pd.DataFrame:
    """Fit on all but the `n_held` largest values of `variable`, then predict those: extrapolation error."""
    largest = np.sort(points[variable].unique())[-n_held:]
    held = points[variable].isin(largest)
    train = fit(form, points, target, weight=weight,
                exclude={i: "held out for extrapolation" for i in points.index[held]})
    out = points[held].copy()
    out["predicted"] = train.predict(out)
    out["relative_error"] = out["predicted"] / out[target] - 1
    out.attrs["variable"] = variable
    return out


# ---------------------------------------------------------------- the fit card


def fit_card(result: Fit, boot: Sequence[Bootstrap] = (), held: pd.DataFrame | None = None,
             level: float = 0.95) -> pd.DataFrame:
    """Everything needed to judge a fit, as (item, value) rows: form, objective, optimizer, grid, bounds,
    points used and excluded with reasons, parameters with bootstrap CIs, R^2, extrapolation error."""
    form = result.form
    grid = "; ".join(f"{p.name}: {p.n_grid} points on [{p.lo:g}, {p.hi:g}]" for p in form.nonlinear)
    bounds = "; ".join([f"{p.name} in [{p.lo:g}, {p.hi:g}]" + (" (lower bound physical)" if p.lower_is_physical
                                                                 else "") for p in form.nonlinear]
                       + [f"{c} >= 0" for c in form.linear])
    excluded = result.points[~result.points["used"]]
    rows = [
        ("form", f"{form.name}: {form.formula}"),
        ("objective", f"sum of Huber(delta={result.delta:g}) over log residuals"
                      + (", weighted" if (result.used["weight"] != 1).any() else "")),
        ("optimizer", f"variable projection (NNLS) on the grid; the best grid point of each of the best "
                      f"{result.n_starts} basins refined by trust-region least squares"),
        ("grid", grid), ("bounds", bounds),
        ("points used", str(len(result.used))),
        ("points excluded", "; ".join(f"{i}: {why}" for i, why in excluded["excluded_because"].items())
         or "none"),
        ("R^2", f"{result.r2():.4f}"),
    ]
    for b in boot:
        ci = b.ci(level) if len(b.params) else None
        rows.append((f"bootstrap over {b.unit}",
                     f"{b.n_resamples} resamples, {len(b.params)} fitted"
                     + "".join(f"; {n} failed: {why}" for why, n in b.failures.items())))
        for name in form.param_names:
            if ci is not None:
                rows.append((f"  {name} {100 * level:g}% CI ({b.unit})",
                             f"[{ci.loc[name, 'lo']:.4g}, {ci.loc[name, 'hi']:.4g}]"))
    rows += [(name, f"{value:.6g}") for name, value in result.params.items()]
    if held is not None:
        variable = held.attrs["variable"]
        rows += [(f"extrapolation error at {variable} = {v:.3g}", f"{100 * e:+.2f}%")
                 for v, e in zip(held[variable], held["relative_error"])]
    return pd.DataFrame(rows, columns=["item", "value"])


# ---------------------------------------------------------------- synthetic data and the published recipe


def simulate_samples(form: LawForm, params: Mapping[str, float], points: pd.DataFrame, n_samples: int,
                     noise: float = 0.05, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample losses whose population bits per byte follow the law exactly: (nll_nats, n_bytes).

    Each sample has a byte count, a difficulty shared by all points, and independent noise; both are
    mean-one lognormal, so the byte-weighted bits per byte of a point converges to the law's value."""
    rng = np.random.default_rng(seed)
    n_bytes = rng.integers(300, 1500, n_samples).astype(float)
    difficulty = rng.lognormal(-0.5 * 0.3**2, 0.3, n_samples)
    jitter = rng.lognormal(-0.5 * noise**2, noise, (n_samples, len(points)))
    law = form.predict(params, points)
    return LN2 * n_bytes[:, None] * law[None, :] * difficulty[:, None] * jitter, n_bytes


def chinchilla_recipe(points: pd.DataFrame, target: str = "loss", reduce: str = "sum",
                      starts: str = "grid", delta: float = HUBER_DELTA) -> dict[str, float]:
    """Chinchilla's Approach 3 as published: L-BFGS on Huber of log residuals in the log-sum-exp
    parameters (a, b, e, alpha, beta) from every point of its initialisation grid ("grid", 4,500 starts)
    or from one start ("single"); `reduce` "mean" averages the Huber terms as Hoffmann et al. likely did."""
    log_n, log_d = np.log(points["N"].to_numpy(float)), np.log(points["D"].to_numpy(float))
    log_l = np.log(points[target].to_numpy(float))
    scale = len(log_l) if reduce == "mean" else 1.0

    def loss_and_grad(z: np.ndarray) -> tuple[float, np.ndarray]:
        a, b, e, alpha, beta = z
        terms = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
        top = terms.max(axis=0)
        soft = np.exp(terms - top)
        lse = top + np.log(soft.sum(axis=0))
        r = lse - log_l
        dr = np.clip(r, -delta, delta) / scale
        p = soft / soft.sum(axis=0)
        grad = np.array([dr @ p[0], dr @ p[1], dr @ p[2], -(dr * p[0]) @ log_n, -(dr * p[1]) @ log_d])
        return float(huber(r, delta).sum() / scale), grad

    if starts == "grid":
        grid = itertools.product(np.arange(0, 30, 5), np.arange(0, 30, 5), np.arange(-1, 1.5, 0.5),
                                 np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))
        inits = [np.array([a, b, e, al, be]) for a, b, e, al, be in grid]
    else:
        inits = [np.array([5.0, 5.0, 0.0, 0.5, 0.5])]
    best = min((minimize(loss_and_grad, z0, jac=True, method="L-BFGS-B") for z0 in inits), key=lambda r: r.fun)
    a, b, e, alpha, beta = best.x
    return {"E": float(np.exp(e)), "A": float(np.exp(a)), "B": float(np.exp(b)), "alpha": float(alpha),
            "beta": float(beta), "objective": float(best.fun * scale), "iterations": int(best.nit)}


# ---------------------------------------------------------------- checks and the experiment's laws


def chinchilla_design() -> pd.DataFrame:
    """Nine model sizes (44M to 16B parameters) by eight token counts (5B to 500B): a grid spanning
    Chinchilla's training runs, on which the published laws are simulated."""
    return pd.DataFrame([(n, d) for n in np.logspace(np.log10(4.4e7), np.log10(1.6e10), 9)
                         for d in np.logspace(9.7, 11.7, 8)], columns=["N", "D"])


def recovery(form: LawForm, truth: Mapping[str, float], points: pd.DataFrame, n_samples: int,
             n_resamples: int, noise: float = 0.05, seed: int = 0) -> tuple[Fit, Bootstrap, pd.DataFrame]:
    """Simulate per-sample losses from a known law, fit, bootstrap over samples, and compare with the truth."""
    nll, n_bytes = simulate_samples(form, truth, points, n_samples, noise, seed)
    point = fit(form, points.assign(bpb=nll.sum(axis=0) / (LN2 * n_bytes.sum())), "bpb")
    boot = bootstrap_samples(point, nll, n_bytes, resample_weights(n_samples, n_resamples, seed + 1))
    ci = boot.ci()
    table = pd.DataFrame({"true": [truth[p] for p in form.param_names],
                          "fitted": [point.params[p] for p in form.param_names],
                          "ci_lo": ci["lo"].to_numpy(), "ci_hi": ci["hi"].to_numpy()}, index=list(form.param_names))
    table["covered"] = (table["ci_lo"] <= table["true"]) & (table["true"] <= table["ci_hi"])
    return point, boot, table


def coverage(form: LawForm, truth: Mapping[str, float], points: pd.DataFrame, n_datasets: int,
             n_samples: int, n_resamples: int, noise: float = 0.05) -> pd.Series:
    """Share of simulated datasets whose 95% bootstrap interval contains each true parameter."""
    hits = [recovery(form, truth, points, n_samples, n_resamples, noise, seed=10 * s)[2]["covered"]
            for s in range(n_datasets)]
    return pd.concat(hits, axis=1).mean(axis=1)


def merging_macro_curves(table: pd.DataFrame, sizes: Sequence[float], ks: Sequence[int]) -> pd.DataFrame:
    """Macro-average (over the table's domains) of the merging law at each size N and expert count k."""
    grid = pd.DataFrame([(n, k) for n in sizes for k in ks], columns=["N", "k"])
    per_domain = np.stack([MERGING.predict(row, grid) for row in table.to_dict("records")])
    return grid.assign(ce=per_domain.mean(axis=0))


@dataclass(frozen=True)
class LawResult:
    """One law fitted to the experiment's data, or the reason it could not be."""

    name: str
    points: pd.DataFrame
    fit: Fit | None = None
    boots: tuple[Bootstrap, ...] = ()
    held: pd.DataFrame | None = None
    error: str = ""

    def summary(self) -> dict:
        """Plain data for results JSON."""
        if self.fit is None:
            return {"fitted": False, "reason": self.error, "n_points": len(self.points)}
        return {"fitted": True, "params": self.fit.params, "r2": self.fit.r2(), "n_points": len(self.fit.used),
                "ci95": {b.unit: b.ci().to_dict("index") for b in self.boots if len(b.params)},
                "failures": {b.unit: b.failures for b in self.boots},
                "extrapolation_relative_error": None if self.held is None else
                self.held["relative_error"].tolist()}


def attempt_fit(form: LawForm, points: pd.DataFrame, target: str) -> tuple[Fit | None, str]:
    """The fit, or None and the FitError's message saying why there is none."""
    try:
        return fit(form, points, target), ""
    except FitError as exc:
        return None, str(exc)


def fit_points(name: str, points: pd.DataFrame, nll_nats: np.ndarray, n_bytes: np.ndarray, n_resamples: int,
               refit_models: Callable[[np.ndarray], dict[str, float]] | None = None, n_models: int = 0,
               seed: int = 0) -> LawResult:
    """A power law with floor in `x` fitted to `points["bpb"]`, with bootstraps over the samples (whose
    per-sample losses, one column per point, are nll_nats) and, given refit_models, over the models."""
    point, error = attempt_fit(POWER_LAW, points, "bpb")
    if point is None:
        return LawResult(name, points, error=error)
    boots = [bootstrap_samples(point, nll_nats, n_bytes, resample_weights(len(n_bytes), n_resamples, seed))]
    if refit_models is not None:
        boots.append(bootstrap_models(refit_models, n_models, n_resamples, seed))
    try:
        held = holdout(POWER_LAW, points, "bpb", "x")
    except FitError:
        held = None
    return LawResult(name, points, point, tuple(boots), held)


class BudgetPoints:
    """Budget points (each log-spaced budget bin's frontier and mean) of the pools, or of the single models,
    of any subset of a matrix's models: computed once per subset, so bootstraps of several laws share them.
    `table` is the full pool table when the caller has it already."""

    def __init__(self, matrix: LossMatrix, cards: pd.DataFrame, singles: bool = False,
                 table: pd.DataFrame | None = None):
        self.matrix, self.cards, self.singles = matrix, cards, singles
        self._table = table
        self._cache: dict[tuple[int, ...] | None, dict[str, pd.DataFrame]] = {}

    def table(self) -> pd.DataFrame:
        """The pool table (or the single models' rows) of all the models."""
        if self._table is None:
            make = oracle.single_table if self.singles else oracle.pool_table
            self._table = make(self.matrix, self.cards)
        return self._table

    def _draw_table(self, models: list[int]) -> pd.DataFrame:
        """Budget and oracle bits per byte of every pool (or single model) of a subset of the models; pools
        are named by bit mask, and enumerated exactly, without the full table's descriptions."""
        nll, n_params = self.matrix.nll_nats[:, models], self.cards["n_params_total"].to_numpy()[models]
        total_bytes = LN2 * self.matrix.n_bytes.sum()
        if self.singles:
            return pd.DataFrame({"pool": models, "total_params": n_params, "oracle_bpb": nll.sum(axis=0) / total_bytes})
        if len(models) > oracle.MAX_EXACT_MODELS:
            return oracle.pool_table(self.matrix.subset(models), self.cards.iloc[models].reset_index(drop=True))
        return pd.DataFrame({"pool": np.arange(1, 1 << len(models)), "total_params": oracle.all_pool_budgets(n_params),
                             "oracle_bpb": oracle.all_pool_nll_sums(nll) / total_bytes})

    def points(self, stat: str, models: Sequence[int] | None = None) -> pd.DataFrame:
        """Budget points (x = total parameters, bpb) at each bin's frontier or mean."""
        key = None if models is None else tuple(int(j) for j in models)
        if key not in self._cache:
            table = self.table() if key is None else self._draw_table(list(key))
            self._cache[key] = {s: oracle.budget_points(table, s).rename(columns={"params": "x"})
                                for s in ("frontier", "mean")}
        return self._cache[key][stat]

    def per_sample(self, stat: str) -> np.ndarray:
        """Per-sample losses behind each budget point of all models (samples x points)."""
        if stat == "frontier":
            return oracle.pool_minima(self.matrix, self.points(stat)["pool"].tolist())
        table = self.table()
        return oracle.budget_minima(self.matrix, table["pool"], oracle.budget_bins(table))

    def law(self, name: str, stat: str, n_resamples: int, seed: int = 0) -> LawResult:
        """The power law of these budget points, with bootstraps over samples and over models."""
        return fit_points(name, self.points(stat), self.per_sample(stat), self.matrix.n_bytes, n_resamples,
                          lambda models: fit(POWER_LAW, self.points(stat, models), "bpb").params,
                          len(self.matrix.models), seed)


def experiment_laws(matrix: LossMatrix, cards: pd.DataFrame, n_resamples: int, seed: int = 0) -> list[LawResult]:
    """The experiment's laws: single models (bits per byte against parameters) and pools (oracle bits per
    byte against total parameters, at each budget bin's frontier and mean), each with bootstrap intervals."""
    singles = pd.DataFrame({"x": cards["n_params_total"].to_numpy(float), "bpb": matrix.corpus_bpb().to_numpy(),
                            "model": matrix.models})
    results = [fit_points("single models", singles, matrix.nll_nats, matrix.n_bytes, n_resamples, seed=seed)]
    pools = BudgetPoints(matrix, cards)
    results += [pools.law(f"pools ({stat} per budget)", stat, n_resamples, seed) for stat in ("frontier", "mean")]
    return results


def collaboration_laws(matrix: LossMatrix, cards: pd.DataFrame, n_resamples: int, seed: int = 0,
                       pools: pd.DataFrame | None = None) -> dict[str, LawResult]:
    """Single-model and pool laws in total parameters, each at the budget bins' frontier and mean, with
    bootstraps over samples and over models that share their draws (so that differences pair up).
    `pools` is the matrix's pool table, if computed already."""
    out = {}
    for singles, label in ((True, "single models"), (False, "pools")):
        points = BudgetPoints(matrix, cards, singles, None if singles else pools)
        for stat in ("frontier", "mean"):
            out[f"{label} ({stat})"] = points.law(f"{label} ({stat} per budget)", stat, n_resamples, seed)
    return out


def paired_differences(a: LawResult, b: LawResult, level: float = 0.95) -> pd.DataFrame:
    """Each parameter of law b minus law a: the point difference and its percentile interval under each
    bootstrap unit, pairing resamples by number (the same sample weights, the same model draws)."""
    if a.fit is None or b.fit is None:
        raise FitError(f"cannot compare {a.name!r} with {b.name!r}: {a.error or b.error}")
    tail, rows = 100 * (1 - level) / 2, []
    for boot_a, boot_b in zip(a.boots, b.boots):
        diff = (boot_b.params - boot_a.params).dropna()
        for name in a.fit.form.param_names:
            rows.append({"unit": boot_a.unit, "param": name, "difference": b.fit.params[name] - a.fit.params[name],
                         "lo": np.percentile(diff[name], tail) if len(diff) else np.nan,
                         "hi": np.percentile(diff[name], 100 - tail) if len(diff) else np.nan,
                         "n_pairs": len(diff)})
    return pd.DataFrame(rows)


def verdict(diffs: pd.DataFrame, param: str, claimed_sign: int) -> str:
    """'reproduced' when every bootstrap unit's interval of the difference lies on the claimed side of
    zero, 'contradicted' when every one lies on the other side, else 'not resolved'."""
    rows = diffs[diffs["param"] == param]
    lo, hi = claimed_sign * rows["lo"], claimed_sign * rows["hi"]
    low, high = np.minimum(lo, hi), np.maximum(lo, hi)
    if len(rows) and (low > 0).all():
        return "reproduced"
    if len(rows) and (high < 0).all():
        return "contradicted"
    return "not resolved"


def paired_bpb_difference(nll_a: np.ndarray, nll_b: np.ndarray, n_bytes: np.ndarray, n_resamples: int,
                          seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """Mean over paired columns of bits per byte b minus a (samples x pairs each), with a percentile
    interval from the bootstrap over evaluation samples."""
    weights = np.vstack([np.ones(len(n_bytes)), resample_weights(len(n_bytes), n_resamples, seed)])
    diff = (weighted_bpb(nll_b, n_bytes, weights) - weighted_bpb(nll_a, n_bytes, weights)).mean(axis=1)
    tail = 100 * (1 - level) / 2
    return {"difference": float(diff[0]), "lo": float(np.percentile(diff[1:], tail)),
            "hi": float(np.percentile(diff[1:], 100 - tail)), "n_pairs": int(nll_a.shape[1])}


def family_laws(matrix: LossMatrix, cards: pd.DataFrame, n_resamples: int, x: str = "n_params_non_embedding",
                seed: int = 0) -> dict[str, LawResult]:
    """A power law with floor per model family: bits per byte against `x` (a card column) of the family's
    models, with a bootstrap over samples and the largest model held out for extrapolation."""
    bpb = matrix.corpus_bpb().to_numpy()
    out = {}
    for family, rows in cards.groupby("family", sort=False).groups.items():
        idx = np.asarray(list(rows))
        points = pd.DataFrame({"x": cards[x].to_numpy(float)[idx], "bpb": bpb[idx],
                               "model": np.asarray(matrix.models)[idx]}).sort_values("x").reset_index(drop=True)
        order = idx[np.argsort(cards[x].to_numpy(float)[idx], kind="stable")]
        out[family] = fit_points(family, points, matrix.nll_nats[:, order], matrix.n_bytes, n_resamples, seed=seed)
    return out


def quality_bars(results: Mapping[str, LawResult], min_r2: float = 0.98, max_extrapolation: float = 0.02
                 ) -> pd.DataFrame:
    """Per family: does bits per byte fall with every step in size, does the law fit (R^2), and does it
    predict the largest model from the others (relative error)? One row per family, with pass flags."""
    rows = []
    for family, result in results.items():
        bpb = result.points.sort_values("x")["bpb"].to_numpy()
        fitted = result.fit is not None
        r2 = result.fit.r2() if fitted else float("nan")
        error = float(result.held["relative_error"].iloc[-1]) if result.held is not None else float("nan")
        rows.append({"family": family, "n_sizes": len(bpb), "monotone": bool(np.all(np.diff(bpb) < 0)),
                     "r2": r2, "r2_ok": bool(r2 >= min_r2), "extrapolation_error": error,
                     "extrapolation_ok": bool(abs(error) <= max_extrapolation)})
    table = pd.DataFrame(rows)
    table["all_bars"] = table[["monotone", "r2_ok", "extrapolation_ok"]].all(axis=1)
    return table
