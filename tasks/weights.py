"""Checkpoint loading from local paths or fsspec URIs, never unpickling code."""

from __future__ import annotations

import hashlib
import io
import posixpath
import re
from collections.abc import Mapping

import torch

from tasks.storage import get_fs

__all__ = [
    "RANDOM_INIT",
    "WeightsError",
    "WeightsNotFoundError",
    "check_weights",
    "fill_zero_init",
    "load_state_dict",
    "load_weights",
    "random_init_label",
    "weights_identity",
]

RANDOM_INIT = "random-init"  # weights identity recorded when a run deliberately has no checkpoint


def random_init_label(variant: str | None = None) -> str:
    """The weights identity of a deliberately random network, "random-init" or "random-init:<variant>" (a
    test-size architecture, a prior, a plug-in): the one label that rows, summaries and reports all carry."""
    return f"{RANDOM_INIT}:{variant}" if variant else RANDOM_INIT


def fill_zero_init(model: torch.nn.Module) -> None:
    """Small seeded weights for the zero-initialised layers of a random-init network.

    A fresh guided-diffusion UNet outputs exactly 0 (its output convs start at zero); a demo without
    weights should still exercise every layer. Seeded, so reruns and actors match.
    """
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


class WeightsNotFoundError(FileNotFoundError):
    """The checkpoint URI does not exist."""


class WeightsError(ValueError):
    """The checkpoint exists but is unusable: digest mismatch, not a state_dict, or wrong keys/shapes."""


def weights_identity(sha256_hex: str, uri: str) -> str:
    """'sha256:<first 16 hex>:<basename>', recorded next to every output."""
    return f"sha256:{sha256_hex[:16]}:{posixpath.basename(uri.rstrip('/'))}"


def _read(uri: str, storage_options: dict | None) -> bytes:
    fs, path = get_fs(uri, storage_options)
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise WeightsNotFoundError(
            f"weights not found: {uri}. Download the checkpoint and point the model's weights setting at it "
            "(a local path or an fsspec URI such as s3://bucket/key; endpoint and credentials come from "
            "storage_options or the AWS_* environment), or run with random weights deliberately."
        ) from None
    except IsADirectoryError:
        raise WeightsNotFoundError(f"weights URI is a directory, not a file: {uri}") from None


def _check_digest(uri: str, actual: str, pinned: str) -> None:
    want = pinned.lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{16,64}", want):
        raise WeightsError(f"sha256 pin for {uri} must be 16 to 64 hex digits, got {pinned!r}")
    if not actual.startswith(want):
        raise WeightsError(f"sha256 mismatch for {uri}: expected {want}, got {actual}")


def _deserialize(uri: str, data: bytes):
    if uri.lower().endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load as st_load

        try:
            return st_load(data)
        except SafetensorError as e:
            raise WeightsError(f"{uri}: not a valid safetensors file: {e}") from None
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        # weights_only refuses any pickled global outside torch's allow-list (arbitrary code).
        raise WeightsError(
            f"{uri}: refused or unreadable as a tensor-only checkpoint (torch.load weights_only=True): "
            f"{_torch_load_reason(e)}"
        ) from None


def _torch_load_reason(e: Exception) -> str:
    """The reason torch gives, without its generic preamble ("Weights only load failed ... Re-running with
    weights_only=False will likely succeed") and the documentation pointer around it."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    specific = [p for p in paragraphs if not p.startswith(("Weights only load failed", "Check the documentation",
                                                           "Please file an issue"))]
    reason = specific[0] if specific else (paragraphs[0] if paragraphs else "")
    reason = reason.split("WeightsUnpickler error:", 1)[-1]
    reason = re.split(r"\. Please use|\n", reason.strip())[0].strip()
    return reason[:300] or type(e).__name__


def _load(uri: str, sha256: str | None, storage_options: dict | None, key: str | None):
    data = _read(uri, storage_options)
    digest = hashlib.sha256(data).hexdigest()
    if sha256:
        _check_digest(uri, digest, sha256)
    obj = _deserialize(uri, data)
    del data
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            have = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise WeightsError(f"{uri}: no entry {key!r} to select (top level has {have})")
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{uri}: expected a state_dict (mapping of tensors), got {type(obj).__name__}")
    nested = [k for k, v in obj.items() if isinstance(v, Mapping)]
    if nested:
        raise WeightsError(f"{uri}: not a flat state_dict; entries {nested[:5]} are dicts: pass key=... to pick one")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{uri}: state_dict entries are not tensors: {bad[:5]}")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd, digest


def load_state_dict(
    uri: str, *, sha256: str | None = None, storage_options: dict | None = None, key: str | None = None
) -> dict[str, torch.Tensor]:
    """Read a checkpoint (.safetensors, else torch.load with weights_only=True) from a path or URI.

    sha256 pins the file (full digest or a prefix of at least 16 hex digits); key selects a nested
    state_dict (e.g. "params_ema"); a uniform "module." prefix is stripped.
    """
    return _load(uri, sha256, storage_options, key)[0]


def load_weights(
    model: torch.nn.Module,
    uri: str,
    *,
    sha256: str | None = None,
    storage_options: dict | None = None,
    key: str | None = None,
    optional_suffixes: tuple[str, ...] = (),
) -> str:
    """Strictly load a checkpoint into model; returns its identity 'sha256:<16 hex>:<basename>'.

    optional_suffixes: model keys ending so may be absent from the checkpoint and keep the model's values
    (BatchNorm's num_batches_tracked, which checkpoints saved before torch 0.4.1 lack and eval never reads).
    """
    sd, digest = _load(uri, sha256, storage_options, key)
    own = model.state_dict()
    for k in own:
        if k not in sd and optional_suffixes and k.endswith(optional_suffixes):
            sd[k] = own[k]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [
        f"{k} checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in sd and sd[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [
            f"{uri} does not match {type(model).__name__} ({len(sd)} checkpoint tensors, {len(own)} in the "
            f"model): {len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} shape mismatches"
        ]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {', '.join(items[:5])}{more}")
        raise WeightsError("; ".join(parts))
    model.load_state_dict(sd, strict=True)
    return weights_identity(digest, uri)


def check_weights(uri: str, storage_options: dict | None = None, sha256: str | None = None) -> str:
    """Read and vet a configured checkpoint in the driver, before any actor starts: a missing file, a digest
    mismatch or a file that is refused as code (weights_only) stops the job with one line naming the file,
    instead of a traceback from every actor."""
    data = _read(uri, storage_options)
    if sha256:
        _check_digest(uri, hashlib.sha256(data).hexdigest(), sha256)
    _deserialize(uri, data)
    return uri
