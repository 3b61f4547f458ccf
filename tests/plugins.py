"""A plug-in enhancer, loaded by dotted path in tests as a CodeFormer/GPEN wrapper would be."""

import torch


class BrightenEnhancer(torch.nn.Module):
    def __init__(self, amount: float = 0.25):
        super().__init__()
        self.amount = amount

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.amount


class CentreFaceDetector:
    """A deterministic plug-in face detector (the shape of a RetinaFace wrapper built from a weights path).

    Per image it "finds" two faces, returned unsorted: a weak one (score 0.3) in the top-left corner and a
    strong one (`score`) in the centre, with the FFHQ template's landmarks mapped into each box.
    """

    def __init__(self, weights, device, score: float = 0.8, fraction: float = 0.5):
        self.weights, self.device, self.score, self.fraction = weights, device, score, fraction

    @staticmethod
    def _face(x0: float, y0: float, side: float, score: float):
        from tasks.detect import FFHQ_TEMPLATE_512, Face

        return Face((x0, y0, x0 + side, y0 + side), FFHQ_TEMPLATE_512 / 512 * side + [x0, y0], score)

    def detect(self, images):
        out = []
        for img in images:
            h, w = img.shape[:2]
            side = self.fraction * min(h, w)
            out.append([self._face(0.0, 0.0, side / 4, 0.3),
                        self._face((w - side) / 2, (h - side) / 2, side, self.score)])
        return out


class TinyGuidanceScaleNet(torch.nn.Module):
    """A learned per-step guidance scale map (the shape of DynFaceRestore's DGSA): (guides (B,G,C,H,W),
    clipped x0-hat (B,C,H,W), original timesteps (B,)) -> per-pixel scale (B,1,H,W) in (0, 1)."""

    def __init__(self, guides: int = 3, channels: int = 3, hidden: int = 4):
        super().__init__()
        self.inp = torch.nn.Conv2d(channels * (guides + 1) + 1, hidden, 3, padding=1)
        self.out = torch.nn.Conv2d(hidden, 1, 3, padding=1)

    def forward(self, guides: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, G, C, H, W = guides.shape
        t_plane = (t.float() / 1000).reshape(B, 1, 1, 1).expand(B, 1, H, W)
        h = torch.cat([guides.reshape(B, G * C, H, W), x0, t_plane], 1)
        return torch.sigmoid(self.out(torch.relu(self.inp(h))))


class NearestUpsampler(torch.nn.Module):
    """A parameter-free plug-in background upsampler (the interface of tasks/upsample.py): nearest x`scale`,
    recording the largest input (pixels per forward) it was given."""

    input_multiple = 1

    def __init__(self, scale: int = 2):
        super().__init__()
        self.scale = scale
        self.max_pixels = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.max_pixels = max(self.max_pixels, x.shape[0] * x.shape[2] * x.shape[3])
        return torch.nn.functional.interpolate(x, scale_factor=self.scale, mode="nearest")


class DiscParser(torch.nn.Module):
    """A parameter-free plug-in face parser (the interface of tasks/parsing.py): 'skin' in a central disc of
    radius `radius` (fraction of the side), 'hair' elsewhere; logits over BiSeNet's 19 classes."""

    def __init__(self, radius: float = 0.3):
        super().__init__()
        from models.bisenet import LABELS

        self.labels, self.radius = LABELS, radius

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        b, _, h, w = x.shape
        yy, xx = torch.meshgrid(torch.arange(h) - (h - 1) / 2, torch.arange(w) - (w - 1) / 2, indexing="ij")
        skin = (yy**2 + xx**2) <= (self.radius * w) ** 2
        logits = torch.zeros(b, len(self.labels), h, w)
        logits[:, self.labels.index("skin")] = skin.float()
        logits[:, self.labels.index("hair")] = (~skin).float()
        return (logits,)


class DotLandmarks:
    """A landmark-detector plug-in (the shape of a FAN-68 wrapper): the brightest pixel of each of the image's
    four quadrants, (x, y). A weights file is required and holds a sub-pixel offset added to every point."""

    kind = "landmarks"
    protocol = "test dots, 4 points"

    def __init__(self, weights, device):
        import json
        from pathlib import Path

        self.offset = float(json.loads(Path(weights).read_text())["offset"])
        self.weights_identity = f"dots:{Path(weights).name}"

    def landmarks(self, images):
        import numpy as np

        out = []
        for img in images:
            g = img.astype(np.int64).sum(axis=2)
            h, w = g.shape
            pts = []
            for y0, x0 in ((0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2)):
                q = g[y0 : y0 + h // 2, x0 : x0 + w // 2]
                y, x = np.unravel_index(int(q.argmax()), q.shape)
                pts.append((x0 + x + self.offset, y0 + y + self.offset))
            out.append(None if g.max() == 0 else np.array(pts))
        return out


class MeanLevelIQA:
    """A no-reference metric plug-in (the shape of a pyiqa wrapper): the mean pixel level times a scale read
    from its weights file; unavailable (with the reason) without one."""

    kind = "no_reference"
    higher_better = True
    protocol = "test: mean level x scale"

    def __init__(self, weights, device, scale_key: str = "scale"):
        import json
        from pathlib import Path

        from tasks.metrics import MetricUnavailableError

        if not weights:
            raise MetricUnavailableError("mean-level IQA: no weights configured")
        self.scale = float(json.loads(Path(weights).read_text())[scale_key])

    def score(self, images):
        import numpy as np

        return [float(np.mean(im)) / 255 * self.scale for im in images]
