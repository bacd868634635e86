"""``enginetime demo --plot FILE.png``: the incident in one picture.

Left, what the engine saw: each shard's decode tokens/s over time, with the storm's
prefill shaded. Right, what the sidecar says about it: each victim's wall time split
into queue / engine_time / interference / other, with the storm and without it (the
baseline run), so "wall time grew, engine time did not" is visible at a glance.

Drawn from the demo's report alone (``enginetime demo --json`` has the same keys),
with matplotlib's non-interactive Agg backend: no display needed.
"""

from __future__ import annotations

import importlib.util

#: Colours of the wall-time parts (queue, engine_time, interference, other).
PARTS = (
    ("queue_s", "queue", "#9e9e9e"),
    ("engine_time_s", "engine_time", "#2e7d32"),
    ("interference_s", "interference", "#c62828"),
    ("other_s", "other", "#f9a825"),
)


def check_available() -> None:
    """Raise ImportError naming the install command when matplotlib is missing (before a long run)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("--plot needs matplotlib: pip install 'enginetime[testbed]' (it is in that extra)")


def plot_report(report: dict, path: str) -> None:
    """Write the demo's picture to ``path`` (PNG; the format follows the file's extension)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = report["timeline"]
    storm = report["storm"]
    storm_shard = tl["storm_shard"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.15, 1]})

    # ---- left: decode tok/s per shard over time, storm shaded
    t = [x + tl["bin_s"] / 2 for x in tl["t0_s"]]
    for k, rates in enumerate(tl["decode_tok_s"]):
        label = f"shard {k}" + (" (storm's shard)" if k == storm_shard else " (victims)")
        ax.plot(t, rates, label=label, linewidth=1.6, linestyle="--" if k == storm_shard else "-")
    s0, s1 = tl["storm"]
    ax.axvspan(s0, s1, color="#c62828", alpha=0.12)
    ax.text(
        (s0 + s1) / 2,
        0.97,
        f"storm: {storm['request_id']}\nprefills {storm['prefill_tokens']} tokens\n"
        f"on shard {storm['shard']} ({storm['chunks']} chunks)",
        transform=ax.get_xaxis_transform(),
        ha="center",
        va="top",
        fontsize=9,
        color="#8e0000",
    )
    ax.set_xlabel("seconds since the victims arrived")
    ax.set_ylabel("decode tokens/s (engine step log)")
    c = report["config"]
    ax.set_title(f"{c['shards']} DP shards, {c['coupling']}: decode throughput per shard", fontsize=11)
    ax.set_ylim(bottom=0)
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)

    # ---- right: each victim's wall time split, with and without the storm
    baseline = report.get("baseline") or {}
    base = {
        v["request_id"].removeprefix("baseline-"): v
        for v in baseline.get("victims", []) + [baseline.get("neighbour")]
        if v
    }
    rows = report["victims"] + ([report["neighbour"]] if report.get("neighbour") else [])
    labels, bars = [], []
    for v in rows:
        b = base.get(v["request_id"])
        if b is not None:
            labels.append(f"{v['request_id']} no storm")
            bars.append(b)
        labels.append(f"{v['request_id']} (shard {v['shard']})")
        bars.append(v)
    y = list(range(len(bars)))[::-1]
    left = [0.0] * len(bars)
    for key, name, colour in PARTS:
        width = [max(r.get(key) or 0.0, 0.0) for r in bars]
        bx.barh(y, width, left=left, color=colour, label=name, height=0.7)
        left = [a + w for a, w in zip(left, width, strict=True)]
    bx.set_yticks(y, labels, fontsize=8)
    for yy, r in zip(y, bars, strict=True):
        if r.get("wall_s") is not None:
            bx.text(r["wall_s"], yy, f" {r['wall_s']:.2f} s", va="center", fontsize=7)
    bx.set_xlabel("seconds (sidecar accounting)")
    bx.set_title("victims' wall = queue + engine_time + interference + other", fontsize=11)
    bx.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, fontsize=8, frameon=False)
    bx.grid(axis="x", alpha=0.3)
    bx.set_xlim(right=max((r.get("wall_s") or 0.0) for r in bars) * 1.15 or 1.0)

    s = report.get("summary", {})
    growth = s.get("victim_wall_growth_max")
    lo, hi = s.get("victim_engine_time_ratio_min"), s.get("victim_engine_time_ratio_max")
    headline = "enginetime demo"
    if growth and lo and hi:
        headline += (
            f": the storm multiplied victims' wall time by up to {growth:.1f}x; "
            f"their engine_time stayed at {lo:.2f}-{hi:.2f}x of the no-storm run"
        )
    fig.suptitle(headline, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)


__all__ = ["check_available", "plot_report"]
