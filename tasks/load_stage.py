"""The load stage (CPU tasks): read bytes, decode, validate, square, resize; draw per-sample parameters.

Every input row comes out as exactly one row: "ok" with `image` (uint8 S x S x 3), or "error" with the
reason and a zero image, so the manifest accounts for every input and the job never stops on one.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from models.noise import derive_seed
from tasks.config import Sampled, opt
from tasks.faults import RetryConfig, SampleError, row_failure
from tasks.images import decode_image, prepare_face
from tasks.listing import list_inputs
from tasks.stage import PIXELS, STATUS, Contract, Declared
from tasks.storage import read_sources

LISTING_COLUMNS = ("id", "source", "stem", "key_error", "key_error_kind")  # tasks/listing.py and tasks/units.py
LOADED = (*[(c, pa.string()) for c in STATUS], ("src_format", pa.string()), ("src_width", pa.int64()),
          ("src_height", pa.int64()), ("src_converted", pa.string()))
PARAM_TYPES = {"N": pa.int64(), "tau": pa.int64(), "sigma": pa.float64()}  # per-sample parameters' manifest types

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageConfig:
    size: int = opt(256, "model input size: faces are resized to size x size with PIL bicubic (as DR2)")
    non_square: str = opt("error", "non-square input: 'error' (an error row) or 'center_crop'")
    max_pixels: int = opt(50_000_000, "refuse images with more pixels than this (checked from the header)")
    min_side: int = opt(16, "refuse images smaller than this on either side")
    extensions: list[str] = opt(["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"],
                                "file extensions listed as inputs (others are ignored and counted)")
    member: str = opt("", "WebDataset input: the extension of the image member (e.g. 'jpg', 'hq.png'); empty: the "
                          "one member with an image extension")
    column: str = opt("", "Parquet-bytes input: the image column (a Hugging Face Image struct or a binary column); "
                          "empty: the only such column")


def draw_params(job_seed: int, sample_id: str, specs: dict[str, Sampled]) -> dict:
    """Per-sample parameters: each drawn from its own stream seeded by (job seed, id, name)."""
    return {name: spec.draw(random.Random(derive_seed("param", job_seed, sample_id, name)))
            for name, spec in specs.items()}


class LoadFaces(Declared):
    """Ray Data batch function: (id, source, stem, key_error, key_error_kind) -> + image, status, error_kind,
    error, src_*, params."""

    @classmethod
    def contract(cls, specs: dict, **kwargs) -> Contract:
        return Contract(LISTING_COLUMNS, (("image", PIXELS), *LOADED,
                                          *((name, PARAM_TYPES.get(name, pa.float64())) for name in specs)))

    def __init__(self, image: ImageConfig, specs: dict[str, Sampled], job_seed: int,
                 storage_options: dict | None = None, retry: RetryConfig | None = None):
        self.image, self.specs, self.job_seed = image, specs, int(job_seed)
        self.storage_options, self.retry = storage_options, retry

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.load(batch, None)

    def load(self, batch: dict[str, np.ndarray], data: list[bytes | None] | None) -> dict[str, np.ndarray]:
        """The batch loaded from its sources, or from `data` (bytes per row, read out of a shard)."""
        size = self.image.size

        def decode(raw: bytes) -> tuple[np.ndarray, dict]:
            rgb, info = decode_image(raw, max_pixels=self.image.max_pixels, min_side=self.image.min_side)
            return prepare_face(rgb, size, self.image.non_square), info

        pixels, out = load_rows(batch, decode, self.storage_options, self.retry, data)
        images = np.zeros((len(pixels), size, size, 3), dtype=np.uint8)
        for k, face in enumerate(pixels):
            if face is not None:
                images[k] = face
        out["image"] = images
        out.update(param_columns(batch, self.specs, self.job_seed))
        refuse_bad_dr2_params(out, size)
        return out


def load_rows(batch: dict[str, np.ndarray], decode: Callable[[bytes], tuple[np.ndarray, dict]],
              storage_options: dict | None, retry: RetryConfig | None = None, given: list[bytes | None] | None = None
              ) -> tuple[list[np.ndarray | None], dict[str, np.ndarray]]:
    """Read every row's source and decode it: (pixels per row, None where it failed; the batch plus status,
    error_kind, error and src_* columns). A bad input is its row's error with its kind; a read that failed
    on every retry is "transient" (never committed); the batch never fails on one sample."""
    n = len(batch["id"])
    pixels: list[np.ndarray | None] = [None] * n
    status, kind, error = ["ok"] * n, [""] * n, [""] * n
    fmt, conv = [""] * n, [""] * n
    width, height = np.zeros(n, np.int64), np.zeros(n, np.int64)
    todo = [k for k in range(n) if not batch["key_error"][k]]
    for k in range(n):
        if batch["key_error"][k]:
            status[k], kind[k], error[k] = "error", str(batch["key_error_kind"][k]), str(batch["key_error"][k])
    data = ([given[k] for k in todo] if given is not None else
            read_sources([str(batch["source"][k]) for k in todo], storage_options, retry))
    for k, raw in zip(todo, data):
        try:
            if isinstance(raw, Exception):
                status[k], kind[k], error[k] = row_failure(raw, "read")
                error[k] = f"cannot read {batch['source'][k]}: {error[k]}"
                continue
            rgb, info = decode(raw)
            fmt[k], conv[k] = info["format"], info["converted"]
            width[k], height[k] = info["width"], info["height"]
            pixels[k] = rgb
        except Exception as e:  # a decoder failure, expected (ImageError) or not, is still one sample's problem
            status[k], kind[k], error[k] = "error", getattr(e, "kind", "decode"), (
                str(e) if isinstance(e, SampleError) else f"{type(e).__name__}: {e}")
    out = dict(batch)
    out.update(status=np.array(status, dtype=object), error_kind=np.array(kind, dtype=object),
               error=np.array(error, dtype=object), src_format=np.array(fmt, dtype=object),
               src_converted=np.array(conv, dtype=object), src_width=width, src_height=height)
    return pixels, out


def load_in_process(spec: str, image: ImageConfig, storage_options: dict | None, batch_size: int):
    """Every input of `spec` read and decoded here, without Ray (for the small reference-building commands):
    yields the load stage's batches, `batch_size` rows each, after logging the rows that could not be used."""
    samples = list_inputs(spec, storage_options, tuple(image.extensions)).samples
    if samples.empty:
        raise ValueError(f"no images under {spec}")
    load = LoadFaces(image, specs={}, job_seed=0, storage_options=storage_options)
    for start in range(0, len(samples), batch_size):
        part = samples.iloc[start : start + batch_size]
        batch = load({c: part[c].to_numpy() for c in part.columns})
        for k in np.flatnonzero(batch["status"] != "ok"):
            log.warning("skipped %s: %s", batch["id"][k], batch["error"][k])
        log.info("%d / %d images", min(start + batch_size, len(samples)), len(samples))
        yield batch


