"""Honest faults: which failures are retried, what is committed, and what a user of the manifest sees."""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import threading
import time

import cv2
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from tasks.config import load
from tasks.faults import TRANSIENT, RetryConfig, TransientError, is_transient, retry_call, row_failure
from tasks.listing import list_inputs
from tasks.manifest import BASE_SCHEMA, ManifestWriter, compact_manifest, read_manifest, write_shard
from tasks.pipeline import Summary, config_hash, drain
from tasks.storage import get_fs, read_sources, write_bytes
from tests.test_augment_workflow import FAST, SAMPLES
from workflows.augment import AugmentConfig
from workflows.augment import main as augment

QUICK = RetryConfig(attempts=3, base_s=0.01, max_wait_s=0.02, deadline_s=5)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def test_transient_failures_are_told_apart_from_the_sample_s_own():
    transient = [EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), ConnectionResetError(),
                 TimeoutError(), ReadTimeoutError(endpoint_url="http://x"), _client_error("SlowDown", 503),
                 _client_error("InternalError", 500), _client_error("Whatever", 502),
                 OSError(errno.ECONNREFUSED, "refused")]
    wrapped = OSError(errno.EIO, "s3fs wraps the botocore error")
    wrapped.__cause__ = _client_error("SlowDown", 503)
    permanent = [FileNotFoundError("s3://b/k"), PermissionError("AccessDenied"), _client_error("NoSuchBucket", 404),
                 ValueError("bad data"), OSError(errno.ENOSPC, "disk full")]
    assert all(is_transient(e) for e in transient + [wrapped])
    assert not any(is_transient(e) for e in permanent)
    assert row_failure(TransientError("gave up", "read_transient"), "read")[:2] == (TRANSIENT, "read_transient")
    assert row_failure(FileNotFoundError("x"), "read")[:2] == ("error", "read_missing")
    assert row_failure(RuntimeError("x"), "write")[:2] == ("error", "write")


def test_retry_call_backs_off_then_succeeds_or_gives_up_and_never_retries_a_permanent_failure():
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("down")
        return "data"

    assert retry_call(flaky, "reading x", RetryConfig(attempts=5, base_s=1, max_wait_s=3), sleep=waits.append) == "data"
    assert len(calls) == 3 and len(waits) == 2 and 0.5 <= waits[0] <= 1 and 1 <= waits[1] <= 2  # doubling
    with pytest.raises(TransientError, match="gave up after 3 tries") as ei:
        retry_call(lambda: (_ for _ in ()).throw(TimeoutError("slow")), "reading y", QUICK, kind="write_transient")
    assert ei.value.kind == "write_transient"
    calls.clear()
    with pytest.raises(FileNotFoundError):
        retry_call(lambda: calls.append(1) or (_ for _ in ()).throw(FileNotFoundError("gone")), "reading z", QUICK)
    assert len(calls) == 1


def test_an_input_list_mixing_schemes_reads_each_uri_with_its_own_filesystem(s3_server, tmp_path):
    bucket = s3_server.new_bucket("mixed")
    s3_server.fs().pipe(f"{bucket}/remote.bin", b"from s3")
    (tmp_path / "local.bin").write_bytes(b"from disk")
    got = read_sources([str(tmp_path / "local.bin"), f"s3://{bucket}/remote.bin", f"s3://{bucket}/missing.bin"],
                       s3_server.storage_options, QUICK)
    assert got[:2] == [b"from disk", b"from s3"]
    assert isinstance(got[2], FileNotFoundError)


def test_a_stopped_endpoint_gives_transient_errors_not_hangs(tmp_path):
    port = _free_port()
    options = {"key": "k", "secret": "s", "endpoint_url": f"http://127.0.0.1:{port}",
               "config_kwargs": {"connect_timeout": 1, "read_timeout": 1, "retries": {"max_attempts": 1}}}
    got = read_sources(["s3://nobucket/a.png"], options, QUICK)
    assert isinstance(got[0], TransientError) and got[0].kind == "read_transient"
    fs, path = get_fs("s3://nobucket/out.png", options)
    with pytest.raises(TransientError) as ei:
        write_bytes(fs, path, b"x", QUICK)
    assert ei.value.kind == "write_transient"


