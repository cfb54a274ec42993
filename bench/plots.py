"""PNG plots for `bench serve` / `bench compare` reports (matplotlib, Agg backend, no display)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRICS = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E"))


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_cdfs(runs: list[dict], path: Path, title: str = "") -> Path:
    """One panel per metric; one CDF line per run (label)."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (key, name) in zip(axes, METRICS):
        for r in runs:
            xs = sorted(r.get("samples_ms", {}).get(key) or [])
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=_label(r))
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of tokens")
        ax.set_title(f"{name} CDF")
        ax.grid(alpha=0.3)
        if any(r.get("samples_ms", {}).get(key) for r in runs):
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _label(r: dict) -> str:
    load = r.get("load") or {}
    parts = [r.get("label") or ""]
    if "rate" in load:
        parts.append(f"{load['rate']:g} req/s")
    elif "concurrency" in load:
        parts.append(f"c={load['concurrency']}")
    return " ".join(p for p in parts if p) or "run"


def _rate(r: dict) -> float:
    load = r.get("load") or {}
    return load.get("rate") or r.get("offered_request_per_s") or r.get("request_per_s") or 0.0


def latency_vs_rate(runs: list[dict], path: Path) -> Path:
    runs = sorted(runs, key=_rate)
    rates = [_rate(r) for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, name in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "itl_ms", "ITL")):
        for q in ("p50", "p90", "p99"):
            ax.plot(rates, [r[key][q] for r in runs], marker="o", label=q)
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel(f"{name} (ms)")
        ax.set_title(f"{name} percentiles vs offered rate")
        ax.grid(alpha=0.3)
        ax.legend()
    slo = (runs[-1].get("slo") or {}).get("ttft_ms") if runs else None
    if slo:
        axes[0].axhline(slo, color="red", ls="--", lw=1, label="SLO")
    return _save(fig, path)


def throughput_vs_rate(runs: list[dict], path: Path) -> Path:
    runs = sorted(runs, key=_rate)
    rates = [_rate(r) for r in runs]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(rates, [r["output_tok_s"] for r in runs], marker="o", label="output tok/s")
    ax.set_xlabel("offered load (requests/s)")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(rates, [r["request_per_s"] for r in runs], marker="s", color="tab:green", label="served req/s")
    ax2.plot(rates, [r["goodput_req_s"] for r in runs], marker="^", color="tab:red", label="goodput req/s")
    ax2.set_ylabel("requests/s")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="upper left")
    ax.set_title("throughput vs offered rate")
    return _save(fig, path)


def timeline(rep: dict, path: Path) -> Path:
    """Offered vs served vs rejected per second, and queue depth (the spike plot)."""
    tl = rep["timeline"]
    fig, ax = plt.subplots(figsize=(9, 4))
    t = tl["t_s"] + [tl["t_s"][-1] + tl["bin_s"]] if tl["t_s"] else []
    ext = lambda xs: xs + xs[-1:]  # noqa: E731  (the last bin gets its full width)
    ax.step(t, ext(tl["offered"]), where="post", label="offered req/s")
    ax.step(t, ext(tl["served"]), where="post", label="served req/s")
    ax.step(t, ext(tl["rejected"]), where="post", label="rejected / failed req/s", color="tab:red")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel(f"requests per {tl['bin_s']:g} s")
    ax.grid(alpha=0.3)
    q = tl.get("queue") or {}
    if q.get("t_s"):
        ax2 = ax.twinx()
        ax2.plot(q["t_s"], q["waiting"], color="tab:gray", lw=1, label="queue depth (waiting)")
        ax2.plot(q["t_s"], q["running"], color="tab:olive", lw=1, ls=":", label="running")
        ax2.set_ylabel("requests")
        h2, l2 = ax2.get_legend_handles_labels()
    else:
        h2, l2 = [], []
    h, lab = ax.get_legend_handles_labels()
    ax.legend(h + h2, lab + l2, fontsize=8, loc="upper right")
    load = rep.get("load") or {}
    ax.set_title(f"timeline ({load.get('kind', '')})")
    return _save(fig, path)


def itl_by_position(runs: list[dict], path: Path, title: str = "") -> Path:
    """ITL p50 (dashed) and p99 (solid) per output-position bucket, one colour per run; the ITL SLO
    as a red line. Bucket "1" is TTFT, not an ITL, so it is not drawn."""
    fig, ax = plt.subplots(figsize=(7.5, 4))
    names: list[str] = []
    slo = None
    for i, r in enumerate(runs):
        pos = r.get("itl_by_position_ms") or {}
        buckets = pos.get("buckets") or {}
        names = names or list(buckets)
        slo = slo if slo is not None else pos.get("itl_slo_ms")
        x = [j for j, b in enumerate(names) if (buckets.get(b) or {}).get("count")]
        if not x:
            continue
        color = f"C{i % 10}"
        ax.plot(x, [buckets[names[j]]["p99"] for j in x], marker="o", color=color, label=f"{_label(r)} p99")
        ax.plot(x, [buckets[names[j]]["p50"] for j in x], marker=".", ls="--", color=color,
                label=f"{_label(r)} p50")
    ax.set_xticks(list(range(len(names))), names)
    ax.set_xlabel("output position (token k; ITL = gap before token k)")
    ax.set_ylabel("ITL (ms)")
    if slo is not None:
        ax.axhline(slo, color="red", ls=":", lw=1, label=f"ITL SLO {slo:g} ms")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.set_title(title or "ITL by output position")
    return _save(fig, path)


def serve_plots(rep: dict, out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    runs = rep.get("runs") or [rep]
    paths = [latency_cdfs(runs, out / "latency_cdf.png", rep.get("model", "")),
             latency_vs_rate(runs, out / "latency_vs_rate.png"),
             throughput_vs_rate(runs, out / "throughput_vs_rate.png"),
             itl_by_position(runs, out / "itl_by_position.png")]
    last = runs[-1]
    name = "spike_timeline.png" if (last.get("load") or {}).get("kind") == "spike" else "timeline.png"
    paths.append(timeline(last, out / name))
    return paths


def compare_bars(section: str, variants: list[dict], path: Path) -> Path:
    """Output tok/s and TTFT p50/p99 per variant (and prefix hit rate when the variants have one)."""
    names = [v.get("label", "?") for v in variants]
    hit = [v.get("prefix_cache_hit_rate") for v in variants]
    ncols = 3 if any(h is not None for h in hit) and section == "routing" else 2
    fig, axes = plt.subplots(1, ncols, figsize=(4.5 * ncols, 3.8))
    axes[0].bar(names, [v["output_tok_s"] for v in variants], color="tab:blue")
    axes[0].set_ylabel("output tokens/s")
    axes[0].set_title("throughput")
    x = range(len(names))
    axes[1].bar([i - 0.2 for i in x], [v["ttft_ms"]["p50"] or 0 for v in variants], 0.4, label="p50")
    axes[1].bar([i + 0.2 for i in x], [v["ttft_ms"]["p99"] or 0 for v in variants], 0.4, label="p99")
    axes[1].set_xticks(list(x), names)
    axes[1].set_ylabel("TTFT (ms)")
    axes[1].set_title("time to first token")
    axes[1].legend()
    if ncols == 3:
        axes[2].bar(names, [100 * (h or 0) for h in hit], color="tab:green")
        axes[2].set_ylabel("prefix cache hit rate (%)")
        axes[2].set_title("prompt tokens served from cache")
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"compare --{section}")
    return _save(fig, path)
