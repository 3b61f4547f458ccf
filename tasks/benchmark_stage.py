"""Benchmark stages: seeded synthetic degradation (CPU tasks), then methods + metrics (GPU actors).

A sample enters as its HQ face (the ground truth, at `image.size`) and leaves as one row per method
with that method's metrics, its restored pixels and, when FID is on, its Inception features.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.dr2 import DR2Params
from models.enhancers import BUILTIN, enhance
from models.noise import sample_seed
from tasks.config import opt
from tasks.degradation import degrade, draw_degradation
from tasks.dr2_stage import DR2Config, DR2Stage, RuntimeConfig, to_uint8
from tasks.faults import TRANSIENT, TransientError
from tasks.images import resize_to
from tasks.manifest import ManifestWriter, manifest_prefix, shard_name
from tasks.metrics import FIDStats, MetricSuite, fid_from_stats
from tasks.restore_stage import EnhancerConfig, build_enhancer
from tasks.storage import get_fs, join_under, write_bytes

log = logging.getLogger(__name__)

FID_DIR = "fid"
DEG_COLUMNS = ("deg_kernel", "deg_kernel_size", "deg_sigma_x", "deg_sigma_y", "deg_theta", "deg_scale",
               "deg_noise", "deg_jpeg_quality", "deg_severity", "deg_level")


@dataclass(frozen=True)
class DegradationConfig:
    preset: str = opt("gfpgan", "degradation preset: gfpgan | difface-celeba-test | codeformer-heavy "
                                "(ranges in tasks/degradation.py), ignored when custom is set")
    custom: dict = opt({}, "custom ranges, e.g. {base: gfpgan, scale: '4:8'} or {sigma_x: [2, 4], scale: 4}")


@dataclass(frozen=True)
class MetricsConfig:
    names: list[str] = opt(["psnr_rgb", "psnr_y", "ssim_rgb", "ssim_y", "lpips_alex", "lpips_vgg", "ids", "deg",
                            "fid"], "metrics to compute; one whose weights are absent is reported unavailable")
    weights: dict = opt({}, "weights per network: {lpips_alex, lpips_vgg: torchvision backbone state_dicts, "
                            "identity: ArcFace iresnet50 backbone.pth, fid: Inception-v3}; unset = torch hub cache")
    sha256: dict = opt({}, "optional sha256 pins per weights key")


def parse_methods(methods: list[dict]) -> list[dict]:
    """Validate method specs: {name, N?, tau?, enhancer?}; 'input' (no N) is the degraded input itself."""
    out, seen = [], set()
    for m in methods:
        m = dict(m)
        unknown = set(m) - {"name", "N", "tau", "enhancer"}
        if unknown or "name" not in m:
            raise ValueError(f"a method is {{name, N, tau, enhancer}}, got {m}")
        if m["name"] in seen:
            raise ValueError(f"duplicate method name {m['name']!r}")
        seen.add(m["name"])
        if ("N" in m) != ("tau" in m):
            raise ValueError(f"method {m['name']!r}: give both N and tau, or neither")
        if "N" in m:
            DR2Params.of(int(m["N"]), int(m["tau"]))
        m.setdefault("enhancer", "none")
        out.append(m)
    return out


class Degrade:
    """CPU batch function: GT -> LQ with per-sample parameters drawn from (job seed, id)."""

    def __init__(self, degradation: DegradationConfig, job_seed: int):
        self.preset = degradation.custom or degradation.preset
        self.job_seed = int(job_seed)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["id"])
        lq = np.zeros_like(batch["image"])
        rows = []
        for k in range(n):
            p = draw_degradation(self.preset, self.job_seed, str(batch["id"][k]))
            rows.append(p.to_row())
            if batch["status"][k] == "ok":
                lq[k] = degrade(batch["image"][k], p, self.job_seed, str(batch["id"][k]))
        out = dict(batch, lq_pixels=lq)
        for c in DEG_COLUMNS:
            out[c] = np.array([r[c] for r in rows], dtype=object if c in ("deg_kernel", "deg_level",
                                                                           "deg_jpeg_quality") else None)
        return out


class BenchmarkStage:
    """GPU actor: every method on the batch (DR2 once per distinct (N, tau)), then batched metrics.

    Returns one row per (sample, method): the sample's columns, `method`, `restored` pixels at the GT size,
    the metric columns, and `features` (Inception pool3) when FID is on (plus `gt_features` on 'input' rows).
    """

    def __init__(self, methods: list[dict], dr2: DR2Config, enhancer: EnhancerConfig, metrics: MetricsConfig,
                 runtime: RuntimeConfig, seed: int, model_size: int = 256, storage_options: dict | None = None,
                 device: torch.device | None = None):
        self.methods = parse_methods(methods)
        self.model_size, self.seed = model_size, int(seed)
        self.dr2 = DR2Stage(dr2, runtime, seed, storage_options) if any("N" in m for m in self.methods) else None
        # without DR2 methods, a subclass's sampler device (or the CPU) hosts the enhancers and the metrics
        self.device = self.dr2.device if self.dr2 else (device or torch.device("cpu"))
        self.enhancers = {}
        self._add_enhancers({m["enhancer"] for m in self.methods if "N" in m}, enhancer, storage_options)
        self.suite = MetricSuite(metrics.names, self.device, metrics.weights, storage_options, sha256=metrics.sha256)
        self.metric_names = [n for n in self.suite.names if n != "fid"]

    def _add_enhancers(self, names: set[str], enhancer: EnhancerConfig, storage_options: dict | None) -> None:
        for name in names - set(self.enhancers):
            cfg = enhancer if name == enhancer.name else EnhancerConfig(name=name, size=enhancer.size)
            self.enhancers[name] = build_enhancer(cfg, self.device, storage_options)

    def _finish(self, x0: torch.Tensor, enhancer_name: str, gt_size: int) -> np.ndarray:
        """A method's output as uint8 at the GT size: its enhancer, then bicubic if it ends elsewhere."""
        model, hand, _ = self.enhancers[enhancer_name]
        with torch.inference_mode():
            y = enhance(model, x0, hand or gt_size)
            if y.shape[-1] != gt_size:  # compare at the GT size
                y = enhance(BUILTIN["bicubic"](), y, gt_size)
        return to_uint8(y)

    def _method_outputs(self, batch, ok) -> dict[str, np.ndarray]:
        gt_size = batch["image"].shape[1]
        lq = batch["lq_pixels"][ok]
        outs: dict[str, np.ndarray] = {}
        x0s: dict[tuple[int, int], torch.Tensor] = {}
        ids = [str(batch["id"][k]) for k in ok]
        for m in self.methods:
            if "N" not in m:
                outs[m["name"]] = lq
                continue
            key = (int(m["N"]), int(m["tau"]))
            if key not in x0s:
                small = np.stack([resize_to(im, self.model_size) for im in lq])  # the reference's PIL bicubic
                x0s[key] = self.dr2.restore_float(small, ids, [DR2Params.of(*key)] * len(ok))
            outs[m["name"]] = self._finish(x0s[key], m["enhancer"], gt_size)
        return outs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, size = len(batch["id"]), batch["image"].shape[1]
        ok = np.flatnonzero(batch["status"] == "ok")
        pos = {k: j for j, k in enumerate(ok)}
        outs = self._method_outputs(batch, ok) if len(ok) else {}
        gt = batch["image"][ok]
        carry = [c for c in batch if c not in ("image", "lq_pixels")]
        extra = ["method", "N", "tau", "omega", "seed", "weights"]
        cols: dict[str, list] = {c: [] for c in carry + extra + self.metric_names}
        restored, feats, gt_feats, has_gt = [], [], [], []
        fid = self.suite.inception is not None
        zero_img, zero_feat = np.zeros((size, size, 3), np.uint8), np.zeros(2048, np.float32)
        for m in self.methods:
            res = self.suite(outs[m["name"]], gt) if len(ok) else None
            for k in range(n):
                j = pos.get(k)
                for c in carry:
                    cols[c].append(batch[c][k])
                cols["method"].append(m["name"])
                dr2 = DR2Params.of(int(m["N"]), int(m["tau"])) if "N" in m else None
                cols["N"].append(dr2.N if dr2 else -1)
                cols["tau"].append(dr2.tau if dr2 else -1)
                cols["omega"].append(dr2.omega if dr2 else -1)
                cols["seed"].append(sample_seed(self.seed, str(batch["id"][k])))
                cols["weights"].append(f"{self.dr2.weights}+{self.enhancers[m['enhancer']][2]}" if dr2 else "none")
                restored.append(outs[m["name"]][j] if j is not None else zero_img)
                for name in self.metric_names:
                    v = res.values.get(name) if res is not None else None
                    cols[name].append(float(v[j]) if v is not None and j is not None else np.nan)
                if fid:
                    f = res.fid_features if res is not None and j is not None else {}
                    feats.append(f["restored"][j].astype(np.float32) if "restored" in f else zero_feat)
                    first = m is self.methods[0] and "gt" in f  # GT features once per sample
                    gt_feats.append(f["gt"][j].astype(np.float32) if first else zero_feat)
                    has_gt.append(bool(first))
        out = {c: np.array(v, dtype=object) if v and isinstance(v[0], str) else np.array(v) for c, v in cols.items()}
        out["restored"] = np.stack(restored)
        out["stem"] = np.array([f"{mth}/{s}" for mth, s in zip(cols["method"], cols["stem"])], dtype=object)
        if fid:
            out.update(features=np.stack(feats), gt_features=np.stack(gt_feats), has_gt_features=np.array(has_gt))
        return out


