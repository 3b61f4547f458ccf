"""Benchmark restoration at scale: seeded synthetic degradation -> methods -> metrics -> manifest + report.

    python workflows/benchmark.py --input s3://celeba-hq/512/ --output s3://bench/run1/ \\
        --dr2.weights s3://models/DR2_FFHQ.pkl --enhancer.weights s3://models/SPARNetHD_FFHQ_DR2aug.pth \\
        --degradation.preset difface-celeba-test

Real-world sets (no ground truth: WIDER-Test, WebPhoto-Test, an archive), scored with no-reference metrics,
FID against reference statistics (workflows/fid_stats.py) and identity between input and output:

    python workflows/benchmark.py --mode real-world --input s3://wider-test/ --output s3://bench/wider/ \\
        --metrics.names '[niqe, ids, deg, fid_tf_inception]' --metrics.fid-reference '{ffhq: s3://stats/ffhq512.npz}'

Stages: list -> read+decode (CPU) -> degrade + write gt/lq (CPU) -> every method + metrics (GPU actors)
-> write restored images (CPU) -> Inception features + manifest shard (CPU). The manifest has one row
per (sample, method); at the end FID is computed from the committed feature shards, and a report
(Markdown + HTML, tables, plots, image grids) is written under <output>/report/.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, fields
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from tasks.benchmark_stage import (
    AsObserved,
    BenchmarkManifestWriter,
    BenchmarkStage,
    DegradationConfig,
    Degrade,
    DynamicBenchmarkStage,
    MetricsConfig,
    check_dynamic_methods,
    fid_scores,
    has_dynamic,
    load_references,
    plugin_report_info,
)
from tasks.config import opt
from tasks.dr2_stage import DR2Config, check_dr2_params, dr2_random_label, missing_dr2_weights
from tasks.dynamic_stage import DynamicConfig
from tasks.faults import RetryConfig
from tasks.load_stage import ImageConfig, LoadFaces
from tasks.manifest import read_manifest
from tasks.metrics import FID_METRICS, FULL_REFERENCE, NO_GT
from tasks.pipeline import (
    Chain,
    ClusterConfig,
    DriverRefusal,
    ResumeConfig,
    Summary,
    actor_pool,
    code_version,
    config_hash,
    finish,
    load_config,
    process,
    refuse_on_driver,
    warn_random,
)
from tasks.report import write_report
from tasks.restore_stage import EnhancerConfig
from tasks.runtime import RuntimeConfig
from tasks.weights import check_weights
from tasks.write_stage import WriteConfig, WriteImages

log = logging.getLogger("benchmark")

MODES = ("synthetic", "real-world")


@dataclass(frozen=True)
class BenchmarkImageConfig(ImageConfig):
    """image.size is the model's input size, as in augment and restore; the ground truth has a name of its own."""

    size: int = opt(256, "model input size: the degraded face is resized to size x size with PIL bicubic for DR2 "
                         "(as DR2); the ground truth is read at image.gt_size")
    gt_size: int = opt(512, "ground-truth size: input faces are read and resized to gt_size x gt_size (PIL bicubic); "
                            "degradation, restored outputs, metrics and the report are at this size (mode real-world: "
                            "the degraded input is read at it)")

    def read_at_gt_size(self) -> ImageConfig:
        """The load stage's settings: faces are read at the ground-truth size."""
        return ImageConfig(**{f.name: getattr(self, f.name) for f in fields(ImageConfig)} | {"size": self.gt_size})


