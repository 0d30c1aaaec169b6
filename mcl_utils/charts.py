"""Charts for the book: one Altair theme, HTML output that renders offline (see _ext/offline_altair.py)."""

from __future__ import annotations

import altair as alt
import pandas as pd

FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


@alt.theme.register("mcl", enable=False)
def _theme() -> alt.theme.ThemeConfig:
    """The book's chart style: quiet axes, readable fonts, a colour-blind-aware palette."""
    return {"config": {
        "font": FONT,
        "view": {"stroke": None, "continuousWidth": 400, "continuousHeight": 260},
        "axis": {"labelFontSize": 12, "titleFontSize": 13, "grid": True, "gridOpacity": 0.4},
        "legend": {"labelFontSize": 12, "titleFontSize": 12, "orient": "bottom"},
        "title": {"fontSize": 15, "anchor": "start"},
        "range": {"category": PALETTE},
    }}


def setup() -> None:
    """Enable the theme and the HTML renderer (the book supplies Vega offline)."""
    alt.theme.enable("mcl")
    alt.renderers.enable("html")


def bpb_by_model(df: pd.DataFrame) -> alt.Chart:
    """Horizontal bars of corpus bits per byte per model (columns: model, bpb, n_params)."""
    return alt.Chart(df, title="Bits per byte on the evaluation sample (lower is better)").mark_bar().encode(
        x=alt.X("bpb:Q", title="bits per byte"),
        y=alt.Y("model:N", sort="x", title=None),
        color=alt.Color("model:N", legend=None),
        tooltip=["model", alt.Tooltip("bpb:Q", format=".4f"), alt.Tooltip("n_params:Q", format=",")],
    ).properties(height=alt.Step(28))


def bpb_by_group(df: pd.DataFrame, group: str) -> alt.Chart:
    """Dots of bits per byte per group and series (columns: group, series, bpb)."""
    return alt.Chart(df, title=f"Bits per byte by {group}").mark_point(filled=True, size=70).encode(
        x=alt.X("bpb:Q", title="bits per byte", scale=alt.Scale(zero=False)),
        y=alt.Y(f"{group}:N", title=None, sort=alt.EncodingSortField("bpb", op="min")),
        color=alt.Color("series:N", title=None),
        shape=alt.Shape("series:N", title=None),
        tooltip=[group, "series", alt.Tooltip("bpb:Q", format=".4f")],
    ).properties(height=alt.Step(20))


def win_share_bars(df: pd.DataFrame, group: str) -> alt.Chart:
    """Stacked shares of samples won by each model, per group (columns: group, model, share)."""
    return alt.Chart(df, title="Which model gives the lowest loss, sample by sample").mark_bar().encode(
        x=alt.X("share:Q", stack="normalize", title="share of samples won", axis=alt.Axis(format="%")),
        y=alt.Y(f"{group}:N", title=None),
        color=alt.Color("model:N", title=None),
        tooltip=[group, "model", alt.Tooltip("share:Q", format=".1%")],
    ).properties(height=alt.Step(20))


def per_sample_scatter(df: pd.DataFrame, x: str, y: str) -> alt.Chart:
    """Per-sample bits per byte of model x against model y, with the diagonal (model names may be any text)."""
    data = pd.DataFrame({"x": df[x], "y": df[y], "sample_id": df["sample_id"], "genre": df["genre"]})
    lo, hi = float(data[["x", "y"]].min().min()), float(data[["x", "y"]].max().max())
    diagonal = alt.Chart(pd.DataFrame({"x": [lo, hi], "y": [lo, hi]})).mark_line(
        color="gray", strokeDash=[4, 4]).encode(x="x:Q", y="y:Q")
    points = alt.Chart(data, title="Per-sample bits per byte: below the diagonal, the vertical-axis model wins"
                       ).mark_circle(size=14, opacity=0.5).encode(
        x=alt.X("x:Q", title=f"{x} (bits per byte)", scale=alt.Scale(zero=False)),
        y=alt.Y("y:Q", title=f"{y} (bits per byte)", scale=alt.Scale(zero=False)),
        color=alt.Color("genre:N", title=None),
        tooltip=["sample_id", "genre", alt.Tooltip("x:Q", format=".3f", title=x),
                 alt.Tooltip("y:Q", format=".3f", title=y)])
    return (diagonal + points).properties(width=380, height=380)


