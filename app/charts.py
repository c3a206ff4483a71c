"""Altair charts of the frames `app.views` builds, free of Streamlit so they test alone.

Every line chart: the smoothed curve over the raw one (faint) when smoothing is on, a legend
under the plot in columns (long series names fit), a click on a legend entry shows only that
series (shift-click adds more; a click on empty space shows all again), and the scales zoom
with the mouse wheel and pan by dragging (a double click resets)."""

from __future__ import annotations

import altair as alt
import pandas as pd

from app.views import X_AXES


def _legend(columns: int = 4, label_limit: int = 140) -> alt.Legend:
    return alt.Legend(orient="bottom", columns=columns, labelLimit=label_limit, symbolLimit=0, title=None)


# axis ticks without trailing zeros (by default a single point's axis reads 461.000000): x (steps,
# epochs, tokens, minutes) in plain digits with thousands separators, y in the shortest form
X_NUMBER = ",~f"
NUMBER = "~g"


def line_chart(df: pd.DataFrame, title: str, axis: str = "step", smoothed: bool = True, log: bool = False,
               color: str = "series", dash: str | None = None, height: int = 240,
               legend_columns: int = 4) -> alt.LayerChart:
    """`df`: rows with `x`, `value`, `smoothed`, `step`, `epoch` and the `color` field.
    `legend_columns`: 4 for short metric names, 1 for run names (each on its own line, up to 360 px)."""
    shown = alt.selection_point(fields=[color], bind="legend", name="shown")
    zoom = alt.selection_interval(bind="scales", name="zoom")
    scale = alt.Scale(type="log") if log else alt.Scale(zero=False)
    x = alt.X("x:Q", title=X_AXES.get(axis, axis), axis=alt.Axis(format=X_NUMBER))
    legend = _legend(legend_columns, 140 if legend_columns > 1 else 360)
    col = alt.Color(f"{color}:N", legend=legend)
    tooltip = [alt.Tooltip(f"{color}:N"), alt.Tooltip("step:Q"), alt.Tooltip("epoch:Q"),
               alt.Tooltip("value:Q", format=".4g")]
    extra = {"strokeDash": alt.StrokeDash(f"{dash}:N", legend=legend)} if dash else {}
    base = alt.Chart(df)
    points = len(df) < 60
    if smoothed:
        raw = base.mark_line(strokeWidth=1).encode(
            x=x, y=alt.Y("value:Q", title=None, scale=scale, axis=alt.Axis(format=NUMBER)), color=col, detail=f"{color}:N",
            opacity=alt.condition(shown, alt.value(0.25), alt.value(0.0)), **extra)
        line = base.mark_line(point=points).encode(
            x=x, y=alt.Y("smoothed:Q", title=None, scale=scale, axis=alt.Axis(format=NUMBER)), color=col,
            opacity=alt.condition(shown, alt.value(1.0), alt.value(0.05)),
            tooltip=[*tooltip, alt.Tooltip("smoothed:Q", format=".4g")], **extra)
        chart = alt.layer(line.add_params(shown, zoom), raw)
    else:
        line = base.mark_line(point=points).encode(
            x=x, y=alt.Y("value:Q", title=None, scale=scale, axis=alt.Axis(format=NUMBER)), color=col,
            opacity=alt.condition(shown, alt.value(1.0), alt.value(0.05)), tooltip=tooltip, **extra)
        chart = alt.layer(line.add_params(shown, zoom))
    return chart.properties(title=title + (" (log)" if log else ""), height=height)


def metric_chart(title: str, df: pd.DataFrame, axis: str, smoothed: bool) -> alt.LayerChart:
    # losses fall by orders of magnitude: a log axis keeps the late curve readable
    log = title.startswith("Loss") and bool((df["value"] > 0).all())
    return line_chart(df, title, axis=axis, smoothed=smoothed, log=log)


def acceptance_curve_chart(curve: pd.DataFrame, axis: str) -> alt.Chart:
    """Mean acceptance length over training (`views.acceptance_curve` with an `x` column)."""
    zoom = alt.selection_interval(bind="scales", name="zoom")
    return (alt.Chart(curve, title="Mean acceptance length").mark_line(point=True)
            .encode(x=alt.X("x:Q", title=X_AXES.get(axis, axis), axis=alt.Axis(format=X_NUMBER)),
                    y=alt.Y("mean acceptance length:Q", title=None, scale=alt.Scale(zero=False),
                            axis=alt.Axis(format=NUMBER)),
                    tooltip=["step", "epoch", "mean acceptance length", "seconds"])
            .add_params(zoom).properties(height=240))


def positions_chart(df: pd.DataFrame, title: str) -> alt.Chart:
    """Per-position acceptance rates (`views.acceptance_positions`) as bars, 0..1."""
    return (alt.Chart(df, title=title).mark_bar()
            .encode(x=alt.X("position:O"), y=alt.Y("acceptance rate:Q", scale=alt.Scale(domain=[0, 1])),
                    tooltip=["position", "acceptance rate"])
            .properties(height=240))


def positions_compare_chart(df: pd.DataFrame) -> alt.Chart:
    """Per-position acceptance rates of several sources (`source`: live, at training time)
    as grouped bars."""
    return (alt.Chart(df, title="Acceptance rate per position").mark_bar()
            .encode(x=alt.X("position:O"), xOffset=alt.XOffset("source:N"),
                    y=alt.Y("acceptance rate:Q", scale=alt.Scale(domain=[0, 1])),
                    color=alt.Color("source:N", legend=_legend(2)), tooltip=["source", "position", "acceptance rate"])
            .properties(height=240))
