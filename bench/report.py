"""Markdown tables and PNG plots of benchmark results, for the README.

    python bench/report.py RESULTS.json... [--out bench/results/README.md] [--notes NOTES.md]

Takes latency.json (bench/latency.py) and assign.json (bench/assign.py) files, from any number
of machines, and writes one markdown file: per file the machine, settings, tables (towers,
label assignment, end-to-end, roofline, targets, skipped backends) and links to the plots,
which are written beside each JSON file as `<json stem>-vs-batch.png` (image-tower latency per
backend), `<stem>-roofline.png` (achieved FLOP/s as a fraction of the measured matmul peak) and
`<stem>-time.png` (label assignment time per output size). Plots need matplotlib
(`pip install 'segclip[bench]'`); without it the tables are written and the plots listed as
skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/report.py` puts bench/, not the repo, on the path
    sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, nargs="+", help="latency.json / assign.json files")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "README.md")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--notes", type=Path, action="append", default=[],
                        help="markdown to insert after the title (hand-written analysis)")
    return parser.parse_args(argv)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_axes(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    """Log2 x, log y, labels, title, grid and legend of a latency plot."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()


def _save(plt: Any, fig: Any, path: Path) -> Path:
    """Write `fig` to `path` (PNG, 120 dpi), close it, return `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_latency(results: dict[str, Any], path: Path) -> Path | None:
    """Image-tower median latency (with its CI) against batch, one line per backend."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for backend in results["backends"]:
        cases = [c for c in backend.get("image", []) if c.get("status") == "ok"]
        if backend.get("status") != "ok" or not cases:
            continue
        batches = [c["batch"] for c in cases]
        medians = [c["latency"]["median_ms"] for c in cases]
        low = [m - c["latency"]["median_ci_ms"][0] for m, c in zip(medians, cases)]
        high = [c["latency"]["median_ci_ms"][1] - m for m, c in zip(medians, cases)]
        ax.errorbar(batches, medians, yerr=[low, high], marker="o", capsize=3,
                    label=backend["backend"])
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    _log_axes(ax, "batch (images)", "image tower median latency (ms)",
              f"{results['machine_slug']}: image tower")
    return _save(plt, fig, path)


def plot_roofline(results: dict[str, Any], path: Path) -> Path | None:
    """Bars: achieved FLOP/s / measured matmul peak per backend and batch."""
    plt = _pyplot()
    labels, values = [], []
    for backend in results["backends"]:
        for case in backend.get("image", []) if backend.get("status") == "ok" else []:
            if "peak_fraction" in case:
                labels.append(f"{backend['backend']}\nb{case['batch']}")
                values.append(100 * case["peak_fraction"])
    if not values:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(values)), 4))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.axhline(100, color="black", lw=0.8)
    ax.axhline(85, color="tab:red", ls="--", lw=0.8, label="85% target (ORT fp32)")
    ax.set_xticks(range(len(values)), labels, fontsize=8)
    ax.set_ylabel("% of measured matmul peak")
    ax.set_title(f"{results['machine_slug']}: image tower roofline fraction")
    ax.legend()
    return _save(plt, fig, path)


def plot_assign(results: dict[str, Any], path: Path) -> Path | None:
    """Median time against output size per variant, at the largest label count."""
    plt = _pyplot()
    rows = [r for r in results["rows"] if r["device"] == "cpu"]
    if not rows:
        return None
    labels = max(r["labels"] for r in rows)
    rows = sorted((r for r in rows if r["labels"] == labels), key=lambda r: r["size"][0])
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in rows[0]["variants"]:
        ax.plot([r["size"][0] for r in rows],
                [r["variants"][name]["latency"]["median_ms"] for r in rows], marker="o",
                label=name)
    _log_axes(ax, "output side H = W (pixels)", "median ms",
              f"{results['machine_slug']}: label assignment, {labels} labels (cpu)")
    return _save(plt, fig, path)


def _link(plot: Path, out: Path) -> str:
    return os.path.relpath(plot, out.parent).replace(os.sep, "/")


