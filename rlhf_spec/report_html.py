"""``rlhf-spec report``: one self-contained HTML page of a run, made with plotly.

The page holds a header (spec, status, time, warnings, what is missing), per-stage time bars, the training
curves of every train stage (every numeric key of its ``history.json``), and for every evaluate stage the win
rates with their intervals, the reward distributions of the policy and the reference per judge, and the
examples table. plotly's JavaScript is embedded once, so the file opens without a network.

The input is a run report (``rlhf-spec run --report PATH``) or a cache run record (``<cache>/runs/*.json``),
whose stages are rebuilt from the entries' manifests. Missing pieces (an entry removed by ``cache gc``, no
evaluate stage, no ``history.json``) are reported on the page instead of failing.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import RLHFSpecError, UsageError

#: Examples shown per evaluate stage (the rest are counted, not shown).
MAX_EXAMPLES = 50
#: Suffixes of per-judge evaluate metrics, ``<judge>.<suffix>``.
JUDGE_SUFFIXES = ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate", "lc_win_rate_ci_low",
                  "lc_win_rate_ci_high", "win_rate_wilson_low", "win_rate_wilson_high", "reward_mean_policy",
                  "reward_mean_reference", "reward_delta")
STATUS_COLORS = {"ran": "#1f77b4", "cached": "#2ca02c", "reused": "#2ca02c", "recorded": "#7f7f7f",
                 "failed": "#d62728", "interrupted": "#ff7f0e"}
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0 auto;max-width:1300px;
padding:16px 24px;color:#222}
h1{margin-bottom:4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0;font-size:14px}th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f5f5f5;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.status{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff;font-weight:600}
.box{border-left:4px solid;padding:6px 12px;margin:10px 0;background:#fafafa}
.warn{border-color:#ff7f0e}.missing{border-color:#7f7f7f}.error{border-color:#d62728}
.text{white-space:pre-wrap;word-break:break-word;max-height:14em;overflow:auto;max-width:30em}
.win{font-weight:700}.meta td{border:none;padding:1px 12px 1px 0}details summary{cursor:pointer;color:#555}
"""


@dataclass
class _Page:
    """What :func:`render_report` collects: the run, the notes on missing pieces, and the HTML sections."""

    run: dict
    missing: list[str] = field(default_factory=list)
    sections: list[str] = field(default_factory=list)
    figures: int = 0


# ----------------------------------------------------------------------------- loading


