"""infra/preflight.sh refuses deployment files that still hold a placeholder and accepts filled-in ones; the
shell commands in them (RayJob entrypoint, launcher commands) hold no <...> that bash would read as a redirect."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "infra" / "preflight.sh"
DEPLOY_FILES = [ROOT / "infra" / "kuberay-rayjob.yaml", ROOT / "infra" / "cluster-aws.yaml"]
PLACEHOLDER = re.compile(r"<[^<>\s]+>|YOUR-[A-Z0-9-]+")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def preflight(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *map(str, files)], capture_output=True, text=True, timeout=60)


def fill(text: str) -> str:
    """Every placeholder replaced by a plausible value (comments too: harmless, the check skips them)."""
    return PLACEHOLDER.sub(lambda m: "filled-" + re.sub(r"[^a-z0-9]+", "-", m.group(0).lower()).strip("-"), text)


def test_committed_templates_are_refused_with_every_placeholder_named():
    result = preflight()  # no argument: both deployment files
    assert result.returncode == 1
    for needle in ["kuberay-rayjob.yaml", "<registry>", "<aws-region>", "YOUR-INPUT-BUCKET", "YOUR-MODEL-BUCKET",
                   "cluster-aws.yaml", "<dlami-ami-id>", "<ACCOUNT_ID>"]:
        assert needle in result.stderr, needle
    # Only values count: <namespace> appears in the comments alone.
    assert "<namespace>" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if re.search(r"infra/\S+\.yaml:\d+:", line)]
    assert len(lines) > 10


def test_filled_files_pass_and_stay_valid_yaml(tmp_path):
    filled = []
    for src in DEPLOY_FILES:
        dst = tmp_path / src.name
        dst.write_text(fill(src.read_text()))
        assert list(yaml.safe_load_all(dst.read_text()))  # still parses
        filled.append(dst)
    result = preflight(*filled)
    assert result.returncode == 0, result.stderr
    assert "no placeholders left" in result.stdout


def test_one_placeholder_in_a_value_is_enough_to_refuse(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("image: registry.example/dr2:1  # e.g. <registry>/dr2:<tag>\n# kubectl -n <namespace>\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("image: registry.example/dr2:1\nentrypoint: python x.py --input s3://YOUR-INPUT-BUCKET/a\n")
    assert preflight(good).returncode == 0
    result = preflight(good, bad)
    assert result.returncode == 1
    assert f"{bad}:2:YOUR-INPUT-BUCKET" in result.stderr
    assert str(good) not in result.stderr
    assert preflight(tmp_path / "missing.yaml").returncode == 2


def test_shell_commands_in_the_deployment_files_have_no_redirect_placeholders():
    job = [d for d in yaml.safe_load_all(DEPLOY_FILES[0].read_text()) if d["kind"] == "RayJob"][0]
    launcher = yaml.safe_load(DEPLOY_FILES[1].read_text())
    commands = [job["spec"]["entrypoint"]]
    for key in ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands"]:
        commands += launcher.get(key) or []
    assert len(commands) > 3
    for command in commands:
        assert not re.search(r"<[^<>\s]+>", command), command
