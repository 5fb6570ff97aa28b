"""The events a request's answer travels as: engine -> LLM replica -> tensor queue mailbox -> ingress.

Plain dicts on the wire (they cross Ray actor calls); these TypedDicts say what each kind carries.
A request's stream is any number of `token` (and, after a redelivery, `restart`) events, ended by
exactly one terminal event: `finish` or `error`. The LLM replica numbers the events it sends (`i`, from 0
for each delivery of a request), so that the tensor queue hands them out in order even when two of its
replicas each received some (a hand-over); events the queue makes itself (`restart`, some errors) have none.
It also marks each with its delivery (`d`: the item's delivery count when it took it; a `restart` carries the
delivery it starts), so that an earlier delivery's events, which reuse the same numbers, cannot mix in.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int


class TokenEvent(TypedDict):
    """New text of the answer (may be empty while a possible stop string is held back)."""

    request_id: str
    i: NotRequired[int]  # its place in the answer (set by the LLM replica)
    d: NotRequired[int]  # the delivery it belongs to (set by the LLM replica)
    type: Literal["token"]
    text: str


class FinishEvent(TypedDict):
    """The answer is complete; `text` is whatever was still held back."""

    request_id: str
    i: NotRequired[int]  # its place in the answer (set by the LLM replica)
    d: NotRequired[int]  # the delivery it belongs to (set by the LLM replica)
    type: Literal["finish"]
    finish_reason: Literal["stop", "length", "cancelled"]
    text: str
    usage: Usage


class ErrorEvent(TypedDict):
    """The request failed; `code` is the HTTP status the client gets. `stage` "vision": the image
    embeddings were lost before generation, so the ingress may encode the images again."""

    request_id: str
    i: NotRequired[int]  # its place in the answer (set by the LLM replica)
    d: NotRequired[int]  # the delivery it belongs to (set by the LLM replica)
    type: Literal["error"]
    code: int
    message: str
    stage: NotRequired[Literal["vision"]]


class RestartEvent(TypedDict):
    """The request was delivered again to another LLM replica: drop any text buffered so far."""

    request_id: str
    type: Literal["restart"]
    d: NotRequired[int]  # the delivery it starts (the queue's redelivery; none when the ingress makes it)


Event = TokenEvent | FinishEvent | ErrorEvent | RestartEvent
# The events one answer of the tensor queue carried (non-empty; ends at the terminal event, if it holds
# it): the ingress sends a batch's text as one stream chunk.
EventBatch = list[Event]

# The kinds that end a request's stream.
TERMINAL_EVENTS = frozenset({"finish", "error"})


def is_terminal(event: Event) -> bool:
    return event["type"] in TERMINAL_EVENTS
