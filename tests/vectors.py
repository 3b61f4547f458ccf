"""Access to ../shared: the reference test vectors, checkpoint layouts and sample faces."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import torch

SHARED = Path(os.environ.get("DR2PIPE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
VECTORS = SHARED / "test-vectors"
LAYOUTS = SHARED / "checkpoint-layouts"


@functools.cache
def vector(name: str) -> dict[str, np.ndarray]:
    with np.load(VECTORS / name) as z:
        return {k: z[k] for k in z.files}


def config(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


def state_dict(name: str) -> dict[str, torch.Tensor]:
    return torch.load(VECTORS / name, map_location="cpu", weights_only=True)


def layout(name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) rows of a checkpoint layout TSV, in order."""
    rows = []
    for line in (LAYOUTS / name).read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            rows.append((key, tuple(int(d) for d in shape.strip("()").split(",") if d.strip())))
    return rows
