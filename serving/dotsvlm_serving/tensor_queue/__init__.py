"""The tensor queue between the vision and LLM pools: queue semantics (`core`) and transports."""

from .core import ConsumerLost, ItemTooLarge, QueueFull, QueueItem, QueueMoved, QueueSnapshot, TensorQueueCore
from .transport import (DirectTensorRef, RayObjectTransport, TensorHandle, TensorTransport,
                        TransportError, check_direct_transport, from_wire, to_wire)

__all__ = ["DirectTensorRef", "check_direct_transport", "ConsumerLost", "ItemTooLarge", "QueueFull", "QueueItem", "QueueMoved", "QueueSnapshot", "TensorQueueCore", "RayObjectTransport", "TensorHandle",
           "TensorTransport", "TransportError", "from_wire", "to_wire"]
