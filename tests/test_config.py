"""Configs: YAML defaults, dotted CLI overrides, --help covering every field, strict keys."""

import random

import pytest
import yaml

from tasks.config import Sampled, _walk, load, make_parser, to_dict
from workflows.augment import AugmentConfig


def test_yaml_then_cli_overrides(tmp_path):
    cfg_file = tmp_path / "a.yaml"
    cfg_file.write_text(yaml.safe_dump({"input": "s3://in/", "dr2": {"N": [4, 8], "tau": 22},
                                        "runtime": {"batch_size": 8}}))
    cfg = load(AugmentConfig, ["--config", str(cfg_file), "--runtime.batch-size", "64", "--dr2.tau", "20:30",
                               "--output", "001", "--allow-random-weights", "true", "--blur.sigma", "0"],
               "d")
    assert cfg.input == "s3://in/" and cfg.output == "001"  # strings stay strings
    assert cfg.runtime.batch_size == 64
    assert cfg.dr2.N == Sampled(values=(4, 8)) and cfg.dr2.tau == Sampled(low=20, high=30)
    assert cfg.dr2.allow_random_weights is True and cfg.blur.sigma.draw(random.Random(0)) == 0


def test_shipped_config_loads_and_round_trips(tmp_path):
    cfg = load(AugmentConfig, [], "d", None)
    shipped = load(AugmentConfig, ["--config", "configs/augment.yaml"], "d")
    assert shipped.dr2.N == Sampled(values=(4, 8, 16)) and shipped.blur.sigma == Sampled(low=1.0, high=3.0)
    # every section of the YAML is a known field (strict build), and dumping then loading is stable
    path = tmp_path / "dump.yaml"
    path.write_text(yaml.safe_dump(to_dict(shipped)))
    assert load(AugmentConfig, ["--config", str(path)], "d") == shipped
    assert cfg != shipped


def test_image_size_is_the_model_size_in_every_workflow_and_the_benchmark_names_its_gt_size():
    from workflows.benchmark import BenchmarkConfig
    from workflows.restore import RestoreConfig

    shipped = load(BenchmarkConfig, ["--config", "configs/benchmark.yaml"], "d")
    assert (shipped.image.size, shipped.image.gt_size) == (256, 512)
    assert load(RestoreConfig, ["--config", "configs/restore.yaml"], "d").image.size == shipped.image.size
    cfg = load(BenchmarkConfig, ["--image.size", "32", "--image.gt-size", "64", "--image.min-side", "8"], "d")
    assert cfg.image.size == 32
    read = cfg.image.read_at_gt_size()  # what the load stage resizes the ground truth to
    assert (read.size, read.min_side, read.extensions) == (64, 8, cfg.image.extensions)
    assert "gt_size" in to_dict(cfg)["image"] and "model_size" not in to_dict(cfg)


def test_unknown_keys_and_bad_types_are_rejected(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dr2: {weigths: x}\n")
    with pytest.raises(SystemExit):
        load(AugmentConfig, ["--config", str(bad)], "d")
    assert "dr2.weigths" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load(AugmentConfig, ["--runtime.batch-size", "many"], "d")


def test_help_documents_every_field():
    text = make_parser(AugmentConfig, "d", None).format_help()
    for path, f, _ in _walk(AugmentConfig):
        assert "--" + path.replace("_", "-") in text, path
        assert f.metadata.get("help"), f"{path} has no help text"
    assert "--allow-random-weights" in text


def test_sampled_parsing():
    assert Sampled.parse(4) == Sampled(values=(4,))
    assert Sampled.parse("4,8,16") == Sampled(values=(4, 8, 16))
    assert Sampled.parse({"low": 0.5, "high": 3}) == Sampled(low=0.5, high=3)
    with pytest.raises(ValueError):
        Sampled.parse({"low": 3, "high": 1})
    with pytest.raises(ValueError):
        Sampled.parse([])
    r = Sampled.parse("1:3")
    assert {r.draw(random.Random(k)) for k in range(100)} == {1, 2, 3}
