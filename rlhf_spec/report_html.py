"""``rlhf-spec report``: one self-contained HTML page of a run, made with plotly.

The page holds a header (spec, status, time, warnings, what is missing), per-stage time bars and table, the
training curves of every train stage (every numeric key of its ``history.json``), and for every evaluate stage
the win rates with their intervals, the reward distributions of the policy and the reference per judge, and
the examples table. plotly's JavaScript is embedded once, so the file opens without a network.

The input is a run report (``rlhf-spec run --report PATH``) or a cache run record (``<cache>/runs/*.json``),
whose stages are rebuilt from the entries' manifests (:mod:`rlhf_spec.report_data`). Missing pieces (an entry
removed by ``cache gc``, no evaluate stage, no ``history.json``) are reported on the page instead of failing.
The figures are drawn in :mod:`rlhf_spec.report_plots`; this module lays out the page and writes it.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any

from .errors import UsageError
from .report_data import (
    computed_seconds,
    eval_metrics,
    judge_value,
    judges_of,
    load_run,
    num,
    read_eval_table,
    read_history,
)
from .report_plots import (
    STATUS_COLORS,
    Page,
    reward_figure,
    slug,
    time_figure,
    training_figure,
    winrate_figure,
)

__all__ = ["MAX_EXAMPLES", "build_html", "cmd_report", "eval_metrics", "judges_of", "load_run", "read_eval_table",
           "read_history", "render_report"]

#: Examples shown per evaluate stage (the rest are counted, not shown).
MAX_EXAMPLES = 50
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0 auto;max-width:1300px;
padding:16px 24px;color:#222}
h1{margin-bottom:4px}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0;font-size:14px}
th,td{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f5f5f5;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.status{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff;font-weight:600}
.box{border-left:4px solid;padding:6px 12px;margin:10px 0;background:#fafafa}
.warn{border-color:#ff7f0e}.missing{border-color:#7f7f7f}.error{border-color:#d62728}
.text{white-space:pre-wrap;word-break:break-word;max-height:14em;overflow:auto;max-width:30em}
.win{font-weight:700}.meta td{border:none;padding:1px 12px 1px 0}details summary{cursor:pointer;color:#555}
"""


# ----------------------------------------------------------------------------- HTML pieces


def _e(v: Any) -> str:
    """``v`` as escaped HTML text, with control characters shown as U+FFFD."""
    return html.escape(_CONTROL.sub("\ufffd", str(v)))


def _fmt(v: Any, digits: int = 4) -> str:
    """A number with ``digits`` decimals (integers as they are, tiny values in 3 significant digits)."""
    n = num(v)
    if n is None:
        return "n/a" if v is None else _e(v)
    if isinstance(v, int):
        return str(v)
    return f"{n:.3g}" if n and abs(n) < 10 ** -digits else f"{n:.{digits}f}"


