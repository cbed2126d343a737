"""The HTML report (`rlhf-spec report`): built from a real tiny run, opened in headless Chromium.

Chromium comes from the OS packages (`sh scripts/install_browser.sh`, run by `make test`); without it the
browser tests fail with the install command instead of skipping. The tests that need the tiny run (and the
browser) are marked slow; `make test-fast` runs only the input and escaping checks.
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import struct
import subprocess
import tempfile
from collections import defaultdict
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import cli, tiny_spec_dict, write_spec
from rlhf_spec.errors import UsageError
from rlhf_spec.report_html import cmd_report, load_run, render_report

INSTALL = "sh scripts/install_browser.sh  (or: apt-get install -y chromium)"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# One figure per train stage, one win-rate figure and one reward histogram per judge of the evaluate stage.
EXPECTED_FIGURES = {"fig-stage-times", "fig-train-reward_model", "fig-train-rebel", "fig-winrate-evaluate",
                    "fig-rewards-evaluate-rm"}


# ----------------------------------------------------------------------------- helpers


def chromium_binary() -> str:
    """The Chromium executable; fails the test (not skips) with the install command when it is missing."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"Chromium is not installed (no `chromium` on PATH); install it with: {INSTALL}")


def start_chromium(tmp: Path, *args: str) -> subprocess.Popen:
    """Start headless Chromium with a fresh, empty profile folder under ``tmp``."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp)
    return subprocess.Popen([chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, what: str) -> str:
    """Wait for a Chromium started by :func:`start_chromium`; its stdout, or a failure with its stderr."""
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"chromium {what} timed out: {err[-2000:]}")
    assert proc.returncode == 0, f"chromium {what} failed ({proc.returncode}): {err[-2000:]}"
    return out


def without_plotly_js(page: Path, out: Path) -> Path:
    """A copy of the page without its embedded plotly.js (the first script): no figure can render."""
    text = page.read_text()
    start = text.index('<script type="text/javascript">')
    out.write_text(text[:start] + text[text.index("</script>", start) + len("</script>"):])
    return out


class FigureScan(HTMLParser):
    """Per plotly figure div (``class="plotly-graph-div"``): how many ``main-svg`` elements and which trace
    kinds (``<g class="trace bars">``) plotly drew inside it."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.figures: list[str] = []
        self.svgs: dict[str, int] = defaultdict(int)
        self.traces: dict[str, set] = defaultdict(set)

    def _figure(self) -> str:
        return next((d for d in reversed(self.stack) if d), "")

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "div":
            fig = a.get("id", "") if "plotly-graph-div" in cls else ""
            self.stack.append(fig)
            if fig:
                self.figures.append(fig)
        elif tag == "svg" and "main-svg" in cls and self._figure():
            self.svgs[self._figure()] += 1
        elif tag == "g" and "trace" in cls and self._figure():
            self.traces[self._figure()].update(c for c in cls if c != "trace")

    def handle_endtag(self, tag):
        if tag == "div" and self.stack:
            self.stack.pop()


def scan(dom: str) -> FigureScan:
    s = FigureScan()
    s.feed(dom)
    s.close()
    return s


