"""Benchmark stages: seeded synthetic degradation (CPU tasks), then methods + metrics (GPU actors).

A sample enters as its HQ face (the ground truth, at `image.gt_size`) and leaves as one row per method
with that method's metrics, its restored pixels and, when FID is on, its Inception features (one column per
FID network, `features:<metric>`). In real-world mode a sample enters as the degraded face itself (no ground
truth): `AsObserved` replaces the degradation, full-reference metrics are not applicable, identity compares
output with input, and FIDs are against reference statistics (metrics.fid_reference).

Dynamic methods ({name, dynamic: true, enhancer, diffuse}): `parse_methods_with_dynamic` and
`DynamicBenchmarkStage`, which runs tasks/dynamic_stage.py's sampler next to the DR2/input methods.
"""

from __future__ import annotations

import io
import logging
import posixpath
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.dr2 import DR2Params
from models.dynamic import DynParams
from models.enhancers import BUILTIN, enhance
from models.noise import sample_seed
from tasks.config import opt
from tasks.degradation import degrade, draw_degradation
from tasks.dr2_stage import DR2Config, DR2Stage
from tasks.dynamic_stage import (
    DIFFUSE_MODES,
    DYNAMIC_COLUMNS,
    DynamicConfig,
    DynamicStage,
    empty_info,
    info_arrays,
    resolve_diffuse,
)
from tasks.faults import TRANSIENT, TransientError
from tasks.images import resize_to
from tasks.manifest import ManifestWriter, manifest_prefix, shard_name
from tasks.metrics import (
    FID_DIM,
    FID_METRICS,
    METRIC_NAMES,
    FIDReference,
    FIDStats,
    MetricSuite,
    check_metric_names,
    fid_against_reference,
    fid_from_stats,
    load_fid_reference,
)
from tasks.restore_stage import Enhancer, EnhancerConfig, build_enhancer
from tasks.runtime import RuntimeConfig, to_uint8
from tasks.stage import PIXELS, Contract, Declared
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
                            "fid_tf_inception"], "metrics to compute (tasks.metrics.METRIC_NAMES); one whose weights "
                                                 "are absent is reported unavailable")
    weights: dict = opt({}, "weights per network: {lpips_alex, lpips_vgg: torchvision backbone state_dicts, "
                            "identity: ArcFace iresnet50 backbone.pth, fid_tf_inception: pytorch-fid's "
                            "pt_inception-2015-12-05-6726825d.pth, fid_tv_inception: torchvision Inception-v3}; "
                            "unset = torch hub cache")
    sha256: dict = opt({}, "optional sha256 pins per weights key")
    plugins: dict = opt({}, "plug-in metrics {name: {class: pkg.module:Class, weights: path/URI, kwargs: {}}}: "
                            "kind 'no_reference' (e.g. tasks.iqa_plugins:PyIQAMetric with kwargs {metric: musiq}) "
                            "or 'landmarks' (an LMD with another landmark detector); add the name to metrics.names")
    fid_reference: dict = opt({}, "named FID reference statistics {name: .npz path/URI with mu, sigma} (pytorch-fid "
                                  "/ clean-fid layout, or workflows/fid_stats.py); each FID metric of the file's "
                                  "protocol is also computed against each, e.g. {ffhq: s3://stats/ffhq512.npz}")


def load_references(metrics: MetricsConfig, storage_options: dict | None = None) -> dict[str, FIDReference]:
    """The configured reference statistics, read and checked (on the driver, before anything runs)."""
    check_metric_names(metrics.names, metrics.plugins)
    refs = {}
    for name, uri in (metrics.fid_reference or {}).items():
        if str(name) == "gt":
            raise ValueError("metrics.fid_reference: the name 'gt' is reserved for the run's ground truth")
        refs[str(name)] = load_fid_reference(str(name), str(uri), storage_options)
    return refs


