"""Decode, validate, square and encode face images, one sample at a time.

Every problem with the input bytes surfaces as ImageError with a message meant for the manifest's
`error` column; the batch carries on with the next sample.
"""

from __future__ import annotations

import io
import re
import warnings

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from tasks.faults import SampleError

__all__ = [
    "ImageError",
    "check_square",
    "decode_image",
    "decode_png",
    "encode_png",
    "prepare_face",
    "resize_to",
]


class ImageError(SampleError, ValueError):
    """A per-sample input failure (bad bytes, wrong size, wrong shape); kind "decode" unless said."""

    kind = "decode"


_GRAY_MODES = {"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


def _header(data: bytes, max_pixels: int, min_side: int) -> tuple[Image.Image, str]:
    """Open lazily (no pixel decode) and apply the size limits before anything is allocated."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        # PIL refuses before we see the size; its message carries the pixel count.
        m = re.search(r"\((\d+) pixels\)", str(e))
        claimed = f"{int(m.group(1)):,} pixels" if m else "more pixels than PIL allows"
        msg = f"image too large: header claims {claimed}, limit is {max_pixels:,} pixels"
        raise ImageError(msg, "too_large") from None
    except UnidentifiedImageError:
        raise ImageError(
            f"image format not recognised ({len(data)} bytes starting {data[:8]!r}); not an image?"
        ) from None
    except Exception as e:  # malformed headers raise assorted errors inside PIL plugins
        raise ImageError(f"corrupt image header: {type(e).__name__}: {e}") from None
    fmt = (img.format or "unknown").lower()
    w, h = img.size
    if w * h > max_pixels:
        raise ImageError(
            f"image too large: {w}x{h} = {w * h:,} pixels, limit is {max_pixels:,} pixels ({fmt})", "too_large"
        )
    if min(w, h) < min_side:
        raise ImageError(f"image too small: {w}x{h}, each side must be at least {min_side} px ({fmt})", "too_small")
    return img, fmt


def _strict_load_error(img: Image.Image) -> str | None:
    """PIL's reason for rejecting the pixel data, or None when it decodes cleanly.

    Relies on ImageFile.LOAD_TRUNCATED_IMAGES being False (PIL's default).
    """
    try:
        img.load()
    except Exception as e:
        return str(e) or type(e).__name__
    return None


# EXIF Orientation tag -> the PIL transpose that makes the image upright (as PIL.ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}


def decode_image(data: bytes, *, max_pixels: int = 50_000_000, min_side: int = 16,
                 exif_orientation: bool = False) -> tuple[np.ndarray, dict]:
    """Decode encoded image bytes to RGB uint8 (H, W, 3), C-contiguous.

    Returns (rgb, info) with info = {format, width, height, channels (source), bit_depth (source),
    converted (short note or "")}. Alpha is dropped (as PIL's convert('RGB') does), gray is replicated,
    16-bit is reduced by rounding x/257. EXIF orientation is ignored, like the reference's PIL path, unless
    exif_orientation (whole photos: a phone's portrait shot must be upright for face detection).
    PIL itself refuses headers above 2 * Image.MAX_IMAGE_PIXELS whatever max_pixels says.
    """
    if not isinstance(data, (bytes, bytearray)):
        data = bytes(data)  # memoryview / numpy buffers from Arrow
    n = len(data)
    if n == 0:
        raise ImageError("empty file (0 bytes)")
    img, fmt = _header(data, max_pixels, min_side)
    mode = img.mode
    src_channels = len(img.getbands())

    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        arr, cv_reason = None, f"OpenCV: {str(e).strip().splitlines()[-1]}"
    else:
        cv_reason = "OpenCV could not decode it (unsupported variant?)"
    if arr is None:
        reason = _strict_load_error(img) or cv_reason
        raise ImageError(f"corrupt or truncated {fmt.upper()} data ({n} bytes): {reason}")
    if fmt in ("jpeg", "mpo") and not data.rstrip(b"\0\r\n ").endswith(b"\xff\xd9"):
        # Older OpenCV returns a grey-filled partial image for truncated JPEGs; a missing EOI marker
        # sends the file through PIL's strict decoder (valid files with trailing junk still pass).
        reason = _strict_load_error(img)
        if reason is not None:
            raise ImageError(f"corrupt or truncated JPEG data ({n} bytes): {reason}")

    notes = []
    if arr.dtype == np.uint16:
        bit_depth = 16
        arr = ((arr.astype(np.uint32) + 128) // 257).astype(np.uint8)  # == round(x / 257)
        notes.append("16-bit->8-bit")
    elif arr.dtype == np.uint8:
        bit_depth = 8
    else:
        raise ImageError(f"unsupported sample type {arr.dtype} in {fmt.upper()} data")

    channels = 1 if arr.ndim == 2 else arr.shape[2]
    if mode in ("P", "PA"):
        notes.append("palette->RGB")
    elif mode == "CMYK":
        notes.append("CMYK->RGB")
    elif mode in _GRAY_MODES or channels == 1:
        notes.append("gray->RGB")
    if channels == 4:
        notes.append("alpha dropped")
    if channels == 1:
        rgb = cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    elif channels == 3:
        rgb = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    elif channels == 4:
        rgb = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGB)
    else:
        raise ImageError(f"unsupported channel count {channels} in {fmt.upper()} data")

    if exif_orientation:
        try:
            orientation = img.getexif().get(0x0112)
        except Exception:  # a malformed EXIF block: keep the pixels as stored
            orientation = None
        if orientation in _EXIF_TRANSPOSE:
            rgb = np.asarray(Image.fromarray(rgb).transpose(_EXIF_TRANSPOSE[orientation]))
            notes.append(f"EXIF orientation {orientation} applied")
    h, w = rgb.shape[:2]
    if min(w, h) < min_side:  # header and decoder can disagree for odd formats
        raise ImageError(f"image too small: {w}x{h}, each side must be at least {min_side} px ({fmt})", "too_small")
    info = {
        "format": fmt,
        "width": w,
        "height": h,
        "channels": src_channels,
        "bit_depth": bit_depth,
        "converted": ", ".join(notes),
    }
    return np.ascontiguousarray(rgb), info


decode_png = decode_image


def resize_to(rgb: np.ndarray, size: int) -> np.ndarray:
    """Square resize with PIL bicubic (antialiased when shrinking), as the reference does."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    out = Image.fromarray(np.ascontiguousarray(rgb)).resize((size, size), Image.BICUBIC)
    return np.asarray(out)


def check_square(rgb: np.ndarray, *, policy: str = "error") -> np.ndarray:
    """Aligned faces are square: raise ImageError ("error") or take the centred square ("center_crop")."""
    h, w = rgb.shape[:2]
    if h == w:
        return rgb
    if policy == "error":
        raise ImageError(f"expected a square aligned face, got {w}x{h} (set non_square=center_crop to crop)",
                         "not_square")
    if policy == "center_crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return np.ascontiguousarray(rgb[top : top + s, left : left + s])
    raise ValueError(f"unknown non_square policy {policy!r}; use 'error' or 'center_crop'")


def prepare_face(rgb: np.ndarray, size: int, non_square: str = "error") -> np.ndarray:
    """Square check (or centre crop) then PIL-bicubic resize to size x size."""
    return resize_to(check_square(rgb, policy=non_square), size)


def encode_png(rgb: np.ndarray, compression: int = 3) -> bytes:
    """Lossless PNG of an RGB uint8 (H, W, 3) array."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png expects uint8 (H, W, 3), got {rgb.dtype} {rgb.shape}")
    ok, buf = cv2.imencode(".png", rgb[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()
