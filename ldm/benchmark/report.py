"""The benchmark's outputs: per-run and per-configuration CSVs, a markdown report and bar charts.

Speed-ups are ratios of mean run times: ``vs A = mean(A) / mean(X)`` and ``vs P = mean(P) / mean(X)``, so a
number above 1 means X is faster. matplotlib is optional: without it the charts are skipped with a note.
"""

from __future__ import annotations

import csv
import io
import statistics
from typing import Iterable

from ldm.fileio import atomic_write, write_text

RUN_FIELDS = ["batch", "repeat", "order", "config", "label", "flags", "status", "seconds", "images", "images_per_s",
              "process_s", "peak_mem_mb", "peak_kind", "model", "H", "W", "steps", "n_iter", "dtype",
              "device", "device_name", "torch", "python", "code", "loadavg_1min"]
SUMMARY_FIELDS = ["batch", "config", "label", "runs", "mean_s", "median_s", "min_s", "max_s", "images_per_s",
                  "speedup_vs_A", "speedup_vs_P", "process_mean_s", "peak_mem_mb"]
UNET_FIELDS = ["config", "label", "flags", "status", "unet_batch", "H", "W", "ms_mean", "ms_median", "ms_min",
               "ms_max", "iters", "first_call_s", "first_peak_mb", "peak_mem_mb", "loaded_mb", "activations_mb",
               "est_activations_mb", "est_mb", "peak_kind",
               "fit_res", "fit_method", "budget_gb", "device", "device_name", "torch"]