def test_same_stems_get_distinct_names_and_repeated_list_rows_are_dropped(tmp_path):
    for name in ("a.png", "a.jpg", "b.png"):
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    listing = list_inputs(str(tmp_path / "in"))
    stems = dict(zip(listing.samples["id"], listing.samples["stem"]))
    assert stems == {"a.jpg": "a.jpg", "a.png": "a.png", "b.png": "b"}  # neither a.* wins the name "a"
    assert not listing.samples["key_error"].any()
    uris = [str(tmp_path / "in" / n) for n in ("a.png", "b.png", "a.png")]
    pd.DataFrame({"uri": uris}).to_csv(tmp_path / "list.csv", index=False)
    listing = list_inputs(str(tmp_path / "list.csv"))
    assert listing.duplicates == 1 and len(listing.samples) == 2


def test_manifest_writer_commits_only_final_rows_and_counts_kinds(tmp_path):
    out = str(tmp_path / "out")
    writer = ManifestWriter(out, [], {"job_seed": 0}, retry=QUICK)
    n = 4
    batch = {"id": np.array([f"s{k}" for k in range(n)], dtype=object), "source": np.array(["x"] * n, dtype=object),
             "status": np.array(["ok", "error", TRANSIENT, "ok"], dtype=object),
             "error_kind": np.array(["", "decode", "read_transient", ""], dtype=object),
             "error": np.array(["", "bad", "down", ""], dtype=object), "weights": np.array(["w"] * n, dtype=object)}
    stats = writer(batch)
    assert (stats["ok"][0], stats["error"][0], stats["transient"][0], stats["rows"][0]) == (2, 1, 1, 3)
    assert json.loads(stats["kinds"][0]) == {"decode": 1, "read_transient": 1}
    df = read_manifest(out).set_index("id")
    assert sorted(df.index) == ["s0", "s1", "s3"] and df.loc["s1", "error_kind"] == "decode"


def test_compaction_leaves_each_id_once_for_any_parquet_reader(tmp_path):
    out = str(tmp_path / "out")
    writer = ManifestWriter(out, [], {"job_seed": 0})

    def commit(ids, status):
        n = len(ids)
        write_shard(writer.table({"id": np.array(ids, dtype=object), "source": np.array(ids, dtype=object),
                                  "status": np.array([status] * n, dtype=object),
                                  "error_kind": np.array(["decode" if status == "error" else ""] * n, dtype=object),
                                  "error": np.array([""] * n, dtype=object)}), out)
        time.sleep(0.01)  # processed_at has millisecond resolution

    commit(["a", "b", "c"], "error")  # a first run
    commit(["a", "b"], "ok")  # --resume.retry-errors redid two of them
    assert len(pd.read_parquet(tmp_path / "out" / "manifest")) == 5  # the state compaction repairs
    assert compact_manifest(out) == 2
    plain = pd.read_parquet(tmp_path / "out" / "manifest")
    assert sorted(plain["id"]) == ["a", "b", "c"]
    assert plain.set_index("id")["status"].to_dict() == {"a": "ok", "b": "ok", "c": "error"}
    ids = pads.dataset(str(tmp_path / "out" / "manifest")).to_table().column("id").to_pylist()
    assert sorted(ids) == ["a", "b", "c"]
    commit(["c"], "ok")
    assert compact_manifest(out) == 1  # the first shard lost its last row: it is removed, not left empty
    assert len(list((tmp_path / "out" / "manifest").glob("part-*.parquet"))) == 2
    assert compact_manifest(out) == 0


