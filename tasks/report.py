"""Benchmark report: the (sample, method) manifest turned into tables, plots and image grids.

`aggregate(df)` gives mean and count per method x degradation level (plus "all") for every metric column
present; rows whose status is not "ok" are left out of the means but counted. `write_report(...)` writes,
under `<output>/report/`:

- `report.md` and `report.html` (the same content; the HTML has inline CSS and the plots and grids inline as
  base64 while they fit in a few MB, each also linked to its file, so the page works on its own or next to
  its files);
- `plots/<metric>.png`: the metric's mean against the degradation level (levels ordered by `deg_scale`),
  one line per method, with standard-error bars;
- `grids/<n>.png`: input | each method's output | ground truth for `grid_samples` samples spread over the
  levels, mildest first (one row per sample, up to 6 rows per grid; tiles `tile` px, default 256; height is
  grid_header_height(tile) + rows * tile, width columns * tile), with column titles, the sample id / level /
  scale on the input and each output's scores (or its error) written on it; a method whose output is the
  input itself (e.g. "input") gets no column;
- `aggregate.csv`: the table `aggregate` returns.

Everything is a pure function of the manifest rows (sorted first, so the row order does not matter), the
images and the arguments: the same inputs give the same bytes. Images are read and files written through
tasks.storage, so `output` and the image URIs can be local paths or s3:// (with `storage_options`).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
import math
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
import pandas as pd

from tasks.images import decode_image, encode_png
from tasks.storage import get_fs, join_under, redact, write_bytes
from tasks.units import read_output_image

__all__ = [
    "METRICS", "PROTOCOLS", "aggregate", "choose_grid_samples", "fid_columns", "grid_header_height", "level_order",
    "method_order", "write_report",
]

log = logging.getLogger(__name__)

# name -> (label, higher is better, number format)
METRICS: dict[str, tuple[str, bool, str]] = {
    "psnr_rgb": ("PSNR RGB (dB)", True, "{:.2f}"),
    "psnr_y": ("PSNR Y (dB)", True, "{:.2f}"),
    "ssim_rgb": ("SSIM RGB", True, "{:.4f}"),
    "ssim_y": ("SSIM Y", True, "{:.4f}"),
    "lpips_alex": ("LPIPS Alex", False, "{:.4f}"),
    "lpips_vgg": ("LPIPS VGG", False, "{:.4f}"),
    "ids": ("IDS (identity cos)", True, "{:.4f}"),
    "deg": ("Deg (identity angle)", False, "{:.2f}"),
    "lmd_mtcnn5": ("LMD MTCNN-5 (px)", False, "{:.3f}"),
    "niqe": ("NIQE", False, "{:.3f}"),
}
# name -> (protocol, what it is compared with: "gt" = the ground truth, "input" = the method's input, "none")
PROTOCOLS: dict[str, tuple[str, str]] = {
    "psnr_rgb": ("10 log10(1 / MSE), RGB in [0, 1], float64 (skimage)", "gt"),
    "psnr_y": ("PSNR on BT.601 Y in [16, 235] / 255 (BasicSR / pyiqa `psnr` test_y_channel)", "gt"),
    "ssim_rgb": ("SSIM, 11x11 Gaussian sigma 1.5, valid window, mean of R, G, B (pyiqa `ssimc`)", "gt"),
    "ssim_y": ("SSIM on BT.601 Y (BasicSR / pyiqa `ssim`)", "gt"),
    "lpips_alex": ("LPIPS v0.1, AlexNet trunk, inputs in [-1, 1] (lpips package)", "gt"),
    "lpips_vgg": ("LPIPS v0.1, VGG16 trunk, inputs in [-1, 1] (lpips package)", "gt"),
    "ids": ("ArcFace IResNet-50 embedding cosine, 112x112 (insightface arcface_torch)", "gt|input"),
    "deg": ("ArcFace IResNet-50 embedding angle in degrees", "gt|input"),
    "lmd_mtcnn5": ("mean distance of the 5 MTCNN landmarks, px at the GT size", "gt"),
    "niqe": ("NIQE (Mittal et al. 2013): MSCN, AGGD/GGD features at 2 scales, 96 px patches, pristine MVG", "none"),
    "fid_tf_inception": ("FID, pytorch-fid TF Inception (pt_inception-2015-12-05) pool3, bilinear 299, "
                         "the FID of papers", "set"),
    "fid_tv_inception": ("FID, torchvision ImageNet Inception-v3 pool3, bilinear 299: comparable only with itself",
                         "set"),
}
FID_LABELS = {"fid_tf_inception": "FID TF-Inception", "fid_tv_inception": "FID torchvision-Inception"}
ALL_LEVEL = "all"
_BASELINES = ("input", "bicubic")  # listed first and drawn dashed
_NO_VALUE = "–"
_HTML_INLINE_BUDGET = 4_000_000  # bytes of base64 images inlined in report.html; beyond it, links only


# Metrics a run adds (plug-in no-reference metrics): name -> (label, higher is better, format, protocol); set by
# write_report for the duration of one call.
_EXTRA: ContextVar[dict[str, tuple[str, bool, str, str]] | None] = ContextVar("report_extra_metrics", default=None)


def _known() -> dict[str, tuple[str, bool, str]]:
    return METRICS | {k: v[:3] for k, v in (_EXTRA.get() or {}).items()}


def _protocol(metric: str) -> tuple[str, str]:
    extra = _EXTRA.get() or {}
    return (extra[metric][3], "none") if metric in extra else PROTOCOLS.get(metric, ("", ""))


def _arrow(metric: str) -> str:
    return "↑" if _known()[metric][1] else "↓"


def _label(metric: str) -> str:
    if metric in FID_LABELS:
        return f"{FID_LABELS[metric]} ↓"
    return f"{_known()[metric][0]} {_arrow(metric)}" if metric in _known() else metric


def _fmt(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _NO_VALUE
    spec = _known()[metric][2] if metric in _known() else "{:.4g}"
    return spec.format(float(value))


# ----------------------------------------------------------------------------------------------------------
# Ordering and aggregation
# ----------------------------------------------------------------------------------------------------------


def _prepare(df: pd.DataFrame) -> pd.DataFrame:
    """Canonical copy: row order fixed by (id, method), status/level filled, metric columns numeric."""
    d = df.copy()
    if "method" not in d.columns:
        raise ValueError("the manifest has no 'method' column")
    if "id" not in d.columns:
        d["id"] = range(len(d))
    d["id"] = d["id"].astype(str)
    d["method"] = d["method"].astype(str)
    d["status"] = d["status"].fillna("error").astype(str) if "status" in d.columns else "ok"
    if "deg_level" not in d.columns:
        d["deg_level"] = "unknown"
    d["deg_level"] = d["deg_level"].where(d["deg_level"].notna(), "unknown").astype(str)
    if "deg_scale" in d.columns:
        d["deg_scale"] = pd.to_numeric(d["deg_scale"], errors="coerce")
    for m in _known():
        if m in d.columns:
            d[m] = pd.to_numeric(d[m], errors="coerce").astype(float)
    return d.sort_values(["id", "method"], kind="mergesort").reset_index(drop=True)


def method_order(df: pd.DataFrame) -> list[str]:
    """Baselines ("input", "bicubic") first, then the other methods by name."""
    names = sorted(set(df["method"].astype(str)))
    return [m for m in _BASELINES if m in names] + [m for m in names if m not in _BASELINES]


def level_order(df: pd.DataFrame) -> list[str]:
    """Degradation levels mildest first: by the median `deg_scale` of their samples, then by name."""
    levels = df["deg_level"].where(df["deg_level"].notna(), "unknown").astype(str)
    if "deg_scale" in df.columns:
        scale = pd.to_numeric(df["deg_scale"], errors="coerce").groupby(levels).median()
    else:
        scale = pd.Series(dtype=float)

    def key(name: str):
        s = scale.get(name, float("nan"))
        return (math.isnan(s), 0.0 if math.isnan(s) else s, name)

    return sorted(set(levels), key=key)


def _metrics_in(df: pd.DataFrame) -> list[str]:
    return [m for m in _known() if m in df.columns]


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and count per method x degradation level, plus level "all", for every metric column present.

    Columns: method, level, n (rows), n_ok, n_error (rows whose status is not "ok"), then for each metric
    `<metric>` (mean over ok rows, NaN ignored) and `<metric>_n` (how many values that mean is over).
    Rows: methods in `method_order`, levels in `level_order` then "all".
    """
    d = _prepare(df)
    metrics = _metrics_in(d)
    methods, levels = method_order(d), level_order(d)
    ok = d["status"] == "ok"
    rows = []
    for method in methods:
        dm = d[d["method"] == method]
        for level in [*levels, ALL_LEVEL]:
            part = dm if level == ALL_LEVEL else dm[dm["deg_level"] == level]
            if level != ALL_LEVEL and part.empty:
                continue
            good = part[ok.loc[part.index]]
            row = {"method": method, "level": level, "n": len(part), "n_ok": len(good),
                   "n_error": len(part) - len(good)}
            for m in metrics:
                vals = good[m].dropna()
                row[m] = float(vals.mean()) if len(vals) else float("nan")
                row[f"{m}_n"] = len(vals)
            rows.append(row)
    cols = ["method", "level", "n", "n_ok", "n_error"] + [c for m in metrics for c in (m, f"{m}_n")]
    out = pd.DataFrame(rows, columns=cols)
    for c in ("n", "n_ok", "n_error", *(f"{m}_n" for m in metrics)):
        out[c] = out[c].astype("int64")
    return out