def plugin_report_info(metrics: MetricsConfig) -> dict[str, tuple[str, bool, str, str]]:
    """{plug-in metric: (label, higher is better, format, protocol)} for the report, from the plug-in classes'
    attributes (`higher_better`, default True; `protocol`), without building them."""
    from tasks.plugins import import_plugin

    out = {}
    for name, spec in (metrics.plugins or {}).items():
        if name not in metrics.names:
            continue
        cls = import_plugin(str(spec["class"]), f"metrics.plugins.{name}.class", "a plug-in metric class")
        lmd = getattr(cls, "kind", "") == "landmarks"
        protocol = str(getattr(cls, "protocol", "") or f"plug-in {spec['class']}")
        out[name] = (name, False if lmd else bool(getattr(cls, "higher_better", True)), "{:.4f}",
                     f"landmark distance (px), {protocol}" if lmd else protocol)
    return out


def feature_column(metric: str, source: str = "restored") -> str:
    """The batch column of one FID network's features: `features:<metric>` / `gt_features:<metric>`."""
    return f"{'gt_' if source == 'gt' else ''}features:{metric}"


DEG_TYPES = {"deg_kernel": pa.string(), "deg_kernel_size": pa.int64(), "deg_jpeg_quality": pa.int64(),
             "deg_level": pa.string()}  # the others are float64
DEGRADED = (("lq_pixels", PIXELS), *((c, DEG_TYPES.get(c, pa.float64())) for c in DEG_COLUMNS))


class AsObserved(Declared):
    """Real-world mode's stand-in for `Degrade`: the input face is the method input; there is no ground truth.

    Sets `lq_pixels` to the image and `deg_level` to "real-world" (the report's only level); other degradation
    columns stay empty.
    """

    READS = ("id", "image")
    ADDS = DEGRADED

    LEVEL = "real-world"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(batch, lq_pixels=batch["image"], deg_level=np.array([self.LEVEL] * len(batch["id"]), dtype=object))


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


class Degrade(Declared):
    """CPU batch function: GT -> LQ with per-sample parameters drawn from (job seed, id)."""

    READS = ("id", "status", "image")
    ADDS = DEGRADED

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