def test_print_config_and_config_hash_never_show_secrets(tmp_path, capsys):
    secret = "s3cr3t-value-123"
    argv = ["--storage-options", f"{{key: AKIA-ID, secret: {secret}, endpoint_url: http://u:pw@127.0.0.1:1}}"]
    with pytest.raises(SystemExit):
        load(AugmentConfig, argv + ["--print-config"], "", None)
    shown = capsys.readouterr().out
    assert secret not in shown and "pw@" not in shown and "AKIA-ID" not in shown and "***" in shown
    a = load(AugmentConfig, argv, "", None)
    b = load(AugmentConfig, [argv[0], argv[1].replace(secret, "another-secret")], "", None)
    c = load(AugmentConfig, argv + ["--seed", "7"], "", None)
    assert config_hash(a) == config_hash(b) != config_hash(c)


def test_summary_counts_a_restarted_actor_once_and_drain_logs_progress(caplog):
    s = Summary("augment", "/tmp/x", seconds=10.0, pool_size=1,
                busy={"DR2Stage@h:1": 2.0, "DR2Stage@h:2": 6.0})  # pid 1 died, pid 2 replaced it
    assert s.model_actors == 1 and s.restarted_actors == 1 and s.actor_utilisation == pytest.approx(0.8)
    assert "+1 restarted" in s.text()

    def heartbeats() -> int:
        return sum("running" in r.message and "committed" in r.message for r in caplog.records)

    class SlowDataset:  # a stage that takes a while: its one batch comes after two heartbeats (on any machine load)
        def iter_batches(self, **_):
            deadline = time.monotonic() + 30
            while heartbeats() < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            yield {"ok": np.array([1]), "error": np.array([0]), "transient": np.array([2]),
                   "shard": np.array(["s"], dtype=object), "kinds": np.array(['{"read_transient": 2}']),
                   "busy": np.array(["{}"])}

    caplog.set_level(logging.INFO, logger="tasks.pipeline")
    s = drain(SlowDataset(), Summary("augment", "/tmp/x"), heartbeat_s=0.1)
    assert (s.ok, s.transient, s.error_kinds) == (1, 2, {"read_transient": 2})
    assert heartbeats() >= 2
    assert "INCOMPLETE: 2 samples failed transiently" in s.text()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(180)