def law_fit(points: pd.DataFrame | None, curve: pd.DataFrame, x_title: str, y_title: str,
            title: str) -> alt.Chart:
    """Fitted curves on a log x axis, with observed points if given (both: columns x, y, series)."""
    x = alt.X("x:Q", title=x_title, scale=alt.Scale(type="log"))
    y = alt.Y("y:Q", title=y_title, scale=alt.Scale(zero=False))
    line = alt.Chart(curve).mark_line(strokeWidth=2).encode(x=x, y=y, color=alt.Color("series:N", title=None))
    if points is None:
        return line.properties(title=title)
    dots = alt.Chart(points).mark_point(filled=True, size=50).encode(
        x=x, y=y, color=alt.Color("series:N", title=None),
        tooltip=[alt.Tooltip("x:Q", format=".3g"), alt.Tooltip("y:Q", format=".4f"), "series"])
    return (line + dots).properties(title=title)


def pools_by_budget(pools: pd.DataFrame) -> alt.Chart:
    """Oracle bits per byte of every pool against its total parameters, by homogeneous/heterogeneous."""
    return alt.Chart(pools, title="Every pool: oracle bits per byte against total parameters").mark_point(
        filled=True, size=60, opacity=0.7).encode(
        x=alt.X("total_params:Q", title="total parameters of the pool", scale=alt.Scale(type="log")),
        y=alt.Y("oracle_bpb:Q", title="oracle bits per byte", scale=alt.Scale(zero=False)),
        color=alt.Color("kind:N", title=None), shape=alt.Shape("n_models:O", title="models in pool"),
        tooltip=["pool", "families", alt.Tooltip("total_params:Q", format=","),
                 alt.Tooltip("oracle_bpb:Q", format=".4f")])


def residuals(df: pd.DataFrame, x_title: str) -> alt.Chart:
    """Log residuals of a fit against x, with the zero line (columns: x, log_residual, series)."""
    zero = alt.Chart(pd.DataFrame({"y": [0.0]})).mark_rule(color="gray", strokeDash=[4, 4]).encode(y="y:Q")
    dots = alt.Chart(df).mark_point(filled=True, size=40).encode(
        x=alt.X("x:Q", title=x_title, scale=alt.Scale(type="log")),
        y=alt.Y("log_residual:Q", title="log(predicted) - log(observed)"),
        color=alt.Color("series:N", title=None))
    return (zero + dots).properties(title="Residuals of the fit", height=180)


def family_scaling(points: pd.DataFrame, curves: pd.DataFrame, x_title: str) -> alt.Chart:
    """Bits per byte of each family's models against size, with each family's fitted law (points: x, bpb,
    family, model, seed; curves: x, bpb, family). Seed replicas are hollow."""
    x = alt.X("x:Q", title=x_title, scale=alt.Scale(type="log"))
    y = alt.Y("bpb:Q", title="bits per byte on the Brown sample", scale=alt.Scale(zero=False))
    color = alt.Color("family:N", title=None)
    line = alt.Chart(curves).mark_line(strokeWidth=2, opacity=0.8).encode(x=x, y=y, color=color)
    dots = alt.Chart(points).mark_point(size=60).encode(
        x=x, y=y, color=color, fill=alt.condition("datum.seed == 0", color, alt.value("white")),
        tooltip=["model", alt.Tooltip("x:Q", format=","), alt.Tooltip("bpb:Q", format=".4f")])
    return (line + dots).properties(title="Each family's models and its fitted law", width=460, height=300)