FEATURE_COLUMNS = ("features", "gt_features", "has_gt_features")


class BenchmarkManifestWriter(ManifestWriter):
    """Writes the batch's Inception features to <output>/fid/<shard> first, then the manifest shard (the
    commit marker), so FID statistics exist exactly for committed samples and merge exactly at the end."""

    def __call__(self, batch: dict) -> dict:
        if "features" in batch:
            ids = [str(i) for i in batch["id"]]
            gt = np.asarray(batch["has_gt_features"], dtype=bool)
            table = pa.table({
                "id": ids + [i for i, g in zip(ids, gt) if g],
                "source": [str(m) for m in batch["method"]] + ["gt"] * int(gt.sum()),
                "features": pa.FixedSizeListArray.from_arrays(pa.array(np.concatenate(
                    [batch["features"], batch["gt_features"][gt]]).reshape(-1)), 2048),
            })
            buf = io.BytesIO()
            pq.write_table(table, buf)
            uri = join_under(join_under(self.output, FID_DIR), shard_name(ids))
            fs, path = get_fs(uri, self.storage_options)
            try:
                write_bytes(fs, path, buf.getvalue(), self.retry)
            except TransientError as e:  # features missing: none of these rows may be committed
                batch = dict(batch, status=np.full(len(ids), TRANSIENT, dtype=object),
                             error_kind=np.full(len(ids), e.kind, dtype=object))
        return super().__call__({k: v for k, v in batch.items() if k not in FEATURE_COLUMNS})


def fid_scores(output: str, storage_options: dict | None = None) -> dict[str, float | str]:
    """FID of each method against the GT, from the feature shards of committed manifest shards."""
    fs, root = get_fs(join_under(output, FID_DIR), storage_options)
    _, committed = get_fs(manifest_prefix(output), storage_options)
    stats: dict[str, FIDStats] = {}
    try:
        paths = sorted(fs.find(root))
    except FileNotFoundError:
        paths = []
    for p in paths:
        name = p.rsplit("/", 1)[-1]
        if not fs.exists(f"{committed}/{name}"):
            continue  # features of a shard that never committed
        with fs.open(p, "rb") as f:
            t = pq.read_table(f)
        feats = np.asarray(t.column("features").combine_chunks().flatten()).reshape(-1, 2048).astype(np.float64)
        src = np.asarray(t.column("source").to_pylist(), dtype=object)
        for s in set(src):
            stats.setdefault(s, FIDStats()).update(feats[src == s])
    if "gt" not in stats:
        return {}
    out: dict[str, float | str] = {}
    for method, st in stats.items():
        if method != "gt":
            out[method] = (fid_from_stats(st, stats["gt"]) if min(st.count, stats["gt"].count) >= 2
                           else "unavailable: fewer than 2 images")
    return out
