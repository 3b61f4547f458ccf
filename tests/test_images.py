import io
import struct
import time
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image

import tasks.images as images
from tasks.images import (
    ImageError,
    check_square,
    decode_image,
    decode_png,
    encode_png,
    prepare_face,
    resize_to,
)


def _pil_bytes(arr, fmt, mode=None, **kw):
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_with_header(width: int, height: int) -> bytes:
    """A syntactically valid PNG whose IHDR claims width x height (8-bit RGB) with almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _png_chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def face():
    rng = np.random.default_rng(0)
    # Smooth content plus noise: compresses like a photo, exercises every value range.
    y, x = np.mgrid[0:96, 0:96]
    base = np.stack([x * 2, y * 2, (x + y)], axis=-1).astype(np.int32)
    return np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, face):
    """Bad and odd inputs written to disk and read back, as the pipeline would see them."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    png = _pil_bytes(face, "PNG")
    jpg = _pil_bytes(face, "JPEG", quality=90)
    rgb16 = rng.integers(0, 65536, (32, 40, 3), dtype=np.uint16)
    rgb16[0, :8, 0] = [0, 128, 129, 385, 386, 32767, 32768, 65535]  # rounding edges of x/257
    gray16 = rng.integers(0, 65536, (24, 24), dtype=np.uint16)
    rgba = np.dstack([face, rng.integers(0, 256, face.shape[:2], dtype=np.uint8)])
    rgba[..., 3][:10] = 0  # fully transparent rows must keep their RGB
    files = {
        "empty.png": b"",
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpg[: len(jpg) // 2],
        "notes.png": b"this is a text file, not a picture\n" * 3,
        "bitflip.png": png[:200] + bytes(b ^ 0x5A for b in png[200:260]) + png[260:],
        "rgb16.png": cv2.imencode(".png", rgb16[..., ::-1])[1].tobytes(),
        "gray16.png": cv2.imencode(".png", gray16)[1].tobytes(),
        "gray8.png": _pil_bytes(face[..., 1], "PNG"),
        "rgba.png": _pil_bytes(rgba, "PNG", "RGBA"),
        "la.png": _pil_bytes(np.dstack([face[..., 0], face[..., 2]]), "PNG", "LA"),
        "palette.png": None,
        "huge.png": _png_with_header(100_000, 100_000),
        "big.png": _png_with_header(8000, 8000),
        "wide.png": _pil_bytes(np.zeros((48, 64, 3), np.uint8) + face[:48, :64], "PNG"),
        "tiny.png": _pil_bytes(face[:8, :8], "PNG"),
        "good.png": png,
        "good.jpg": jpg,
    }
    buf = io.BytesIO()
    Image.fromarray(face).convert("P", palette=Image.ADAPTIVE, colors=64).save(buf, "PNG")
    files["palette.png"] = buf.getvalue()
    for name, data in files.items():
        (d / name).write_bytes(data)
    read = {name: (d / name).read_bytes() for name in files}
    read["_arrays"] = {"rgb16": rgb16, "gray16": gray16, "rgba": rgba}
    return read


@pytest.mark.parametrize(
    "name, expected",
    [
        ("empty.png", ["empty file (0 bytes)"]),
        ("truncated.png", ["truncated", "PNG"]),
        ("truncated.jpg", ["truncated", "JPEG"]),
        ("notes.png", ["format not recognised", "not an image"]),
        ("bitflip.png", ["corrupt or truncated PNG"]),
        ("huge.png", ["too large", "10,000,000,000 pixels", "limit is 50,000,000"]),
        ("big.png", ["too large", "8000x8000", "64,000,000", "limit is 50,000,000"]),
        ("tiny.png", ["too small", "8x8", "at least 16 px"]),
    ],
)
def test_bad_inputs_raise_clear_errors(corpus, name, expected):
    with pytest.raises(ImageError) as ei:
        decode_image(corpus[name])
    for part in expected:
        assert part in str(ei.value), (name, str(ei.value))


@pytest.mark.parametrize("name", ["huge.png", "big.png"])
def test_oversized_header_rejected_before_pixel_decode(corpus, monkeypatch, name):
    def forbidden(*a, **k):
        raise AssertionError("pixel decoder must not run for an oversized header")

    monkeypatch.setattr(images.cv2, "imdecode", forbidden)
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="too large"):
        decode_image(corpus[name])
    assert time.perf_counter() - t0 < 0.5