class BenchmarkStage(Declared):
    """GPU actor: every method on the batch (DR2 once per distinct (N, tau)), then batched metrics.

    Returns one row per (sample, method): the sample's columns, `method`, `restored` pixels at the GT size,
    the metric columns, and per FID network `features:<metric>` (pool3) (plus `gt_features:<metric>` on the
    first method's rows). real_world: the batch's image is the degraded input, there is no ground truth.
    """

    @classmethod
    def contract(cls, methods: list[dict], metrics: MetricsConfig, **kwargs) -> Contract:
        scores = [m for m in metrics.names
                  if m not in FID_METRICS and (m in METRIC_NAMES or m in (metrics.plugins or {}))]
        return Contract(("id", "status", "stem", "image", "lq_pixels"), (
            ("method", pa.string()), ("restored", PIXELS), ("N", pa.int64()), ("tau", pa.int64()),
            ("omega", pa.int64()), ("seed", pa.int64()), ("weights", pa.string()),
            *((m, pa.float64()) for m in scores)))

    def __init__(self, methods: list[dict], dr2: DR2Config, enhancer: EnhancerConfig, metrics: MetricsConfig,
                 runtime: RuntimeConfig, seed: int, model_size: int = 256, storage_options: dict | None = None,
                 device: torch.device | None = None, real_world: bool = False):
        self.methods = parse_methods(methods)
        self.real_world = bool(real_world)
        self.model_size, self.seed = model_size, int(seed)
        self.dr2 = DR2Stage(dr2, runtime, seed, storage_options) if any("N" in m for m in self.methods) else None
        # without DR2 methods, a subclass's sampler device (or the CPU) hosts the enhancers and the metrics
        self.device = self.dr2.device if self.dr2 else (device or torch.device("cpu"))
        self.enhancers: dict[str, Enhancer] = {}
        self._add_enhancers({m["enhancer"] for m in self.methods if "N" in m}, enhancer, storage_options)
        self.suite = MetricSuite(metrics.names, self.device, metrics.weights, storage_options, sha256=metrics.sha256,
                                 fid_sources=("restored",) if self.real_world else ("restored", "gt"),
                                 plugins=metrics.plugins)
        self.metric_names = [n for n in self.suite.names if n not in FID_METRICS]

    def _add_enhancers(self, names: set[str], enhancer: EnhancerConfig, storage_options: dict | None) -> None:
        for name in names - set(self.enhancers):
            cfg = enhancer if name == enhancer.name else EnhancerConfig(name=name, size=enhancer.size)
            self.enhancers[name] = build_enhancer(cfg, self.device, storage_options)

    def _finish(self, x0: torch.Tensor, enhancer_name: str, gt_size: int) -> np.ndarray:
        """A method's output as uint8 at the GT size: its enhancer, then bicubic if it ends elsewhere."""
        chosen = self.enhancers[enhancer_name]
        with torch.inference_mode():
            y = enhance(chosen.network, x0, chosen.hand_over or gt_size)
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
                x0s[key] = self.dr2.dr2_x0(small, ids, [DR2Params.of(*key)] * len(ok))
            outs[m["name"]] = self._finish(x0s[key], m["enhancer"], gt_size)
        return outs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, size = len(batch["id"]), batch["image"].shape[1]
        ok = np.flatnonzero(batch["status"] == "ok")
        pos = {k: j for j, k in enumerate(ok)}
        outs = self._method_outputs(batch, ok) if len(ok) else {}
        gt = None if self.real_world else batch["image"][ok]
        lq = batch["lq_pixels"][ok]
        carry = [c for c in batch if c not in ("image", "lq_pixels")]
        extra = ["method", "N", "tau", "omega", "seed", "weights"]
        cols: dict[str, list] = {c: [] for c in carry + extra + self.metric_names}
        restored, has_gt = [], []
        nets = list(self.suite.fid)
        feats = {feature_column(m, s): [] for m in nets for s in ("restored", "gt")}
        zero_img, zero_feat = np.zeros((size, size, 3), np.uint8), np.zeros(FID_DIM, np.float32)
        for m in self.methods:
            res = self.suite(outs[m["name"]], gt, input=lq) if len(ok) else None
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
                cols["weights"].append(f"{self.dr2.weights}+{self.enhancers[m['enhancer']].weights}" if dr2 else "none")
                restored.append(outs[m["name"]][j] if j is not None else zero_img)
                for name in self.metric_names:
                    v = res.values.get(name) if res is not None else None
                    cols[name].append(float(v[j]) if v is not None and j is not None else np.nan)
                first = m is self.methods[0] and j is not None and not self.real_world  # GT features once per sample
                if nets:
                    has_gt.append(bool(first))
                for net in nets:
                    f = res.fid_features.get(net, {}) if res is not None and j is not None else {}
                    feats[feature_column(net)].append(f["restored"][j].astype(np.float32) if f else zero_feat)
                    feats[feature_column(net, "gt")].append(f["gt"][j].astype(np.float32) if first else zero_feat)
        out = {c: np.array(v, dtype=object) if v and isinstance(v[0], str) else np.array(v) for c, v in cols.items()}
        out["restored"] = np.stack(restored)
        out["stem"] = np.array([f"{mth}/{s}" for mth, s in zip(cols["method"], cols["stem"])], dtype=object)
        if nets:
            out.update({c: np.stack(v) for c, v in feats.items()}, has_gt_features=np.array(has_gt))
        return out


def _is_feature_column(name: str) -> bool:
    return name.startswith(("features:", "gt_features:")) or name == "has_gt_features"


class BenchmarkManifestWriter(ManifestWriter):
    """Writes the batch's Inception features to <output>/fid/<shard> first, then the manifest shard (the
    commit marker), so FID statistics exist exactly for committed samples and merge exactly at the end.
    Feature rows: (id, source = method or "gt", metric = the FID network's metric name, features)."""

    def __call__(self, batch: dict, name: str | None = None) -> dict:
        nets = [c.split(":", 1)[1] for c in batch if c.startswith("features:")]
        if nets:
            ids = [str(i) for i in batch["id"]]
            gt = np.asarray(batch["has_gt_features"], dtype=bool)
            gt_ids = [i for i, g in zip(ids, gt) if g]
            methods = [str(m) for m in batch["method"]]
            rows_id, rows_src, rows_metric, blocks = [], [], [], []
            for net in nets:
                rows_id += ids + gt_ids
                rows_src += methods + ["gt"] * len(gt_ids)
                rows_metric += [net] * (len(ids) + len(gt_ids))
                blocks += [batch[feature_column(net)], batch[feature_column(net, "gt")][gt]]
            table = pa.table({
                "id": rows_id, "source": rows_src, "metric": rows_metric,
                "features": pa.FixedSizeListArray.from_arrays(pa.array(
                    np.concatenate(blocks).astype(np.float32).reshape(-1)), FID_DIM),
            })
            buf = io.BytesIO()
            pq.write_table(table, buf)
            uri = join_under(join_under(self.output, FID_DIR), name or shard_name(ids))  # the manifest shard's name
            fs, path = get_fs(uri, self.storage_options)
            try:
                write_bytes(fs, path, buf.getvalue(), self.retry)
            except TransientError as e:  # features missing: none of these rows may be committed
                batch = dict(batch, status=np.full(len(ids), TRANSIENT, dtype=object),
                             error_kind=np.full(len(ids), e.kind, dtype=object))
        return super().__call__({k: v for k, v in batch.items() if not _is_feature_column(k)}, name)


