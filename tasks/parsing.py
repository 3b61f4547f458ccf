"""Parsing-mask blending of restored faces (CodeFormer's use_parse): paste only the face's own regions.

A face parser labels each restored crop; the chosen regions become a soft mask as CodeFormer's
face_restoration_helper builds it, at the parser's 512 px: 1 on the regions, two Gaussian blurs (kernel 101,
sigma 11), a zeroed 10 px border, then resized to the crop. Paste-back (tasks/align.py) warps it back and
uses min(parsing mask, soft eroded mask), so hair, background and clothes keep the background while the
seam stays feathered. Without a parser (name none, the default) the soft eroded mask alone is used.

Regions: CodeFormer (ParseNet labels) keeps skin, brows, eyes, glasses, ears, earrings, nose, mouth, lips and
hair (its MASK_COLORMAP); the default here is the face proper: skin, brows, eyes, nose, mouth and lips
(`regions: codeformer` selects CodeFormer's set). The parser runs on the restoration actors' device.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.bisenet import LABELS, BiSeNet
from tasks.config import opt
from tasks.plugins import build_network, import_plugin
from tasks.weights import load_weights

FACE_REGIONS = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "nose", "mouth", "u_lip", "l_lip")
# CodeFormer's MASK_COLORMAP (255 for ParseNet labels 1-13 and 15), named: everything but background, hat,
# neck, necklace and cloth.
CODEFORMER_REGIONS = FACE_REGIONS + ("eye_g", "l_ear", "r_ear", "ear_r", "hair")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# CodeFormer's post-processing at 512 px
PARSE_SIZE, BLUR_KERNEL, BLUR_SIGMA, BORDER = 512, 101, 11, 10


@dataclass(frozen=True)
class ParserConfig:
    name: str = opt("none", "face parser for the paste mask: none (soft eroded mask only) | bisenet (facexlib's "
                            "parsing_bisenet.pth) | a plug-in 'pkg.module:Class' (float (B,3,512,512) normalised "
                            "by mean/std -> logits (B,K,512,512) or a tuple starting with them; its class names in "
                            "an attribute `labels` or in `labels`)")
    weights: str | None = opt(None, "parser weights (parsing_bisenet.pth), path or fsspec URI")
    sha256: str | None = opt(None, "expected sha256 (or a 16+ hex prefix) of the parser weights")
    regions: list[str] = opt(list(FACE_REGIONS), "parser classes blended from the restored face (the rest keeps "
                                                 "the background); ['codeformer'] = CodeFormer's use_parse set "
                                                 "(adds glasses, ears, earrings, hair)")
    labels: list[str] = opt([], "the parser's class names in output order; [] = the model's `labels` "
                                "(BiSeNet: CelebAMask-HQ's 19)")
    mean: list[float] = opt(list(IMAGENET_MEAN), "input normalisation mean (RGB in [0,1]; facexlib's BiSeNet: "
                                                 "ImageNet's)")
    std: list[float] = opt(list(IMAGENET_STD), "input normalisation std")
    kwargs: dict = opt({}, "constructor arguments of a plug-in parser")
    allow_random_weights: bool = opt(False, "run the parser without weights (random-init; tests only)")


def region_names(cfg: ParserConfig) -> tuple[str, ...]:
    return CODEFORMER_REGIONS if list(cfg.regions) == ["codeformer"] else tuple(cfg.regions)


def build_parser(cfg: ParserConfig, storage_options: dict | None = None):
    """(model, identity, class names) or (None, 'none', ()) for name none."""
    if cfg.name == "none":
        return None, "none", ()
    if cfg.name == "bisenet":
        factory, kwargs = BiSeNet, {"num_class": len(cfg.labels) or len(LABELS)}
    else:
        factory, kwargs = import_plugin(cfg.name, "photos.parser.name", "none, bisenet"), dict(cfg.kwargs)
    model, identity = build_network(
        factory, kwargs, name=cfg.name, weights=None, sha256=None, storage_options=storage_options,
        allow_random_weights=cfg.allow_random_weights or bool(cfg.weights),
        missing=f"no weights configured for photos.parser.name {cfg.name!r}: set photos.parser.weights "
                "(parsing_bisenet.pth), or photos.parser.name none for the soft eroded mask")
    if cfg.weights:  # strict, but a checkpoint from before torch 0.4.1 has no BatchNorm num_batches_tracked
        identity = load_weights(model, cfg.weights, sha256=cfg.sha256, storage_options=storage_options,
                                optional_suffixes=("num_batches_tracked",))
    labels = tuple(cfg.labels) or tuple(getattr(model, "labels", ()))
    unknown = [r for r in region_names(cfg) if r not in labels]
    if unknown:
        raise ValueError(f"photos.parser.regions {unknown} are not classes of the parser {cfg.name!r}: {labels}")
    return model, identity, labels


def parse_mask(labels: np.ndarray, keep: np.ndarray, out_size: int) -> np.ndarray:
    """CodeFormer's mask from a (512, 512) label map: kept classes -> 1, blurred twice, border zeroed, resized
    to the restored crop (out_size); float32 in [0, 1]."""
    mask = keep[labels].astype(np.float32)
    mask = cv2.GaussianBlur(mask, (BLUR_KERNEL, BLUR_KERNEL), BLUR_SIGMA)
    mask = cv2.GaussianBlur(mask, (BLUR_KERNEL, BLUR_KERNEL), BLUR_SIGMA)
    mask[:BORDER], mask[-BORDER:], mask[:, :BORDER], mask[:, -BORDER:] = 0, 0, 0, 0
    if out_size != mask.shape[0]:
        mask = cv2.resize(mask, (out_size, out_size), interpolation=cv2.INTER_LINEAR)
    return np.clip(mask, 0.0, 1.0)


class FaceParser:
    """Parsing masks of restored crops on one device: __call__(uint8 (K,S,S,3)) -> float16 (K,S,S)."""

    def __init__(self, cfg: ParserConfig, device: torch.device, storage_options: dict | None = None):
        self.cfg, self.device = cfg, device
        model, self.identity, labels = build_parser(cfg, storage_options)
        self.model = model.to(device) if isinstance(model, torch.nn.Module) else model
        self.keep = np.array([name in region_names(cfg) for name in labels])
        self.mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1)

    @torch.inference_mode()
    def labels(self, faces: np.ndarray) -> np.ndarray:
        """(K, 512, 512) int class map (argmax) of restored crops, resized to 512 bilinearly as CodeFormer.

        One face per forward: batched convolutions differ in the last bits with the batch's composition, and a
        face's mask must not depend on the faces beside it (the parser costs little next to restoration).
        """
        out = []
        for i in range(len(faces)):
            x = torch.from_numpy(np.ascontiguousarray(faces[i : i + 1])).to(self.device)
            x = x.permute(0, 3, 1, 2).float().div_(255.0)
            if x.shape[-1] != PARSE_SIZE:
                x = F.interpolate(x, (PARSE_SIZE, PARSE_SIZE), mode="bilinear", align_corners=False)
            logits = self.model((x - self.mean) / self.std)
            logits = logits[0] if isinstance(logits, (tuple, list)) else logits
            if logits.shape[1] != len(self.keep):
                raise ValueError(f"parser {self.cfg.name!r} returned {logits.shape[1]} classes for "
                                 f"{len(self.keep)} labels")
            out.append(logits.argmax(1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, PARSE_SIZE, PARSE_SIZE), np.int64)

    def __call__(self, faces: np.ndarray) -> np.ndarray:
        size = faces.shape[1]
        return np.stack([parse_mask(lab, self.keep, size).astype(np.float16) for lab in self.labels(faces)]) \
            if len(faces) else np.zeros((0, size, size), np.float16)
