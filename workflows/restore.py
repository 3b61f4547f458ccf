"""Bulk restoration of an archive of aligned faces: DR2, then an enhancement module, with a Parquet manifest.

    python workflows/restore.py --input s3://archive/faces/ --output s3://restored/ \\
        --dr2.weights s3://models/DR2_FFHQ.pkl --enhancer.weights s3://models/SPARNetHD_FFHQ_DR2aug.pth

Stages: list -> read+decode+resize (CPU tasks) -> DR2 + enhancer (one actor pool sharing each GPU, or two
pools) -> encode+write (CPU tasks) -> manifest shard. (N, tau) per dataset from the config, or per sample
from `N`/`tau` columns of a Parquet/CSV input list. Resume, error rows and summary as augment.py.

Whole photos (--photos.mode photos, or auto: non-square inputs): read+decode -> detect faces and align them
to the FFHQ template (CPU actors) -> restore every face of a batch of photos together (GPU actors) ->
feathered paste-back + write (CPU tasks) -> one manifest row per photo (manifest/) and one per face
(faces/manifest/: box, landmarks, score, status: ok | too_small | over_cap | invalid). See tasks/photo_stage.py.
--photos.upscale 2 --photos.upsampler.weights RealESRGAN_x2plus.pth: the photo comes out twice its size, the
background from Real-ESRGAN (tiled on the restoration actors), the faces pasted at the upscaled geometry.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from tasks.config import opt
from tasks.dr2_stage import DR2Config, DR2Stage, check_dr2_params, dr2_random_label, missing_dr2_weights
from tasks.dynamic_stage import (
    DR2_PRIORS,
    DYNAMIC_COLUMNS,
    DynamicConfig,
    DynamicStage,
    missing_prior_weights,
    resolve_diffuse,
)
from tasks.faults import RetryConfig
from tasks.load_stage import ImageConfig, LoadFaces
from tasks.manifest import ManifestWriter
from tasks.photo_stage import (
    FACE_COLUMNS,
    DetectAlign,
    LoadPhotos,
    PasteAndWrite,
    PhotoConfig,
    PhotoRestore,
)
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
    sharded,
    warn_random,
)
from tasks.restore_stage import EnhancerConfig, EnhanceStage, RestoreStage, RestoreWriteConfig
from tasks.runtime import RuntimeConfig
from tasks.upsample import resolve_upscale, runs_network
from tasks.weights import check_weights, random_init_label
from tasks.write_stage import WriteImages

log = logging.getLogger("restore")

@dataclass(frozen=True)
class RestoreConfig:
    input: str = opt("data/samples", "LQ aligned faces: folder/prefix, glob, .parquet/.csv list with a 'uri' "
                                     "column (optional 'id', 'N', 'tau' columns for per-sample settings), WebDataset "
                                     ".tar shards (shard, folder, glob, brace pattern) or Parquet files of image bytes")
    output: str = opt("out/restore", "output prefix: restored/, dr2/, manifest/ and _summary.json go under it")
    seed: int = opt(0, "job seed: a sample's noise depends only on (seed, sample id)")
    storage_options: dict = opt({}, "fsspec options (e.g. {endpoint_url: ...}); credentials from the environment")
    method: str = opt("dr2", "dr2: DR2 then the enhancer | dynamic: DynFaceRestore-style dynamic diffusion "
                             "(blur mapper (DR2's x0-hat by default, see dynamic.diffuse) -> DSST start -> guided "
                             "DDIM, see dynamic.*; the README says which parts are the paper's and which are "
                             "training-free substitutes) then the enhancer")
    topology: str = opt("shared", "shared: DR2 and the enhancer in one actor per GPU (no intermediate copy); "
                                  "separate: two actor pools (scale them independently)")
    image: ImageConfig = ImageConfig()
    photos: PhotoConfig = PhotoConfig()
    dr2: DR2Config = DR2Config()
    dynamic: DynamicConfig = DynamicConfig()
    enhancer: EnhancerConfig = EnhancerConfig()
    write: RestoreWriteConfig = RestoreWriteConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    retry: RetryConfig = RetryConfig()
    resume: ResumeConfig = ResumeConfig()
    cluster: ClusterConfig = ClusterConfig()


def param_specs(cfg: RestoreConfig) -> dict:
    """Per-sample parameters the load stage draws: DR2's (N, tau); the dynamic method estimates its own."""
    return {} if cfg.method == "dynamic" else {"N": cfg.dr2.N, "tau": cfg.dr2.tau}


def manifest_constants(cfg: RestoreConfig, version: str) -> dict:
    return {"job_seed": cfg.seed, "code_version": version, "config_hash": config_hash(cfg),
            "enhancer": cfg.enhancer.name}