def test_an_endpoint_that_never_answers_is_refused_in_bounded_time(tmp_path, capsys):
    """Accepts connections, never answers: the job says what it waited on and stops, instead of hanging."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    try:
        port = server.getsockname()[1]
        options = (f"{{key: k, secret: s, endpoint_url: 'http://127.0.0.1:{port}', "
                   "config_kwargs: {connect_timeout: 1, read_timeout: 1, retries: {max_attempts: 1}}}")
        rc = augment(["--input", "s3://silent/in/", "--output", str(tmp_path / "out"), *FAST,
                      "--storage-options", options, "--retry.attempts", "2", "--retry.deadline-s", "3"])
    finally:
        stop.set()
        server.close()
        for conn in held:
            conn.close()
    err = capsys.readouterr().err
    assert rc == 2 and "listing s3://silent/in/" in err and "Traceback" not in err


def test_a_checkpoint_refused_as_code_is_reported_once_with_its_reason(tmp_path, capsys):
    import pickle

    class RunsCode:  # os.system pickles as posix.system (print would not: Ray patches it)
        def __reduce__(self):
            return (os.system, ("true",))

    evil = tmp_path / "evil.pth"
    import torch

    torch.save({"w": torch.zeros(1), "payload": RunsCode()}, evil, pickle_module=pickle)
    rc = augment(["--input", str(SAMPLES), "--output", str(tmp_path / "out"), "--dr2.weights", str(evil)])
    err = capsys.readouterr().err
    assert rc == 2 and str(evil) in err and "unsupported GLOBAL posix.system" in err
    assert "Traceback" not in err and "will likely succeed" not in err and err.count("evil.pth") == 1
    assert not (tmp_path / "out").exists()


def test_wrong_options_and_missing_inputs_are_refused_on_the_driver(tmp_path, capsys):
    assert augment(["--input", str(SAMPLES), "--output", str(tmp_path / "o"), *FAST, "--dr2.N", "3"]) == 2
    err = capsys.readouterr().err
    assert "--dr2.N" in err and "allowed: 1, 2, 4, 8, 16, 32" in err and "Traceback" not in err
    assert augment(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"), *FAST]) == 2
    err = capsys.readouterr().err
    assert "--input" in err and "not found" in err and "Traceback" not in err


def _faces(n: int, size: int = 32) -> list[bytes]:
    face = cv2.resize(cv2.imread(str(SAMPLES / "256.png")), (size, size), interpolation=cv2.INTER_AREA)
    return [cv2.imencode(".png", np.roll(face, k, axis=1))[1].tobytes() for k in range(n)]


def test_commits_flow_during_the_run_on_two_cpus(ray_local, tmp_path, monkeypatch):
    """The first manifest shard is committed before a quarter of the samples have been through the model."""
    import workflows.augment as workflow
    from tasks.dr2_stage import DR2Stage

    (tmp_path / "in").mkdir()
    n = 24
    for k, data in enumerate(_faces(n, 64)):
        (tmp_path / "in" / f"{k:03d}.png").write_bytes(data)
    done_log = tmp_path / "model-done.log"

    class RecordingDR2Stage(DR2Stage):  # travels to the actor by value, with the log's path
        def __call__(self, batch):
            out = super().__call__(batch)
            with open(done_log, "a") as f:
                f.writelines(f"{time.time()}\n" for _ in out["id"])
            return out

    monkeypatch.setattr(workflow, "DR2Stage", RecordingDR2Stage)
    out = tmp_path / "out"
    # ~1.5 s of model per sample (26 UNet calls at 64 px), so a quarter of the run is well past start-up
    assert augment(["--input", str(tmp_path / "in"), "--output", str(out), *FAST, "--image.size", "64",
                    "--dr2.N", "8", "--dr2.tau", "5", "--runtime.batch-size", "2", "--cluster.block-rows", "2",
                    "--cluster.manifest-rows", "2"]) == 0
    done = sorted(float(t) for t in done_log.read_text().split())
    first_commit = min(p.stat().st_mtime for p in (out / "manifest").glob("part-*.parquet"))
    assert len(done) == n
    assert first_commit < done[len(done) // 4 - 1], (first_commit - done[0], done[-1] - done[0])


@pytest.fixture(scope="module")
def own_s3(tmp_path_factory):
    """A SeaweedFS of this module's own, so that stopping it cannot disturb other tests."""
    from tests.s3server import start_seaweedfs

    server, weed = start_seaweedfs(tmp_path_factory.mktemp("weed-outage"))
    yield server, weed
    weed.stop()


def _outage_after_first_commit(server, weed, output_key: str, seconds: float) -> threading.Thread:
    def run():
        fs = server.fs()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 120:
            try:
                fs.invalidate_cache()
                if fs.glob(f"{output_key}/manifest/part-*.parquet"):
                    break
            except Exception:
                pass
            time.sleep(0.2)
        weed.stop()
        time.sleep(seconds)
        weed.restart(server)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.slow
