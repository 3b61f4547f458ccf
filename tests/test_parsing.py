"""Parsing-mask blending: BiSeNet's full-size checkpoint layout, CodeFormer's mask post-processing, and a
paste that keeps the background off the parsed face regions."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from models.bisenet import LABELS, BiSeNet
from tasks.align import AlignConfig, face_layer, paste_back, similarity_to_template
from tasks.parsing import CODEFORMER_REGIONS, FaceParser, ParserConfig, build_parser, parse_mask
from tasks.weights import WeightsError, load_weights
from tests.test_align import face_at, full_mask, landmarks_for
from tests.test_rrdbnet import read_layout

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_full_size_bisenet_loads_parsing_bisenet_layout_strictly(tmp_path):
    model = BiSeNet(19)
    rows = read_layout("parsing_bisenet_keys.tsv")
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == rows
    g = torch.Generator().manual_seed(0)
    sd = {k: (torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(s, generator=g))
          for k, s in rows}
    torch.save(sd, tmp_path / "parsing_bisenet.pth")  # facexlib's file is a flat state_dict
    identity = load_weights(model, str(tmp_path / "parsing_bisenet.pth"))
    assert identity.endswith("parsing_bisenet.pth")
    key = "cp.resnet.layer3.0.downsample.1.running_var"
    assert torch.equal(model.cp.resnet.layer3[0].downsample[1].running_var, sd[key])
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 19, 64, 64)
    # through photos.parser: the same file, and one saved without BatchNorm's num_batches_tracked (torch < 0.4.1)
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "old.pth")
    for name in ("parsing_bisenet.pth", "old.pth"):
        parsed, identity, _ = build_parser(ParserConfig(name="bisenet", weights=str(tmp_path / name)))
        assert identity.endswith(name) and torch.equal(parsed.conv_out.conv_out.weight, sd["conv_out.conv_out.weight"])
    sd.pop("ffm.conv1.weight")
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(WeightsError, match="1 missing.*ffm.conv1.weight"):
        build_parser(ParserConfig(name="bisenet", weights=str(tmp_path / "broken.pth")))


def test_mask_post_processing_is_codeformers():
    labels = np.full((512, 512), LABELS.index("hair"))
    labels[150:400, 120:390] = LABELS.index("skin")
    labels[200:230, 180:240] = LABELS.index("l_eye")
    keep = np.array([n in ("skin", "l_eye") for n in LABELS])
    mask = parse_mask(labels, keep, 512)
    assert mask.dtype == np.float32 and mask[275, 255] == pytest.approx(1.0, abs=1e-3)  # deep inside: 1
    assert mask[40, 255] < 1e-3 and mask[480, 40] < 1e-3  # hair far from the face: 0
    assert 0.3 < mask[150, 255] < 0.7  # the edge: blurred (sigma 11, twice), half way
    assert (mask[:10] == 0).all() and (mask[:, -10:] == 0).all()  # border zeroed
    small = parse_mask(labels, keep, 256)
    assert small.shape == (256, 256) and abs(small[137, 127] - mask[275, 255]) < 1e-3


def test_parsed_paste_keeps_the_background_off_the_face_regions():
    cfg = ParserConfig(name="tests.plugins:DiscParser")
    parser = FaceParser(cfg, torch.device("cpu"))
    assert parser.identity == cfg.name  # parameter-free plug-in
    rng = np.random.default_rng(0)
    restored = rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    masks = parser(restored)
    assert masks.shape == (2, 128, 128) and masks.dtype == np.float16
    M = similarity_to_template(landmarks_for(face_at(10, 0.5, 150, 140, 128), 128), 128)
    photo = rng.integers(0, 256, (300, 320, 3), dtype=np.uint8)
    align = AlignConfig(face_size=128, upscale=2)
    background = cv2.resize(photo, (640, 600), interpolation=cv2.INTER_NEAREST)
    out = paste_back(photo, [restored[0]], [M], align, canvas=background.copy(), masks=[masks[0]])
    soft = full_mask(out.shape, face_layer(photo.shape, restored[0], M, align))
    parsed = full_mask(out.shape, face_layer(photo.shape, restored[0], M, align, face_mask=masks[0]))
    assert (parsed <= soft + 1e-6).all()  # min(parse, soft): never more of the face than the soft mask
    assert (parsed == 0).mean() > (soft == 0).mean() + 0.02  # the "hair" ring keeps the background
    assert np.array_equal(out[parsed == 0], background[parsed == 0])
    assert (parsed == 1).sum() > 1000  # the disc of "skin" is the restored face
    plain = paste_back(photo, [restored[0]], [M], align, canvas=background.copy())
    assert not np.array_equal(out, plain)


def test_regions_and_labels():
    assert set(CODEFORMER_REGIONS) >= {"hair", "skin", "nose", "l_ear"} and "cloth" not in CODEFORMER_REGIONS
    with pytest.raises(ValueError, match="photos.parser.regions"):
        build_parser(ParserConfig(name="tests.plugins:DiscParser", regions=["teeth"]))
    with pytest.raises(RuntimeError, match="photos.parser.weights"):
        build_parser(ParserConfig(name="bisenet"))
    model, identity, labels = build_parser(ParserConfig(name="bisenet", allow_random_weights=True))
    assert isinstance(model, BiSeNet) and identity == "random-init:bisenet" and labels == LABELS