def png_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG file; fails if it is not one."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------- the tiny run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_models, hh_file) -> dict:
    """One real run of the whole tiny pipeline (reward model, sample, score, filter, pair, REBEL, evaluate)."""
    d = tmp_path_factory.mktemp("html_report_run")
    spec = write_spec(d, tiny_spec_dict(tiny_models, hh_file))
    res = cli("run", str(spec), "--cache-dir", str(d / "cache"), "--report", str(d / "report.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((d / "report.json").read_text())
    return {"dir": d, "report": d / "report.json", "cache": d / "cache", "data": report}


@pytest.fixture(scope="module")
def html_page(tiny_run) -> Path:
    out = render_report(tiny_run["report"], tiny_run["dir"] / "out" / "report.html")
    assert out == tiny_run["dir"] / "out" / "report.html" and out.is_file()
    return out


@pytest.fixture(scope="module")
def browser(html_page, tmp_path_factory) -> dict:
    """One Chromium pass, three browsers at once: the report's DOM after its scripts ran, the DOM of a copy
    without plotly.js (the control), and a 1400x4000 screenshot."""
    chromium_binary()
    tmp = tmp_path_factory.mktemp("browser")
    broken = without_plotly_js(html_page, tmp / "no_js.html")
    shot = tmp / "report.png"
    procs = {"dom": start_chromium(tmp, "--dump-dom", html_page.resolve().as_uri()),
             "control": start_chromium(tmp, "--dump-dom", broken.resolve().as_uri()),
             "shot": start_chromium(tmp, f"--screenshot={shot}", "--window-size=1400,4000",
                                    html_page.resolve().as_uri())}
    out = {name: finish(proc, name) for name, proc in procs.items()}
    return {"dom": out["dom"], "control": out["control"], "screenshot": shot}


# ----------------------------------------------------------------------------- browser tests


@pytest.mark.slow
def test_every_plot_renders_in_chromium(html_page, browser):
    from plotly.offline import get_plotlyjs

    page = html_page.read_text()
    assert page.count(get_plotlyjs()) == 1, "plotly.js must be embedded exactly once"
    assert "<script src" not in page and "<link" not in page, "the page must not load anything from elsewhere"
    s = scan(browser["dom"])
    assert set(s.figures) == EXPECTED_FIGURES
    unrendered = [f for f in s.figures if s.svgs[f] == 0]
    assert not unrendered, f"plotly drew no SVG for {unrendered}"
    assert "bars" in s.traces["fig-stage-times"] and "bars" in s.traces["fig-winrate-evaluate"]
    assert "scatter" in s.traces["fig-train-rebel"] and "bars" in s.traces["fig-rewards-evaluate-rm"]


@pytest.mark.slow
def test_dom_holds_win_rates_and_examples(tiny_run, browser):
    import datasets

    dom = browser["dom"]
    ev = next(s for s in tiny_run["data"]["stages"] if s["kind"] == "evaluate")
    m = ev["metrics"]
    assert f'{m["rm.win_rate"]:.3f}' in dom
    assert f'[{m["rm.win_rate_ci_low"]:.3f}, {m["rm.win_rate_ci_high"]:.3f}]' in dom
    assert f'{m["rm.lc_win_rate"]:.3f}' in dom and "length-controlled win rate" in dom
    table = datasets.load_from_disk(str(Path(ev["output"]) / "data")).to_dict()
    body = dom.split('<table class="examples">', 1)[1].split("</table>", 1)[0]
    assert body.count("<tr>") == 1 + len(table["policy"])  # header + one row per answer
    text = html.unescape(body)
    for prompt in table["prompt"]:
        assert prompt[-1]["content"].replace("\r\n", "\n").strip() in text
    for rid in ("reward_model", "rebel", "evaluate"):
        assert f">{rid}<" in dom
    assert "rlhf-spec run: tiny" in dom and 'id="warnings"' in dom


@pytest.mark.slow
def test_checker_catches_missing_plotly_js(browser):
    """Without plotly.js no figure renders, and the checks above notice."""
    s = scan(browser["control"])
    assert set(s.figures) == EXPECTED_FIGURES and not any(s.svgs.values())


@pytest.mark.slow
def test_screenshot_is_a_png(browser):
    shot = browser["screenshot"]
    assert shot.is_file() and png_size(shot) == (1400, 4000) and shot.stat().st_size > 20_000


# ----------------------------------------------------------------------------- inputs and missing pieces


@pytest.mark.slow
def test_run_record_rebuilds_the_stages(tiny_run, tmp_path):
    """A cache run record works as input; an entry gone after gc is named, not fatal."""
    record_file = next((tiny_run["cache"] / "runs").glob("*.json"))
    record = json.loads(record_file.read_text())
    root = tmp_path / "cache"
    (root / "runs").mkdir(parents=True)
    (root / "entries").symlink_to(tiny_run["cache"] / "entries")
    record["keys"].append("ff" + "0" * 62)
    (root / "runs" / "r.json").write_text(json.dumps(record))
    run = load_run(root / "runs" / "r.json")
    assert [s["id"] for s in run["stages"]] == [s["id"] for s in tiny_run["data"]["stages"]]
    out = render_report(root / "runs" / "r.json")
    assert out == root / "runs" / "r.html"
    page = out.read_text()
    assert "ff0000000000 is gone" in page
    for fig in EXPECTED_FIGURES:
        assert f'id="{fig}"' in page


@pytest.mark.slow
def test_missing_outputs_and_no_evaluate_stage(tiny_run, tmp_path):
    report = json.loads(tiny_run["report"].read_text())
    report["stages"] = [dict(s, output=str(tmp_path / "gone")) if s["id"] == "rebel" else s
                        for s in report["stages"] if s["kind"] != "evaluate"]
    report["warnings"] = ["disk <almost> full"]
    (tmp_path / "r.json").write_text(json.dumps(report))
    page = render_report(tmp_path / "r.json").read_text()
    assert "stage &#x27;rebel&#x27;: its output folder" in page and "no evaluate stage" in page
    assert 'id="fig-train-reward_model"' in page and 'id="fig-train-rebel"' not in page
    assert "disk &lt;almost&gt; full" in page and "<almost>" not in page


@pytest.mark.slow
def test_fully_cached_rerun_shows_the_computed_seconds(tiny_run, tmp_path):
    """A rerun served wholly from the cache reports, per stage, the seconds its entry took when it was
    computed (from the manifest), and the page draws those marked cached instead of bars of 0 s."""
    first = {s["id"]: s for s in tiny_run["data"]["stages"]}
    shutil.copytree(tiny_run["cache"], tmp_path / "cache", symlinks=True)  # the module's cache keeps one run record
    res = cli("run", str(tiny_run["dir"] / "spec.json"), "--cache-dir", str(tmp_path / "cache"),
              "--report", str(tmp_path / "rerun.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    stages = json.loads((tmp_path / "rerun.json").read_text())["stages"]
    assert [(s["id"], s["status"]) for s in stages] == [(sid, "cached") for sid in first]
    for s in stages:
        assert s["seconds"] == 0.0
        assert s["computed_seconds"] == pytest.approx(first[s["id"]]["seconds"], abs=0.002)
        assert "computed_seconds" not in first[s["id"]]
    assert "computed in" in res.stdout
    page = render_report(tmp_path / "rerun.json", tmp_path / "rerun.html")
    text = page.read_text()
    for s in stages:
        assert f"cached (computed in {s['computed_seconds']:.2f} s)" in text  # the bar's label
        assert f'<td class="num computed">{s["computed_seconds"]:.2f} (cached)</td>' in text  # the stage table
    assert "hatched: served from the cache" in text
    dom = finish(start_chromium(tmp_path, "--dump-dom", page.resolve().as_uri()), "dom of the rerun")
    s = scan(dom)
    assert s.svgs["fig-stage-times"] and "bars" in s.traces["fig-stage-times"]
    assert html.unescape(dom).count("cached (computed in ") >= len(stages)


def test_cached_stage_bars_and_table(tmp_path):
    """Without any cache entry: a cached stage's bar and row show its computed seconds, marked cached; a stage
    that ran shows its seconds, and a cached one from an older report (no computed_seconds) shows 0 s."""
    base = {"kind": "sample", "uses": "generate", "key": "k" * 64, "output": "", "metrics": {}, "rows": 4, "reason": ""}
    stages = [dict(base, id="a", status="cached", seconds=0.0, computed_seconds=327.4),
              dict(base, id="b", status="ran", seconds=12.5),
              dict(base, id="c", status="cached", seconds=0.0)]
    (tmp_path / "r.json").write_text(json.dumps({"spec": "s", "status": "ok", "seconds": 13.0, "stages": stages}))
    text = render_report(tmp_path / "r.json").read_text()
    assert "cached (computed in 327.40 s)" in text and '<td class="num computed">327.40 (cached)</td>' in text
    assert "12.50 s" in text and text.count('class="num computed"') == 1
    assert "0.00 s" in text


def test_texts_are_escaped(tmp_path):
    """Answers and prompts are shown as text, never as markup."""
    import datasets

    entry = tmp_path / "entry"
    datasets.Dataset.from_dict({
        "prompt_id": ["p0"], "sample_index": [0], "prompt": [[{"role": "user", "content": "<b>bold?</b>"}]],
        "policy": ['<script>alert("x")</script>'], "reference": ["a & b"], "policy_reward/j": [1.0],
        "reference_reward/j": [0.5]}).save_to_disk(str(entry / "data"))
    stage = {"id": "ev", "kind": "evaluate", "uses": "reward-winrate", "key": "k" * 64, "status": "ran", "seconds": 1.0,
             "output": str(entry), "output_type": "metrics", "rows": 1, "reason": "",
             "metrics": {"primary_judge": "j", "j.win_rate": 1.0, "j.win_rate_ci_low": 0.2, "j.win_rate_ci_high": 1.0}}
    (tmp_path / "r.json").write_text(json.dumps({"spec": "s", "status": "ok", "seconds": 1.0, "stages": [stage]}))
    page = render_report(tmp_path / "r.json").read_text()
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page and '<script>alert("x")' not in page
    assert "&lt;b&gt;bold?&lt;/b&gt;" in page and "a &amp; b" in page
    assert "no train stage" in page


def test_bad_inputs_raise_usage_errors(tmp_path, capsys):
    cases = {"missing.json": None, "bad.json": "{not json", "list.json": "[1, 2]", "other.json": '{"name": "x"}'}
    for name, text in cases.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        with pytest.raises(UsageError) as err:
            render_report(tmp_path / name)
        assert name in str(err.value) and err.value.exit_code == 2
    assert "does not exist" in str(pytest.raises(UsageError, load_run, tmp_path / "missing.json").value)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"spec": "s", "status": "ok", "seconds": 0, "stages": []}))
    assert cmd_report(argparse.Namespace(source=str(ok), output=str(tmp_path / "o.html"))) == 0
    assert "o.html" in capsys.readouterr().out and "the run has no stages" in (tmp_path / "o.html").read_text()


@pytest.mark.slow
def test_report_of_a_relative_cache_opens_from_another_folder(tiny_run, tmp_path):
    """A run with a relative --cache-dir writes absolute output folders into its report, so `rlhf-spec report`
    run from another folder still finds the entries and draws the examples and training curves."""
    run_dir, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(tiny_run["cache"], run_dir / "cache", symlinks=True)
    shutil.copy(tiny_run["dir"] / "spec.json", run_dir / "spec.json")
    res = cli("run", "spec.json", "--cache-dir", "cache", "--report", "report.json", cwd=run_dir)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert Path(report["cache_dir"]).is_absolute() and all(Path(s["output"]).is_absolute() for s in report["stages"])
    res = cli("report", str(run_dir / "report.json"), "-o", "page.html", cwd=elsewhere)
    assert res.returncode == 0, res.stderr[-3000:]
    page = (elsewhere / "page.html").read_text()
    assert "is gone" not in page and '<table class="examples">' in page and 'id="fig-train-reward_model"' in page
