"""bench/bench_shards.py runs and prints its tables; shard output sends fewer PUTs than loose files."""

import pytest

from bench.bench_shards import main


def test_planning_prints_files_vs_shards_and_resume(tmp_path, capsys):
    result = main(["planning", "--counts", "2000", "4000", "--per-shard", "1000", "--resume-files", "2000",
                   "--workers", "1", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    for column in ("mode", "samples", "shards", "seconds", "peak_MiB", "+MiB", "ratio_s", "ratio_+MiB"):
        assert column in out
    modes = [r["mode"] for r in result["rows"]]
    assert modes == ["files: plan()", "shards: plan_units()"] * 2 + ["resume files: committed_ids()",
                                                                      "resume shards: plan_units()"]
    shards = [r for r in result["rows"] if r["mode"].startswith("shards")]
    assert [r["shards"] for r in shards] == [2, 4] and all(r["todo"] == r["shards"] for r in shards)
    resume = result["rows"][-1]
    assert resume["todo"] == 0 and resume["skipped"] == 4  # every unit found committed from marker names
    assert "shard-mode driver peak" in out and list(tmp_path.iterdir()) == []  # temporary data removed


@pytest.mark.usefixtures("one_torch_thread")
def test_requests_webdataset_output_sends_fewer_puts(s3_server, monkeypatch, tmp_path, capsys):
    for k, v in s3_server.env.items():  # credentials through the environment, as --endpoint expects
        monkeypatch.setenv(k, v)
    result = main(["requests", "--count", "8", "--shard-size", "4", "--batch-size", "8",
                   "--endpoint", s3_server.endpoint_url, "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    for column in ("output", "PUT/img", "GET/img", "LIST/img", "HEAD/img", "ratio_PUT", "ratio_LIST"):
        assert column in out
    files, wds = result["files"]["kinds"], result["webdataset"]["kinds"]
    assert 0 < wds["PUT"] < files["PUT"]
    assert files["PUT"] >= 2 * 8  # an lq and an hq object per image
    assert files["GET"] >= 8 and wds["GET"] >= 8  # the same loose inputs are read in both modes