def _stable_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def choose_grid_samples(df: pd.DataFrame, n: int) -> list[str]:
    """`n` sample ids spread over the degradation levels, mildest level first; deterministic.

    Levels take turns (mildest first) until n ids are chosen; inside a level the ids are spread evenly
    over its range of `deg_scale`, preferring ids for which every method succeeded.
    """
    d = _prepare(df)
    if n <= 0 or d.empty:
        return []
    d["_scale"] = d["deg_scale"] if "deg_scale" in d.columns else np.nan
    d["_error"] = (d["status"] != "ok").astype(int)
    per_id = d.groupby("id", sort=True).agg(level=("deg_level", "first"), scale=("_scale", "first"),
                                            errors=("_error", "sum"))
    levels = [lv for lv in level_order(d) if (per_id["level"] == lv).any()]
    quota = dict.fromkeys(levels, 0)
    avail = {lv: int((per_id["level"] == lv).sum()) for lv in levels}
    left = min(n, len(per_id))
    while left > 0:
        for lv in levels:
            if left > 0 and quota[lv] < avail[lv]:
                quota[lv] += 1
                left -= 1
    chosen = []
    for lv in levels:
        cand = per_id[per_id["level"] == lv].copy()
        cand["h"] = [_stable_hash(i) for i in cand.index]
        clean = cand[cand["errors"] == 0].sort_values(["scale", "h"], kind="mergesort")
        dirty = cand[cand["errors"] > 0].sort_values(["errors", "scale", "h"], kind="mergesort")
        k = quota[lv]
        picks = list(clean.index[_spread(len(clean), min(k, len(clean)))])
        picks += list(dirty.index[: k - len(picks)])
        chosen += sorted(picks, key=lambda i: (cand.loc[i, "scale"], i))
    return chosen


