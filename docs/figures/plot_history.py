"""Plot the training curves of online train stages into one SVG for the docs.

Usage::

    python docs/figures/plot_history.py [--panels KEY,KEY,...] OUT.svg LABEL=ENTRY_DIR [LABEL=ENTRY_DIR ...]

Each ``ENTRY_DIR`` is a cache entry of an online train stage (``.rlhf-cache/entries/<kk>/<key>``); its
``history.json`` holds one row per rollout step. The figure has four panels sharing the step axis: the mean
training reward of the rollouts (reward units), the mean held-out reward ``eval_reward_mean`` where it was
measured (step 0 is the starting policy, from the manifest), the mean per-sequence KL to the reference policy (k1, nats) and
the mean response length (tokens). ``--panels`` picks other ``history.json`` columns instead, e.g.
``reward/format_mean`` (the share of rollouts a ``format`` component of a ``combine`` reward accepts).

Needs matplotlib (``pip install -e .[docs]``). Raises ``SystemExit`` for a missing ``history.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PANELS = (("reward_mean", "training reward (rollouts)"), ("eval_reward_mean", "held-out reward"),
          ("kl", "KL to reference (nats/sequence)"), ("response_length_mean", "response length (tokens)"))
TITLES = {**dict(PANELS), "reward/format_mean": "strict format (share of rollouts)"}


def load(entry: Path) -> list[dict]:
    """Rows of ``entry/history.json``, led by a step-0 row holding the starting policy's held-out reward
    (``eval_reward_mean_first`` of the entry's manifest); ``SystemExit`` naming the path when it is missing."""
    path = entry / "history.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no history.json (is this an online train stage's cache entry?)")
    metrics = json.loads((entry / "manifest.json").read_text()).get("metrics", {})
    start = [{"step": 0, "eval_reward_mean": metrics["eval_reward_mean_first"]}] if "eval_reward_mean_first" in metrics else []
    return start + json.loads(path.read_text())


def main(argv: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = PANELS
    if argv[:1] == ["--panels"] and len(argv) > 1:
        panels = tuple((k, TITLES.get(k, k)) for k in argv[1].split(","))
        argv = argv[2:]
    if len(argv) < 2 or any("=" not in a for a in argv[1:]):
        raise SystemExit(__doc__)
    runs = [(label, load(Path(d))) for label, d in (a.split("=", 1) for a in argv[1:])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    axes = axes[0]
    for ax, (key, title) in zip(axes, panels):
        for label, rows in runs:
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("rollout step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(argv[0], metadata={"Date": None})
    print(f"wrote {argv[0]}")


if __name__ == "__main__":
    main(sys.argv[1:])
