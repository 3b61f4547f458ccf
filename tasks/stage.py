"""The skeleton of a model stage, written once: select the "ok" rows, zero-fill the image outputs, run the
model on the ok rows only, then add the per-row annotations. A stage says only what it computes.

Rows whose status is not "ok" (load errors, transient reads) pass through untouched: their image outputs
are zeros of the right shape (Arrow needs one shape per column) and no model ever sees them.
"""

from __future__ import annotations

import numpy as np


def ok_rows(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Indices of the rows a stage computes on."""
    return np.flatnonzero(batch["status"] == "ok")


def per_row(batch: dict[str, np.ndarray], value, dtype=object) -> np.ndarray:
    """A per-row constant column (a weights identity, a method name) for every row of the batch."""
    return np.array([value] * len(batch["id"]), dtype=dtype)


class ImageStage:
    """Base of a per-batch model stage whose outputs are uint8 (B, S, S, 3) image columns.

    Subclasses define `output_sizes` (each output column and its side, known even without ok rows),
    `run` (the outputs of the ok rows, in their order) and, when they add per-row columns, `annotate`.
    Other per-row outputs of `run` (a start step, a blur level) are declared with their fill value for the
    rows not computed by `empty_columns`.
    """

    def output_sizes(self, batch: dict[str, np.ndarray]) -> dict[str, int]:
        raise NotImplementedError

    def empty_columns(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Non-image outputs of `run`, filled for every row with the value error rows keep."""
        return {}

    def run(self, batch: dict[str, np.ndarray], ok: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def annotate(self, batch: dict[str, np.ndarray]) -> None:
        """Per-row columns added after the outputs (all rows, error rows included)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok, n = ok_rows(batch), len(batch["id"])
        outputs = {name: np.zeros((n, size, size, 3), np.uint8) for name, size in self.output_sizes(batch).items()}
        outputs.update(self.empty_columns(batch))
        if len(ok):
            for name, pixels in self.run(batch, ok).items():
                outputs[name][ok] = pixels
        batch.update(outputs)
        self.annotate(batch)
        return batch
