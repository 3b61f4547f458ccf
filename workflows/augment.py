"""Build enhancement-module training pairs: LQ = DR2(HQ) (*) k_sigma, with a Parquet manifest.

    python workflows/augment.py --input s3://faces/ffhq512/ --output s3://train/dr2aug/ --dr2.weights ...
    ray job submit --working-dir . -- python workflows/augment.py --config configs/augment.yaml ...

Stages: list -> read+decode+resize (CPU tasks) -> DR2 (actor pool, GPUs) -> blur+encode+write (CPU
tasks) -> manifest shard (CPU tasks). A rerun with the same output finishes only the missing samples.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script (python workflows/augment.py): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.augment_stage import AugmentWriteConfig, BlurAndWrite, BlurConfig
from tasks.config import opt
from tasks.dr2_stage import DR2Config, DR2Stage, check_dr2_params, dr2_random_label, missing_dr2_weights
from tasks.faults import RetryConfig
from tasks.load_stage import ImageConfig, LoadFaces
from tasks.manifest import ManifestWriter
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
from tasks.runtime import RuntimeConfig
from tasks.weights import check_weights

log = logging.getLogger("augment")


@dataclass(frozen=True)
class AugmentConfig:
    input: str = opt("data/samples", "HQ aligned faces: a folder/prefix (recursive), a glob, a .parquet/.csv list "
                                     "with a 'uri' column, WebDataset .tar shards (a shard, folder, glob or "
                                     "brace pattern faces-{00000..00099}.tar) or Parquet files of image bytes "
                                     "(local, s3://, gs://, any fsspec URI)")
    output: str = opt("out/augment", "output prefix: lq/ and hq/ (or shards/), manifest/ and _summary.json go "
                                     "under it")
    seed: int = opt(0, "job seed: a sample's noise and parameters depend only on (seed, sample id)")
    storage_options: dict = opt({}, "fsspec options for input/output/weights, e.g. {endpoint_url: ...}; "
                                    "credentials come from the environment or instance role, not from here")
    image: ImageConfig = ImageConfig()
    dr2: DR2Config = DR2Config()
    blur: BlurConfig = BlurConfig()
    write: AugmentWriteConfig = AugmentWriteConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    retry: RetryConfig = RetryConfig()
    resume: ResumeConfig = ResumeConfig()
    cluster: ClusterConfig = ClusterConfig()


def build_pipeline(cfg: AugmentConfig, plan, ray, version: str):
    so = cfg.storage_options or None
    pool, gpus = actor_pool(cfg.runtime, ray)
    log.info("DR2 actor pool: %d actor(s), %.2f GPU each, batch %d", pool, gpus, cfg.runtime.batch_size)
    chain = Chain(ray, plan, cfg, LoadFaces, dict(image=cfg.image, job_seed=cfg.seed, storage_options=so,
                                                  retry=cfg.retry, specs={"N": cfg.dr2.N, "tau": cfg.dr2.tau,
                                                                          "sigma": cfg.blur.sigma}))
    chain.model(DR2Stage, dict(dr2=cfg.dr2, runtime=cfg.runtime, seed=cfg.seed, storage_options=so),
                pool=pool, gpus=gpus)
    return chain.commit(
        (BlurAndWrite, dict(output=cfg.output, write=cfg.write, storage_options=so, retry=cfg.retry)),
        (ManifestWriter, dict(output=cfg.output, storage_options=so, retry=cfg.retry,
                              constants={"job_seed": cfg.seed, "code_version": version,
                                         "config_hash": config_hash(cfg)})))


@refuse_on_driver
def main(argv: list[str] | None = None) -> int:
    cfg: AugmentConfig = load_config(AugmentConfig, argv, __doc__, "augment")
    so = cfg.storage_options or None
    try:
        check_dr2_params(cfg.dr2, cfg.image.size)
    except ValueError as e:
        raise DriverRefusal(str(e)) from None
    weights = check_weights(cfg.dr2.weights, so, cfg.dr2.sha256) if cfg.dr2.weights else None
    if missing_dr2_weights(cfg.dr2):
        log.error("%s", missing_dr2_weights(cfg.dr2))
        return 2
    version = code_version()
    summary = Summary("augment", cfg.output, weights=weights or dr2_random_label(cfg.dr2), code_version=version,
                      config_hash=config_hash(cfg))
    if not weights:
        warn_random(summary, "RANDOM-INIT DR2 NETWORK: no weights were given, so every LQ image is the output of "
                             "an untrained network, NOT a DR2 restoration. The manifest says weights=random-init.")
    process(cfg, summary, build_pipeline, version)
    return finish(summary, so)


if __name__ == "__main__":
    sys.exit(main())
