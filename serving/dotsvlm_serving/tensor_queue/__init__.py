"""The tensor queue between the vision and LLM pools: queue semantics (`core`) and transports."""

from .core import ConsumerLost, ItemTooLarge, QueueFull, QueueItem, QueueMoved, QueueSnapshot, TensorQueueCore
from .transport import RayObjectTransport, TensorHandle, TensorTransport, TransportError, from_wire, to_wire

__all__ = ["ConsumerLost", "ItemTooLarge", "QueueFull", "QueueItem", "QueueMoved", "QueueSnapshot", "TensorQueueCore", "RayObjectTransport", "TensorHandle",
           "TensorTransport", "TransportError", "from_wire", "to_wire"]
