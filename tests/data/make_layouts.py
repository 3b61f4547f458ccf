#!/usr/bin/env python
"""Write the checkpoint layouts (key<TAB>shape, state_dict order) of the public upsampler and parser weights.

    python tests/data/make_layouts.py        # rewrites tests/data/*.tsv

Spelled out from the reference architectures' constructors (BasicSR basicsr/archs/rrdbnet_arch.py for
RealESRGAN_x4plus.pth / RealESRGAN_x2plus.pth under 'params_ema'; facexlib facexlib/parsing/bisenet.py and
resnet.py for parsing_bisenet.pth), independently of models/: the tests compare the project's modules to
these files, so the files must not be read off those modules.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def conv(prefix: str, cin: int, cout: int, k: int, bias: bool = True) -> list[tuple[str, tuple]]:
    rows = [(f"{prefix}.weight", (cout, cin, k, k))]
    return rows + ([(f"{prefix}.bias", (cout,))] if bias else [])


def bn(prefix: str, c: int) -> list[tuple[str, tuple]]:
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]


def rrdbnet(scale: int, num_in_ch=3, num_out_ch=3, num_feat=64, num_block=23, num_grow_ch=32):
    # scale 2: the input is pixel-unshuffled by 2 (x4 channels), scale 1: by 4 (x16)
    cin = num_in_ch * {4: 1, 2: 4, 1: 16}[scale]
    rows = conv("conv_first", cin, num_feat, 3)
    for b in range(num_block):
        for r in (1, 2, 3):
            for c in range(1, 5):
                rows += conv(f"body.{b}.rdb{r}.conv{c}", num_feat + (c - 1) * num_grow_ch, num_grow_ch, 3)
            rows += conv(f"body.{b}.rdb{r}.conv5", num_feat + 4 * num_grow_ch, num_feat, 3)
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        rows += conv(name, num_feat, num_feat, 3)
    return rows + conv("conv_last", num_feat, num_out_ch, 3)


def bisenet(num_class=19):
    rows = conv("cp.resnet.conv1", 3, 64, 7, bias=False) + bn("cp.resnet.bn1", 64)
    chans = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
    for li, (cin, cout, stride) in enumerate(chans, 1):
        for b in range(2):
            p, i = f"cp.resnet.layer{li}.{b}", cin if b == 0 else cout
            rows += conv(f"{p}.conv1", i, cout, 3, bias=False) + bn(f"{p}.bn1", cout)
            rows += conv(f"{p}.conv2", cout, cout, 3, bias=False) + bn(f"{p}.bn2", cout)
            if b == 0 and (cin != cout or stride != 1):
                rows += conv(f"{p}.downsample.0", cin, cout, 1, bias=False) + bn(f"{p}.downsample.1", cout)

    def cbr(p, cin, cout, k):  # ConvBNReLU: conv (no bias) + bn
        return conv(f"{p}.conv", cin, cout, k, bias=False) + bn(f"{p}.bn", cout)

    for name, cin in (("arm16", 256), ("arm32", 512)):
        rows += cbr(f"cp.{name}.conv", cin, 128, 3) + conv(f"cp.{name}.conv_atten", 128, 128, 1, bias=False)
        rows += bn(f"cp.{name}.bn_atten", 128)
    rows += cbr("cp.conv_head32", 128, 128, 3) + cbr("cp.conv_head16", 128, 128, 3) + cbr("cp.conv_avg", 512, 128, 1)
    rows += cbr("ffm.convblk", 256, 256, 1) + conv("ffm.conv1", 256, 64, 1, bias=False)
    rows += conv("ffm.conv2", 64, 256, 1, bias=False)
    for name, cin, mid in (("conv_out", 256, 256), ("conv_out16", 128, 64), ("conv_out32", 128, 64)):
        rows += cbr(f"{name}.conv", cin, mid, 3) + conv(f"{name}.conv_out", mid, num_class, 1, bias=False)
    return rows


LAYOUTS = {
    "realesrgan_x4plus_keys.tsv": rrdbnet(4),
    "realesrgan_x2plus_keys.tsv": rrdbnet(2),
    "parsing_bisenet_keys.tsv": bisenet(),
}


def main() -> None:
    for name, rows in LAYOUTS.items():
        text = "".join(f"{k}\t({', '.join(map(str, s))}{',' if len(s) == 1 else ''})\n" for k, s in rows)
        (HERE / name).write_text(text)
        print(name, len(rows), "tensors")


if __name__ == "__main__":
    main()
