"""Count the object-store requests (PUT / GET / LIST / HEAD / DELETE) an s3fs filesystem sends during a block.

    from bench.count_requests import count_requests
    with count_requests(fs) as counts:        # fs: an s3fs.S3FileSystem (e.g. tasks.storage.get_fs(uri)[0])
        run_something(fs)
    print(counts.by_kind, counts.by_operation)   # Counter({'PUT': 3, 'LIST': 1}), Counter({'PutObject': 3, ...})

What is counted: botocore's `before-send.s3.<Operation>` event, emitted once per HTTP request the client
sends, retries included (before-call would count an API call once however often it was retried), on the
client of each filesystem given. In-process only: requests sent by Ray workers, or by another s3fs instance
than the ones given (a different storage_options makes a different cached instance), are not seen.
Kinds follow S3's request pricing classes: PUT covers PutObject, CopyObject and the multipart calls; LIST the
listings; GET, HEAD and DELETE their objects' calls; anything else counts under OTHER.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

KINDS = {
    "PUT": {"PutObject", "CopyObject", "CreateMultipartUpload", "UploadPart", "UploadPartCopy",
            "CompleteMultipartUpload", "AbortMultipartUpload"},
    "GET": {"GetObject"},
    "LIST": {"ListObjectsV2", "ListObjects", "ListObjectVersions", "ListBuckets", "ListMultipartUploads",
             "ListParts"},
    "HEAD": {"HeadObject", "HeadBucket"},
    "DELETE": {"DeleteObject", "DeleteObjects"},
}
_KIND_OF = {op: kind for kind, ops in KINDS.items() for op in ops}
_ids = itertools.count()


class RequestCounts:
    """HTTP requests seen, by S3 operation name; by_kind groups them (PUT/GET/LIST/HEAD/DELETE/OTHER)."""

    def __init__(self) -> None:
        self.by_operation: Counter[str] = Counter()

    def on_send(self, event_name: str = "", **_) -> None:  # a botocore handler: returning None sends as usual
        self.by_operation[event_name.rsplit(".", 1)[-1]] += 1

    @property
    def by_kind(self) -> Counter[str]:
        kinds: Counter[str] = Counter()
        for op, n in self.by_operation.items():
            kinds[_KIND_OF.get(op, "OTHER")] += n
        return kinds

    @property
    def total(self) -> int:
        return sum(self.by_operation.values())


@contextmanager
def count_requests(*filesystems) -> Iterator[RequestCounts]:
    """Count the requests every given s3fs filesystem sends inside the block (others are ignored)."""
    counts = RequestCounts()
    hooked = []
    for fs in filesystems:
        events = fs.s3.meta.events  # fs.s3 connects on first use: the client the filesystem will use
        uid = f"count-requests-{next(_ids)}"
        events.register("before-send.s3", counts.on_send, unique_id=uid)
        hooked.append((events, uid))
    try:
        yield counts
    finally:
        for events, uid in hooked:
            events.unregister("before-send.s3", unique_id=uid)