def _fmt_g(v: Any) -> str:
    """A number in 4 significant digits, anything else as escaped text."""
    n = num(v)
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
            ("total seconds", _e(f"{num(run.get('seconds')) or 0.0:.1f}")),
            ("started", _e(run.get("started") or "n/a")),
            ("spec file", _e(run.get("source") or "n/a")), ("cache", _e(run.get("cache_dir") or "n/a")),
            ("host", _e(run.get("host") or "n/a")), ("from", _e(run.get("kind_of_source", "run report"))),
            ("stages", _e(len(run.get("stages", []))))]
    parts = [f"<h1>rlhf-spec run: {_e(run.get('spec') or '?')}</h1>",
             '<table class="meta">' + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in meta) + "</table>"]
    if run.get("error"):
        parts.append(f'<div class="box error"><b>error:</b> {_e(run["error"])}</div>')
    warnings = list(run.get("warnings") or [])
    parts.append(f'<div class="box warn" id="warnings"><b>warnings ({len(warnings)}):</b> '
                 + ("<ul>" + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>" if warnings else "none")
                 + "</div>")
    if missing:
        parts.append('<div class="box missing" id="missing"><b>not shown (missing pieces):</b><ul>'
                     + "".join(f"<li>{_e(m)}</li>" for m in missing) + "</ul></div>")
    return "<header>" + "".join(parts) + "</header>"


def _computed_cell(stage: dict) -> str:
    """The seconds a cached stage's entry took when it was computed, marked cached; empty for other stages."""
    before = computed_seconds(stage)
    return f'<td class="num computed">{before:.2f} (cached)</td>' if before is not None else '<td class="num"></td>'


def _stages_table(stages: list[dict]) -> str:
    """One row per stage: id, kind, uses, status, seconds in this run, seconds when computed (cached stages),
    rows, key and the reason it reran or failed."""
    rows = [[f"<td>{_e(s.get('id', '?'))}</td>", f"<td>{_e(s.get('kind', ''))}</td>",
             f"<td>{_e(s.get('uses', ''))}</td>",
             f'<td style="color:{STATUS_COLORS.get(s.get("status"), "#222")}">{_e(s.get("status", "?"))}</td>',
             f'<td class="num">{num(s.get("seconds")) or 0.0:.2f}</td>', _computed_cell(s),
             f'<td class="num">{"" if s.get("rows") is None else _e(s.get("rows"))}</td>',
             f"<td><code>{_e(str(s.get('key', ''))[:12])}</code></td>", f"<td>{_e(s.get('reason') or '')}</td>"]
            for s in stages]
    return _table(["stage", "kind", "uses", "status", "seconds", "seconds when computed", "rows", "key", "reason"],
                  rows, "stages")


def _interval(metrics: dict, judge: str, prefix: str, primary: bool) -> str:
    """``[low, high]`` of ``<judge>.<prefix>_low``/``_high`` with 3 decimals, or ``n/a``."""
    low = judge_value(metrics, judge, f"{prefix}_low", primary)
    high = judge_value(metrics, judge, f"{prefix}_high", primary)
    return f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else "n/a"


def _winrate_table(metrics: dict, judges: list[str]) -> str:
    """Per judge: win rate with its interval, Wilson interval, LC win rate with its interval, mean rewards."""
    rows = []
    for j in judges:
        first = j == judges[0]
        rows.append([f"<td>{_e(j)}{' (primary)' if j == metrics.get('primary_judge') else ''}</td>",
                     f'<td class="num winrate">{_fmt(judge_value(metrics, j, "win_rate", first), 3)}</td>',
                     f'<td class="num">{_interval(metrics, j, "win_rate_ci", first)}</td>',
                     f'<td class="num">{_interval(metrics, j, "win_rate_wilson", first)}</td>',
                     f'<td class="num lcwinrate">{_fmt(judge_value(metrics, j, "lc_win_rate", first), 3)}</td>',
                     f'<td class="num">{_interval(metrics, j, "lc_win_rate_ci", first)}</td>',
                     f'<td class="num">{_fmt(judge_value(metrics, j, "reward_mean_policy", first))}</td>',
                     f'<td class="num">{_fmt(judge_value(metrics, j, "reward_mean_reference", first))}</td>'])
    conf = num(metrics.get("confidence")) or 0.95
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
        last += (f'<details><summary>{len(turns) - 1} earlier turn(s)</summary>'
                 f'<div class="text">{earlier}</div></details>')
    return f"<td>{last}</td>"


def _examples_table(table: dict, judges: list[str], limit: int = MAX_EXAMPLES) -> str:
    """The first ``limit`` answers: prompt's last turn, the policy's and the reference's answers, each judge's
    scores (the higher in bold). Every text is escaped."""
    n = len(table.get("policy", []))
    rows = []
    for i in range(min(n, limit)):
        pid, idx = table.get("prompt_id", [""] * n)[i], table.get("sample_index", [0] * n)[i]
        row = [f'<td class="num">{_e(pid)}#{_e(idx)}</td>',
               _prompt_cell(table.get("prompt", [None] * n)[i]),
               f'<td><div class="text">{_e(table["policy"][i])}</div></td>',
               f'<td><div class="text">{_e(table.get("reference", [""] * n)[i])}</div></td>']
        for j in judges:
            p = num(table.get(f"policy_reward/{j}", [None] * n)[i])
            r = num(table.get(f"reference_reward/{j}", [None] * n)[i])
            pw, rw = (p > r, r > p) if p is not None and r is not None else (False, False)
            row += [f'<td class="num{" win" if pw else ""}">{_fmt(p)}</td>',
                    f'<td class="num{" win" if rw else ""}">{_fmt(r)}</td>']
        rows.append(row)
    head = ["prompt#sample", "prompt (last turn)", "policy answer", "reference answer"]
    head += [h for j in judges for h in (f"{j}: policy", f"{j}: reference")]
    more = f"<p>showing {min(n, limit)} of {n} answers.</p>" if n > limit else f"<p>{n} answers.</p>"
    return more + _table(head, rows, "examples")


# ----------------------------------------------------------------------------- sections


def _time_section(page: Page) -> None:
    stages = page.run.get("stages", [])
    if not stages:
        page.missing.append("the run has no stages; no time bars")
        page.sections.append("<section id='times'><h2>Time per stage</h2><p>No stages.</p></section>")
        return
    page.sections.append("<section id='times'><h2>Time per stage</h2>" + time_figure(page, stages)
                         + _stages_table(stages) + "</section>")


def _training_section(page: Page) -> None:
    train = [s for s in page.run.get("stages", []) if s.get("kind") == "train"]
    if not train:
        page.missing.append("the run has no train stage; no training curves")
        return
    parts = ["<section id='training'><h2>Training curves</h2>"]
    for st in train:
        hist = read_history(st, page.missing)
        fig = training_figure(page, st, hist) if hist else ""
        if hist == []:
            page.missing.append(f"stage '{st.get('id')}': history.json is empty; no training curves")
        parts.append(fig or f"<p>{_e(st.get('id'))}: no training curves (see the missing pieces above).</p>")
    page.sections.append("".join(parts) + "</section>")


def _evaluate_section(page: Page, stage: dict) -> str:
    """Win rates (figure and table), KL and lengths, reward histograms per judge, examples of one evaluate stage."""
    metrics = eval_metrics(stage)
    table = read_eval_table(stage, page.missing)
    judges = judges_of(metrics, table)
    sid = _e(stage.get("id"))
    parts = [f"<section class='evaluate' id='evaluate-{slug(stage.get('id'))}'><h2>Evaluation: {sid}</h2>"]
    if judges and any(judge_value(metrics, j, "win_rate", j == judges[0]) is not None for j in judges):
        parts += ["<h3>Win rates</h3>", winrate_figure(page, stage, metrics, judges), _winrate_table(metrics, judges)]
    else:
        page.missing.append(f"stage '{stage.get('id')}': no win-rate metrics")
    extra = [(k, metrics.get(k)) for k in ("kl_k1", "kl_k3", "length_mean_policy", "length_mean_reference", "prompts",
                                           "samples_per_prompt") if k in metrics]
    if extra:
        parts.append("<p class='extra'>" + ", ".join(f"{_e(k)} = {_fmt_g(v)}" for k, v in extra) + "</p>")
    if table is not None:
        parts.append("<h3>Reward distributions</h3>")
        parts += [reward_figure(page, stage, table, j) for j in judges if f"policy_reward/{j}" in table]
        parts += ["<h3>Examples</h3>", _examples_table(table, [j for j in judges if f"policy_reward/{j}" in table])]
    return "".join(parts) + "</section>"


def _evaluation_sections(page: Page) -> None:
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
    page = Page(run=run, missing=list(run.get("missing") or []))
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


def render_report(source: Path, out: Path | None = None) -> Path:
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


def cmd_report(args, console=None) -> int:
    """``rlhf-spec report SOURCE [-o OUT.html]``: write the HTML report and print its path.

    Args:
        args: argparse namespace with ``source`` (run report or run record path) and ``output`` (optional path).
        console: a ``rich.console.Console`` to print the path on (default: plain ``print``).

    Returns:
        0 on success.

    Raises:
        UsageError: bad input or an unwritable output (exit code 2).
        RLHFSpecError: plotly is not installed (exit code 1).
    """
    out = getattr(args, "output", None)
    path = render_report(Path(args.source), Path(out) if out else None)
    (console.print if console is not None else print)(f"HTML report: {path}")
    return 0
