"""Whose fault a failure is: the sample's own, or the infrastructure's.

A sample's own failure (undecodable, too large, unsafe key, ...) is final: its row is committed with
status "error" and an `error_kind`. An infrastructure failure (connection refused or reset, timeouts,
throttling, 5xx) is retried with bounded exponential backoff; if it outlasts the retries the sample is
marked "transient" and never committed, so a plain rerun redoes it and the job ends non-zero.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tasks.config import opt

log = logging.getLogger(__name__)

T = TypeVar("T")

# status of a row that failed transiently: it flows to the manifest writer, which counts and drops it
TRANSIENT = "transient"

# error_kind values, one per cause (the summary's histogram uses these names)
ERROR_KINDS = {
    "read_missing": "the input does not exist",
    "read_denied": "the input cannot be read with these credentials",
    "read_transient": "reading failed on every retry (network, throttling, server down): not committed",
    "decode": "undecodable, truncated or unsupported image data (or a tar cut inside this sample)",
    "no_image": "a shard sample without exactly one image member (or a Parquet row without image bytes)",
    "bad_shard": "an input shard that cannot be opened as a tar or Parquet file: its samples are unknown",
    "too_large": "more pixels than image.max_pixels",
    "too_small": "a side below image.min_side",
    "not_square": "an aligned face that is not square (image.non_square: error)",
    "bad_params": "per-sample N or tau (from the input list) that DR2 cannot run at the model size",
    "unsafe_key": "the output key derived from the id would leave the output prefix",
    "duplicate_name": "another input already takes this output name",
    "model": "the model stage failed on this sample",
    "detect": "face detection or alignment failed on this photo",
    "write": "writing an output failed permanently",
    "write_transient": "writing failed on every retry: not committed",
    "other": "an unexpected failure",
}


class SampleError(Exception):
    """A failure that belongs to one sample, with its error kind."""

    kind = "other"

    def __init__(self, message: str, kind: str | None = None):
        super().__init__(message)
        if kind is not None:
            self.kind = kind


class TransientError(Exception):
    """An infrastructure failure that outlasted the retries; `kind` is read_transient or write_transient."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                     errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE, errno.EAGAIN, errno.EBUSY,
                     getattr(errno, "EREMOTEIO", 121)}  # s3fs maps S3 InternalError to EREMOTEIO
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                    "RequestTimeout", "RequestTimeoutException", "InternalError", "ServiceUnavailable",
                    "BadGateway", "GatewayTimeout", "503", "500", "502", "504"}
_TRANSIENT_NAMES = {
    # botocore: EndpointConnectionError, ConnectTimeoutError < ConnectionError; ReadTimeoutError,
    # ConnectionClosedError < HTTPClientError. aiohttp / fsspec equivalents for gcsfs and friends.
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "HTTPClientError", "ProxyConnectionError", "ResponseStreamingError", "IncompleteReadError",
    "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError",
    "ClientPayloadError", "ClientOSError", "FSTimeoutError", "IncompleteRead",
}


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry can cure: connection/timeouts, throttling and server errors, anywhere in
    the exception's cause chain. Missing objects, denied access and bad data are not."""
    for e in _chain(exc):
        if isinstance(e, TransientError):
            return True
        if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__):
            return True
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            if code in _TRANSIENT_CODES or status == 429 or int(status) >= 500:
                return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def read_error_kind(exc: BaseException) -> str:
    """The error kind of a read that failed permanently."""
    for e in _chain(exc):
        if isinstance(e, FileNotFoundError):
            return "read_missing"
        if isinstance(e, PermissionError):
            return "read_denied"
    return "read_missing" if "NoSuchKey" in str(exc) else "other"


@dataclass(frozen=True)
class RetryConfig:
    attempts: int = opt(8, "tries of one read or write before a transient failure (connection, timeout, "
                           "throttling, 5xx) is given up; the sample is then left uncommitted for a rerun")
    base_s: float = opt(0.5, "first backoff wait in seconds; doubles after every try (with jitter)")
    max_wait_s: float = opt(15.0, "longest single backoff wait in seconds")
    deadline_s: float = opt(120.0, "give up on one read or write after this many seconds of retrying")

    def __post_init__(self):
        if self.attempts < 1:
            raise ValueError(f"retry.attempts must be at least 1, got {self.attempts}")
        if min(self.base_s, self.max_wait_s, self.deadline_s) < 0:
            raise ValueError("retry.base-s, retry.max-wait-s and retry.deadline-s must be >= 0")


DEFAULT_RETRY = RetryConfig()


def retry_call(fn: Callable[[], T], what: str, policy: RetryConfig | None = None, *, kind: str = "read_transient",
               sleep: Callable[[float], None] = time.sleep) -> T:
    """fn() retried on transient failures with exponential backoff; any other failure is raised at once.
    Raises TransientError(kind) when the retries or the deadline run out."""
    policy = policy or DEFAULT_RETRY
    t0 = time.monotonic()
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as e:
            if not is_transient(e):
                raise
            waited = time.monotonic() - t0
            wait = min(policy.max_wait_s, policy.base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            if attempt == policy.attempts or waited + wait > policy.deadline_s:
                raise TransientError(f"{what}: gave up after {attempt} tries in {waited:.1f} s: "
                                     f"{type(e).__name__}: {e}", kind) from e
            log.warning("%s: %s: %s; retry %d/%d in %.1f s", what, type(e).__name__, e, attempt,
                        policy.attempts - 1, wait)
            sleep(wait)
    raise AssertionError("unreachable")


def row_failure(exc: BaseException, stage: str) -> tuple[str, str, str]:
    """(status, error_kind, message) for a row whose `stage` (read, write, model, detect) raised exc."""
    message = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, TransientError):
        return TRANSIENT, exc.kind, str(exc)
    if is_transient(exc):
        return TRANSIENT, f"{'write' if stage == 'write' else 'read'}_transient", message
    if isinstance(exc, SampleError):
        return "error", exc.kind, str(exc)
    return "error", read_error_kind(exc) if stage == "read" else stage if stage in ERROR_KINDS else "other", message
