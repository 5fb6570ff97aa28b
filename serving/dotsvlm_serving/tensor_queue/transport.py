"""How embeddings travel from the vision pool to the LLM pool.

The queue itself only ever holds small `TensorHandle`s; the bytes move through a `TensorTransport`.
`RayObjectTransport` uses Ray object references (shared memory on one node, the object manager across
nodes). A GPU-direct transport (NCCL/NIXL) can implement the same two calls later: `put` on the
producer returns a handle, `get` on the consumer materialises the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class TensorHandle:
    """A reference to one tensor held by a transport; cheap to pickle."""

    transport: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    # Transport-specific payload. For Ray: a one-element list holding the ObjectRef (wrapped in a list so
    # that Ray passes the reference through actor calls instead of resolving it).
    payload: Any = field(repr=False, default=None)


class TransportError(RuntimeError):
    """The tensor behind a handle could not be fetched (its producer or owner died)."""


@runtime_checkable
class TensorTransport(Protocol):
    name: str

    def put(self, array: np.ndarray) -> TensorHandle: ...

    def get(self, handle: TensorHandle, *, timeout_s: float | None = None) -> np.ndarray: ...


class RayObjectTransport:
    """Tensor transport over Ray object references (zero-copy reads from the node's shared memory)."""

    name = "ray"

    def put(self, array: np.ndarray) -> TensorHandle:
        import ray

        array = np.ascontiguousarray(array)
        return self.from_ref(ray.put(array), shape=array.shape, dtype=array.dtype)

    @classmethod
    def from_ref(cls, ref: Any, *, shape: tuple[int, ...], dtype: Any) -> TensorHandle:
        """Wrap an ObjectRef that will resolve to an ndarray (e.g. a Serve call's result)."""
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        return TensorHandle(transport=cls.name, shape=tuple(int(s) for s in shape), dtype=dt.str, nbytes=nbytes,
                            payload=[ref])

    def get(self, handle: TensorHandle, *, timeout_s: float | None = None) -> np.ndarray:
        import ray

        if handle.transport != self.name:
            raise TransportError(f"handle from transport {handle.transport!r} given to {self.name!r}")
        try:
            value = ray.get(handle.payload[0], timeout=timeout_s)
        except Exception as exc:  # ObjectLostError, OwnerDiedError, GetTimeoutError, ...
            raise TransportError(f"image embeddings could not be fetched: {type(exc).__name__}: {exc}") from exc
        if not isinstance(value, np.ndarray) or tuple(value.shape) != handle.shape:
            raise TransportError(f"transport returned {type(value).__name__} of unexpected shape")
        return value
