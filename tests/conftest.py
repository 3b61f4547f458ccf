"""Shared pytest fixtures. Keep this file thin: fixtures live in their own modules."""

from tests.s3server import s3_server  # noqa: F401  (session-scoped S3 server on 127.0.0.1)