def test_s3_outage_mid_run_commits_no_good_sample_as_an_error(ray_local, own_s3, capsys):
    server, weed = own_s3
    bucket = server.new_bucket("outage")
    fs = server.fs()
    for k, data in enumerate(_faces(24)):
        fs.pipe(f"{bucket}/in/{k:03d}.png", data)
    options = json.dumps({**server.storage_options, "config_kwargs": {"connect_timeout": 1, "read_timeout": 5}})
    common = ["--input", f"s3://{bucket}/in/", *FAST, "--storage-options", options, "--dr2.tau", "20",
              "--runtime.batch-size", "2", "--cluster.manifest-rows", "2"]

    # 1. The outage outlasts the retries: samples in flight are left uncommitted, the run says so and ends 3.
    outage = _outage_after_first_commit(server, weed, f"{bucket}/short", 8)
    rc = augment([*common, "--output", f"s3://{bucket}/short/", "--retry.attempts", "2",
                  "--retry.base-s", "0.2", "--retry.deadline-s", "1"])
    outage.join()
    err = capsys.readouterr().err
    df = read_manifest(f"s3://{bucket}/short/", server.storage_options)
    summary = json.loads(fs.cat(f"{bucket}/short/_summary.json"))
    assert (df["status"] == "ok").all(), df[df["status"] != "ok"][["id", "error"]]  # no good sample as an error
    assert summary["transient"] > 0 and summary["ok"] + summary["transient"] == 24 and rc == 3
    assert "INCOMPLETE" in err and "rerun the same command" in err
    # ... and a plain rerun finishes exactly them: every input once, for a plain Parquet read too.
    assert augment([*common, "--output", f"s3://{bucket}/short/"]) == 0
    raw = pa.concat_tables([pads.dataset(f"{bucket}/short/manifest", filesystem=server.pyarrow_fs()).to_table()])
    assert sorted(raw.column("id").to_pylist()) == [f"{k:03d}.png" for k in range(24)]
    assert set(raw.column("status").to_pylist()) == {"ok"}

    # 2. The outage is shorter than the retries: the run rides it out, all ok, exit 0.
    outage = _outage_after_first_commit(server, weed, f"{bucket}/long", 5)
    rc = augment([*common, "--output", f"s3://{bucket}/long/", "--retry.deadline-s", "90", "--retry.max-wait-s", "2"])
    outage.join()
    df = read_manifest(f"s3://{bucket}/long/", server.storage_options)
    assert rc == 0 and len(df) == 24 and (df["status"] == "ok").all()


def test_retry_errors_leaves_each_id_once_in_a_plain_read(ray_local, tmp_path):
    (tmp_path / "in").mkdir()
    faces = _faces(3)
    (tmp_path / "in" / "a.png").write_bytes(faces[0])
    (tmp_path / "in" / "a.jpg").write_bytes(cv2.imencode(".jpg", cv2.imdecode(
        np.frombuffer(faces[1], np.uint8), cv2.IMREAD_COLOR))[1].tobytes())
    (tmp_path / "in" / "broken.png").write_bytes(faces[2][:40])
    out = tmp_path / "out"
    assert augment(["--input", str(tmp_path / "in"), "--output", str(out), *FAST]) == 0
    assert (out / "lq" / "a.png.png").exists() and (out / "lq" / "a.jpg.png").exists()  # same stem: both kept
    (tmp_path / "in" / "broken.png").write_bytes(faces[2])  # the user fixes the file
    assert augment(["--input", str(tmp_path / "in"), "--output", str(out), *FAST,
                    "--resume.retry-errors", "true"]) == 0
    plain = pd.read_parquet(out / "manifest")
    assert sorted(plain["id"]) == ["a.jpg", "a.png", "broken.png"] and (plain["status"] == "ok").all()
    assert set(BASE_SCHEMA.names) <= set(plain.columns)


def test_per_sample_dr2_params_from_a_list_that_cannot_run_are_error_rows():
    from tasks.config import Sampled
    from tasks.load_stage import ImageConfig, LoadFaces

    n = 3
    src = str(SAMPLES / "256.png")
    batch = {"id": np.array([f"f{k}" for k in range(n)], dtype=object), "source": np.array([src] * n, dtype=object),
             "stem": np.array([f"f{k}" for k in range(n)], dtype=object),
             "key_error": np.array([""] * n, dtype=object), "key_error_kind": np.array([""] * n, dtype=object),
             "N": np.array([4, 3, 4]), "tau": np.array([22, 10, 150])}
    load = LoadFaces(ImageConfig(size=64), {"N": Sampled((4,)), "tau": Sampled((22,))}, job_seed=0)
    out = load(batch)
    assert list(out["status"]) == ["ok", "error", "error"]
    assert list(out["error_kind"]) == ["", "bad_params", "bad_params"]
    assert "N=3 must be a positive divisor of the model size 64" in out["error"][1] and "tau=150" in out["error"][2]