def write_csv(path: str, rows: Iterable[dict], fields: list[str]) -> None:
    """``rows`` as CSV with the columns ``fields`` (other keys of a row are left out)."""
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def summarize(rows: list[dict]) -> list[dict]:
    """One row per (batch, config) over the successful runs, in the order the configurations ran."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["batch"], r["config"]), []).append(r)
    out = []
    for (batch, key), runs in groups.items():
        secs = [r["seconds"] for r in runs]
        mean = statistics.fmean(secs)
        out.append({"batch": batch, "config": key, "label": runs[0]["label"], "runs": len(runs), "mean_s": mean,
                    "median_s": statistics.median(secs), "min_s": min(secs), "max_s": max(secs),
                    "images_per_s": runs[0]["images"] / mean,
                    "process_mean_s": statistics.fmean(r["process_s"] for r in runs),
                    "peak_mem_mb": max(r["peak_mem_mb"] for r in runs)})
    for s in out:
        for ref in ("A", "P"):
            base = next((b for b in out if b["batch"] == s["batch"] and b["config"] == ref), None)
            s[f"speedup_vs_{ref}"] = base["mean_s"] / s["mean_s"] if base else None
    return out


def _fmt(v, spec: str = ".4g", none: str = "–") -> str:
    """``v`` in ``spec``; 4 significant digits stay out of exponent notation for values from 1e4 on."""
    if v is None or v == "":
        return none
    return format(v, ".0f") if spec == ".4g" and abs(v) >= 1e4 else format(v, spec)


def _x(v) -> str:
    return _fmt(v, ".3f") + ("x" if v else "")


def markdown(summary: list[dict], unet: list[dict], header: list[str], notes: list[str]) -> str:
    """The report: header lines, one table per batch size, the ours/peer ratios, the UNet table, notes."""
    lines = [*header, ""]
    for batch in sorted({s["batch"] for s in summary}):
        lines += [f"### Batch size {batch}: seconds per run (n_iter iterations, warm-up excluded)", "",
                  "| config | what | runs | mean s | median s | min s | max s | images/s | speed-up vs A "
                  "| speed-up vs diffusers (P) | process s | peak MiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in (s for s in summary if s["batch"] == batch):
            lines.append(f"| {s['config']} | {s['label']} | {s['runs']} | {_fmt(s['mean_s'])} | {_fmt(s['median_s'])} "
                         f"| {_fmt(s['min_s'])} | {_fmt(s['max_s'])} | {_fmt(s['images_per_s'])} "
                         f"| {_x(s['speedup_vs_A'])} | {_x(s['speedup_vs_P'])} | {_fmt(s['process_mean_s'])} "
                         f"| {_fmt(s['peak_mem_mb'], '.0f')} |")
        lines += ["", *ratio_lines([s for s in summary if s["batch"] == batch]), ""]
    if unet:
        lines += ["### UNet alone: one guided step (UNet batch = 2 x images); compile time separate", "",
                  "| config | what | UNet batch | HxW | ms/step mean | median | min | first call s "
                  "| first calls' peak MiB | steps' peak MiB | activations MiB | estimated activations MiB "
                  "| largest HxW in budget |",
                  "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for u in unet:
            if u["status"] != "ok":
                lines.append(f"| {u['config']} | {u['label']} | {u['unet_batch']} | {u['H']}x{u['W']} | "
                             f"{u['status']} |" + "  |" * 8)
                continue
            fit = "–"
            if u.get("fit_method"):
                fit = (f"{u['fit_res']}x{u['fit_res']}" if u["fit_res"] else "< 256x256") + \
                    f" ({u['fit_method']}, {u['budget_gb']:.0f} GiB)"
            lines.append(f"| {u['config']} | {u['label']} | {u['unet_batch']} | {u['H']}x{u['W']} "
                         f"| {_fmt(u['ms_mean'])} | {_fmt(u['ms_median'])} | {_fmt(u['ms_min'])} "
                         f"| {_fmt(u['first_call_s'], '.3g')} | {_fmt(u['first_peak_mb'], '.0f')} "
                         f"| {_fmt(u['peak_mem_mb'], '.0f')} | {_fmt(max(u['activations_mb'], 0.0), '.0f')} "
                         f"| {_fmt(u['est_activations_mb'], '.0f')} | {fit} |")
        lines.append("")
        lines += profile_lines(unet)
    if notes:
        lines += ["Notes:", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def profile_lines(unet: list[dict]) -> list[str]:
    """Per profiled configuration: its costliest ops in one UNet call (self time, share of the call, calls)."""
    lines = []
    for u in (u for u in unet if u.get("profile")):
        lines += [f"#### Where the time goes: {u['config']} ({u['label']}), one UNet call, torch.profiler", "",
                  "| op | self ms | share | calls |", "|---|---:|---:|---:|"]
        lines += [f"| `{p['op']}` | {p['self_ms']:.1f} | {100 * p['share']:.1f}% | {p['calls']} |" for p in u["profile"]]
        lines.append("")
    return lines


def ratio_lines(summary: list[dict]) -> list[str]:
    """'ours / diffusers' time ratios measured in this run (below 1: ours is faster)."""
    by = {s["config"]: s for s in summary}
    pairs = [("D", "P", "eager, SDPA"), ("E", "PC", "both compiled"), ("E", "P", "ours compiled vs diffusers eager")]
    return [f"Time ratio ours/diffusers, {what}: {a}/{b} = {by[a]['mean_s'] / by[b]['mean_s']:.3f} "
            f"(diffusers/ours = {by[b]['mean_s'] / by[a]['mean_s']:.3f}x)."
            for a, b, what in pairs if a in by and b in by]


def charts(rows: list[dict], summary: list[dict], title: str, runs_png: str, summary_png: str) -> str | None:
    """Blog-style bar charts: mean run time per configuration and batch size, and every run in the order it ran.

    Returns None, or a note when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return "charts skipped: matplotlib is not installed (pip install 'ldm-fast[plots]')"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(s["config"] for s in summary))
    colors = {k: plt.get_cmap("tab10")(i % 10) for i, k in enumerate(keys)}
    labels = {s["config"]: f"{s['config']}: {s['label']}" for s in summary}
    batches = sorted({s["batch"] for s in summary})
    width = 0.8 / max(len(keys), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 + 1.4 * len(batches) * len(keys) * 0.5), 4.8))
    for i, k in enumerate(keys):
        for j, b in enumerate(batches):
            s = next((s for s in summary if s["batch"] == b and s["config"] == k), None)
            if s is None:
                continue
            x = j + (i - (len(keys) - 1) / 2) * width
            ax.bar(x, s["mean_s"], width * 0.92, color=colors[k], label=labels[k] if j == 0 else None,
                   yerr=[[s["mean_s"] - s["min_s"]], [s["max_s"] - s["mean_s"]]], capsize=3)
            ax.annotate(f"{s['mean_s']:.3g}", (x, s["max_s"]), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(batches)), [f"batch size {b}" for b in batches])
    ax.set_ylabel("seconds per run (lower is better)")
    _save_chart(plt, fig, ax, title, summary_png)

    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(ok) + 2.5), 4.2))
    for i, r in enumerate(ok):
        ax.bar(i, r["seconds"], color=colors.get(r["config"], "grey"))
    ax.set_xticks(range(len(ok)), [f"{r['config']}" for r in ok], fontsize=7)
    for k in keys:
        ax.bar(0, 0, color=colors[k], label=labels[k])
    ax.set_xlabel("runs in the order they ran (A B C ... repeated; batch sizes one after another)")
    ax.set_ylabel("seconds per run")
    _save_chart(plt, fig, ax, title, runs_png)
    return None


def _save_chart(plt, fig, ax, title: str, path: str) -> None:
    """Title, the legend beside the axes, and the PNG written atomically."""
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    atomic_write(path, lambda f, _tmp: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
