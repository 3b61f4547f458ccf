"""One way to reach local paths, s3://, gs:// or any fsspec location.

S3 endpoints: s3fs accepts `endpoint_url` (top level) or `client_kwargs={"endpoint_url": ...}` in
storage_options, and botocore already honours AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL (and fsspec
FSSPEC_S3_ENDPOINT_URL), so nothing is added here. Credentials come from the usual chain (env, profile,
instance role); use redact() before logging any options.
"""

from __future__ import annotations

import copy
import os
import posixpath
import re
import unicodedata
import uuid
from collections.abc import Mapping
from urllib.parse import unquote

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.faults import RetryConfig, TransientError, is_transient, retry_call

__all__ = [
    "get_fs",
    "is_object_store",
    "join_under",
    "read_sources",
    "redact",
    "write_bytes",
]

_OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2"}


# botocore's defaults (60 s connect and read timeouts, retried 5 times) make an endpoint that accepts
# connections and never answers hang a job for minutes in silence. Bounded here, overridable through
# storage_options {config_kwargs: {...}}; tasks.faults.retry_call does the patient retrying, visibly.
S3_CLIENT_DEFAULTS = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 2, "mode": "standard"}}


def fsspec_options(uri: str, storage_options: dict | None) -> dict:
    """storage_options for uri's filesystem, with bounded client timeouts on S3 unless given."""
    options = dict(storage_options or {})
    if uri.split("://", 1)[0] in ("s3", "s3a") and "://" in uri:
        # a deep copy: botocore rewrites the nested retries dict in place, which would change fsspec's cache
        # key after the first client and silently rebuild every process's first filesystem
        options["config_kwargs"] = copy.deepcopy({**S3_CLIENT_DEFAULTS, **(options.get("config_kwargs") or {})})
    return options


def get_fs(uri: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URI; the path carries no scheme."""
    return fsspec.core.url_to_fs(uri, **fsspec_options(uri, storage_options))


def read_sources(sources: list[str], storage_options: dict | None, retry: RetryConfig | None = None
                 ) -> list[bytes | Exception]:
    """Fetch many objects at once, each URI through its own filesystem (s3fs/gcsfs fetch concurrently).

    Failures come back as values: transient ones are retried (tasks.faults.retry_call) and, if they
    outlast the retries, come back as TransientError; missing or denied objects come back as they are.
    """
    results: list[bytes | Exception | None] = [None] * len(sources)
    groups: dict[int, tuple[fsspec.AbstractFileSystem, list[tuple[int, str]]]] = {}
    for k, uri in enumerate(sources):
        fs, path = get_fs(uri, storage_options)
        groups.setdefault(id(fs), (fs, []))[1].append((k, path))
    for fs, items in groups.values():
        pending = items

        def fetch_pending(fs=fs):
            nonlocal pending
            got = fs.cat([p for _, p in pending], on_error="return")
            if not isinstance(got, dict):  # some backends return bare bytes for a single path
                got = {pending[0][1]: got}
            for k, p in pending:
                results[k] = got.get(p, FileNotFoundError(p))
            pending = [(k, p) for k, p in pending if isinstance(results[k], Exception) and is_transient(results[k])]
            if pending:
                raise results[pending[0][0]]

        try:
            retry_call(fetch_pending, f"reading {len(pending)} object(s) such as {sources[pending[0][0]]}", retry)
        except TransientError as e:
            for k, _ in pending:
                results[k] = e
        except Exception as e:  # the whole request failed for good (e.g. a missing bucket)
            for k, _ in pending:
                results[k] = results[k] if isinstance(results[k], Exception) else e
    return results


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    p = fs.protocol
    return {p} if isinstance(p, str) else set(p)


def is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(_protocols(fs) & _OBJECT_STORES)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def join_under(prefix: str, relative: str) -> str:
    """prefix + "/" + relative, where relative can never point outside prefix.

    Rejects (ValueError) absolute paths, "..", empty segments, backslashes, control characters, URL
    schemes / drive letters / fsspec "::" chaining, and segments that decode (percent-encoding, NFKC) to
    dot segments or separators. "./" segments are dropped.
    """
    if not isinstance(prefix, str) or not prefix:
        raise ValueError("output prefix must be a non-empty string")
    if not isinstance(relative, str) or not relative:
        raise ValueError("relative key must be a non-empty string")

    def bad(why: str) -> ValueError:
        return ValueError(f"unsafe relative key {relative!r}: {why}")

    if _CONTROL.search(relative):
        raise bad("control characters are not allowed")
    if "\\" in relative:
        raise bad("backslashes are not allowed")
    if relative.startswith("/"):
        raise bad("absolute paths are not allowed")
    if "://" in relative or "::" in relative:
        raise bad("URL schemes / chained URLs are not allowed")
    segments = relative.split("/")
    if ":" in segments[0]:
        raise bad("a ':' in the first segment looks like a URL scheme or drive letter")
    kept = []
    for seg in segments:
        if seg == ".":
            continue
        if seg == "":
            raise bad("empty path segments are not allowed")
        if seg == "..":
            raise bad("'..' segments are not allowed")
        decoded = unquote(seg)
        for variant in (decoded, unicodedata.normalize("NFKC", seg), unicodedata.normalize("NFKC", decoded)):
            if variant in (".", "..") or "/" in variant or "\\" in variant or _CONTROL.search(variant):
                raise bad(f"segment {seg!r} decodes to a path separator or dot segment")
        if len(seg.encode("utf-8")) > 255:
            raise bad("a segment is longer than 255 bytes")
        kept.append(seg)
    if not kept:
        raise bad("no file name left after removing './'")
    return prefix + ("" if prefix.endswith("/") else "/") + "/".join(kept)


def write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes, retry: RetryConfig | None = None) -> None:
    """Write a whole file so that readers see either nothing / the old file, or the complete new one.

    Local: temp file in the same directory + os.replace (atomic, not fsync'ed). Object stores: one put
    (atomic by nature), retried on transient failures (TransientError when they outlast the retries).
    Other filesystems: makedirs + pipe_file (as atomic as the backend is).
    """
    if isinstance(fs, LocalFileSystem):
        path = fs._strip_protocol(path)
        parent = os.path.dirname(path) or "."
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            with open(tmp, "xb") as f:  # "x": never clobber; mode follows the umask like a normal file
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return
    if not is_object_store(fs):
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
    retry_call(lambda: fs.pipe_file(path, data), f"writing {path}", retry, kind="write_transient")


_SECRET_KEY = re.compile(r"secret|key|token|password|passwd|credential|session|auth", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(options: Mapping | None) -> dict:
    """Copy of storage options safe to log: secret-looking values and URL userinfo replaced by '***'."""

    def walk(value, hide: bool):
        if isinstance(value, Mapping):
            return {k: walk(v, hide or bool(_SECRET_KEY.search(str(k)))) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(walk(v, hide) for v in value)
        if hide and value not in (None, "", False):
            return "***"
        if isinstance(value, str):
            return _URL_USERINFO.sub("***@", value)
        return value

    return walk(dict(options or {}), False)