def _spread(length: int, k: int) -> list[int]:
    """k indices spread evenly over range(length), ends included when k > 1."""
    if k <= 0:
        return []
    if k == 1:
        return [length // 2]
    return sorted({round(i * (length - 1) / (k - 1)) for i in range(k)})


# ----------------------------------------------------------------------------------------------------------
# Document model: built once, rendered to Markdown and HTML
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    text: str
    bold: bool = False
    note: str = ""  # small trailing remark, e.g. "(n=9)"
    num: bool = False  # right-aligned numeric cell
    warn: bool = False  # something went wrong here (error counts): bold, and red in HTML


@dataclass
class Table:
    header: list[str]
    rows: list[list[Cell]]
    caption: str = ""


@dataclass
class Image:
    rel: str  # path under report/
    alt: str
    caption: str = ""
    data: bytes = b""  # what report.html inlines (PNG or JPEG)
    mime: str = "image/png"


@dataclass
class Block:
    kind: str  # "h2", "h3", "p", "table", "img", "gallery" (list of Image), "list"
    content: object


def _bold_best(values: list[float], texts: list[str], higher: bool) -> list[bool]:
    """Which cells hold the best value; compared as displayed, so equal-looking values are bolded alike."""
    shown = [(float(t), i) for i, (v, t) in enumerate(zip(values, texts)) if not math.isnan(v)]
    if not shown:
        return [False] * len(values)
    best = max(s for s, _ in shown) if higher else min(s for s, _ in shown)
    flags = [False] * len(values)
    for s, i in shown:
        flags[i] = s == best
    return flags


def _metric_table(agg: pd.DataFrame, level: str, methods: list[str], metrics: list[str]) -> Table:
    part = agg[agg["level"] == level].set_index("method")
    present = [m for m in methods if m in part.index]
    header = ["method", "n", "errors"] + [_label(m) for m in metrics]
    cols: list[list[Cell]] = []
    for m in metrics:
        vals = [float(part.loc[x, m]) for x in present]
        texts = [_fmt(m, v) for v in vals]
        bold = _bold_best(vals, texts, _known()[m][1])
        cells = []
        for x, v, t, b in zip(present, vals, texts, bold):
            n_m, n_ok = int(part.loc[x, f"{m}_n"]), int(part.loc[x, "n_ok"])
            note = f"(n={n_m})" if not math.isnan(v) and n_m != n_ok else ""
            cells.append(Cell(t, bold=b, note=note, num=True))
        cols.append(cells)
    rows = []
    for i, x in enumerate(present):
        n_err = int(part.loc[x, "n_error"])
        rows.append([Cell(x), Cell(str(int(part.loc[x, "n_ok"])), num=True),
                     Cell(str(n_err), num=True, warn=n_err > 0)] + [c[i] for c in cols])
    return Table(header, rows)


def _flatten(meta: Mapping, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for k, v in meta.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out += _flatten(v, key + ".")
        elif isinstance(v, (list, tuple, dict)):
            out.append((key, json.dumps(v, default=str, ensure_ascii=False)))
        else:
            out.append((key, str(v)))
    return out


def fid_columns(fid: Mapping) -> dict[str, dict]:
    """{"<metric>@<reference>": {method: value}}; a flat {method: value} (one FID against the ground truth, the
    old form) is read as {"fid@gt": ...}."""
    if fid and not all(isinstance(v, Mapping) for v in fid.values()):
        return {"fid@gt": dict(fid)}
    return {str(k): dict(v) for k, v in fid.items()}


def _fid_cell(v) -> tuple[float, str]:
    if isinstance(v, str):
        return float("nan"), v
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return float("nan"), _NO_VALUE
    return float(v), f"{float(v):.2f}"


def _fid_header(key: str) -> str:
    metric, _, ref = key.partition("@")
    return f"{FID_LABELS.get(metric, 'FID')} ↓ vs {ref or 'gt'}"


def _fid_table(fid: Mapping, methods: list[str]) -> Table:
    cols = fid_columns(fid)
    keys = sorted(cols)
    seen = {m for per in cols.values() for m in per}
    names = [m for m in methods if m in seen] + sorted(str(m) for m in seen if m not in methods)
    grid = []
    for key in keys:
        vals, texts = zip(*[_fid_cell(cols[key].get(n)) for n in names]) if names else ((), ())
        bold = _bold_best(list(vals), [t if not math.isnan(v) else "nan" for v, t in zip(vals, texts)], higher=False)
        grid.append([Cell(t, bold=b, num=not math.isnan(v)) for v, t, b in zip(vals, texts, bold)])
    rows = [[Cell(n)] + [col[i] for col in grid] for i, n in enumerate(names)]
    return Table(["method"] + [_fid_header(k) for k in keys], rows)


def _reference_text(ref: str, mode: str, references: Mapping) -> str:
    if ref == "gt":
        return "ground truth"
    if ref == "gt|input":
        return "the method's input (no ground truth)" if mode == "real-world" else "ground truth"
    if ref == "none":
        return "none (no-reference: the output alone)"
    if ref == "set":
        return "image sets: " + ("; ".join(f"{k} = {v}" for k, v in references.items()) or "ground truth")
    return ref


def _protocol_table(metrics: list[str], mode: str, references: Mapping) -> Table:
    rows = []
    for m in metrics:
        protocol, ref = _protocol(m)
        better = "lower" if m in FID_LABELS or not _known().get(m, ("", False))[1] else "higher"
        rows.append([Cell(_label(m)), Cell(m), Cell(f"{better} is better"), Cell(protocol),
                     Cell(_reference_text(ref, mode, references))])
    return Table(["metric", "name", "direction", "protocol", "compared with"], rows)


def _build(d: pd.DataFrame, agg: pd.DataFrame, *, fid, unavailable, meta, plots: list[Image],
           grids: list[tuple[Image, str]], references: Mapping | None = None,
           not_applicable: Mapping | None = None) -> tuple[str, list[Block]]:
    methods, levels = method_order(d), level_order(d)
    all_metrics = _metrics_in(d)
    unavailable = {str(k): str(v) for k, v in (unavailable or {}).items()}
    for m in all_metrics:  # a column with no value at all is unavailable too, whatever the caller said
        if m not in unavailable and d[m].isna().all():
            unavailable[m] = "no values in the manifest (every row is NaN)"
    not_applicable = {str(k): str(v) for k, v in (not_applicable or {}).items()}
    for m in not_applicable:
        unavailable.pop(m, None)
    metrics = [m for m in all_metrics if m not in unavailable and m not in not_applicable]
    references = {str(k): str(v) for k, v in (references or {}).items()}
    mode = str((meta or {}).get("mode", "synthetic"))
    title = str((meta or {}).get("title") or "Face restoration benchmark")
    n_ids, n_err = d["id"].nunique(), int((d["status"] != "ok").sum())
    blocks: list[Block] = []
    add = blocks.append
    untrained = random_networks(d, (meta or {}).get("metric_weights"))
    if untrained:
        add(Block("banner", "UNTRAINED NETWORKS: these numbers describe random-init networks, not the methods: "
                            + "; ".join(untrained) + ". Configure their weights for numbers that mean anything."))

    summary = (f"{n_ids} samples × {len(methods)} methods ({len(d)} rows, {n_err} errors), "
               f"{len(levels)} degradation levels: {', '.join(levels) or 'none'}. "
               f"Metrics: {', '.join(_label(m) for m in metrics) or 'none'} (↑ higher is better, ↓ lower is "
               f"better; the best value in each column is in bold; means are over rows with status ok).")
    add(Block("p", summary))

    add(Block("h2", "Overall"))
    if metrics:
        add(Block("table", _metric_table(agg, ALL_LEVEL, methods, metrics)))
    else:
        add(Block("p", "No metric has any value."))

    fids = sorted({k.partition("@")[0] for k in fid_columns(fid)})
    add(Block("h2", "Metric protocols"))
    add(Block("table", _protocol_table(metrics + [m for m in fids if m in FID_LABELS], mode, references)))

    add(Block("h2", "FID"))
    if fid:
        add(Block("table", _fid_table(fid, methods)))
        used = sorted({k.partition("@")[2] or "gt" for k in fid_columns(fid)})
        add(Block("list", [f"vs {r}: {references.get(r, 'ground truth of this run' if r == 'gt' else r)}"
                           for r in used]))
    else:
        add(Block("p", "No FID was computed."))

    add(Block("h2", "Unavailable metrics"))
    if unavailable:
        items = [f"{_label(m)}: {reason}" for m, reason in sorted(unavailable.items(),
                                                                 key=lambda kv: (kv[0] not in _known(), kv[0]))]
        add(Block("list", items))
    else:
        add(Block("p", "None: every metric was computed."))
    if not_applicable:
        add(Block("h2", "Not applicable"))
        add(Block("list", [f"{_label(m)}: {why}" for m, why in sorted(not_applicable.items())]))

    if plots:
        add(Block("h2", "Metrics by degradation level"))
        add(Block("gallery", plots))

    if grids:
        add(Block("h2", "Examples"))
        add(Block("p", "Columns: degraded input | each method's output (with its scores) | ground truth. "
                       "Samples are spread over the degradation levels."))
        for img, heading in grids:
            add(Block("h3", heading))
            add(Block("img", img))

    add(Block("h2", "Tables by degradation level"))
    for level in levels:
        rows = d[d["deg_level"] == level]
        head = f"{level}: {rows['id'].nunique()} samples"
        if "deg_scale" in rows.columns and rows["deg_scale"].notna().any():
            lo, hi = rows["deg_scale"].min(), rows["deg_scale"].max()
            head += f", scale {lo:.2f}" + (f" to {hi:.2f}" if hi != lo else "")
        add(Block("h3", head))
        if metrics:
            add(Block("table", _metric_table(agg, level, methods, metrics)))

    add(Block("h2", "Errors"))
    err = d[d["status"] != "ok"]
    counts = agg[agg["level"] == ALL_LEVEL].set_index("method")
    add(Block("table", Table(["method", "rows", "ok", "errors"], [
        [Cell(m), Cell(str(int(counts.loc[m, "n"])), num=True), Cell(str(int(counts.loc[m, "n_ok"])), num=True),
         Cell(str(int(counts.loc[m, "n_error"])), warn=bool(counts.loc[m, "n_error"]), num=True)]
        for m in methods if m in counts.index])))
    if len(err):
        msgs = err["error"].fillna("(no message)").astype(str) if "error" in err.columns else \
            pd.Series(["(no message)"] * len(err), index=err.index)
        msgs = msgs.str.strip().str.slice(0, 300)
        grouped = (pd.DataFrame({"method": err["method"], "msg": msgs, "id": err["id"]})
                   .groupby(["msg", "method"], sort=True)["id"].agg(["size", lambda s: ", ".join(list(s)[:5])]))
        grouped.columns = ["count", "ids"]
        grouped = grouped.reset_index().sort_values(["count", "msg", "method"], ascending=[False, True, True],
                                                    kind="mergesort").head(30)
        add(Block("table", Table(["error", "method", "count", "ids (first 5)"], [
            [Cell(r.msg), Cell(r.method), Cell(str(r.count), num=True), Cell(r.ids)]
            for r in grouped.itertuples(index=False)])))

    if meta:
        add(Block("h2", "Run"))
        add(Block("table", Table(["key", "value"], [[Cell(k), Cell(v)] for k, v in _flatten(redact(meta))])))
    return title, blocks


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]|"})
_MD_TAG = re.compile(r"<(?=[A-Za-z/!?])")  # "<" that could open raw HTML; "12 < 2048" stays readable


def _md(text: str) -> str:
    return _MD_TAG.sub(r"\\<", str(text).replace("\n", " ").translate(_MD_SPECIAL))


def _md_cell(c: Cell) -> str:
    t = _md(c.text)
    if c.bold or c.warn:
        t = f"**{t}**"
    return f"{t} {_md(c.note)}" if c.note else t


def random_networks(d: pd.DataFrame, metric_weights: Mapping | None = None) -> list[str]:
    """Every random-init network behind a report's numbers, named by role: the rows' weights identities
    ("<diffusion>+<enhancer>", extra networks as "+dr2=...", "+dblm=...") and metric backbones set to random-init."""
    found: list[str] = []
    for value in sorted(d["weights"].dropna().astype(str).unique()) if "weights" in d.columns else []:
        for k, part in enumerate(value.split("+")):
            role, _, identity = part.rpartition("=") if "=" in part else ("", "", part)
            role = role or ("diffusion network" if k == 0 else "enhancer")
            if identity.startswith("random-init") and f"{role} ({identity})" not in found:
                found.append(f"{role} ({identity})")
    found += [f"metric backbone {name} (random-init)" for name, w in sorted((metric_weights or {}).items())
              if w == "random-init"]
    return found


def render_markdown(title: str, blocks: list[Block]) -> str:
    out = [f"# {_md(title)}", ""]
    for b in blocks:
        if b.kind in ("h2", "h3"):
            out += [("## " if b.kind == "h2" else "### ") + _md(b.content), ""]
        elif b.kind == "p":
            out += [_md(b.content), ""]
        elif b.kind == "banner":
            out += [f"> **{_md(b.content)}**", ""]
        elif b.kind == "list":
            out += [f"- {_md(x)}" for x in b.content] + [""]
        elif b.kind == "table":
            t: Table = b.content
            out.append("| " + " | ".join(_md(h) for h in t.header) + " |")
            first = t.rows[0] if t.rows else [Cell("")] * len(t.header)
            out.append("|" + "|".join("---:" if c.num else "---" for c in first) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in t.rows]
            out.append("")
        elif b.kind in ("img", "gallery"):
            for img in b.content if b.kind == "gallery" else [b.content]:
                out += [f"![{_md(img.alt)}]({img.rel})", ""]
    return "\n".join(out)


_CSS = """
body{font:15px/1.5 -apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f2328;margin:0;background:#f6f8fa}
main{max-width:1200px;margin:0 auto;padding:24px 32px 64px;background:#fff;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{font-size:26px;margin:8px 0 4px}h2{font-size:20px;margin:32px 0 10px;padding-bottom:4px;
border-bottom:1px solid #d0d7de}h3{font-size:16px;margin:20px 0 8px}
p.summary{color:#57606a}
table{border-collapse:collapse;margin:6px 0 14px;font-size:14px}
th,td{border:1px solid #d0d7de;padding:4px 10px;vertical-align:top}
th{background:#f0f3f6;font-weight:600;white-space:nowrap}
tr:nth-child(even) td{background:#fafbfc}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.best{font-weight:700;background:#dafbe1 !important}
td.warn{font-weight:700;color:#a40e26;background:#ffebe9 !important}
td small{color:#6e7781;font-weight:400}
td.wrap{word-break:break-all;max-width:760px}
ul.unavail li{margin:2px 0}
.plots{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:8px 16px}
figure{margin:10px 0 18px}figure img{max-width:100%;height:auto;border:1px solid #d0d7de}
figcaption{color:#57606a;font-size:13px}
nav a{margin-right:12px}
"""


def _html_cell(c: Cell, tag: str = "td") -> str:
    cls = [x for x, on in (("num", c.num), ("best", c.bold), ("warn", c.warn), ("wrap", len(c.text) > 60)) if on]
    attr = f' class="{" ".join(cls)}"' if cls else ""
    body = html.escape(c.text)
    if c.note:
        body += f" <small>{html.escape(c.note)}</small>"
    return f"<{tag}{attr}>{body}</{tag}>"


def render_html(title: str, blocks: list[Block]) -> str:
    budget = _HTML_INLINE_BUDGET
    sections = [b.content for b in blocks if b.kind == "h2"]
    anchors = {s: "s-" + "".join(ch if ch.isalnum() else "-" for ch in s.lower()) for s in sections}
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>",
           f"<h1>{html.escape(title)}</h1>",
           "<nav>" + "".join(f'<a href="#{anchors[s]}">{html.escape(s)}</a>' for s in sections) + "</nav>"]
    first_p = True
    for b in blocks:
        if b.kind == "h2":
            out.append(f'<h2 id="{anchors[b.content]}">{html.escape(b.content)}</h2>')
        elif b.kind == "h3":
            out.append(f"<h3>{html.escape(b.content)}</h3>")
        elif b.kind == "p":
            out.append(f'<p{" class=summary" if first_p else ""}>{html.escape(b.content)}</p>')
            first_p = False
        elif b.kind == "banner":
            out.append(f'<p class="banner" style="background:#fdd;border:2px solid #c00;padding:.6em;'
                       f'font-weight:bold">{html.escape(b.content)}</p>')
        elif b.kind == "list":
            out.append('<ul class="unavail">' + "".join(f"<li>{html.escape(x)}</li>" for x in b.content) + "</ul>")
        elif b.kind == "table":
            t: Table = b.content
            out.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in t.header)
                       + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(_html_cell(c) for c in row) + "</tr>" for row in t.rows]
            out.append("</tbody></table>")
        elif b.kind in ("img", "gallery"):
            figures = []
            for img in b.content if b.kind == "gallery" else [b.content]:
                src = img.rel
                encoded = base64.b64encode(img.data).decode("ascii") if img.data else ""
                if encoded and len(encoded) <= budget:
                    budget -= len(encoded)
                    src = f"data:{img.mime};base64,{encoded}"
                cap = f"<figcaption>{html.escape(img.caption)}</figcaption>" if img.caption else ""
                figures.append(f'<figure><a href="{html.escape(img.rel)}"><img src="{html.escape(src)}" '
                               f'alt="{html.escape(img.alt)}"></a>{cap}</figure>')
            out.append('<div class="plots">' + "".join(figures) + "</div>" if b.kind == "gallery"
                       else figures[0])
    out.append("</main></body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------------------

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h"]


def _plot_metric(d: pd.DataFrame, agg: pd.DataFrame, metric: str, methods: list[str], levels: list[str]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ok = d[d["status"] == "ok"]
    sem = ok.groupby(["method", "deg_level"])[metric].sem()
    fig = Figure(figsize=(6.6, 4.0), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(levels))
    part = agg[agg["level"] != ALL_LEVEL].set_index(["method", "level"])
    others = [m for m in methods if m not in _BASELINES]
    for m in methods:
        y = np.array([part[metric].get((m, lv), np.nan) for lv in levels], dtype=float)
        if np.isnan(y).all():
            continue
        e = np.array([sem.get((m, lv), np.nan) for lv in levels], dtype=float)
        if m in _BASELINES:
            style = dict(color="#7f7f7f" if m == "input" else "#000000", marker="o" if m == "input" else "s",
                         linestyle="--", alpha=0.75)
        else:
            i = others.index(m)
            style = dict(color=_COLORS[i % len(_COLORS)], marker=_MARKERS[i % len(_MARKERS)], linestyle="-")
        ax.errorbar(x, y, yerr=np.nan_to_num(e), label=m, linewidth=1.8, markersize=6, capsize=3,
                    elinewidth=0.9, **style)
    counts = d.groupby("deg_level")["id"].nunique()
    ax.set_xticks(x, [f"{lv}\n(n={int(counts.get(lv, 0))})" for lv in levels])
    ax.set_xlim(-0.35, len(levels) - 0.65)
    label, higher, _ = _known()[metric]
    ax.set_xlabel("degradation level (by scale factor, mildest first)")
    ax.set_ylabel(f"{label} {_arrow(metric)}")
    ax.set_title(f"{label}: {'higher' if higher else 'lower'} is better {_arrow(metric)}", fontsize=12)
    ax.grid(True, color="#e5e5e5", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    handles, labels = ax.get_legend_handles_labels()
    right = 0.97
    if handles and (len(handles) > 5 or max(len(s) for s in labels) > 22):  # many or long names: beside
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
        extra = 0.7 + 0.065 * min(40, max(len(s) for s in labels))  # inches the legend needs
        fig.set_size_inches(6.6 + extra, 4.0)
        right = 1 - (extra + 0.1) / (6.6 + extra)
    elif handles:
        ax.legend(handles, labels, loc="best", fontsize=9, framealpha=0.9)
    fig.subplots_adjust(left=0.11, right=right, top=0.91, bottom=0.2)  # fixed: tight_layout costs a draw
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Image grids
# ----------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=8)
def _font(size: int):
    from PIL import ImageFont

    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except Exception:  # no TrueType font: PIL's bitmap font still draws ASCII
        return ImageFont.load_default()


def _text_width(font, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else len(text) * 6


def _fit(text: str, width: int, size: int, min_size: int = 9):
    """(font, text) that fits in width pixels: shrink the font, then cut the text with an ellipsis."""
    while size > min_size and _text_width(_font(size), text) > width:
        size -= 1
    font = _font(size)
    if _text_width(font, text) <= width:
        return font, text
    while len(text) > 1 and _text_width(font, text + "…") > width:
        text = text[:-1]
    return font, text + "…"


def _load_tile(uri, tile: int, storage_options, nearest_up: bool) -> tuple[np.ndarray | None, str]:
    """RGB tile x tile from an image URI, or (None, why) when it cannot be read."""
    if uri is None or (isinstance(uri, float) and math.isnan(uri)) or not str(uri):
        return None, "no image"
    try:
        rgb, _ = decode_image(read_output_image(str(uri), storage_options))
    except Exception as e:  # one unreadable image must not stop the report
        log.warning("report grid: cannot read %s: %s", uri, e)
        return None, "unreadable"
    h, w = rgb.shape[:2]
    if h != w:  # centre square, as aligned faces are
        s = min(h, w)
        rgb = rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    if rgb.shape[0] > tile:
        interp = cv2.INTER_AREA
    else:
        interp = cv2.INTER_NEAREST if nearest_up else cv2.INTER_CUBIC
    if rgb.shape[0] != tile:
        rgb = cv2.resize(rgb, (tile, tile), interpolation=interp)
    return np.ascontiguousarray(rgb), ""


def _caption(draw, tile: int, x0: int, y0: int, text: str, *, top: bool, color=(255, 255, 255)) -> None:
    size = max(9, round(tile * 0.05))
    font, text = _fit(text, tile - 8, size)
    h = size + 8
    y = y0 if top else y0 + tile - h
    draw.rectangle([x0, y, x0 + tile - 1, y + h - 1], fill=(0, 0, 0, 150))
    draw.text((x0 + 4, y + 3), text, font=font, fill=(*color, 255))


def grid_header_height(tile: int) -> int:
    return max(22, round(tile * 0.12))


def _render_grid(samples: list[dict], columns: list[tuple[str, str]], tile: int) -> np.ndarray:
    """samples: {"label", "cells": [(rgb | None, why, caption, caption_color)]}; columns: (title, kind)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    head = grid_header_height(tile)
    H, W = head + tile * len(samples), tile * len(columns)
    canvas = PILImage.new("RGBA", (W, H), (255, 255, 255, 255))
    base = ImageDraw.Draw(canvas)
    for j, (title, kind) in enumerate(columns):
        x0 = j * tile
        fill = {"lq": (234, 238, 242), "gt": (226, 242, 230)}.get(kind, (245, 247, 250))
        base.rectangle([x0, 0, x0 + tile - 1, head - 1], fill=fill)
        font, text = _fit(title, tile - 10, max(11, round(tile * 0.062)))
        tw = _text_width(font, text)
        bbox = font.getbbox(text) if hasattr(font, "getbbox") else (0, 0, 0, 10)
        base.text((x0 + (tile - tw) / 2, (head - (bbox[3] - bbox[1])) / 2 - bbox[1]), text, font=font,
                  fill=(31, 35, 40))
    overlay = PILImage.new("RGBA", (W, H), (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    for i, s in enumerate(samples):
        y0 = head + i * tile
        for j, (rgb, why, cap, cap_color) in enumerate(s["cells"]):
            x0 = j * tile
            if rgb is None:
                base.rectangle([x0, y0, x0 + tile - 1, y0 + tile - 1], fill=(60, 60, 60))
                font, text = _fit(why, tile - 16, max(11, round(tile * 0.07)))
                base.text((x0 + (tile - _text_width(font, text)) / 2, y0 + tile / 2 - font.size / 2), text,
                          font=font, fill=(235, 235, 235))
            else:
                canvas.paste(PILImage.fromarray(rgb, "RGB"), (x0, y0))
            if cap:
                _caption(draw, tile, x0, y0, cap, top=False, color=cap_color)
        _caption(draw, tile, 0, y0, s["label"], top=True)
    for j in range(1, len(columns)):  # thin white separators between tiles
        base.line([(j * tile, head), (j * tile, H)], fill=(255, 255, 255), width=1)
    for i in range(1, len(samples)):
        base.line([(0, head + i * tile), (W, head + i * tile)], fill=(255, 255, 255), width=1)
    out = PILImage.alpha_composite(canvas, overlay).convert("RGB")
    return np.asarray(out)


def _score_text(row: pd.Series, metrics: list[str]) -> str:
    parts = []
    for m in metrics:
        v = row.get(m, np.nan)
        if v is not None and not (isinstance(v, float) and math.isnan(v)):
            parts.append(f"{_known()[m][0].split(' (')[0]} {_fmt(m, v)}")
    return " · ".join(parts)


def _grid_metrics(metrics: list[str]) -> list[str]:
    """Up to two scores to print on each output: a fidelity one and a perceptual one."""
    picks = []
    for group in (("psnr_y", "psnr_rgb"), ("lpips_alex", "lpips_vgg", "ids", "deg", "ssim_y", "ssim_rgb")):
        for m in group:
            if m in metrics:
                picks.append(m)
                break
    return picks


def _build_grids(d: pd.DataFrame, ids: list[str], methods: list[str], metrics: list[str], tile: int,
                 storage_options, max_rows: int = 6) -> list[tuple[str, str, np.ndarray]]:
    """[(file name, heading, rgb)]: the samples in order, max_rows per grid, one row per sample."""
    if not ids:
        return []
    sel = d[d["id"].isin(ids)]
    by_id = {i: g.set_index("method") for i, g in sel.groupby("id", sort=True)}

    def first(g: pd.DataFrame, col: str):
        if col not in g.columns:
            return None
        vals = g[col].dropna()
        return vals.iloc[0] if len(vals) else None

    # A method whose output is the input itself (e.g. "input") would only repeat the first column.
    def repeats_input(m: str, i: str) -> bool:
        g = by_id[i]
        return m in g.index and first(g.loc[[m]], "restored") == first(g, "lq")

    shown = [m for m in methods if any(m in by_id[i].index for i in ids)
             and not all(repeats_input(m, i) for i in ids)]
    columns = [("input (lq)", "lq")] + [(m, "method") for m in shown] + [("ground truth", "gt")]
    jobs = []
    for i in ids:
        g = by_id[i]
        jobs.append((first(g, "lq"), True))
        jobs += [(first(g.loc[[m]], "restored") if m in g.index else None, False) for m in shown]
        jobs.append((first(g, "gt"), False))
    with ThreadPoolExecutor(max_workers=8) as pool:
        tiles = list(pool.map(lambda job: _load_tile(job[0], tile, storage_options, job[1]), jobs))
    score_metrics = _grid_metrics(metrics)
    samples, k = [], 0
    for i in ids:
        g = by_id[i]
        cells = [(*tiles[k], "", (255, 255, 255))]
        k += 1
        for m in shown:
            rgb, why = tiles[k]
            k += 1
            if m not in g.index:
                cells.append((None, "no row", "", (255, 255, 255)))
                continue
            row = g.loc[[m]].iloc[0]
            if str(row.get("status", "ok")) != "ok":
                msg = str(row.get("error") or "error")
                cells.append((None if rgb is None else rgb // 3, "error", f"error: {msg}", (255, 150, 150)))
            else:
                cells.append((rgb, why, _score_text(row, score_metrics), (255, 255, 255)))
        cells.append((*tiles[k], "", (255, 255, 255)))
        k += 1
        level = str(first(g, "deg_level") or "")
        scale = first(g, "deg_scale")
        label = f"{i} · {level}" + (f" · ×{float(scale):.2f}" if scale is not None else "")
        samples.append({"id": i, "level": level, "label": label, "cells": cells})
    out = []
    for n, start in enumerate(range(0, len(samples), max_rows)):
        chunk = samples[start:start + max_rows]
        levels = list(dict.fromkeys(s["level"] for s in chunk))
        heading = (f"Samples {', '.join(s['id'] for s in chunk)} (level{'s' if len(levels) > 1 else ''} "
                   f"{', '.join(levels)})")
        out.append((f"{n}.png", heading, _render_grid(chunk, columns, tile)))
    return out


# ----------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------


def write_report(df: pd.DataFrame, output: str, *, fid: Mapping | None = None, unavailable: Mapping | None = None,
                 meta: Mapping | None = None, grid_samples: int = 6, storage_options: dict | None = None,
                 tile: int = 256, references: Mapping | None = None, not_applicable: Mapping | None = None,
                 extra_metrics: Mapping | None = None) -> dict[str, str]:
    """Write report.md, report.html, aggregate.csv, plots/*.png and grids/*.png under `<output>/report/`.

    fid: {"<metric>@<reference>": {method: value or "unavailable: ..."}} (a flat {method: value} is one FID vs
    the ground truth); references: {reference name: description} ("gt" = this run's ground truth);
    not_applicable: {metric: why} (e.g. full-reference metrics of a real-world run); extra_metrics: metrics
    beyond METRICS (plug-ins) as {name: (label, higher is better, number format, protocol)}.
    Returns {path relative to report/: URI written}. Image URIs in the manifest are read with the same
    storage_options; an unreadable image becomes a grey tile saying so.
    """
    token = _EXTRA.set({str(k): tuple(v) for k, v in (extra_metrics or {}).items()})
    try:
        return _write_report(df, output, fid=fid, unavailable=unavailable, meta=meta, grid_samples=grid_samples,
                             storage_options=storage_options, tile=tile, references=references,
                             not_applicable=not_applicable)
    finally:
        _EXTRA.reset(token)


def _write_report(df, output, *, fid, unavailable, meta, grid_samples, storage_options, tile, references,
                  not_applicable) -> dict[str, str]:
    d = _prepare(df)
    agg = aggregate(d)
    methods, levels = method_order(d), level_order(d)
    unavailable = dict(unavailable or {})
    metrics = [m for m in _metrics_in(d) if m not in unavailable and m not in (not_applicable or {})
               and d[m].notna().any()]

    files: dict[str, bytes] = {}
    plots = []
    for m in metrics:
        rel = f"plots/{m}.png"
        files[rel] = _plot_metric(d, agg, m, methods, levels)
        plots.append(Image(rel, f"{_known()[m][0]} by degradation level", data=files[rel]))

    grids = []
    ids = choose_grid_samples(d, grid_samples)
    for name, heading, rgb in _build_grids(d, ids, methods, metrics, tile, storage_options):
        rel = f"grids/{name}"
        files[rel] = encode_png(rgb)
        ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 85])
        preview = jpg.tobytes() if ok else files[rel]
        grids.append((Image(rel, heading, caption=f"full size: {rel}",
                            data=preview, mime="image/jpeg" if ok else "image/png"), heading))

    title, blocks = _build(d, agg, fid=fid or {}, unavailable=unavailable, meta=meta or {}, plots=plots,
                           grids=grids, references=references, not_applicable=not_applicable)
    files["report.md"] = render_markdown(title, blocks).encode("utf-8")
    files["report.html"] = render_html(title, blocks).encode("utf-8")
    files["aggregate.csv"] = agg.to_csv(index=False, float_format="%.6g").encode("utf-8")

    fs, base = get_fs(output, storage_options)
    root = join_under(base, "report")
    written = {}
    for rel in sorted(files):
        write_bytes(fs, join_under(root, rel), files[rel])
        written[rel] = join_under(join_under(output, "report"), rel)
    return written
