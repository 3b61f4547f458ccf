"""What a stage is: the columns it reads and adds (its Contract, checked when a pipeline is built, and the
source of the manifest's schema), and the skeleton of a model stage, written once: select the "ok" rows,
zero-fill the image outputs, run the model on the ok rows only, then add the per-row annotations.

Rows whose status is not "ok" (load errors, transient reads) pass through untouched: their image outputs
are zeros of the right shape (Arrow needs one shape per column) and no model ever sees them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

PIXELS = None  # the "type" of a uint8 (B, S, S, 3) image column: it flows between stages, never to the manifest
IN_FLIGHT = None  # likewise for other columns that only travel between stages (records, per-row arrays)
STATUS = ("status", "error_kind", "error")


@dataclass(frozen=True)
class Contract:
    """The columns a stage reads and the columns it adds, each with its Arrow type (PIXELS for images)."""

    reads: tuple[str, ...] = ()
    adds: tuple[tuple[str, pa.DataType | None], ...] = ()


class Declared:
    """A stage class whose contract does not depend on its arguments declares READS and ADDS; one whose
    contract does (the images a writer writes, the metrics a benchmark computes) overrides contract()."""

    READS: tuple[str, ...] = ()
    ADDS: tuple[tuple[str, pa.DataType | None], ...] = ()

    @classmethod
    def contract(cls, **kwargs) -> Contract:
        return Contract(cls.READS, cls.ADDS)


class ContractError(ValueError):
    """A pipeline whose stages read a column that no earlier stage adds."""


def check_chain(source: list[str], stages: list[tuple[type, dict]]) -> list[tuple[str, pa.DataType]]:
    """Walk the stages in order from the source's columns: every column read must have been added before.
    Returns the typed columns the chain adds, in order (the manifest's schema follows from them)."""
    have, typed = set(source), {}
    for stage_cls, kwargs in stages:
        c = stage_cls.contract(**kwargs)
        missing = [r for r in c.reads if r not in have]
        if missing:
            raise ContractError(f"stage {stage_cls.__name__} reads {missing}, which no earlier stage adds "
                                f"(available: {sorted(have)})")
        for name, kind in c.adds:
            have.add(name)
            if kind is not None:
                typed[name] = kind
    return list(typed.items())


def ok_rows(batch: dict[str, np.ndarray]) -> np.ndarray:
    """Indices of the rows a stage computes on."""
    return np.flatnonzero(batch["status"] == "ok")


def per_row(batch: dict[str, np.ndarray], value, dtype=object) -> np.ndarray:
    """A per-row constant column (a weights identity, a method name) for every row of the batch."""
    return np.array([value] * len(batch["id"]), dtype=dtype)


class ImageStage(Declared):
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