def fid_scores(output: str, storage_options: dict | None = None,
               references: dict[str, FIDReference] | None = None) -> dict[str, dict[str, float | str]]:
    """FIDs from the feature shards of committed manifest shards: {"<metric>@<reference>": {method: value}}.

    reference "gt": against this run's ground-truth images (when the run has them); any other: the named
    reference statistics of the same protocol. A value is a float or "unavailable: <reason>".
    """
    fs, root = get_fs(join_under(output, FID_DIR), storage_options)
    _, committed = get_fs(manifest_prefix(output), storage_options)
    stats: dict[tuple[str, str], FIDStats] = {}
    try:
        paths = sorted(fs.find(root))
    except FileNotFoundError:
        paths = []
    for p in paths:
        name = posixpath.relpath(p, root)
        if not fs.exists(f"{committed}/{name}"):
            continue  # features of a shard that never committed
        with fs.open(p, "rb") as f:
            t = pq.read_table(f)
        feats = np.asarray(t.column("features").combine_chunks().flatten()).reshape(-1, FID_DIM).astype(np.float64)
        src = np.asarray(t.column("source").to_pylist(), dtype=object)
        # shards written before FID metrics were named hold torchvision-Inception features only
        metric = (np.asarray(t.column("metric").to_pylist(), dtype=object) if "metric" in t.column_names
                  else np.full(len(src), "fid_tv_inception", dtype=object))
        for key in set(zip(metric, src)):
            stats.setdefault(key, FIDStats(FID_DIM)).update(feats[(metric == key[0]) & (src == key[1])])
    out: dict[str, dict[str, float | str]] = {}
    for (metric, method), st in sorted(stats.items()):
        if method == "gt":
            continue
        gt = stats.get((metric, "gt"))
        if gt is not None:
            out.setdefault(f"{metric}@gt", {})[method] = (
                fid_from_stats(st, gt) if min(st.count, gt.count) >= 2 else "unavailable: fewer than 2 images")
        for ref in (references or {}).values():
            if ref.protocol == metric:
                out.setdefault(f"{metric}@{ref.name}", {})[method] = (
                    fid_against_reference(st, ref) if st.count >= 2 else "unavailable: fewer than 2 images")
    return out


# ---------------------------------------------------------------------------------------------------------
# Benchmark methods {name, dynamic: true, enhancer}
# ---------------------------------------------------------------------------------------------------------
def is_dynamic(method: dict) -> bool:
    return bool(method.get("dynamic", False))


def parse_methods_with_dynamic(methods: list[dict]) -> list[dict]:
    """parse_methods for the DR2/input methods, plus dynamic methods {name, dynamic: true, enhancer?, diffuse?};
    order kept. diffuse overrides dynamic.diffuse for that method (e.g. dyn and dyn_raw side by side)."""
    plain = parse_methods([m for m in methods if not is_dynamic(m)])
    it = iter(plain)
    out, seen = [], {m["name"] for m in plain}
    for m in methods:
        if not is_dynamic(m):
            out.append(next(it))
            continue
        m = dict(m)
        unknown = set(m) - {"name", "dynamic", "enhancer", "diffuse"}
        if unknown or "name" not in m or m["dynamic"] is not True:
            raise ValueError(f"a dynamic method is {{name, dynamic: true, enhancer, diffuse}}, got {m}")
        if m["name"] in seen:
            raise ValueError(f"duplicate method name {m['name']!r}")
        if m.get("diffuse", "auto") not in DIFFUSE_MODES:
            raise ValueError(f"method {m['name']!r}: diffuse must be one of {', '.join(DIFFUSE_MODES)}, "
                             f"got {m['diffuse']!r}")
        seen.add(m["name"])
        m.setdefault("enhancer", "none")
        out.append(m)
    return out