def refuse_bad_dr2_params(out: dict[str, np.ndarray], size: int) -> None:
    """Per-sample (N, tau) from an input list that DR2 cannot run at this size become that sample's error row
    (kind bad_params), instead of failing its whole batch in the model actor. Configured values were checked on
    the driver already."""
    if "N" not in out or "tau" not in out:
        return
    for k in np.flatnonzero(out["status"] == "ok"):
        n, tau = int(out["N"][k]), int(out["tau"][k])
        why = (f"N={n} must be a positive divisor of the model size {size}" if n < 1 or size % n else
               f"tau={tau} must be a diffusion step 0..99" if not 0 <= tau <= 99 else "")
        if why:
            out["status"][k], out["error_kind"][k], out["error"][k] = "error", "bad_params", why


def param_columns(batch: dict[str, np.ndarray], specs: dict[str, Sampled], job_seed: int) -> dict[str, np.ndarray]:
    """One column per spec: the input list's value where it gives one, else drawn from (job seed, id, name)."""
    given = {name: batch[name] for name in specs if name in batch}
    params = [draw_params(job_seed, str(i), {k: v for k, v in specs.items() if k not in given}) for i in batch["id"]]
    for name, values in given.items():
        for k, p in enumerate(params):
            p[name] = values[k].item() if hasattr(values[k], "item") else values[k]
    return {name: np.array([p[name] for p in params]) for name in specs}