def _read_json(path: Path, what: str) -> Any:
    """The JSON document at ``path``; :class:`UsageError` naming ``what`` if it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} {path}: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"{what} {path} is not valid JSON: {exc}") from None


def load_run(source: Path) -> dict:
    """Read a run report or a cache run record and return it in the run report's shape.

    Args:
        source: a run report (``rlhf-spec run --report PATH``: keys ``spec``, ``status``, ``stages``, ...) or
            a cache run record (``<cache>/runs/<time>-<pid>.json``: keys ``spec``, ``source``, ``keys``).

    Returns:
        The report dict (``spec``, ``status``, ``seconds``, ``warnings``, ``stages``, ...). For a run record the
        stages are rebuilt from each key's manifest, ``status`` is ``"recorded"`` and ``kind_of_source`` says so;
        keys whose entry is gone are listed under ``missing``.

    Raises:
        UsageError: if ``source`` does not exist, is not JSON, or is neither a run report nor a run record.
    """
    source = Path(source)
    doc = _read_json(source, "run report or run record")
    if isinstance(doc, dict) and isinstance(doc.get("stages"), list) and "spec" in doc:
        run = dict(doc)
        run["stages"] = [s for s in doc["stages"] if isinstance(s, dict)]
        run.setdefault("kind_of_source", "run report")
        run.setdefault("missing", [])
        return run
    if isinstance(doc, dict) and isinstance(doc.get("keys"), list) and "spec" in doc:
        return _run_from_record(doc, source)
    raise UsageError(f"{source} is neither a run report (written by `rlhf-spec run --report PATH`, with 'spec' and "
                     "'stages') nor a cache run record (<cache>/runs/*.json, with 'spec' and 'keys')")


def _spec_order(spec_source: str) -> list[str]:
    """Stage ids in the order of the spec file, or ``[]`` if it cannot be read."""
    try:
        spec = json.loads(Path(spec_source).read_text(encoding="utf-8"))
        return [s["id"] for s in spec.get("stages", []) if isinstance(s, dict) and "id" in s]
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def _run_from_record(record: dict, source: Path) -> dict:
    """A run report rebuilt from a cache run record: one stage per key whose manifest names a stage."""
    root = source.resolve().parent.parent
    stages, missing = [], []
    for key in record["keys"]:
        if not isinstance(key, str) or len(key) < 3:
            continue
        folder = root / "entries" / key[:2] / key
        try:
            man = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            missing.append(f"cache entry {key[:12]} is gone (removed by `cache gc`?) or unreadable; its stage is not shown")
            continue
        st = man.get("stage") or {}
        if not st.get("id") or "memo" in st or "kind" not in st:
            continue  # memo entries (reference logprobs) and converted models are not stages
        stages.append({"id": st["id"], "kind": st.get("kind", ""), "uses": st.get("uses", ""), "key": key,
                       "status": "recorded", "seconds": float(man.get("seconds") or 0.0), "output": str(folder),
                       "output_type": man.get("output_type", ""), "metrics": man.get("metrics") or {},
                       "rows": man.get("rows"), "reason": "", "_created": man.get("created", "")})
    order = _spec_order(record.get("source", ""))
    stages.sort(key=lambda s: (order.index(s["id"]) if s["id"] in order else len(order), s["_created"]))
    seconds = sum(s["seconds"] for s in stages)
    return {"spec": record.get("spec", ""), "source": record.get("source", ""), "status": "recorded", "error": "",
            "started": "", "seconds": seconds, "warnings": [], "summary": {}, "stages": stages, "missing": missing,
            "cache_dir": str(root), "kind_of_source": f"cache run record {source.name} (times are those of the run "
                                                       "that computed each entry)"}


def _entry(stage: dict) -> Optional[Path]:
    """The stage's output folder if it still exists, else ``None``."""
    out = stage.get("output") or ""
    return Path(out) if out and Path(out).is_dir() else None


def _gone(stage: dict) -> str:
    """Why a stage has no output folder to read, in words."""
    if not stage.get("output"):
        return f"stage '{stage.get('id')}' ({stage.get('status', '?')}) has no output folder"
    return f"stage '{stage.get('id')}': its output folder {stage['output']} is gone (removed by `cache gc`?)"


def read_history(stage: dict, notes: Optional[list[str]] = None) -> Optional[list[dict]]:
    """A train stage's ``history.json`` (one dict per update), or ``None`` if it is missing.

    Args:
        stage: one stage of the run report (uses its ``id`` and ``output`` folder).
        notes: a list to append the reason to when the history is missing (optional).

    Returns:
        The list of per-update dicts, or ``None``.

    Raises:
        Nothing: a missing, unreadable or malformed file gives ``None`` and a note.
    """
    folder = _entry(stage)
    why = ""
    if folder is None:
        why = f"{_gone(stage)}; no training curves"
    elif not (folder / "history.json").is_file():
        why = f"stage '{stage.get('id')}': no history.json in {folder}; no training curves"
    else:
        try:
            hist = json.loads((folder / "history.json").read_text(encoding="utf-8"))
            if isinstance(hist, list):
                return [h for h in hist if isinstance(h, dict)]
            why = f"stage '{stage.get('id')}': history.json is not a list; no training curves"
        except (OSError, ValueError) as exc:
            why = f"stage '{stage.get('id')}': history.json cannot be read ({exc}); no training curves"
    if notes is not None:
        notes.append(why)
    return None


def read_eval_table(stage: dict, notes: Optional[list[str]] = None) -> Optional[dict[str, list]]:
    """An evaluate stage's per-answer table (``data/``, one row per prompt and sample) as columns.

    Args:
        stage: one evaluate stage of the run report (uses its ``id`` and ``output`` folder).
        notes: a list to append the reason to when the table is missing (optional).

    Returns:
        ``{column: values}`` (``prompt``, ``policy``, ``reference``, ``policy_reward/<judge>``, ...), or ``None``
        if the folder is gone or cannot be loaded.

    Raises:
        Nothing: a missing or unloadable table gives ``None`` and a note.
    """
    folder = _entry(stage)
    why = ""
    if folder is None:
        why = _gone(stage)
    elif not (folder / "data").is_dir():
        why = f"stage '{stage.get('id')}': no per-answer table (data/) in {folder}"
    else:
        try:
            import datasets

            return datasets.load_from_disk(str(folder / "data")).to_dict()
        except Exception as exc:  # noqa: BLE001 - any load failure is reported on the page
            why = f"stage '{stage.get('id')}': the per-answer table cannot be loaded ({type(exc).__name__}: {exc})"
    if notes is not None:
        notes.append(why + "; no reward distributions or examples")
    return None