def has_dynamic(methods: list[dict]) -> bool:
    return any(is_dynamic(m) for m in methods)


def check_dynamic_methods(methods: list[dict], dynamic: DynamicConfig, dr2: DR2Config | None) -> None:
    """On the driver: every dynamic method's diffuse resolves (ValueError naming the option otherwise)."""
    for m in parse_methods_with_dynamic(methods):
        if is_dynamic(m):
            resolve_diffuse(dynamic, dr2, m.get("diffuse"))


class DynamicBenchmarkStage(BenchmarkStage):
    """BenchmarkStage plus dynamic methods: the dynamic sampler runs once per batch and distinct diffuse
    value (shared by the dynamic methods that differ only in their enhancer); their rows carry omega = the
    respaced start, the networks' weights and the per-sample dynamic annotations (mapper, blur levels)."""

    @classmethod
    def contract(cls, **kwargs) -> Contract:
        base = BenchmarkStage.contract(**kwargs)
        return Contract(base.reads, (*base.adds, *DYNAMIC_COLUMNS[1:]))

    def __init__(self, methods: list[dict], dynamic: DynamicConfig, dr2, enhancer: EnhancerConfig,
                 metrics: MetricsConfig, runtime: RuntimeConfig, seed: int, model_size: int = 256,
                 storage_options: dict | None = None, real_world: bool = False):
        methods = parse_methods_with_dynamic(methods)
        dynamic_methods = [m for m in methods if is_dynamic(m)]
        self.dynamic_stage = DynamicStage(dynamic, None, runtime, seed, storage_options, dr2=dr2,
                                          diffuse_modes=[self._diffuse(m, dynamic) for m in dynamic_methods])
        super().__init__([m for m in methods if not is_dynamic(m)], dr2, enhancer, metrics, runtime, seed,
                         model_size, storage_options, device=self.dynamic_stage.device, real_world=real_world)
        self.methods = methods
        self._add_enhancers({m["enhancer"] for m in dynamic_methods}, enhancer, storage_options)
        self._results: dict[str, tuple[list[DynParams], list[dict]]] = {}

    @staticmethod
    def _diffuse(method: dict, dynamic: DynamicConfig) -> str:
        return method.get("diffuse", dynamic.diffuse)

    def _mode(self, method: dict) -> str:
        """The resolved mapper of a dynamic method (auto and its value share one chain)."""
        return self.dynamic_stage.modes[self._diffuse(method, self.dynamic_stage.cfg)]

    def _method_outputs(self, batch, ok) -> dict[str, np.ndarray]:
        outs = super()._method_outputs(batch, ok)  # dynamic methods come back as the LQ (no N): replaced here
        gt_size = batch["image"].shape[1]
        ids = [str(batch["id"][k]) for k in ok]
        sampled: dict[str, torch.Tensor] = {}
        for m in self.methods:
            if not is_dynamic(m):
                continue
            mode = self._mode(m)
            if mode not in sampled:
                x0, params, info = self.dynamic_stage.restore_float(batch["lq_pixels"][ok], ids,
                                                                    self._diffuse(m, self.dynamic_stage.cfg))
                sampled[mode] = x0
                self._results[mode] = (params, info)
            outs[m["name"]] = self._finish(sampled[mode], m["enhancer"], gt_size)
        return outs

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._results = {}
        out = super().__call__(batch)
        n = len(batch["id"])
        ok = np.flatnonzero(batch["status"] == "ok")
        cols = empty_info(n * len(self.methods))
        for j, m in enumerate(self.methods):
            if not is_dynamic(m):
                continue
            rows = slice(j * n, (j + 1) * n)
            out["weights"][rows] = f"{self.dynamic_stage.weights}+{self.enhancers[m['enhancer']].weights}"
            params, info = self._results.get(self._mode(m), ([], []))
            for p, row, k in zip(params, info, ok):
                out["omega"][j * n + k] = p.start
                for c in cols:
                    cols[c][j * n + k] = row[c]
        out.update(info_arrays(cols))
        return out
