"""bench/count_requests.py against the S3 test server: a known sequence of fsspec calls, its request counts."""

from __future__ import annotations

from bench.count_requests import count_requests


def test_counts_puts_lists_gets_and_heads(s3_server):
    fs, bucket = s3_server.fs(), s3_server.new_bucket("count")
    fs.pipe_file(f"{bucket}/warm", b"0")  # connect outside the block: session set-up is not counted
    with count_requests(fs) as counts:
        for k in range(3):
            fs.pipe_file(f"{bucket}/p/{k}.bin", b"x" * (k + 1))
        listing = fs.ls(f"{bucket}/p", refresh=True)
        assert fs.cat_file(f"{bucket}/p/2.bin") == b"xxx"
        fs.invalidate_cache()
        assert fs.info(f"{bucket}/p/0.bin")["size"] == 1
    assert len(listing) == 3
    assert counts.by_operation["PutObject"] == 3
    assert counts.by_kind["PUT"] == 3 and counts.by_kind["LIST"] == 1 and counts.by_kind["GET"] == 1
    assert counts.by_kind["HEAD"] == 1, counts.by_operation
    assert counts.total == 6, counts.by_operation
    fs.pipe_file(f"{bucket}/after", b"1")  # unhooked once the block ends
    assert counts.total == 6


def test_counts_only_the_given_filesystem(s3_server):
    watched, other = s3_server.fs(), s3_server.fs()
    bucket = s3_server.new_bucket("count")
    other.pipe_file(f"{bucket}/warm", b"0")
    with count_requests(watched) as counts:
        other.pipe_file(f"{bucket}/a", b"a")
        watched.pipe_file(f"{bucket}/b", b"b")
    assert dict(counts.by_kind) == {"PUT": 1}
