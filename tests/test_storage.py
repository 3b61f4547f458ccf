import json
import os
import posixpath
import random
import threading

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem

import tasks.storage as storage
from tasks.storage import get_fs, join_under, redact, write_bytes

# ---------------------------------------------------------------- join_under


@pytest.mark.parametrize(
    "prefix, rel, expected",
    [
        ("out", "a.png", "out/a.png"),
        ("out/", "a.png", "out/a.png"),
        ("s3://bkt/run1", "x/y/z.png", "s3://bkt/run1/x/y/z.png"),
        ("s3://bkt/run1/", "./x/./z.png", "s3://bkt/run1/x/z.png"),
        ("/data/out", "shard-00001/img_000001.png", "/data/out/shard-00001/img_000001.png"),
        ("/data/out", "name with spaces.png", "/data/out/name with spaces.png"),
        ("/data/out", "名前/顔.png", "/data/out/名前/顔.png"),
        ("/data/out", "a..b.png", "/data/out/a..b.png"),
        ("/data/out", ".hidden", "/data/out/.hidden"),
        ("/data/out", "...", "/data/out/..."),
        ("/data/out", "~user/a.png", "/data/out/~user/a.png"),
        ("/data/out", "dir/12:30:00.png", "/data/out/dir/12:30:00.png"),
        ("/", "a.png", "/a.png"),
    ],
)
def test_join_under_accepts_normal_keys(prefix, rel, expected):
    assert join_under(prefix, rel) == expected


ADVERSARIAL = [
    "",
    ".",
    "./",
    "./.",
    "..",
    "../x.png",
    "a/../../x.png",
    "a/..",
    "a/b/../../../etc/passwd",
    "/etc/passwd",
    "//server/share",
    "a//b.png",
    "a/",
    "a\\b.png",
    "..\\..\\x.png",
    "a\x00b.png",
    "a\nb.png",
    "a\rb",
    "tab\there",
    "del\x7f",
    "nel\x85",
    "s3://other-bucket/x.png",
    "file:///etc/passwd",
    "x/https://evil/",
    "C:/Windows/x.png",
    "c:x.png",
    "memory::s3://bkt/x",
    "a/%2e%2e/b.png",
    "%2E%2E/x.png",
    "a%2fb.png",
    "a%5Cb.png",
    "%00.png",
    "\u2025/x.png",  # TWO DOT LEADER: NFKC -> ".."
    "\uff0e\uff0e/x.png",  # fullwidth dots
    "a\uff0fb.png",  # fullwidth solidus: NFKC -> "/"
    "a\uff3cb.png",  # fullwidth reverse solidus
    "x" * 256 + ".png",
]


@pytest.mark.parametrize("rel", ADVERSARIAL)
def test_join_under_rejects_escapes(rel):
    with pytest.raises(ValueError):
        join_under("/data/out", rel)


@pytest.mark.parametrize("bad", [None, b"a.png", 3])
def test_join_under_rejects_non_strings(bad):
    with pytest.raises(ValueError):
        join_under("/data/out", bad)
    with pytest.raises(ValueError):
        join_under(bad or "", "a.png")


def test_join_under_error_message_names_the_key():
    with pytest.raises(ValueError, match=r"unsafe relative key '\.\./x': '\.\.' segments are not allowed"):
        join_under("out", "../x")


def test_join_under_property_never_escapes(tmp_path):
    """Random compositions of hostile pieces: either rejected, or resolved strictly inside the prefix."""
    rng = random.Random(1234)
    pieces = [
        "a", "b.png", ".", "..", "...", "/", "//", "\\", "\x00", "\n", ":", "://", "::", "%2e", "%2f", "%",
        "~", " ", "\u2025", "\uff0e", "\uff0f", "s3", "file", "C:", "é", "-", "_",
    ]
    prefix = str(tmp_path / "out")
    accepted = 0
    for _ in range(4000):
        rel = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 7)))
        try:
            out = join_under(prefix, rel)
        except ValueError:
            continue
        accepted += 1
        assert out.startswith(prefix + "/")
        tail = out[len(prefix) + 1 :]
        segs = tail.split("/")
        assert all(s not in ("", ".", "..") for s in segs), rel
        assert "\\" not in tail and "\x00" not in tail
        assert posixpath.normpath(out).startswith(prefix + "/")
        real = os.path.realpath(out)
        assert real.startswith(os.path.realpath(prefix) + os.sep), (rel, real)
    assert accepted > 200  # the generator also produces plenty of legitimate names


# ---------------------------------------------------------------- write_bytes