@dataclass(frozen=True)
class BenchmarkConfig:
    input: str = opt("data/samples", "aligned faces: the ground truth (mode synthetic) or the degraded faces to "
                                     "restore (mode real-world); folder/prefix, glob, URI list, WebDataset .tar "
                                     "shards or Parquet files of image bytes")
    mode: str = opt("synthetic", "synthetic: input = ground truth, degraded here with degradation.*; real-world: input "
                                 "= degraded faces without ground truth (no degradation; full-reference metrics not "
                                 "applicable; identity vs input; FID vs metrics.fid_reference)")
    output: str = opt("out/benchmark", "output prefix: gt/, lq/, restored/<method>/, fid/, manifest/, report/")
    seed: int = opt(0, "job seed: degradations and DR2 noise depend only on (seed, sample id)")
    storage_options: dict = opt({}, "fsspec options (e.g. {endpoint_url: ...}); credentials from the environment")
    methods: list[dict] = opt([{"name": "input"}, {"name": "dr2", "N": 4, "tau": 22, "enhancer": "none"},
                               {"name": "dr2+sparnethd", "N": 4, "tau": 22, "enhancer": "sparnethd"}],
                              "methods: {name, N, tau, enhancer}; without N the degraded input itself; enhancer "
                              "none/bicubic or the configured enhancer.name; {name, dynamic: true, enhancer, "
                              "diffuse}: the dynamic method configured by dynamic.*, diffuse overriding "
                              "dynamic.diffuse (e.g. {name: dyn_raw, dynamic: true, diffuse: input} beside dyn)")
    image: BenchmarkImageConfig = BenchmarkImageConfig()
    degradation: DegradationConfig = DegradationConfig()
    dr2: DR2Config = DR2Config()
    dynamic: DynamicConfig = DynamicConfig()
    enhancer: EnhancerConfig = EnhancerConfig()
    metrics: MetricsConfig = MetricsConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    retry: RetryConfig = RetryConfig()
    resume: ResumeConfig = ResumeConfig()
    write: WriteConfig = WriteConfig()
    cluster: ClusterConfig = ClusterConfig()
    report_grid_samples: int = opt(6, "faces shown in the report's image grids")


def build_pipeline(cfg: BenchmarkConfig, plan, ray, version: str):
    so = cfg.storage_options or None
    pool, gpus = actor_pool(cfg.runtime, ray)
    chain = Chain(ray, plan, cfg, LoadFaces, dict(image=cfg.image.read_at_gt_size(), job_seed=cfg.seed,
                                                  storage_options=so, retry=cfg.retry, specs={}))
    real_world = cfg.mode == "real-world"
    if real_world:  # the input is the degraded face: no degradation, no ground truth
        chain.cpu(AsObserved)
    else:
        chain.cpu(Degrade, degradation=cfg.degradation, job_seed=cfg.seed)
    chain.cpu(WriteImages, output=cfg.output, storage_options=so, retry=cfg.retry, keep_pixels=True,
              images={"lq": "lq_pixels"} if real_world else {"gt": "image", "lq": "lq_pixels"},
              png_compression=cfg.write.png_compression, format=cfg.write.format)
    dyn = {"dynamic": cfg.dynamic} if has_dynamic(cfg.methods) else {}
    chain.model(DynamicBenchmarkStage if dyn else BenchmarkStage, dict(
        methods=cfg.methods, **dyn, dr2=cfg.dr2, enhancer=cfg.enhancer, metrics=cfg.metrics, runtime=cfg.runtime,
        seed=cfg.seed, model_size=cfg.image.size, storage_options=so, real_world=real_world), pool=pool, gpus=gpus)
    return chain.commit(
        (WriteImages, dict(output=cfg.output, images={"restored": "restored"}, storage_options=so, retry=cfg.retry,
                           png_compression=cfg.write.png_compression, format=cfg.write.format)),
        (BenchmarkManifestWriter, dict(output=cfg.output, storage_options=so,
                                       retry=cfg.retry, constants={"job_seed": cfg.seed, "code_version": version,
                                                                   "config_hash": config_hash(cfg)})),
        rows=cfg.cluster.manifest_rows * len(cfg.methods))


