"""The ``rlhf-spec`` command line.

Exit codes: 0 success; 1 runtime failure; 2 invalid spec or usage; 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

from .errors import RLHFSpecError, UsageError


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 140)


def _registry():
    from .plugins import registry

    return registry()


def _load(args) -> "object":
    from .spec import load_pipeline

    return load_pipeline(args.spec, _registry(), overrides=getattr(args, "set", None) or [])


def _cache(args, pipeline=None):
    from .cache import Cache
    from .runner import cache_dir_for

    return Cache(cache_dir_for(pipeline, getattr(args, "cache_dir", None)))


# ----------------------------------------------------------------------------- commands


def cmd_validate(args) -> int:
    pipe = _load(args)
    print(f"{args.spec}: valid ({len(pipe.stages)} stages: {', '.join(s.id for s in pipe.stages)})")
    return 0


def cmd_schema(args) -> int:
    from .spec import json_schema

    text = json.dumps(json_schema(_registry()), indent=2, sort_keys=True) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_plugins(args) -> int:
    reg = _registry()
    rows = reg.rows()
    failures = [f.__dict__ for f in reg.failures]
    conflicts = {"/".join(p for p in k if p): v for k, v in reg.conflicts.items()}
    if args.json:
        print(json.dumps({"implementations": rows, "stages": [r for r in rows if r["surface"] == "stage"],
                          "failures": failures, "conflicts": conflicts}, indent=2))
        return 0
    from rich.table import Table

    con = _console()
    t = Table(title="rlhf-spec plugins: stages, rewards and generation backends")
    for col in ("surface", "kind", "name", "distribution", "version", "inputs -> output", "description"):
        t.add_column(col)
    for r in rows:
        io = f"{','.join(r['inputs']) or '-'} -> {r['output']}" if r["surface"] == "stage" else ""
        t.add_row(r["surface"], r["kind"] or "-", r["name"], r["distribution"], r["version"], io, r["description"])
    con.print(t)
    for f in failures:
        con.print(f"[red]plugin '{f['entry_point']}' from {f['distribution']} {f['version']} failed to load:[/] "
                  f"{f['error']}")
    for k, v in conflicts.items():
        con.print(f"[red]{k} is registered by more than one distribution:[/] {', '.join(v)}")
    return 0


def cmd_plan(args) -> int:
    from .plan import plan
    from .runner import Runner

    pipe = _load(args)
    cache = _cache(args, pipe)
    runner = Runner(pipe, cache)
    rows = plan(runner, until=args.until, force=frozenset(args.force or []), explain=args.explain)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    con = _console()
    t = Table(title=f"plan for {pipe.spec.name} (cache {cache.root})")
    for col in ("stage", "kind", "uses", "status", "key", "resources", "why"):
        t.add_column(col, overflow="fold")
    for r in rows:
        res = r.get("resources") or {}
        res_txt = ", ".join(f"{k}={v}" for k, v in res.items())
        style = "green" if r["status"] == "cached" else "yellow"
        t.add_row(r["id"], r["kind"], r["uses"], f"[{style}]{r['status']}[/]", (r.get("key") or "?")[:12], res_txt,
                  r["reason"])
    con.print(t)
    if args.explain:
        for r in rows:
            for c in r.get("changes", []) or []:
                con.print(f"  {r['id']}: {c}")
    return 0


def cmd_run(args) -> int:
    from .report import build_report, print_summary, write_report
    from .runner import Runner

    started = time.time()
    pipe = _load(args)
    cache = _cache(args, pipe)
    con = _console()
    runner = Runner(pipe, cache, console=con)
    runner.selected(args.until)
    runner.check_force(args.force)
    status, error, code = "ok", "", 0
    try:
        runner.run(until=args.until, force=frozenset(args.force or []))
    except KeyboardInterrupt:
        status, error, code = "interrupted", "interrupted; rerun the same command to resume", 130
    except RLHFSpecError as exc:
        status, error, code = "failed", str(exc), exc.exit_code
        if args.debug:
            traceback.print_exc()
    finally:
        outcomes = [runner.outcomes[s.id] for s in runner.selected(args.until) if s.id in runner.outcomes]
        with contextlib.suppress(RLHFSpecError):
            runner.record()
    report = build_report(runner, started, outcomes, status, error)
    path = Path(args.report) if args.report else cache.root / "reports" / (
        f"{pipe.spec.name}-{_dt.datetime.now().strftime('%Y%m%dT%H%M%S')}.json")
    write_report(path, report)
    print_summary(con, report)
    con.print(f"report: {path}")
    if code:
        print(f"rlhf-spec: {error}", file=sys.stderr)
    return code


def _parse_age(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw]?)", text.strip())
    if not m:
        raise UsageError(f"--older-than expects a number with s, m, h, d or w (e.g. 7d), got {text!r}")
    mult = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return float(m.group(1)) * mult


def cmd_cache(args) -> int:
    cache = _cache(args)
    con = _console()
    if args.cache_cmd == "ls":
        rows = []
        for key, man in cache.entries():
            st = man.get("stage", {})
            rows.append({"key": key, "spec": st.get("spec", ""), "stage": st.get("id", ""),
                         "kind": st.get("kind", st.get("memo", "")),
                         "uses": st.get("uses", ""), "created": man.get("created", ""), "bytes": man.get("bytes", 0),
                         "rows": man.get("rows")})
        rows.sort(key=lambda r: r["created"])
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        from rich.table import Table

        t = Table(title=f"cache {cache.root}: {len(rows)} entries")
        for col in ("key", "spec", "stage", "kind", "uses", "created", "MB", "rows"):
            t.add_column(col)
        for r in rows:
            t.add_row(r["key"][:12], r["spec"], r["stage"], r["kind"], r["uses"], r["created"],
                      f"{r['bytes'] / 1e6:.1f}", "" if r["rows"] is None else str(r["rows"]))
        con.print(t)
        return 0
    if args.cache_cmd == "verify":
        res = cache.scan()
        bad = [r for r in res if not r["ok"]]
        for r in bad:
            con.print(f"[red]corrupt[/] {r['key'][:12]} ({r['stage'].get('id', '')}): set aside")
        con.print(f"verified {len(res)} entries: {len(res) - len(bad)} ok, {len(bad)} corrupt")
        return 1 if bad else 0
    if args.cache_cmd == "gc":
        older = _parse_age(args.older_than) if args.older_than else None
        res = cache.gc(keep_last=args.keep_last, older_than=older, dry_run=args.dry_run)
        verb = "would remove" if args.dry_run else "removed"
        for k in res["removed"]:
            con.print(f"{verb} {k}")
        con.print(f"{verb} {len(res['removed'])} item(s), {res['freed_bytes'] / 1e6:.1f} MB; kept {res['kept']} key(s) "
                  f"of the last {args.keep_last} run(s) per spec")
        return 0
    raise UsageError("cache needs one of: ls, verify, gc")


# ----------------------------------------------------------------------------- parser


def _common(sp, cache_dir: bool = True) -> None:
    """Options every command accepts before or after its name. Their defaults are set once, on the
    top-level parser; a sub-parser only overrides a value the user gave there (SUPPRESS)."""
    sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    if cache_dir:
        sp.add_argument("--cache-dir", default=argparse.SUPPRESS,
                        help="cache folder (default: $RLHF_SPEC_CACHE, the spec's cache.dir, or .rlhf-cache)")


def _spec_args(sp) -> None:
    sp.add_argument("spec", help="path of the JSON spec")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a spec value by dotted path, e.g. stages.sample.params.n=2 (repeatable)")


def _cache_parser(sub) -> None:
    sp = sub.add_parser("cache", help="inspect and clean the cache")
    _common(sp)
    csub = sp.add_subparsers(dest="cache_cmd", required=True)
    c = csub.add_parser("ls", help="list entries")
    c.add_argument("--json", action="store_true")
    _common(c)
    c = csub.add_parser("verify", help="re-hash every entry; set corrupt ones aside")
    _common(c)
    c = csub.add_parser("gc", help="remove entries, trash and partial work no kept run needs")
    c.add_argument("--keep-last", type=int, default=1, help="keep what the last N runs of each spec used (default 1)")
    c.add_argument("--older-than", help="only remove what is older than AGE (e.g. 12h, 7d)")
    c.add_argument("--dry-run", action="store_true")
    _common(c)
    sp.set_defaults(fn=cmd_cache)


def cmd_report(args) -> int:
    from .report_html import cmd_report as _cmd_report

    return _cmd_report(args, console=_console())


def build_parser() -> argparse.ArgumentParser:
    """The ``rlhf-spec`` argument parser. ``--debug`` and ``--cache-dir`` mean the same before or after a command."""
    p = argparse.ArgumentParser(prog="rlhf-spec", description="Run an RLHF pipeline from one declarative JSON spec.")
    p.add_argument("--debug", action="store_true", default=False, help="show tracebacks")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $RLHF_SPEC_CACHE, the spec's cache.dir, "
                                                     "or .rlhf-cache)")
    sub = p.add_subparsers(dest="cmd", required=True)

    sp = sub.add_parser("run", help="run a spec, reusing cached stages")
    _spec_args(sp)
    _common(sp)
    sp.add_argument("--report", help="where to write the JSON run report")
    sp.add_argument("--force", action="append", metavar="ID", help="rerun this stage even if cached (repeatable)")
    sp.add_argument("--until", metavar="ID", help="stop after this stage (runs only it and what it needs)")
    sp.set_defaults(fn=cmd_run)

    sp = sub.add_parser("plan", help="show which stages are cached and which would run, and why")
    _spec_args(sp)
    _common(sp)
    sp.add_argument("--force", action="append", metavar="ID")
    sp.add_argument("--until", metavar="ID")
    sp.add_argument("--explain", action="store_true", help="name the key ingredient that changed for each stage that "
                                                           "reruns")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(fn=cmd_plan)

    sp = sub.add_parser("validate", help="check a spec without running anything")
    _spec_args(sp)
    _common(sp, cache_dir=False)
    sp.set_defaults(fn=cmd_validate)

    sp = sub.add_parser("plugins", help="list installed stages, rewards and generation backends")
    sp.add_argument("--json", action="store_true")
    _common(sp, cache_dir=False)
    sp.set_defaults(fn=cmd_plugins)

    sp = sub.add_parser("schema", help="print the JSON Schema of specs (with installed plugins' params)")
    sp.add_argument("-o", "--output", help="write to this file instead of stdout")
    _common(sp, cache_dir=False)
    sp.set_defaults(fn=cmd_schema)
    _cache_parser(sub)
    sp = sub.add_parser("report", help="write a self-contained HTML report of a run (plots, win rates, examples)")
    sp.add_argument("source", metavar="RUN_OR_REPORT",
                    help="run report JSON (rlhf-spec run --report PATH) or cache run record (<cache>/runs/*.json)")
    sp.add_argument("-o", "--output", metavar="OUT.html", help="where to write the HTML (default: SOURCE with .html)")
    _common(sp, cache_dir=False)
    sp.set_defaults(fn=cmd_report)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if exc.code in (0, None) else 2
    debug = bool(args.debug)
    if debug:
        import logging

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logging.getLogger("rlhf_spec").addHandler(handler)
        logging.getLogger("rlhf_spec").setLevel(logging.DEBUG)
    try:
        code = args.fn(args)
    except RLHFSpecError as exc:
        if debug:
            traceback.print_exc()
        print(f"rlhf-spec: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        print("rlhf-spec: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        # the reader closed the pipe (`rlhf-spec plan --json | head`): nothing failed here, so no error; stdout
        # goes to devnull so the interpreter's last flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except Exception as exc:  # noqa: BLE001
        if debug:
            traceback.print_exc()
        else:
            print(f"rlhf-spec: internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)",
                  file=sys.stderr)
        code = 1
    return code


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
