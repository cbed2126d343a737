"""The figures of ``rlhf-spec report``, drawn with plotly: seconds per stage, training curves, reward
distributions and win rates. Each returns one ``<div>`` without plotly.js; the page embeds it once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import RLHFSpecError
from .report_data import CACHED, computed_seconds, judge_value, num

STATUS_COLORS = {"ran": "#1f77b4", "cached": "#2ca02c", "reused": "#2ca02c", "recorded": "#7f7f7f",
                 "failed": "#d62728", "interrupted": "#ff7f0e"}


@dataclass
class Page:
    """What the page builder collects: the run, the notes on missing pieces, and the HTML sections."""

    run: dict
    missing: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    figures: int = 0


def plotly():
    """``(plotly.graph_objects, plotly.io, plotly.subplots)``; :class:`RLHFSpecError` if plotly is not installed."""
    try:
        import plotly.graph_objects as go
        import plotly.io as pio
        from plotly.subplots import make_subplots
    except ImportError as exc:
        raise RLHFSpecError(f"rlhf-spec report needs plotly ({exc}); "
                            "install it with `pip install 'plotly>=6'`") from None
    return go, pio, make_subplots


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-") or "x"


def figure_html(page: Page, fig, div_id: str) -> str:
    """One figure as a ``<div>`` without plotly.js (the page embeds it once, in its head)."""
    _, pio, _ = plotly()
    page.figures += 1
    fig.update_layout(template="plotly_white", margin={"l": 60, "r": 30, "t": 60, "b": 50})
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True},
                       default_height=f"{fig.layout.height or 420}px")


def stage_bar(stage: dict) -> tuple[float, str, str]:
    """``(seconds, label, pattern)`` of one stage's time bar.

    A stage served from the cache is drawn with the seconds its entry took when it was computed, hatched
    (pattern ``"/"``) and labelled ``cached (computed in N s)``; any other stage with its ``seconds``.
    """
    before = computed_seconds(stage)
    if before is not None:
        return before, f"{stage.get('status')} (computed in {before:.2f} s)", "/"
    secs = num(stage.get("seconds")) or 0.0
    return secs, f"{secs:.2f} s", ""


def time_figure(page: Page, stages: list[dict]) -> str:
    """Horizontal bars of seconds per stage, coloured by status; cached stages as :func:`stage_bar` draws them."""
    go, _, _ = plotly()
    fig = go.Figure()
    ids = [s.get("id", "?") for s in stages]
    longest, hatched = 0.0, False
    for status in dict.fromkeys(s.get("status", "?") for s in stages):
        rows = [s for s in stages if s.get("status", "?") == status]
        secs, labels, patterns = zip(*(stage_bar(s) for s in rows))
        longest, hatched = max(longest, *secs), hatched or any(patterns)
        name = f"{status} (seconds when computed)" if status in CACHED and any(patterns) else status
        fig.add_trace(go.Bar(y=[s.get("id", "?") for s in rows], x=list(secs), orientation="h", name=name,
                             marker={"color": STATUS_COLORS.get(status, "#9467bd"),
                                     "pattern": {"shape": list(patterns)}},
                             text=list(labels), textposition="outside", cliponaxis=False))
    title = "Seconds per stage"
    if hatched:
        title += " (hatched: served from the cache; bar = seconds when computed)"
    fig.update_layout(title=title, xaxis={"title": "seconds", "range": [0, 1.45 * longest or 1.0]},
                      height=max(260, 70 + 40 * len(stages)), barmode="overlay", showlegend=True,
                      legend_title_text="status", yaxis={"categoryorder": "array", "categoryarray": ids[::-1]})
    return figure_html(page, fig, "fig-stage-times")


def training_figure(page: Page, stage: dict, history: list[dict]) -> str:
    """One panel per numeric key of a train stage's history (loss, reward margin, KL, lr, ...), x = update.

    Returns ``""`` (and notes it on the page) when the history has no numeric key.
    """
    go, _, make_subplots = plotly()
    keys = [k for k in dict.fromkeys(k for h in history for k in h) if k != "update"
            and any(num(h.get(k)) is not None for h in history)]
    if not keys:
        page.missing.append(f"stage '{stage.get('id')}': history.json has no numeric values; no training curves")
        return ""
    xs = [num(h.get("update")) or i + 1 for i, h in enumerate(history)]
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=keys, horizontal_spacing=0.07,
                        vertical_spacing=min(0.12, 0.35 / nrows))
    for i, k in enumerate(keys):
        fig.add_trace(go.Scatter(x=xs, y=[num(h.get(k)) for h in history], mode="lines+markers", name=k),
                      row=i // cols + 1, col=i % cols + 1)
        fig.update_xaxes(title_text="update", row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(title=f"Training curves: {stage.get('id')} ({stage.get('uses')}, {len(history)} updates)",
                      height=120 + 260 * nrows, showlegend=False)
    return figure_html(page, fig, f"fig-train-{slug(stage.get('id'))}")


def reward_figure(page: Page, stage: dict, table: dict, judge: str) -> str:
    """Overlaid histograms of one judge's rewards for the policy's and the reference's answers, with means."""
    go, _, _ = plotly()
    fig = go.Figure()
    for who, color in (("policy", "#1f77b4"), ("reference", "#ff7f0e")):
        vals = [v for v in (num(x) for x in table.get(f"{who}_reward/{judge}", [])) if v is not None]
        fig.add_trace(go.Histogram(x=vals, name=f"{who} (n={len(vals)})", opacity=0.6, marker_color=color))
        if vals:
            fig.add_vline(x=sum(vals) / len(vals), line_dash="dash", line_color=color)
    fig.update_layout(title=f"Reward distribution, judge '{judge}' ({stage.get('id')}); dashed lines: means",
                      barmode="overlay", xaxis_title="reward", yaxis_title="answers", height=380)
    return figure_html(page, fig, f"fig-rewards-{slug(stage.get('id'))}-{slug(judge)}")


def winrate_figure(page: Page, stage: dict, metrics: dict, judges: list[str]) -> str:
    """Bars of the win rate and the length-controlled win rate per judge, with their intervals as error bars."""
    go, _, _ = plotly()
    fig = go.Figure()
    bars = (("win rate", "win_rate", "#1f77b4"), ("length-controlled win rate", "lc_win_rate", "#9467bd"))
    for label, prefix, color in bars:
        ys, lo, hi = [], [], []
        for j in judges:
            y = judge_value(metrics, j, prefix, j == judges[0])
            low = judge_value(metrics, j, f"{prefix}_ci_low", j == judges[0])
            high = judge_value(metrics, j, f"{prefix}_ci_high", j == judges[0])
            ys.append(y)
            lo.append(y - low if y is not None and low is not None else 0.0)
            hi.append(high - y if y is not None and high is not None else 0.0)
        fig.add_trace(go.Bar(x=judges, y=ys, name=label, marker_color=color,
                             error_y={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo},
                             text=[f"{y:.3f}" if y is not None else "n/a" for y in ys], textposition="inside",
                             insidetextanchor="start"))
    fig.add_hline(y=0.5, line_dash="dot", line_color="#555", annotation_text="0.5 (tie)")
    fig.update_layout(title=f"Win rate of the policy over the reference ({stage.get('id')}), with intervals",
                      barmode="group", yaxis={"range": [0, 1.05], "title": "win rate"}, xaxis_title="judge", height=400)
    return figure_html(page, fig, f"fig-winrate-{slug(stage.get('id'))}")
