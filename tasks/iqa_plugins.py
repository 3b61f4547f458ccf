"""Learned no-reference quality metrics (MUSIQ, CLIP-IQA, MANIQA, TOPIQ-face, ...) through pyiqa, as a metric
plug-in with its weights from a configured path.

    --metrics.plugins '{musiq: {class: tasks.iqa_plugins:PyIQAMetric, weights: /w/musiq_koniq_ckpt.pth,
                                kwargs: {metric: musiq}}}' --metrics.names '[niqe, musiq]'

pyiqa downloads weights at first use, which a cluster without internet cannot do: here a metric without a
configured checkpoint is unavailable, with the reason, and pyiqa is given the file (`pretrained_model_path`).
pyiqa is optional (not in the lock); without it the metric is unavailable and says so. An fsspec URI is copied
to a local temporary file first (pyiqa opens paths).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from tasks.metrics import MetricUnavailableError
from tasks.storage import get_fs


class PyIQAMetric:
    """pyiqa.create_metric(metric, pretrained_model_path=weights): score(images) -> (B,) floats."""

    kind = "no_reference"

    def __init__(self, weights: str | None, device: str = "cpu", metric: str = "musiq", **kwargs):
        self.metric = str(metric)
        if not weights:
            raise MetricUnavailableError(
                f"pyiqa {self.metric}: no weights configured (metrics.plugins.<name>.weights: the checkpoint pyiqa "
                "would download at first use; nothing is downloaded here)")
        try:
            import pyiqa
        except ImportError:
            raise MetricUnavailableError(f"pyiqa {self.metric}: the pyiqa package is not installed") from None
        local = self._local(weights)
        self.model = pyiqa.create_metric(self.metric, as_loss=False, device=torch.device(device),
                                         pretrained_model_path=local, **kwargs)
        self.higher_better = not bool(getattr(self.model, "lower_better", False))
        self.weights_identity = f"pyiqa-{self.metric}:{os.path.basename(weights.rstrip('/'))}"
        self.protocol = f"pyiqa {getattr(pyiqa, '__version__', '')} {self.metric}, weights {os.path.basename(weights)}"
        self.device = torch.device(device)

    @staticmethod
    def _local(uri: str) -> str:
        fs, path = get_fs(uri)
        if "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)):
            if not os.path.isfile(path):
                raise MetricUnavailableError(f"pyiqa weights not found: {uri}")
            return path
        if not fs.exists(path):
            raise MetricUnavailableError(f"pyiqa weights not found: {uri}")
        fd, local = tempfile.mkstemp(suffix=os.path.splitext(path)[1])
        with os.fdopen(fd, "wb") as f:
            f.write(fs.cat_file(path))
        return local

    @torch.inference_mode()
    def score(self, images: list[np.ndarray]) -> np.ndarray:
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255).to(self.device)
        return self.model(x).detach().double().cpu().numpy().reshape(-1)
