"""How embeddings travel from the vision pool to the LLM pool.

The queue itself only ever holds small `TensorHandle`s; the bytes move through a `TensorTransport`.
`RayObjectTransport` resolves a Ray object reference (the vision replica's answer), in one of two forms
(`queue.embedding_transport`, which the vision replica reads):
- "object-store": the answer is the embeddings themselves, as the wire ndarray (`to_wire`): shared memory
  on one node (the consumer maps it, no copy), Ray's object manager across nodes, host memory either way.
- "nixl": the answer is a small `DirectTensorRef`, a reference made by Ray's direct transport (RDT,
  `ray.put(tensor, _tensor_transport="nixl")`): the tensor stays in the vision replica's memory, on its
  device, and the consumer's `ray.get` pulls it with NIXL (GPU to GPU over NVLink or RDMA where the pools
  have GPUs; CPU memory otherwise). Needs the `nixl` package in both replicas' image.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

# Tensors travel as numpy arrays (what Ray's object store reads zero-copy). dtypes numpy lacks travel
# as a same-width integer view and are reinterpreted on arrival, without a copy.
_WIRE_VIEW = {"bfloat16": np.int16}


@dataclass(frozen=True)
class TensorHandle:
    """A reference to one tensor held by a transport; cheap to pickle."""

    transport: str
    shape: tuple[int, ...]
    dtype: str  # the tensor's logical dtype, as torch names it ("bfloat16", "float32", ...)
    nbytes: int
    # Transport-specific payload. For Ray: a one-element list holding the ObjectRef (wrapped in a list so
    # that Ray passes the reference through actor calls instead of resolving it).
    payload: Any = field(repr=False, default=None)


class TransportError(RuntimeError):
    """The tensor behind a handle could not be fetched (its producer or owner died, or it failed)."""


@dataclass(frozen=True)
class DirectTensorRef:
    """A vision replica's answer when its embeddings travel by Ray's direct transport: the reference to
    a tensor that stays in that replica's memory until the consumer pulls it (see the module's text)."""

    ref: list  # [ObjectRef]: in a list, so that Ray passes the reference through calls instead of resolving it
    transport: str  # RDT's name for it ("nixl")

    @classmethod
    def put(cls, tensor: Any, transport: str = "nixl") -> DirectTensorRef:
        """Only in a Ray actor (a Serve replica): RDT keeps the tensor in the actor that put it."""
        import ray

        return cls([ray.put(tensor.contiguous(), _tensor_transport=transport)], transport)


def check_direct_transport(name: str) -> None:
    """Raise a ValueError a person can act on when this process cannot send embeddings the way
    `queue.embedding_transport` names (checked where they are made, before a request depends on it)."""
    if name == "nixl":
        try:
            import nixl  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                f"queue.embeddingTransport is NIXL but the serving image has no working NIXL ({exc}): install "
                f"it in the image (`pip install nixl`, part of dotsvlm[serving]) or set queue.embeddingTransport "
                f"to ObjectStore") from None


def dtype_name(dtype: Any) -> str:
    """"bfloat16", "float32", ... for a torch or numpy dtype (or such a name)."""
    if not isinstance(dtype, str) and not str(dtype).startswith("torch."):
        return np.dtype(dtype).name
    name = str(dtype).removeprefix("torch.")
    return name if name in _WIRE_VIEW else np.dtype(name).name


def wire_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a tensor of this logical dtype travels as."""
    return np.dtype(_WIRE_VIEW.get(dtype, dtype))


def to_wire(tensor: Any) -> np.ndarray:
    """A CPU torch tensor (or ndarray) -> the contiguous ndarray that travels (a view: no copy when the
    tensor is already contiguous)."""
    if isinstance(tensor, np.ndarray):
        return np.ascontiguousarray(tensor)
    import torch

    t = tensor.detach().contiguous()
    name = dtype_name(t.dtype)
    if name in _WIRE_VIEW:
        t = t.view(getattr(torch, str(wire_dtype(name))))
    return t.numpy()


def from_wire(array: np.ndarray, dtype: str) -> Any:
    """The ndarray that travelled -> a torch tensor of the logical dtype sharing its memory (no copy;
    read-only memory from the object store stays read-only in use)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "non-writable array": we only read it
        t = torch.from_numpy(array)
    return t.view(getattr(torch, dtype)) if dtype in _WIRE_VIEW else t


def _fetch(ref: Any, timeout_s: float | None) -> Any:
    import ray

    try:
        return ray.get(ref, timeout=timeout_s)
    except Exception as exc:  # ObjectLostError, OwnerDiedError, GetTimeoutError, the producer's error
        raise TransportError(f"image embeddings could not be fetched: {type(exc).__name__}: {exc}") from exc


@runtime_checkable
class TensorTransport(Protocol):
    name: str

    def put(self, tensor: Any) -> TensorHandle: ...

    def get(self, handle: TensorHandle, *, timeout_s: float | None = None) -> Any:
        """The tensor (torch, the handle's dtype), without copying the bytes that arrived."""
        ...


class RayObjectTransport:
    """Tensor transport over Ray object references: the object store (zero-copy reads from the node's
    shared memory) or, when the reference resolves to a `DirectTensorRef`, Ray's direct transport."""

    name = "ray"

    def put(self, tensor: Any) -> TensorHandle:
        import ray

        array = to_wire(tensor)
        dtype = dtype_name(getattr(tensor, "dtype", array.dtype))
        return self.from_ref(ray.put(array), shape=array.shape, dtype=dtype)

    @classmethod
    def from_ref(cls, ref: Any, *, shape: tuple[int, ...], dtype: Any) -> TensorHandle:
        """Wrap an ObjectRef that will resolve to the wire ndarray (`to_wire`) of a tensor of this
        logical dtype (e.g. a Serve call's result)."""
        name = dtype_name(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * wire_dtype(name).itemsize
        return TensorHandle(transport=cls.name, shape=tuple(int(s) for s in shape), dtype=name, nbytes=nbytes,
                            payload=[ref])

    def _resolve(self, handle: TensorHandle, timeout_s: float | None) -> np.ndarray | DirectTensorRef:
        if handle.transport != self.name:
            raise TransportError(f"handle from transport {handle.transport!r} given to {self.name!r}")
        return _fetch(handle.payload[0], timeout_s)

    @staticmethod
    def _array(value: Any, handle: TensorHandle) -> np.ndarray:
        if not isinstance(value, np.ndarray) or tuple(value.shape) != handle.shape:
            raise TransportError(f"transport returned {type(value).__name__} of unexpected shape")
        return value

    def get_array(self, handle: TensorHandle, *, timeout_s: float | None = None) -> np.ndarray:
        """The wire ndarray, zero-copy from the node's object store (object-store answers only)."""
        return self._array(self._resolve(handle, timeout_s), handle)

    def get(self, handle: TensorHandle, *, timeout_s: float | None = None) -> Any:
        value = self._resolve(handle, timeout_s)
        if not isinstance(value, DirectTensorRef):
            return from_wire(self._array(value, handle), handle.dtype)
        tensor = _fetch(value.ref[0], timeout_s)  # pulled by RDT (NIXL) into this process, on the sender's device type
        if tuple(tensor.shape) != handle.shape or dtype_name(tensor.dtype) != handle.dtype:
            raise TransportError(f"{value.transport} returned a {tuple(tensor.shape)} {tensor.dtype} tensor, "
                                 f"expected {handle.shape} {handle.dtype}")
        return tensor