def test_max_pixels_and_min_side_are_parameters(face):
    data = _pil_bytes(face[:64, :64], "PNG")
    with pytest.raises(ImageError, match=r"64x64 = 4,096 pixels, limit is 1,000"):
        decode_image(data, max_pixels=1000)
    with pytest.raises(ImageError, match="at least 100 px"):
        decode_image(data, min_side=100)
    rgb, _ = decode_image(data, min_side=64, max_pixels=4096)
    assert rgb.shape == (64, 64, 3)


def test_truncated_jpeg_caught_even_if_decoder_returns_partial_image(corpus, monkeypatch):
    # Older OpenCV builds return a grey-filled image for truncated JPEGs (4.14 returns None): simulate it.
    monkeypatch.setattr(images.cv2, "imdecode", lambda buf, flags: np.full((96, 96, 3), 128, np.uint8))
    with pytest.raises(ImageError, match="truncated"):
        decode_image(corpus["truncated.jpg"])
    rgb, _ = decode_image(corpus["good.jpg"])  # EOI present: fast path, no second decode
    assert rgb.shape == (96, 96, 3)


def test_jpeg_with_trailing_bytes_still_decodes(corpus):
    ref, _ = decode_image(corpus["good.jpg"])
    rgb, info = decode_image(corpus["good.jpg"] + b"trailing junk after EOI")
    assert info["format"] == "jpeg"
    np.testing.assert_array_equal(rgb, ref)


def test_png_round_trip_bit_exact(corpus, face):
    rgb, info = decode_image(corpus["good.png"])
    assert rgb.dtype == np.uint8 and rgb.flags.c_contiguous
    np.testing.assert_array_equal(rgb, face)
    expected = {"format": "png", "width": 96, "height": 96, "channels": 3, "bit_depth": 8, "converted": ""}
    assert info == expected
    again, _ = decode_png(encode_png(rgb))
    np.testing.assert_array_equal(again, face)
    again, _ = decode_png(encode_png(rgb, compression=9))
    np.testing.assert_array_equal(again, face)


def test_jpeg_matches_reference_pil_decode(corpus):
    rgb, info = decode_image(corpus["good.jpg"])
    ref = np.asarray(Image.open(io.BytesIO(corpus["good.jpg"])).convert("RGB"))
    np.testing.assert_array_equal(rgb, ref)
    assert info["format"] == "jpeg" and info["converted"] == ""