def eval_metrics(stage: dict) -> dict:
    """An evaluate stage's metrics.

    Args:
        stage: one evaluate stage of the run report.

    Returns:
        The stage's ``metrics`` from the report, or its entry's ``metrics.json`` when those are empty; ``{}``
        when neither is available.

    Raises:
        Nothing: an unreadable ``metrics.json`` gives ``{}``.
    """
    metrics = stage.get("metrics") or {}
    folder = _entry(stage)
    if not metrics and folder is not None and (folder / "metrics.json").is_file():
        try:
            metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            metrics = {}
    return metrics if isinstance(metrics, dict) else {}


def judges_of(metrics: dict, table: Optional[dict] = None) -> list[str]:
    """The judge names of an evaluate stage.

    Args:
        metrics: the evaluate metrics (``<judge>.win_rate`` keys, ``primary_judge``).
        table: the per-answer table's columns (``policy_reward/<judge>``), if loaded.

    Returns:
        Judge names without duplicates, the primary judge first.

    Raises:
        Nothing.
    """
    names = [k[: -len(".win_rate")] for k in metrics if k.endswith(".win_rate")]
    names += [c.split("/", 1)[1] for c in (table or {}) if c.startswith("policy_reward/")]
    out = list(dict.fromkeys(names))
    primary = metrics.get("primary_judge")
    if primary in out:
        out.remove(primary)
        out.insert(0, primary)
    return out


# ----------------------------------------------------------------------------- figures


def _plotly():
    """``(plotly.graph_objects, plotly.io, plotly.subplots)``; :class:`RLHFSpecError` if plotly is not installed."""
    try:
        import plotly.graph_objects as go
        import plotly.io as pio
        from plotly.subplots import make_subplots
    except ImportError as exc:
        raise RLHFSpecError(f"rlhf-spec report needs plotly ({exc}); install it with `pip install 'plotly>=6'`") from None
    return go, pio, make_subplots


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-") or "x"


def _figure_html(page: _Page, fig, div_id: str) -> str:
    """One figure as a ``<div>`` without plotly.js (the page embeds it once, in its head)."""
    _, pio, _ = _plotly()
    page.figures += 1
    fig.update_layout(template="plotly_white", margin=dict(l=60, r=30, t=60, b=50))
    return pio.to_html(fig, include_plotlyjs=False, full_html=False, div_id=div_id,
                       config={"displaylogo": False, "responsive": True}, default_height=f"{fig.layout.height or 420}px")