def build_photo_pipeline(cfg: RestoreConfig, plan, ray, version: str):
    """Whole photos: load -> detect+align (CPU actors) -> restore crops (GPU actors) -> paste+write -> manifest."""
    so, ph, dynamic = cfg.storage_options or None, cfg.photos, cfg.method == "dynamic"
    upscale, upsampler, upsampler_note = resolve_upscale(ph.upsampler, ph.upscale)
    # faces are aligned at the model's size, and pasted at the effective upscale
    align = dataclasses.replace(ph.align, face_size=cfg.image.size, upscale=upscale)
    network = upscale > 1 and runs_network(ph.upsampler)
    pool, gpus = actor_pool(cfg.runtime, ray)
    chain = Chain(ray, plan, cfg, LoadPhotos, dict(
        mode=ph.mode, max_pixels=cfg.image.max_pixels, min_side=cfg.image.min_side, job_seed=cfg.seed,
        storage_options=so, retry=cfg.retry, exif_orientation=ph.exif_orientation, specs=param_specs(cfg)),
        batch_rows=ph.batch_size)
    detect_pool = (ray.data.ActorPoolStrategy(size=ph.detect_actors) if ph.detect_actors > 0 else
                   ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(ray.cluster_resources()["CPU"]) // 2)))
    chain.cpu_actors(DetectAlign, dict(detector=ph.detector, align=align, storage_options=so), detect_pool)
    stage_cls, stage_kwargs = ((DynamicStage, dict(dynamic=cfg.dynamic, dr2=cfg.dr2)) if dynamic
                               else (RestoreStage, dict(dr2=cfg.dr2)))
    stage_kwargs.update(enhancer=cfg.enhancer, runtime=cfg.runtime, seed=cfg.seed, storage_options=so)
    chain.model(PhotoRestore, dict(stage_cls=stage_cls, stage_kwargs=stage_kwargs, chunk=cfg.runtime.batch_size,
                                   upscale=upscale, upsampler=ph.upsampler if network else None, parser=ph.parser),
                pool=pool, gpus=gpus, batch_size=ph.batch_size)
    constants = manifest_constants(cfg, version)
    return chain.commit(
        (PasteAndWrite, dict(output=cfg.output, align=align, write_faces=ph.write_faces,
                             png_compression=cfg.write.png_compression, constants=constants, storage_options=so,
                             retry=cfg.retry, face_columns=FACE_COLUMNS + (DYNAMIC_COLUMNS if dynamic else []),
                             upsampler=upsampler, upsampler_note=upsampler_note)),
        (ManifestWriter, dict(output=cfg.output, storage_options=so, retry=cfg.retry, constants=constants)),
        rows=ph.batch_size)  # whole photos: a shard per photo batch keeps a task's memory bounded


def build_pipeline(cfg: RestoreConfig, plan, ray, version: str):
    if cfg.photos.mode != "aligned":
        return build_photo_pipeline(cfg, plan, ray, version)
    so = cfg.storage_options or None
    pool, gpus = actor_pool(cfg.runtime, ray)
    dynamic = cfg.method == "dynamic"
    chain = Chain(ray, plan, cfg, LoadFaces, dict(image=cfg.image, job_seed=cfg.seed, storage_options=so,
                                                  retry=cfg.retry, specs=param_specs(cfg)))
    if dynamic:  # one actor: estimator + dynamic sampler + enhancer (topology does not apply)
        chain.model(DynamicStage, dict(dynamic=cfg.dynamic, enhancer=cfg.enhancer, runtime=cfg.runtime,
                                       seed=cfg.seed, storage_options=so, dr2=cfg.dr2), pool=pool, gpus=gpus)
    elif cfg.topology == "shared":
        chain.model(RestoreStage, dict(dr2=cfg.dr2, enhancer=cfg.enhancer, runtime=cfg.runtime, seed=cfg.seed,
                                       storage_options=so), pool=pool, gpus=gpus)
    elif cfg.topology == "separate":
        half = gpus / 2 if gpus else 0.0  # both pools share each GPU
        chain.model(DR2Stage, dict(dr2=cfg.dr2, runtime=cfg.runtime, seed=cfg.seed, storage_options=so),
                    pool=pool, gpus=half)
        chain.model(EnhanceStage, dict(enhancer=cfg.enhancer, runtime=cfg.runtime, storage_options=so),
                    pool=pool, gpus=half)
    else:
        raise ValueError(f"topology must be 'shared' or 'separate', got {cfg.topology!r}")
    images = {"restored": "restored", **({"dr2": "dr2"} if cfg.write.dr2 else {})}
    return chain.commit(
        (WriteImages, dict(output=cfg.output, images=images, png_compression=cfg.write.png_compression,
                           storage_options=so, retry=cfg.retry, format=cfg.write.format)),
        (ManifestWriter, dict(output=cfg.output, storage_options=so, retry=cfg.retry,
                              constants=manifest_constants(cfg, version))))


@refuse_on_driver
def main(argv: list[str] | None = None) -> int:
    cfg: RestoreConfig = load_config(RestoreConfig, argv, __doc__, "restore")
    so = cfg.storage_options or None
    if cfg.method not in ("dr2", "dynamic"):
        log.error("--method must be dr2 or dynamic, got %r", cfg.method)
        return 2
    if cfg.photos.mode not in ("aligned", "photos", "auto"):
        log.error("--photos.mode must be aligned, photos or auto, got %r", cfg.photos.mode)
        return 2
    if cfg.photos.mode != "aligned" and sharded(cfg):
        raise DriverRefusal(f"--photos.mode {cfg.photos.mode}: whole photos are read from loose files and written as "
                            "files; allowed with --write.format webdataset|parquet or shard inputs: --photos.mode "
                            "aligned")
    if cfg.photos.mode != "aligned":
        try:
            upscale, _, upsampler_note = resolve_upscale(cfg.photos.upsampler, cfg.photos.upscale)
        except ValueError as e:
            log.error("%s", e)
            return 2
        if cfg.photos.upsampler.weights:
            check_weights(cfg.photos.upsampler.weights, so)
        parser = cfg.photos.parser
        if parser.name not in ("none", "bisenet") and "." not in parser.name and ":" not in parser.name:
            log.error("--photos.parser.name must be none, bisenet or a plug-in 'pkg.module:Class', got %r", parser.name)
            return 2
        if parser.name == "bisenet" and list(parser.regions) != ["codeformer"] and not parser.labels:
            from models.bisenet import LABELS

            unknown = [r for r in parser.regions if r not in LABELS]
            if unknown:
                log.error("--photos.parser.regions %s unknown: allowed %s or [codeformer]", unknown, ", ".join(LABELS))
                return 2
        if cfg.photos.parser.weights:
            check_weights(cfg.photos.parser.weights, so)
        elif cfg.photos.parser.name == "bisenet" and not cfg.photos.parser.allow_random_weights:
            log.error("--photos.parser.name bisenet needs --photos.parser.weights (parsing_bisenet.pth); "
                      "--photos.parser.name none keeps the soft eroded mask")
            return 2
    net = cfg.dynamic if cfg.method == "dynamic" else cfg.dr2  # the diffusion network's weights settings
    if cfg.method == "dr2":
        try:
            check_dr2_params(cfg.dr2, cfg.image.size)
        except ValueError as e:
            raise DriverRefusal(str(e)) from None
    weights = check_weights(net.weights, so, net.sha256) if net.weights else None
    if cfg.enhancer.weights:
        check_weights(cfg.enhancer.weights, so)
    # the dynamic method's blur mapper: a DR2 network of its own unless the prior is one
    separate_dr2 = False
    if cfg.method == "dynamic":
        try:
            separate_dr2 = resolve_diffuse(cfg.dynamic, cfg.dr2) == "dr2" and cfg.dynamic.prior not in DR2_PRIORS
        except ValueError as e:
            log.error("%s", e)
            return 2
        for extra in (cfg.dr2.weights if separate_dr2 else None, cfg.dynamic.estimator_weights,
                      cfg.dynamic.scale_map_weights):
            if extra:
                check_weights(extra, so)
    missing = missing_prior_weights(cfg.dynamic) if cfg.method == "dynamic" else missing_dr2_weights(cfg.dr2)
    if missing:
        log.error("%s", missing)
        return 2
    version = code_version()
    random_label = random_init_label(cfg.dynamic.prior) if cfg.method == "dynamic" else dr2_random_label(cfg.dr2)
    summary = Summary("restore", cfg.output, weights=weights or random_label, code_version=version,
                      config_hash=config_hash(cfg))
    net_name = "DYNAMIC PRIOR" if cfg.method == "dynamic" else "DR2"
    random_parts = [p for p, w in ((net_name, weights), ("DR2 BLUR MAPPER", cfg.dr2.weights or not separate_dr2),
                                   ("enhancer", cfg.enhancer.weights or cfg.enhancer.name in ("none", "bicubic")))
                    if not w]
    if random_parts:
        warn_random(summary, f"RANDOM-INIT {' AND '.join(random_parts)}: no weights were given, so the outputs are "
                             "NOT restorations. The manifest's weights columns say random-init.")
    if cfg.photos.mode != "aligned" and upsampler_note:
        warn_random(summary, f"BACKGROUND UPSAMPLER WITHOUT WEIGHTS: {upsampler_note} (photos.upscale "
                             f"{cfg.photos.upscale} -> {upscale}); every photo row says so.")
    if cfg.photos.mode != "aligned" and cfg.photos.upscale > 1 and cfg.photos.upsampler.allow_random_weights \
            and not cfg.photos.upsampler.weights and runs_network(cfg.photos.upsampler):
        warn_random(summary, "RANDOM-INIT BACKGROUND UPSAMPLER: photos.upsampler.allow_random_weights without "
                             "weights; the backgrounds are NOT upscaled photos.")
    process(cfg, summary, build_pipeline, version)
    return finish(summary, so)


if __name__ == "__main__":
    sys.exit(main())