def test_16bit_rgb_rounds_x_over_257(corpus):
    src = corpus["_arrays"]["rgb16"]
    rgb, info = decode_image(corpus["rgb16.png"])
    expected = np.round(src / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(rgb, expected)
    assert list(rgb[0, :8, 0]) == [0, 0, 1, 1, 2, 127, 128, 255]
    assert (info["bit_depth"], info["channels"]) == (16, 3)
    assert info["converted"] == "16-bit->8-bit"


def test_16bit_gray(corpus):
    src = corpus["_arrays"]["gray16"]
    rgb, info = decode_image(corpus["gray16.png"])
    g = np.round(src / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(rgb, np.stack([g, g, g], axis=-1))
    assert (info["bit_depth"], info["channels"]) == (16, 1)
    assert "16-bit->8-bit" in info["converted"] and "gray->RGB" in info["converted"]


def test_gray8(corpus, face):
    rgb, info = decode_image(corpus["gray8.png"])
    g = face[..., 1]
    np.testing.assert_array_equal(rgb, np.stack([g, g, g], axis=-1))
    assert (info["channels"], info["bit_depth"], info["converted"]) == (1, 8, "gray->RGB")


def test_rgba_alpha_dropped_rgb_preserved(corpus):
    src = corpus["_arrays"]["rgba"]
    rgb, info = decode_image(corpus["rgba.png"])
    np.testing.assert_array_equal(rgb, src[..., :3])  # not premultiplied, not composited
    ref = np.asarray(Image.open(io.BytesIO(corpus["rgba.png"])).convert("RGB"))
    np.testing.assert_array_equal(rgb, ref)
    assert info["channels"] == 4 and info["converted"] == "alpha dropped"


def test_gray_alpha(corpus, face):
    rgb, info = decode_image(corpus["la.png"])
    g = face[..., 0]
    np.testing.assert_array_equal(rgb, np.stack([g, g, g], axis=-1))
    assert info["channels"] == 2 and info["converted"] == "gray->RGB, alpha dropped"


def test_palette(corpus):
    rgb, info = decode_image(corpus["palette.png"])
    ref = np.asarray(Image.open(io.BytesIO(corpus["palette.png"])).convert("RGB"))
    np.testing.assert_array_equal(rgb, ref)
    assert info["converted"] == "palette->RGB" and info["channels"] == 1


def test_non_square_policies(corpus):
    rgb, info = decode_image(corpus["wide.png"])
    assert (info["width"], info["height"]) == (64, 48)
    with pytest.raises(ImageError) as ei:
        prepare_face(rgb, 32)
    assert str(ei.value) == "expected a square aligned face, got 64x48 (set non_square=center_crop to crop)"
    with pytest.raises(ImageError):
        check_square(rgb, policy="error")
    crop = check_square(rgb, policy="center_crop")
    np.testing.assert_array_equal(crop, rgb[:, 8:56])
    out = prepare_face(rgb, 32, non_square="center_crop")
    np.testing.assert_array_equal(out, resize_to(rgb[:, 8:56], 32))
    with pytest.raises(ValueError, match="unknown non_square policy"):
        check_square(rgb, policy="pad")


def test_resize_matches_pil_bicubic_and_identity():
    rng = np.random.default_rng(3)
    big = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    out = resize_to(big, 256)
    ref = np.asarray(Image.fromarray(big).resize((256, 256), Image.BICUBIC))
    assert out.shape == (256, 256, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref)
    # antialiased: a plain bicubic (no prefilter) would differ on noise
    plain = cv2.resize(big, (256, 256), interpolation=cv2.INTER_CUBIC)
    assert np.abs(out.astype(int) - plain).mean() > 5
    small = big[:256, :256]
    assert resize_to(small, 256) is small
    up = resize_to(small, 512)
    np.testing.assert_array_equal(up, np.asarray(Image.fromarray(small).resize((512, 512), Image.BICUBIC)))


def test_encode_png_validates_input():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(8, 8\)"):
        encode_png(np.zeros((8, 8), np.uint8))


def test_accepts_memoryview(corpus, face):
    rgb, _ = decode_image(memoryview(corpus["good.png"]))
    np.testing.assert_array_equal(rgb, face)


def test_fuzzed_bytes_only_ever_raise_image_error(corpus):
    rng = np.random.default_rng(7)
    seeds = [corpus["good.png"], corpus["good.jpg"], corpus["palette.png"], corpus["rgb16.png"]]
    outcomes = {"ok": 0, "error": 0}
    for i in range(240):
        data = bytearray(seeds[i % len(seeds)])
        op = rng.integers(0, 3)
        if op == 0:
            data = data[: rng.integers(0, len(data))]
        elif op == 1:
            for pos in rng.integers(0, len(data), size=rng.integers(1, 20)):
                data[pos] = rng.integers(0, 256)
        else:
            pos = rng.integers(0, len(data))
            data[pos:pos] = rng.integers(0, 256, rng.integers(1, 64), dtype=np.uint8).tobytes()
        try:
            rgb, info = decode_image(bytes(data))
        except ImageError as e:
            assert str(e)
            outcomes["error"] += 1
        else:
            assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
            assert (info["width"], info["height"]) == (rgb.shape[1], rgb.shape[0])
            outcomes["ok"] += 1
    assert outcomes["error"] > 50 and outcomes["ok"] > 0


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_on_request_as_pil_does(orientation):
    from PIL import ImageOps

    rng = np.random.default_rng(orientation)
    stored = Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif)
    data = buf.getvalue()
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    rgb, info = decode_image(data, exif_orientation=True)
    assert np.array_equal(rgb, upright)
    assert ("EXIF orientation" in info["converted"]) == (orientation != 1)
    assert (info["width"], info["height"]) == (upright.shape[1], upright.shape[0])
    as_stored, _ = decode_image(data)  # off by default: aligned crops are read as the reference reads them
    assert np.array_equal(as_stored, np.asarray(stored))
