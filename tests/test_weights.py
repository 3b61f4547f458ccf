import hashlib
import io
import pickle
import re
import zipfile

import pytest
import torch
from safetensors.torch import save as st_save

from tasks.weights import (
    RANDOM_INIT,
    WeightsError,
    WeightsNotFoundError,
    load_state_dict,
    load_weights,
    weights_identity,
)


def _model(hidden: int = 8) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.BatchNorm1d(hidden), torch.nn.Linear(hidden, 2))


def _pt_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _assert_same(a: dict, b: dict):
    assert sorted(a) == sorted(b)  # safetensors stores keys sorted
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.fixture
def sd():
    m = _model()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    m[1].running_mean.uniform_()
    return {k: v.clone() for k, v in m.state_dict().items()}  # includes an int64 num_batches_tracked


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_round_trip_local(tmp_path, sd, ext):
    path = tmp_path / f"model.{ext}"
    path.write_bytes(_pt_bytes(sd) if ext == "pt" else st_save(sd))
    _assert_same(load_state_dict(str(path)), sd)


@pytest.mark.parametrize("ext", ["pt", "safetensors"])
def test_round_trip_s3(s3_server, sd, ext):
    bucket = s3_server.new_bucket("weights")
    data = _pt_bytes(sd) if ext == "pt" else st_save(sd)
    s3_server.fs().pipe_file(f"{bucket}/ckpt/model.{ext}", data)
    uri = f"s3://{bucket}/ckpt/model.{ext}"
    loaded = load_state_dict(uri, storage_options=s3_server.storage_options, sha256=hashlib.sha256(data).hexdigest())
    _assert_same(loaded, sd)
    m = _model()
    ident = load_weights(m, uri, storage_options=s3_server.storage_options)
    assert ident == f"sha256:{hashlib.sha256(data).hexdigest()[:16]}:model.{ext}"
    _assert_same(m.state_dict(), sd)


def test_sha256_pin(tmp_path, sd):
    path = tmp_path / "pinned.pt"
    data = _pt_bytes(sd)
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    for pin in (digest, digest.upper(), f"sha256:{digest}", digest[:16]):
        _assert_same(load_state_dict(str(path), sha256=pin), sd)
    wrong = "0" * 64
    with pytest.raises(WeightsError) as ei:
        load_state_dict(str(path), sha256=wrong)
    msg = str(ei.value)
    assert str(path) in msg and wrong in msg and digest in msg and "mismatch" in msg
    with pytest.raises(WeightsError, match="16 to 64 hex digits"):
        load_state_dict(str(path), sha256="abc")


def test_missing_local_file(tmp_path):
    uri = str(tmp_path / "nope" / "DR2_FFHQ.pkl")
    with pytest.raises(WeightsNotFoundError) as ei:
        load_state_dict(uri)
    assert isinstance(ei.value, FileNotFoundError)
    assert uri in str(ei.value) and "s3://bucket/key" in str(ei.value)


def test_missing_s3_object_and_bucket(s3_server):
    bucket = s3_server.new_bucket("weights")
    for uri in (f"s3://{bucket}/absent.pt", "s3://no-such-bucket-dr2/absent.safetensors"):
        with pytest.raises(WeightsNotFoundError) as ei:
            load_state_dict(uri, storage_options=s3_server.storage_options)
        assert uri in str(ei.value)
    with pytest.raises(FileNotFoundError):  # plain FileNotFoundError handlers catch it too
        load_weights(_model(), f"s3://{bucket}/absent.pt", storage_options=s3_server.storage_options)


class _RunsCode:
    """Unpickling this calls open(marker, 'w'): any side effect proves code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_weights_only_refuses_pickled_code(tmp_path, sd):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    path.write_bytes(_pt_bytes({**sd, "payload": _RunsCode(marker)}))
    with pytest.raises(WeightsError) as ei:
        load_state_dict(str(path))
    assert "weights_only=True" in str(ei.value) and "Unsupported global" in str(ei.value)
    assert str(path) in str(ei.value)
    assert not marker.exists()
    # Control: an unrestricted unpickle of the same archive's data.pkl (tensors stubbed out) really would
    # have executed it.
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))

    class Unrestricted(pickle.Unpickler):
        def persistent_load(self, pid):
            return None

        def find_class(self, module, name):
            if module.startswith("torch"):
                return lambda *args, **kwargs: None
            return super().find_class(module, name)

    Unrestricted(io.BytesIO(data)).load()
    assert marker.exists()


def test_garbage_files(tmp_path):
    for name, data in (("junk.pt", b"not a checkpoint" * 10), ("junk.safetensors", b"\xff" * 64), ("e.pt", b"")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(WeightsError, match=re.escape(str(tmp_path / name))):
            load_state_dict(str(tmp_path / name))


def test_key_selection_and_module_prefix(tmp_path, sd):
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    path = tmp_path / "train_state.pth"
    path.write_bytes(_pt_bytes({"params": other, "params_ema": {f"module.{k}": v for k, v in sd.items()}}))
    _assert_same(load_state_dict(str(path), key="params_ema"), sd)
    _assert_same(load_state_dict(str(path), key="params"), other)
    with pytest.raises(WeightsError, match=r"not a flat state_dict.*'params'.*key="):
        load_state_dict(str(path))
    with pytest.raises(WeightsError, match=r"no entry 'state_dict'.*'params', 'params_ema'"):
        load_state_dict(str(path), key="state_dict")
    # A prefix on only some keys is left alone.
    mixed = {"module.a": torch.ones(1), "b": torch.ones(1)}
    path.write_bytes(_pt_bytes(mixed))
    assert list(load_state_dict(str(path))) == ["module.a", "b"]


def test_strict_load_mismatch_lists_keys(tmp_path, sd):
    path = tmp_path / "model.pt"
    path.write_bytes(_pt_bytes({**{k: v for k, v in sd.items() if k != "0.bias"}, "extra.weight": torch.ones(3)}))
    m = _model(hidden=16)  # every hidden-sized tensor mismatches too
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(WeightsError) as ei:
        load_weights(m, str(path))
    msg = str(ei.value)
    assert "1 missing, 1 unexpected" in msg and "shape mismatches" in msg
    assert "missing: 0.bias" in msg and "unexpected: extra.weight" in msg
    assert "0.weight checkpoint (8, 4) vs model (16, 4)" in msg
    assert str(path) in msg and "Sequential" in msg
    _assert_same(m.state_dict(), before)  # nothing half-loaded


def test_identity_string(tmp_path, sd):
    path = tmp_path / "SPARNetHD_FFHQ_DR2aug.pth"
    data = _pt_bytes(sd)
    path.write_bytes(data)
    m = _model()
    ident = load_weights(m, str(path))
    assert re.fullmatch(r"sha256:[0-9a-f]{16}:SPARNetHD_FFHQ_DR2aug\.pth", ident)
    assert ident == f"sha256:{hashlib.sha256(data).hexdigest()[:16]}:SPARNetHD_FFHQ_DR2aug.pth"
    assert weights_identity("ab" * 32, "s3://b/x/y/m.safetensors") == "sha256:abababababababab:m.safetensors"
    _assert_same(m.state_dict(), sd)
    assert RANDOM_INIT == "random-init"