def _num(v: Any) -> Optional[float]:
    """``v`` as a finite float, else ``None`` (booleans, strings, NaN and infinities are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _time_figure(page: _Page, stages: list[dict]) -> str:
    """Horizontal bars of seconds per stage, coloured by status (cached stages show about 0 s)."""
    go, _, _ = _plotly()
    fig = go.Figure()
    ids = [s.get("id", "?") for s in stages]
    for status in dict.fromkeys(s.get("status", "?") for s in stages):
        rows = [s for s in stages if s.get("status", "?") == status]
        secs = [_num(s.get("seconds")) or 0.0 for s in rows]
        fig.add_trace(go.Bar(y=[s.get("id", "?") for s in rows], x=secs, orientation="h", name=status,
                             marker_color=STATUS_COLORS.get(status, "#9467bd"), text=[f"{x:.2f} s" for x in secs],
                             textposition="outside", cliponaxis=False))
    fig.update_layout(title="Seconds per stage (cached stages take about 0 s)", xaxis_title="seconds",
                      height=max(260, 70 + 40 * len(stages)), barmode="overlay", showlegend=True, legend_title_text="status",
                      yaxis=dict(categoryorder="array", categoryarray=ids[::-1]))
    return _figure_html(page, fig, "fig-stage-times")


def _training_figure(page: _Page, stage: dict, history: list[dict]) -> str:
    """One panel per numeric key of a train stage's history (loss, reward margin, KL, lr, ...), x = update.

    Returns ``""`` (and notes it on the page) when the history has no numeric key.
    """
    go, _, make_subplots = _plotly()
    keys = [k for k in dict.fromkeys(k for h in history for k in h) if k != "update"
            and any(_num(h.get(k)) is not None for h in history)]
    if not keys:
        page.missing.append(f"stage '{stage.get('id')}': history.json has no numeric values; no training curves")
        return ""
    xs = [_num(h.get("update")) or i + 1 for i, h in enumerate(history)]
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=keys, horizontal_spacing=0.07,
                        vertical_spacing=min(0.12, 0.35 / nrows))
    for i, k in enumerate(keys):
        fig.add_trace(go.Scatter(x=xs, y=[_num(h.get(k)) for h in history], mode="lines+markers", name=k),
                      row=i // cols + 1, col=i % cols + 1)
        fig.update_xaxes(title_text="update", row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(title=f"Training curves: {stage.get('id')} ({stage.get('uses')}, {len(history)} updates)",
                      height=120 + 260 * nrows, showlegend=False)
    return _figure_html(page, fig, f"fig-train-{_slug(stage.get('id'))}")


def _reward_figure(page: _Page, stage: dict, table: dict, judge: str) -> str:
    """Overlaid histograms of one judge's rewards for the policy's and the reference's answers, with means."""
    go, _, _ = _plotly()
    fig = go.Figure()
    for who, color in (("policy", "#1f77b4"), ("reference", "#ff7f0e")):
        vals = [v for v in (_num(x) for x in table.get(f"{who}_reward/{judge}", [])) if v is not None]
        fig.add_trace(go.Histogram(x=vals, name=f"{who} (n={len(vals)})", opacity=0.6, marker_color=color))
        if vals:
            fig.add_vline(x=sum(vals) / len(vals), line_dash="dash", line_color=color)
    fig.update_layout(title=f"Reward distribution, judge '{judge}' ({stage.get('id')}); dashed lines: means",
                      barmode="overlay", xaxis_title="reward", yaxis_title="answers", height=380)
    return _figure_html(page, fig, f"fig-rewards-{_slug(stage.get('id'))}-{_slug(judge)}")


def _judge_value(metrics: dict, judge: str, name: str, primary: bool) -> Optional[float]:
    """``<judge>.<name>``, or the unprefixed ``<name>`` for the primary judge of a single-judge evaluation."""
    v = metrics.get(f"{judge}.{name}")
    if v is None and primary:
        v = metrics.get(name)
    return _num(v)


def _winrate_figure(page: _Page, stage: dict, metrics: dict, judges: list[str]) -> str:
    """Bars of the win rate and the length-controlled win rate per judge, with their intervals as error bars."""
    go, _, _ = _plotly()
    fig = go.Figure()
    for label, prefix, color in (("win rate", "win_rate", "#1f77b4"), ("length-controlled win rate", "lc_win_rate", "#9467bd")):
        ys, lo, hi = [], [], []
        for j in judges:
            y = _judge_value(metrics, j, prefix, j == judges[0])
            low = _judge_value(metrics, j, f"{prefix}_ci_low", j == judges[0])
            high = _judge_value(metrics, j, f"{prefix}_ci_high", j == judges[0])
            ys.append(y)
            lo.append(y - low if y is not None and low is not None else 0.0)
            hi.append(high - y if y is not None and high is not None else 0.0)
        fig.add_trace(go.Bar(x=judges, y=ys, name=label, marker_color=color,
                             error_y=dict(type="data", symmetric=False, array=hi, arrayminus=lo),
                             text=[f"{y:.3f}" if y is not None else "n/a" for y in ys], textposition="inside",
                             insidetextanchor="start"))
    fig.add_hline(y=0.5, line_dash="dot", line_color="#555", annotation_text="0.5 (tie)")
    fig.update_layout(title=f"Win rate of the policy over the reference ({stage.get('id')}), with intervals",
                      barmode="group", yaxis=dict(range=[0, 1.05], title="win rate"), xaxis_title="judge", height=400)
    return _figure_html(page, fig, f"fig-winrate-{_slug(stage.get('id'))}")


# ----------------------------------------------------------------------------- HTML pieces