def training_curves(logs: pd.DataFrame, color: str = "size") -> alt.Chart:
    """Training loss against tokens seen, one panel per family, one line per value of `color` (columns:
    tokens, loss_nats, family, model and `color`); losses are per token of each family's own tokenizer, so
    the panels do not share a y axis."""
    return alt.Chart(logs).mark_line(strokeWidth=1.5).encode(
        x=alt.X("tokens:Q", title="tokens seen", scale=alt.Scale(type="log")),
        y=alt.Y("loss_nats:Q", title="training loss (nats per token)", scale=alt.Scale(zero=False)),
        color=alt.Color(f"{color}:N", title=color, sort=None), detail="model:N",
        tooltip=["model", alt.Tooltip("tokens:Q", format=","), alt.Tooltip("loss_nats:Q", format=".3f")],
    ).properties(width=230, height=200).facet(column=alt.Column("family:N", title=None)).resolve_scale(
        y="independent").properties(title="Training curves (mean loss over each 10 steps)")


def lr_sweep(runs: pd.DataFrame) -> alt.Chart:
    """Validation bits per byte against peak learning rate, one panel per family, one line per size."""
    return alt.Chart(runs).mark_line(point=True).encode(
        x=alt.X("lr:Q", title="peak learning rate", scale=alt.Scale(type="log")),
        y=alt.Y("val_bpb:Q", title="validation bits per byte", scale=alt.Scale(zero=False)),
        color=alt.Color("size:N", title="size"),
        tooltip=["size", alt.Tooltip("lr:Q", format=".3g"), alt.Tooltip("val_bpb:Q", format=".4f")],
    ).properties(width=230, height=200).facet(column=alt.Column("family:N", title=None)).resolve_scale(
        y="independent").properties(title="Learning-rate sweeps")


def pool_cloud(density: pd.DataFrame, curves: pd.DataFrame, points: pd.DataFrame) -> alt.Chart:
    """Every pool as a density of (total parameters, oracle bits per byte) cells, with fitted laws and
    budget points on top (density: x, x2, y, y2, pools; curves: x, bpb, series; points: x, bpb, series)."""
    x = alt.X("x:Q", title="total parameters of the pool", scale=alt.Scale(type="log"))
    y = alt.Y("bpb:Q", title="oracle bits per byte", scale=alt.Scale(zero=False))
    cells = alt.Chart(density).mark_rect(opacity=0.6).encode(
        x=alt.X("x:Q", scale=alt.Scale(type="log"), title="total parameters of the pool"), x2="x2:Q",
        y=alt.Y("y:Q", scale=alt.Scale(zero=False)), y2="y2:Q",
        color=alt.Color("pools:Q", title="pools", scale=alt.Scale(type="log", scheme="greys")),
        tooltip=[alt.Tooltip("pools:Q", format=",")])
    line = alt.Chart(curves).mark_line(strokeWidth=2).encode(x=x, y=y, color=alt.Color("series:N", title=None))
    dots = alt.Chart(points).mark_point(filled=True, size=45).encode(
        x=x, y=y, color=alt.Color("series:N", title=None), shape=alt.Shape("series:N", title=None),
        tooltip=["series", alt.Tooltip("x:Q", format=","), alt.Tooltip("bpb:Q", format=".4f")])
    return (cells + line + dots).resolve_scale(color="independent").properties(
        title="Every pool, the budget points and the fitted laws", width=480, height=320)


def intervals(df: pd.DataFrame, x_title: str, title: str) -> alt.Chart:
    """Point estimates with interval bars, one row per label (columns: label, value, lo, hi, group)."""
    y = alt.Y("label:N", title=None, sort=None)
    zero = alt.Chart(pd.DataFrame({"x": [0.0]})).mark_rule(color="gray", strokeDash=[4, 4]).encode(x="x:Q")
    bars = alt.Chart(df).mark_rule(strokeWidth=2).encode(x=alt.X("lo:Q", title=x_title), x2="hi:Q", y=y,
                                                         color=alt.Color("group:N", title=None))
    dots = alt.Chart(df).mark_point(filled=True, size=60).encode(
        x="value:Q", y=y, color=alt.Color("group:N", title=None),
        tooltip=["label", "group", alt.Tooltip("value:Q", format=".4g"), alt.Tooltip("lo:Q", format=".4g"),
                 alt.Tooltip("hi:Q", format=".4g")])
    return (zero + bars + dots).properties(title=title, height=alt.Step(22), width=420)
