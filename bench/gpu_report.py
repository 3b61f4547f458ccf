#!/usr/bin/env python
"""The GPU runbook's results as README tables and a plot: `python bench/gpu_report.py out/gpu [--plot F]`.

Reads what bench/gpu_runbook.sh packed (PART.tar.gz, or folders holding its JSON): the bench_dr2 ladders
(images/s by configuration and batch, TFLOP/s, % of peak, x the reference-style baseline), issue 6's two
targets checked against them, the pipeline runs (busy%, net%) and the restoration topologies. Prints
Markdown; --plot writes images/s against batch size per configuration as a PNG.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

TARGET_IMAGES_PER_S = 45.0  # issue 6, DR2 at (N, tau) = (4, 22) on one H100
TARGET_VS_REFERENCE = 20.0


def load(paths: Sequence[str]) -> tuple[dict[str, dict], dict[str, str]]:
    """{json name: content}, {text name: content} from tarballs and folders (folders may hold tarballs)."""
    data: dict[str, dict] = {}
    text: dict[str, str] = {}

    def add(name: str, body: str) -> None:
        stem, _, ext = name.rpartition(".")
        if ext == "json":
            data[stem] = json.loads(body)
        elif ext == "txt":
            text[stem] = body

    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(p.iterdir())
        elif p.name.endswith(".tar.gz"):
            files = [p]
        else:
            raise SystemExit(f"{p}: not a folder or a .tar.gz")
        for f in files:
            if f.name.endswith(".tar.gz"):
                with tarfile.open(f) as tar:
                    for m in tar.getmembers():
                        if m.isfile():
                            add(Path(m.name).name, tar.extractfile(m).read().decode())
            elif f.is_file():
                add(f.name, f.read_text())
    return data, text


def _f(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def dr2_rows(data: dict[str, dict]) -> list[dict]:
    """Every bench_dr2 row, the reference row once and first, each with 'x_ref': its images/s over the
    reference's. Several runs measure the reference; the fastest is kept (the ratios are then the lowest)."""
    refs, rows = [], []
    for name in sorted(k for k in data if k.startswith("dr2_")):
        for r in data[name]["rows"]:
            (refs if r["configuration"].startswith("reference") else rows).append(r)
    ref = max((r for r in refs if r.get("images_per_s")), key=lambda r: r["images_per_s"], default=None)
    rows = ([ref] if ref else []) + rows
    for r in rows:
        r["x_ref"] = r["images_per_s"] / ref["images_per_s"] if ref and r.get("images_per_s") else None
    return rows


def dr2_tables(data: dict[str, dict]) -> str:
    rows = dr2_rows(data)
    if not rows:
        return ""
    meta = next(data[k]["meta"] for k in sorted(data) if k.startswith("dr2_"))
    out = [f"DR2 sampler, {meta['arch']} at {meta['size']}², (N, τ) = ({meta['N']}, {meta['tau']}): "
           f"{meta['forwards_per_image']} forwards/image, {meta['device_name']}, torch {meta['torch']}", ""]
    configs = list(dict.fromkeys(r["configuration"] for r in rows))
    batches = sorted({r["batch"] for r in rows})
    out.append("| configuration | " + " | ".join(f"b{b}" for b in batches) + " |")
    out.append("|---|" + "---:|" * len(batches))
    for c in configs:
        by = {r["batch"]: r for r in rows if r["configuration"] == c}
        cells = [("OOM" if by[b].get("error") else _f(by[b]["images_per_s"], ".1f")) if b in by else ""
                 for b in batches]
        out.append(f"| {c} | " + " | ".join(cells) + " |")
    out += ["", "images/s by batch size. Best batch of each configuration:", "",
            "| configuration | batch | images/s | TFLOP/s | % peak | × reference |", "|---|---:|---:|---:|---:|---:|"]
    best = best_rows(rows)
    for c in configs:
        r = best[c]
        out.append(f"| {c} | {r['batch']} | {_f(r['images_per_s'], '.2f')} | {_f(r['tflops'], '.1f')} | "
                   f"{_f(r['pct_peak'], '.1f')} | {_f(r['x_ref'], '.1f')} |")
    return "\n".join(out)


def best_rows(rows: list[dict]) -> dict[str, dict]:
    best: dict[str, dict] = {}
    for r in rows:
        if r.get("images_per_s") and (r["configuration"] not in best
                                      or r["images_per_s"] > best[r["configuration"]]["images_per_s"]):
            best[r["configuration"]] = r
    return best


