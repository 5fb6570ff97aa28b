"""Reading a request body no further than the size limit.

A body with a Content-Length over the limit is refused before it is read (the ingress checks the header);
a chunked upload has none, so it is read chunk by chunk and refused as soon as it passes the limit, rather
than held whole in memory first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from .errors import ApiError


def too_large(limit: int, size: str | None = None) -> ApiError:
    """Its `code` tells a client this 413 from an image's (`image_too_large`): fewer images, not a smaller one."""
    what = f"is {size} bytes," if size is not None else "is"
    return ApiError(413, f"the request body {what} over the {limit}-byte limit: send smaller images or fewer of them",
                    code="body_too_large")


async def read_limited(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """The whole body, or a 413 once more than `limit` bytes have come (the rest is not read)."""
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        parts.append(chunk)
    return b"".join(parts)
