"""The stage skeleton (tasks/stage.py): only ok rows are computed, the others get zeros of the right shape."""

import numpy as np
import pytest

from tasks.stage import ImageStage, per_row


class Invert(ImageStage):
    def __init__(self):
        self.seen = []

    def output_sizes(self, batch):
        return {"inverted": batch["image"].shape[1], "small": 2}

    def run(self, batch, ok):
        self.seen.append(list(ok))
        return {"inverted": 255 - batch["image"][ok], "small": batch["image"][ok][:, :2, :2]}

    def annotate(self, batch):
        batch["weights"] = per_row(batch, "w")


def _batch(status):
    rng = np.random.default_rng(0)
    n = len(status)
    return {"id": np.array([f"s{k}" for k in range(n)], dtype=object), "status": np.array(status, dtype=object),
            "image": rng.integers(1, 255, (n, 4, 4, 3), dtype=np.uint8)}


def test_only_ok_rows_are_computed_and_the_others_are_zero():
    stage, batch = Invert(), _batch(["ok", "error", "ok", "transient"])
    image = batch["image"].copy()
    out = stage(batch)
    assert stage.seen == [[0, 2]]
    assert np.array_equal(out["inverted"][[0, 2]], 255 - image[[0, 2]]) and not out["inverted"][[1, 3]].any()
    assert out["small"].shape == (4, 2, 2, 3) and out["small"].dtype == np.uint8
    assert list(out["weights"]) == ["w"] * 4


def test_a_batch_without_ok_rows_never_runs_the_model_and_keeps_its_shapes():
    stage = Invert()
    out = stage(_batch(["error", "error"]))
    assert stage.seen == []
    assert out["inverted"].shape == (2, 4, 4, 3) and not out["inverted"].any() and list(out["weights"]) == ["w"] * 2


def test_a_chain_reading_a_column_no_earlier_stage_adds_is_refused_when_built():
    import pyarrow as pa

    from tasks.augment_stage import AugmentWriteConfig, BlurAndWrite
    from tasks.dr2_stage import DR2Stage
    from tasks.load_stage import LISTING_COLUMNS, LoadFaces
    from tasks.manifest import ManifestWriter
    from tasks.stage import ContractError, check_chain

    load = (LoadFaces, {"specs": {"N": None, "tau": None, "sigma": None}})
    typed = dict(check_chain(list(LISTING_COLUMNS), [load, (DR2Stage, {}), (BlurAndWrite, {
        "write": AugmentWriteConfig(hq=False)}), (ManifestWriter, {})]))
    assert typed["sigma"] == pa.float64() and typed["lq"] == pa.string() and "hq" not in typed
    assert "image" not in typed and "dr2" not in typed  # pixels never reach the manifest
    with pytest.raises(ContractError, match=r"DR2Stage reads \['N', 'tau'\]"):
        check_chain(list(LISTING_COLUMNS), [(LoadFaces, {"specs": {"sigma": None}}), (DR2Stage, {})])
    with pytest.raises(ContractError, match=r"BlurAndWrite reads \['sigma'\]"):
        check_chain(list(LISTING_COLUMNS), [(LoadFaces, {"specs": {"N": None, "tau": None}}), (DR2Stage, {}),
                                            (BlurAndWrite, {"write": AugmentWriteConfig()})])
