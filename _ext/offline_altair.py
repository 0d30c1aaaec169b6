"""Sphinx extension: serve Vega, Vega-Lite and Vega-Embed locally so Altair charts render offline.

Altair's HTML output loads the three libraries from a CDN unless the page already declares them in
`VEGA_DEBUG` with the exact versions Altair expects. This extension writes vl-convert's bundled copy of
the libraries into the build's static files (wrapped in a function, so its top-level names cannot clash
with Sphinx's globals), exposes `vega`, `vegaLite` and `vegaEmbed`, and presets `VEGA_DEBUG`.
"""

from __future__ import annotations

from pathlib import Path

BUNDLE_NAME = "vega-offline.js"


def _bundle() -> str:
    """The vl-convert JavaScript bundle, wrapped, plus the VEGA_DEBUG preset for Altair's loader."""
    import altair as alt
    import vl_convert

    vl_version = "v" + ".".join(alt.VEGALITE_VERSION.split(".")[:2])
    bundle = vl_convert.javascript_bundle(vl_version=vl_version)
    preset = {"vega_version": alt.VEGA_VERSION, "vegalite_version": alt.VEGALITE_VERSION,
              "vegaembed_version": alt.VEGAEMBED_VERSION}
    return (f"(function () {{\n{bundle}\n}})();\n"
            f"window.VEGA_DEBUG = Object.assign(window.VEGA_DEBUG || {{}}, {preset!r});\n")


def _write_bundle(app, exception) -> None:
    """After an HTML build, place the bundle in _static."""
    if exception is None and app.builder.format == "html":
        out = Path(app.outdir) / "_static" / BUNDLE_NAME
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(_bundle(), encoding="utf-8")


def setup(app):
    """Register the script on every page (loaded before the page body runs Altair's snippets)."""
    app.add_js_file(BUNDLE_NAME, priority=100)
    app.connect("build-finished", _write_bundle)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