@refuse_on_driver
def main(argv: list[str] | None = None) -> int:
    cfg: BenchmarkConfig = load_config(BenchmarkConfig, argv, __doc__, "benchmark")
    try:
        check_dynamic_methods(cfg.methods, cfg.dynamic, cfg.dr2)
    except ValueError as e:
        log.error("%s", e)
        return 2
    so = cfg.storage_options or None
    try:
        check_dr2_params(cfg.dr2, cfg.image.size)
    except ValueError as e:
        raise DriverRefusal(str(e)) from None
    if cfg.mode not in MODES:
        log.error("--mode must be one of %s, got %r", list(MODES), cfg.mode)
        return 2
    try:  # wrong metric names, plug-ins and unreadable reference statistics stop the run before Ray starts
        references = load_references(cfg.metrics, so)
        extra_metrics = plugin_report_info(cfg.metrics)
    except (ValueError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2
    weights = check_weights(cfg.dr2.weights, so, cfg.dr2.sha256) if cfg.dr2.weights else None
    if missing_dr2_weights(cfg.dr2):
        log.error("%s", missing_dr2_weights(cfg.dr2))
        return 2
    version = code_version()
    summary = Summary("benchmark", cfg.output, weights=weights or dr2_random_label(cfg.dr2), code_version=version,
                      config_hash=config_hash(cfg))
    if not weights:
        warn_random(summary, "RANDOM-INIT DR2: the DR2 methods' numbers describe an untrained network, not DR2.")
    process(cfg, summary, build_pipeline, version)
    df = read_manifest(cfg.output, so)
    fid_names = [m for m in cfg.metrics.names if m in FID_METRICS]
    fid = fid_scores(cfg.output, so, references) if fid_names else {}
    unavailable = _unavailable(cfg, df)
    not_applicable = {}
    if cfg.mode == "real-world":
        landmark_plugins = {m for m, info in extra_metrics.items() if info[3].startswith("landmark distance")}
        not_applicable = {m: NO_GT for m in cfg.metrics.names if m in FULL_REFERENCE or m in landmark_plugins}
        for m in not_applicable:
            unavailable.pop(m, None)
    for m in fid_names:
        if m in unavailable or any(k.startswith(f"{m}@") for k in fid):
            continue
        refs = [r.name for r in references.values() if r.protocol == m]
        unavailable[m] = ("no features were computed" if refs or cfg.mode == "synthetic" else
                          f"no ground truth (real-world) and no metrics.fid_reference of protocol {m}")
    ref_notes = {"gt": "ground truth of this run"} | {r.name: r.describe for r in references.values()}
    meta = {"mode": cfg.mode, "input": cfg.input,
            "degradation": "none (real-world input)" if cfg.mode == "real-world" else
            (cfg.degradation.custom or cfg.degradation.preset),
            "methods": json.dumps(cfg.methods), "weights": summary.weights, "code_version": version,
            "samples": int(df["id"].nunique()) if len(df) else 0, "metric_weights": dict(cfg.metrics.weights or {})}
    if len(df):
        written = write_report(df, cfg.output, fid=fid, unavailable=unavailable, meta=meta,
                               grid_samples=cfg.report_grid_samples, storage_options=so,
                               references=ref_notes, not_applicable=not_applicable, extra_metrics=extra_metrics)
        summary.notes.append(f"report: {written.get('report.html', '')}")
    summary.notes += [f"{key} {m}: {v}" for key, per in fid.items() for m, v in per.items()]
    return finish(summary, so)


def _unavailable(cfg: BenchmarkConfig, df) -> dict[str, str]:
    """Metrics with no value at all, with the reason (asked again of the suite, without building networks)."""
    from tasks.metrics import MetricSuite

    fids = [m for m in cfg.metrics.names if m in FID_METRICS]
    missing = [m for m in cfg.metrics.names if m not in FID_METRICS and (m not in df.columns or df[m].isna().all())]
    if not missing and not fids:
        return {}
    if cfg.mode == "real-world":  # not applicable is not unavailable: no need to ask
        missing = [m for m in missing if m not in FULL_REFERENCE]
    suite = MetricSuite([*missing, *fids], "cpu", cfg.metrics.weights, cfg.storage_options or None,
                        sha256=cfg.metrics.sha256, plugins=cfg.metrics.plugins)
    return dict(suite.unavailable) | {m: "no value computed" for m in missing if m not in suite.unavailable}


if __name__ == "__main__":
    sys.exit(main())