def _targets_apply(data: dict[str, dict]) -> bool:
    meta = next(data[k]["meta"] for k in sorted(data) if k.startswith("dr2_"))
    return (meta["N"], meta["tau"], meta["arch"], meta["size"]) == (4, 22, "ffhq256", 256)


def targets(data: dict[str, dict]) -> str:
    rows = dr2_rows(data)
    ref = next((r for r in rows if r["configuration"].startswith("reference") and r.get("images_per_s")), None)
    best = max((r for r in rows if r.get("images_per_s") and not r["configuration"].startswith("reference")),
               key=lambda r: r["images_per_s"], default=None)
    if not best:
        return ""
    if not _targets_apply(data):
        return "targets: not applicable (the issue's targets are for the full-size UNet at (4, 22))"
    ratio = best["x_ref"]
    lines = [f"- best: **{best['images_per_s']:.1f} images/s** ({best['configuration']}, batch {best['batch']}): "
             f"{'meets' if best['images_per_s'] >= TARGET_IMAGES_PER_S else 'MISSES'} the {TARGET_IMAGES_PER_S:g} "
             f"images/s target ({_f(best['pct_peak'], '.1f')}% of peak)"]
    if ratio is not None:
        lines.append(f"- {ratio:.1f}x the reference-style run (batch 1, fp32, eager, {ref['images_per_s']:.2f} "
                     f"images/s): {'meets' if ratio >= TARGET_VS_REFERENCE else 'MISSES'} the "
                     f"{TARGET_VS_REFERENCE:g}x target")
    return "\n".join(lines)


def pipeline_table(data: dict[str, dict]) -> str:
    names = sorted(k for k in data if k.startswith("pipeline_"))
    if not names:
        return ""
    out = ["| run | mode | images | images/s | × model-only | busy % | net % |", "|---|---|---:|---:|---:|---:|---:|"]
    for n in names:
        for r in data[n]["table"]:
            busy, net = r.get("actor_busy"), r.get("network_share")
            out.append(f"| {n.removeprefix('pipeline_')} | {r['mode']} | {r['images']} | {_f(r['images_per_s'], '.2f')}"
                       f" | {_f(r.get('ratio'), '.2f')} | {_f(None if busy is None else 100 * busy, '.0f')} | "
                       f"{_f(None if net is None else 100 * net, '.0f')} |")
    return "\n".join(out)


def restore_table(data: dict[str, dict]) -> str:
    if "restore_topologies" not in data:
        return ""
    out = ["| topology | images | images/s | ratio |", "|---|---:|---:|---:|"]
    for r in data["restore_topologies"]["table"]:
        out.append(f"| {r['topology']} | {r['images']} | {_f(r['images_per_s'], '.2f')} | "
                   f"{_f(r.get('ratio'), '.2f')} |")
    return "\n".join(out)


def plot(data: dict[str, dict], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = dr2_rows(data)
    fig = Figure(figsize=(7, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for c in dict.fromkeys(r["configuration"] for r in rows):
        pts = sorted((r["batch"], r["images_per_s"]) for r in rows if r["configuration"] == c and r.get("images_per_s"))
        if len(pts) == 1:
            ax.axhline(pts[0][1], linestyle="--", color="#7f7f7f", label=c)
        elif pts:
            ax.plot(*zip(*pts), marker="o", label=c)
    if _targets_apply(data):
        ax.axhline(TARGET_IMAGES_PER_S, color="#d62728", linewidth=0.8, label=f"target {TARGET_IMAGES_PER_S:g}")
    batches = sorted({r["batch"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size")
    ax.set_ylabel("images/s")
    ax.set_title("DR2 sampler throughput by configuration")
    ax.grid(True, color="#e5e5e5")
    ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    Path(path).write_bytes(buf.getvalue())


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", help="folders or PART.tar.gz files from bench/gpu_runbook.sh")
    p.add_argument("--plot", metavar="PNG", help="also plot images/s against batch size per configuration")
    args = p.parse_args(argv)
    data, text = load(args.paths)
    device = next((t.splitlines()[-1] for k, t in text.items() if k == "device" and t.strip()), None)
    parts = [f"device: {device}" if device else "", dr2_tables(data), targets(data), pipeline_table(data),
             restore_table(data)]
    report = "\n\n".join(s for s in parts if s)
    print(report)
    if args.plot and dr2_rows(data):
        plot(data, args.plot)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