def latency_markdown(results: dict[str, Any], plots: list[str], name: str) -> list[str]:
    from bench._machine import describe
    from bench._summary import (
        E2E_HEADER,
        TOWER_HEADER,
        e2e_rows,
        markdown_table,
        target_rows,
        tower_rows,
    )

    s = results["settings"]
    lines = [f"## Latency: {results['machine_slug']}, `{name}` ({results['created']})", "",
             "```", describe(results["machine"]), "```", "",
             f"Model: {results['model_source']}; bundle `{results['bundle']['path']}`; threads "
             f"{s['threads']} intra-op (ORT and torch), 1 inter-op; command `{results['command']}`."
             f" Medians with 95% bootstrap CIs; n = timed calls; 'x torch' = torch eager median "
             f"/ this median, same run.", ""]
    for stage in ("image", "text"):
        header = [*TOWER_HEADER]
        header[1] = "batch" if stage == "image" else "labels"
        lines += [f"### {stage.capitalize()} tower", "",
                  markdown_table(header, tower_rows(results, stage)), ""]
    assign = results.get("assign") or {}
    if assign.get("status") == "ok":
        lines += ["### Label assignment (runtime, numpy, real tower outputs)", "",
                  markdown_table(["labels", "output", "size", "windows", "median ms", "p99 ms",
                                  "peak RSS delta MB"],
                                 [[str(c["labels"]), c["output"], "x".join(map(str, c["size"])),
                                   str(c["windows"]), f"{c['latency']['median_ms']:.2f}",
                                   f"{c['latency']['p99_ms']:.2f}",
                                   f"{c['memory']['rss_peak_delta_mb']:.1f}"]
                                  for c in assign["cases"]]), ""]
    for e2e in results.get("e2e", []):
        if e2e.get("status") != "ok":
            lines += [f"End-to-end `Segmenter.segment` ({e2e.get('device')}, "
                      f"{e2e.get('variant')}): skipped, {e2e.get('reason')}", ""]
            continue
        lines += [f"### End-to-end `Segmenter.segment` ({e2e['device']}, {e2e['variant']}, "
                  f"image {e2e['image_size'][0]}x{e2e['image_size'][1]}, {e2e['windows']} "
                  f"windows)", "", f"Backend: `{e2e.get('backend_info')}`.", "",
                  markdown_table(E2E_HEADER, e2e_rows(e2e)), ""]
    flops = results.get("flops") or {}
    if flops:
        parts = flops["image_per_image"]
        lines += ["### Roofline", "",
                  f"Image tower FLOPs per image ({flops['counted']}); torch FlopCounterMode "
                  f"count: {flops.get('torch_counter_per_image')}.", "",
                  markdown_table(["component", "GFLOP", "share"],
                                 [[k, f"{v / 1e9:.3f}", f"{100 * v / parts['total']:.1f}%"]
                                  for k, v in parts.items()]), "",
                  "Measured matmul peaks (GFLOP/s, higher of the run's start and end): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in results["peaks_gflops"].items())
                  + "; load average (1, 5, 15 min) at start / end: "
                  + str([(p or {}).get("load_average") for p in results["peak"].values()]), ""]
    lines += ["### Targets (read from this run, not asserted)", "",
              markdown_table(["target", "value", "goal", "status", "why"],
                             target_rows(results)), "",
              "### Skipped", ""]
    lines += [f"- {item['what']}: {item['reason']}" for item in results["skipped"]] + [""]
    lines += [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return lines


def _wait_range(results: dict[str, Any]) -> str:
    waits = [v["sched"]["contention"] for r in results["rows"] for v in r["variants"].values()
             if v.get("sched")]
    return f"{100 * min(waits):.0f}-{100 * max(waits):.0f}%" if waits else "not recorded"


def assign_markdown(results: dict[str, Any], plots: list[str], name: str) -> list[str]:
    from bench._machine import describe
    from bench._summary import fmt, markdown_table

    w = results["window"]
    lines = [f"## Label assignment: {results['machine_slug']}, `{name}` ({results['created']})",
             "",
             "```", describe(results["machine"]), "```", "",
             f"One window: L = {w['regions']} regions on a {w['grid']}x{w['grid']} grid, D = "
             f"{w['dim']}, `{w['pattern']}` assignments. naive [T,H,W] = the official score-map "
             f"protocol, naive [L,H,W] = upsample + argmax. Peak memory: "
             f"{results['memory_method']}. 'x' = naive / fused, same run (variants timed "
             f"round-robin). numpy BLAS threads: {results['settings'].get('threads', '?')}; "
             f"run-queue wait of the cases: {_wait_range(results)}.", ""]
    variants = sorted({v for r in results["rows"] for v in r["variants"]})
    header = ["device", "size", "labels", *[f"{v} ms" for v in variants],
              *[f"{v} MB" for v in variants], "x faster ([T,H,W])", "x less memory ([T,H,W])"]
    rows = [[r["device"], "x".join(map(str, r["size"])), str(r["labels"]),
             *[fmt(r["variants"][v]["latency"]["median_ms"]) if v in r["variants"] else "-"
               for v in variants],
             *[fmt(r["variants"][v]["peak_mb"], ".1f") if v in r["variants"] else "-"
               for v in variants],
             fmt(r.get("speedup_naive"), ".1f"), fmt(r.get("memory_ratio_naive"), ".1f")]
            for r in results["rows"]]
    lines += [markdown_table(header, rows), ""]
    lines += [f"- skipped: {item['what']}: {item['reason']}" for item in results["skipped"]]
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return lines


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plots_ok, why = not args.no_plots, "--no-plots"
    if plots_ok:
        try:
            _pyplot()
        except ImportError:
            plots_ok, why = False, "matplotlib is not installed (pip install 'segclip[bench]')"
    lines = ["# segclip benchmarks", "",
             "Generated by `python bench/report.py "
             + " ".join(str(a) for a in (argv if argv is not None else sys.argv[1:]))
             + "` from the JSON results beside this file; regenerate rather than edit.", ""]
    for notes in args.notes:
        lines += [notes.read_text().rstrip(), ""]
    for path in args.results:
        try:
            results = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"error: cannot read {path}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        kind = results.get("benchmark")
        makers = {"latency": [("vs-batch", plot_latency), ("roofline", plot_roofline)],
                  "assign": [("time", plot_assign)]}.get(kind)
        if makers is None:
            print(f"error: {path} is not a latency or assign result (benchmark={kind!r})",
                  file=sys.stderr)
            raise SystemExit(2)
        if kind == "latency":  # ratios, roofline and targets with this checkout's rules
            from bench._summary import derive

            results = derive(results)
        plots = []
        if plots_ok:
            for name, make in makers:
                made = make(results, path.parent / f"{path.stem}-{name}.png")
                if made is not None:
                    plots.append(_link(made, args.out))
        render = latency_markdown if kind == "latency" else assign_markdown
        lines += render(results, plots, path.name)
    if not plots_ok:
        lines += [f"Plots skipped: {why}.", ""]
        print(f"plots skipped: {why}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print(f"report: {args.out}")


if __name__ == "__main__":
    main()