def _e(v: Any) -> str:
    """``v`` as escaped HTML text, with control characters shown as U+FFFD."""
    return html.escape(_CONTROL.sub("\ufffd", str(v)))


def _fmt(v: Any, digits: int = 4) -> str:
    """A number with ``digits`` decimals (integers as they are, tiny values in 3 significant digits)."""
    n = _num(v)
    if n is None:
        return "n/a" if v is None else _e(v)
    if isinstance(v, int):
        return str(v)
    return f"{n:.3g}" if n and abs(n) < 10 ** -digits else f"{n:.{digits}f}"


def _fmt_g(v: Any) -> str:
    """A number in 4 significant digits, anything else as escaped text."""
    n = _num(v)
    return f"{n:.4g}" if n is not None else _e(v)


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    """An HTML table; ``head`` is escaped here, the cells must already be HTML."""
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _header_html(run: dict, missing: list[str]) -> str:
    """The page header: spec name, status, total seconds, start time, source, error, warnings and what is missing."""
    status = str(run.get("status", "?"))
    color = STATUS_COLORS.get(status, STATUS_COLORS["ran"] if status == "ok" else "#7f7f7f")
    meta = [("status", f'<span class="status" style="background:{color}">{_e(status)}</span>'),
            ("total seconds", _e(f"{_num(run.get('seconds')) or 0.0:.1f}")), ("started", _e(run.get("started") or "n/a")),
            ("spec file", _e(run.get("source") or "n/a")), ("cache", _e(run.get("cache_dir") or "n/a")),
            ("host", _e(run.get("host") or "n/a")), ("from", _e(run.get("kind_of_source", "run report"))),
            ("stages", _e(len(run.get("stages", []))))]
    parts = [f"<h1>rlhf-spec run: {_e(run.get('spec') or '?')}</h1>",
             '<table class="meta">' + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in meta) + "</table>"]
    if run.get("error"):
        parts.append(f'<div class="box error"><b>error:</b> {_e(run["error"])}</div>')
    warnings = list(run.get("warnings") or [])
    parts.append(f'<div class="box warn" id="warnings"><b>warnings ({len(warnings)}):</b> '
                 + ("<ul>" + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>" if warnings else "none") + "</div>")
    if missing:
        parts.append('<div class="box missing" id="missing"><b>not shown (missing pieces):</b><ul>'
                     + "".join(f"<li>{_e(m)}</li>" for m in missing) + "</ul></div>")
    return "<header>" + "".join(parts) + "</header>"


def _stages_table(stages: list[dict]) -> str:
    """One row per stage: id, kind, uses, status, seconds, rows, key and the reason it reran or failed."""
    rows = [[f"<td>{_e(s.get('id', '?'))}</td>", f"<td>{_e(s.get('kind', ''))}</td>", f"<td>{_e(s.get('uses', ''))}</td>",
             f'<td style="color:{STATUS_COLORS.get(s.get("status"), "#222")}">{_e(s.get("status", "?"))}</td>',
             f'<td class="num">{_num(s.get("seconds")) or 0.0:.2f}</td>',
             f'<td class="num">{"" if s.get("rows") is None else _e(s.get("rows"))}</td>',
             f"<td><code>{_e(str(s.get('key', ''))[:12])}</code></td>", f"<td>{_e(s.get('reason') or '')}</td>"]
            for s in stages]
    return _table(["stage", "kind", "uses", "status", "seconds", "rows", "key", "reason"], rows, "stages")


def _interval(metrics: dict, judge: str, prefix: str, primary: bool) -> str:
    """``[low, high]`` of ``<judge>.<prefix>_low``/``_high`` with 3 decimals, or ``n/a``."""
    low = _judge_value(metrics, judge, f"{prefix}_low", primary)
    high = _judge_value(metrics, judge, f"{prefix}_high", primary)
    return f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else "n/a"


def _winrate_table(metrics: dict, judges: list[str]) -> str:
    """Per judge: win rate with its interval, Wilson interval, LC win rate with its interval, mean rewards."""
    rows = []
    for j in judges:
        first = j == judges[0]
        rows.append([f"<td>{_e(j)}{' (primary)' if j == metrics.get('primary_judge') else ''}</td>",
                     f'<td class="num winrate">{_fmt(_judge_value(metrics, j, "win_rate", first), 3)}</td>',
                     f'<td class="num">{_interval(metrics, j, "win_rate_ci", first)}</td>',
                     f'<td class="num">{_interval(metrics, j, "win_rate_wilson", first)}</td>',
                     f'<td class="num lcwinrate">{_fmt(_judge_value(metrics, j, "lc_win_rate", first), 3)}</td>',
                     f'<td class="num">{_interval(metrics, j, "lc_win_rate_ci", first)}</td>',
                     f'<td class="num">{_fmt(_judge_value(metrics, j, "reward_mean_policy", first))}</td>',
                     f'<td class="num">{_fmt(_judge_value(metrics, j, "reward_mean_reference", first))}</td>'])
    conf = _num(metrics.get("confidence")) or 0.95
    return _table(["judge", "win rate", f"{conf:.0%} interval (bootstrap)", "Wilson interval", "LC win rate",
                   "LC interval", "reward mean policy", "reward mean reference"], rows, "winrates")


def _prompt_cell(prompt: Any) -> str:
    """The prompt's last turn, with the earlier turns folded in a ``<details>``."""
    turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
    turns = [t for t in turns if isinstance(t, dict)]
    if not turns:
        return '<td><div class="text"></div></td>'
    last = f'<div class="text">{_e(turns[-1].get("content", ""))}</div>'
    if len(turns) > 1:
        earlier = "".join(f"<p><b>{_e(t.get('role', ''))}:</b> {_e(t.get('content', ''))}</p>" for t in turns[:-1])
        last += f'<details><summary>{len(turns) - 1} earlier turn(s)</summary><div class="text">{earlier}</div></details>'
    return f"<td>{last}</td>"


def _examples_table(table: dict, judges: list[str], limit: int = MAX_EXAMPLES) -> str:
    """The first ``limit`` answers: prompt's last turn, the policy's and the reference's answers, each judge's
    scores (the higher in bold). Every text is escaped."""
    n = len(table.get("policy", []))
    rows = []
    for i in range(min(n, limit)):
        row = [f'<td class="num">{_e(table.get("prompt_id", [""] * n)[i])}#{_e(table.get("sample_index", [0] * n)[i])}</td>',
               _prompt_cell(table.get("prompt", [None] * n)[i]),
               f'<td><div class="text">{_e(table["policy"][i])}</div></td>',
               f'<td><div class="text">{_e(table.get("reference", [""] * n)[i])}</div></td>']
        for j in judges:
            p = _num(table.get(f"policy_reward/{j}", [None] * n)[i])
            r = _num(table.get(f"reference_reward/{j}", [None] * n)[i])
            pw, rw = (p > r, r > p) if p is not None and r is not None else (False, False)
            row += [f'<td class="num{" win" if pw else ""}">{_fmt(p)}</td>',
                    f'<td class="num{" win" if rw else ""}">{_fmt(r)}</td>']
        rows.append(row)
    head = ["prompt#sample", "prompt (last turn)", "policy answer", "reference answer"]
    head += [h for j in judges for h in (f"{j}: policy", f"{j}: reference")]
    more = f"<p>showing {min(n, limit)} of {n} answers.</p>" if n > limit else f"<p>{n} answers.</p>"
    return more + _table(head, rows, "examples")


# ----------------------------------------------------------------------------- sections


def _time_section(page: _Page) -> None:
    stages = page.run.get("stages", [])
    if not stages:
        page.missing.append("the run has no stages; no time bars")
        page.sections.append("<section id='times'><h2>Time per stage</h2><p>No stages.</p></section>")
        return
    page.sections.append("<section id='times'><h2>Time per stage</h2>" + _time_figure(page, stages)
                         + _stages_table(stages) + "</section>")


def _training_section(page: _Page) -> None:
    train = [s for s in page.run.get("stages", []) if s.get("kind") == "train"]
    if not train:
        page.missing.append("the run has no train stage; no training curves")
        return
    parts = ["<section id='training'><h2>Training curves</h2>"]
    for st in train:
        hist = read_history(st, page.missing)
        fig = _training_figure(page, st, hist) if hist else ""
        if hist == []:
            page.missing.append(f"stage '{st.get('id')}': history.json is empty; no training curves")
        parts.append(fig or f"<p>{_e(st.get('id'))}: no training curves (see the missing pieces above).</p>")
    page.sections.append("".join(parts) + "</section>")


def _evaluate_section(page: _Page, stage: dict) -> str:
    """Win rates (figure and table), KL and lengths, reward histograms per judge, examples of one evaluate stage."""
    metrics = eval_metrics(stage)
    table = read_eval_table(stage, page.missing)
    judges = judges_of(metrics, table)
    sid = _e(stage.get("id"))
    parts = [f"<section class='evaluate' id='evaluate-{_slug(stage.get('id'))}'><h2>Evaluation: {sid}</h2>"]
    if judges and any(_judge_value(metrics, j, "win_rate", j == judges[0]) is not None for j in judges):
        parts += ["<h3>Win rates</h3>", _winrate_figure(page, stage, metrics, judges), _winrate_table(metrics, judges)]
    else:
        page.missing.append(f"stage '{stage.get('id')}': no win-rate metrics")
    extra = [(k, metrics.get(k)) for k in ("kl_k1", "kl_k3", "length_mean_policy", "length_mean_reference", "prompts",
                                           "samples_per_prompt") if k in metrics]
    if extra:
        parts.append("<p class='extra'>" + ", ".join(f"{_e(k)} = {_fmt_g(v)}" for k, v in extra) + "</p>")
    if table is not None:
        parts.append("<h3>Reward distributions</h3>")
        parts += [_reward_figure(page, stage, table, j) for j in judges if f"policy_reward/{j}" in table]
        parts += ["<h3>Examples</h3>", _examples_table(table, [j for j in judges if f"policy_reward/{j}" in table])]
    return "".join(parts) + "</section>"


def _evaluation_sections(page: _Page) -> None:
    evals = [s for s in page.run.get("stages", []) if s.get("kind") == "evaluate" or s.get("output_type") == "metrics"]
    if not evals:
        page.missing.append("the run has no evaluate stage; no win rates, reward distributions or examples")
        return
    page.sections += [_evaluate_section(page, st) for st in evals]


def build_html(run: dict) -> str:
    """Build the whole report page.

    Args:
        run: a run report dict, as returned by :func:`load_run`.

    Returns:
        The HTML document: header, time bars, training curves, evaluation sections, with plotly.js embedded
        once in its head (only when there is a figure). Missing pieces are listed in the header.

    Raises:
        RLHFSpecError: if plotly is not installed.
    """
    page = _Page(run=run, missing=list(run.get("missing") or []))
    _time_section(page)
    _training_section(page)
    _evaluation_sections(page)
    script = ""
    if page.figures:
        from plotly.offline import get_plotlyjs

        script = f'<script type="text/javascript">{get_plotlyjs()}</script>'
    title = _e(f"rlhf-spec report: {run.get('spec') or '?'} ({run.get('status', '?')})")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{CSS}</style>{script}</head><body>{_header_html(run, page.missing)}"
            + "".join(page.sections) + "</body></html>\n")


def render_report(source: Path, out: Optional[Path] = None) -> Path:
    """Write the self-contained HTML report of a run and return its path.

    Args:
        source: a run report JSON (``rlhf-spec run --report PATH``) or a cache run record (``<cache>/runs/*.json``).
        out: the HTML file to write; default: ``source`` with the suffix ``.html``. Parent folders are created.

    Returns:
        The path of the written HTML file.

    Raises:
        UsageError: if ``source`` is missing, not JSON, or neither a run report nor a run record, or if ``out``
            cannot be written.
        RLHFSpecError: if plotly is not installed.
    """
    source = Path(source)
    out = Path(out) if out is not None else source.with_suffix(".html")
    text = build_html(load_run(source))
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise UsageError(f"cannot write the HTML report {out}: {exc.strerror or exc}") from None
    return out


def cmd_report(args) -> int:
    """``rlhf-spec report SOURCE [-o OUT.html]``: write the HTML report and print its path.

    Args:
        args: argparse namespace with ``source`` (run report or run record path) and ``output`` (optional path).

    Returns:
        0 on success.

    Raises:
        UsageError: bad input or an unwritable output (exit code 2).
        RLHFSpecError: plotly is not installed (exit code 1).
    """
    from .cli import _console

    out = getattr(args, "output", None)
    path = render_report(Path(args.source), Path(out) if out else None)
    _console().print(f"HTML report: {path}")
    return 0