def test_write_bytes_local_creates_parents_and_leaves_no_temp(tmp_path):
    fs, base = get_fs(str(tmp_path))
    assert isinstance(fs, LocalFileSystem)
    target = join_under(base, "deep/nested/dir/x.png")
    payload = os.urandom(300_000)
    write_bytes(fs, target, payload)
    with open(target, "rb") as f:
        assert f.read() == payload
    assert os.listdir(os.path.dirname(target)) == ["x.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(target).st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    write_bytes(fs, target, b"second")  # overwrite
    with open(target, "rb") as f:
        assert f.read() == b"second"
    assert os.listdir(os.path.dirname(target)) == ["x.png"]


def test_write_bytes_local_is_atomic_for_readers(tmp_path):
    fs, base = get_fs(str(tmp_path))
    target = join_under(base, "shard.bin")
    size = 1 << 20
    write_bytes(fs, target, b"\x00" * size)
    stop = threading.Event()
    seen = []

    def reader():
        while not stop.is_set():
            with open(target, "rb") as f:
                data = f.read()
            # A reader must only ever see a complete, single-generation file.
            seen.append(len(data) == size and data.count(data[:1]) == size)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(1, 40):
            write_bytes(fs, target, bytes([i]) * size)
    finally:
        stop.set()
        t.join()
    assert seen and all(seen)
    assert os.listdir(tmp_path) == ["shard.bin"]


def test_write_bytes_failure_keeps_old_file_and_cleans_temp(tmp_path, monkeypatch):
    fs, base = get_fs(str(tmp_path))
    target = join_under(base, "keep.txt")
    write_bytes(fs, target, b"old")

    def boom(src, dst):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        write_bytes(fs, target, b"new")
    with open(target, "rb") as f:
        assert f.read() == b"old"
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_write_bytes_other_fsspec_backend():
    fs = fsspec.filesystem("memory")
    write_bytes(fs, "/wb-test/a/b/c.bin", b"xyz")
    assert fs.cat_file("/wb-test/a/b/c.bin") == b"xyz"
    fs.rm("/wb-test", recursive=True)


# ---------------------------------------------------------------- get_fs


def test_get_fs_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = get_fs("rel/dir/file.png")
    assert isinstance(fs, LocalFileSystem)
    assert path == f"{tmp_path}/rel/dir/file.png"
    fs2, path2 = get_fs(f"file://{tmp_path}/x.png")
    assert isinstance(fs2, LocalFileSystem) and path2 == f"{tmp_path}/x.png"


def test_get_fs_s3_round_trip(s3_server):
    bucket = s3_server.new_bucket("storage")
    prefix = f"s3://{bucket}/run1"
    fs, base = get_fs(prefix, s3_server.storage_options)
    assert base == f"{bucket}/run1"
    keys = ["a.png", "sub/b.png", "sub/deeper/c.png"]
    for i, k in enumerate(keys):
        write_bytes(fs, join_under(base, k), bytes([i]) * (1000 + i))
    listed = sorted(fs.find(base))
    assert listed == sorted(f"{bucket}/run1/{k}" for k in keys)
    assert fs.cat_file(f"{bucket}/run1/sub/b.png") == b"\x01" * 1001
    # A fresh client (another process would be one) sees the objects too.
    assert s3_server.fs().cat_file(f"{bucket}/run1/sub/deeper/c.png") == b"\x02" * 1002


def test_get_fs_s3_endpoint_from_environment(s3_server, monkeypatch):
    """Credentials and endpoint only from the AWS_* env vars (botocore honours AWS_ENDPOINT_URL)."""
    bucket = s3_server.new_bucket("envonly")
    s3_server.fs().pipe_file(f"{bucket}/k.txt", b"from-env")
    for name in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    fs, path = get_fs(f"s3://{bucket}/k.txt", {"skip_instance_cache": True})
    assert fs.cat_file(path) == b"from-env"
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server.endpoint_url)  # the service-specific one alone
    fs, path = get_fs(f"s3://{bucket}/k.txt", {"skip_instance_cache": True})
    assert fs.cat_file(path) == b"from-env"


def test_endpoint_in_client_kwargs(s3_server):
    opts = dict(s3_server.storage_options)
    opts["client_kwargs"] = {**opts["client_kwargs"], "endpoint_url": opts.pop("endpoint_url")}
    bucket = s3_server.new_bucket("ckw")
    fs, path = get_fs(f"s3://{bucket}/x.bin", opts)
    write_bytes(fs, path, b"ok")
    assert fs.cat_file(path) == b"ok"


# ---------------------------------------------------------------- redact


def test_redact_hides_secrets(s3_server):
    opts = {
        **s3_server.storage_options,
        "token": "tok-123",
        "config_kwargs": {"s3": {"addressing_style": "path"}},
        "client_kwargs": {
            "region_name": "us-east-1",
            "aws_session_token": "sess-456",
            "endpoint_url": "http://user:hunter2@127.0.0.1:9000",
        },
        "credentials": {"anything": "inside-hidden"},
        "password": "",
        "anon": False,
    }
    before = repr(opts)
    red = redact(opts)
    text = repr(red)
    for secret in (s3_server.secret_key, s3_server.access_key, "tok-123", "sess-456", "hunter2", "inside-hidden"):
        assert secret not in text
    assert red["secret"] == red["key"] == red["token"] == "***"
    assert red["endpoint_url"] == s3_server.endpoint_url
    assert red["client_kwargs"]["region_name"] == "us-east-1"
    assert red["client_kwargs"]["endpoint_url"] == "http://***@127.0.0.1:9000"
    assert red["config_kwargs"] == {"s3": {"addressing_style": "path"}}
    assert red["anon"] is False and red["password"] == ""
    assert repr(opts) == before  # input untouched
    assert redact(None) == {}


def test_s3_client_defaults_are_not_rewritten_by_the_first_client(s3_server):
    """botocore rewrites a Config's retries dict in place; fsspec keys its instance cache on the options."""
    from tasks.storage import S3_CLIENT_DEFAULTS, get_fs

    before = json.dumps(S3_CLIENT_DEFAULTS, sort_keys=True)
    so = {"endpoint_url": s3_server.endpoint_url, "key": s3_server.access_key, "secret": s3_server.secret_key}
    bucket = s3_server.new_bucket("cachekey")
    fs1, _ = get_fs(f"s3://{bucket}/a", so)
    fs1.ls(bucket)  # the first request builds the client
    fs2, _ = get_fs(f"s3://{bucket}/a", so)
    assert json.dumps(S3_CLIENT_DEFAULTS, sort_keys=True) == before and fs2 is fs1
