"""Which replicas of the tensor queue are alive: each writes a heartbeat into Ray's internal KV (the GCS,
kept in Redis with gcsFaultTolerance), so that when Serve starts a replacement (its node drains, its
options change) the old and the new replica each learn the other exists and take their hand-over roles
(`TensorQueueCore.begin_handoff`). The decision is the pure `handoff_role`; `PeerRegistry` is the KV adapter
(blocking calls: run it in a thread).

Whether a peer is alive is judged without comparing clocks: a heartbeat's time is the writer's wall clock
(another process, often another node), and an NTP step of either clock made a live peer look dead (a
successor then ended its hand-over and the predecessor's state was lost; a wall clock stepped forward by
FORGET_S deleted its key) or a dead one look alive (a predecessor sent every put on to a successor that was
gone). Each replica instead notes, on its own monotonic clock, when it last saw a peer's heartbeat change
(`silence`); only a peer's first sighting goes by the wall clocks' difference (a clock step then misjudges a
live peer for one beat at most, and keeps a dead one for STALE_S at most).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

KV_NAMESPACE = "dotsvlm"
KEY_PREFIX = "tensor-queue-replica:"
HEARTBEAT_S = 1.0
# A replica not heard from for this long is gone (killed without a hand-over, or long stopped).
STALE_S = 10.0
# Keys of replicas gone this long are removed by the living one.
FORGET_S = 300.0
SERVE_NAMESPACE = "serve"  # where Serve's replica actors are named


@dataclass(frozen=True)
class Peer:
    replica_id: str
    started_at: float  # wall-clock seconds: which replica is the older one
    seen_at: float  # its last heartbeat, on its own wall clock: compared only with its earlier ones
    actor_name: str | None = None  # its Serve replica actor, looked up to tell a killed replica at once
    # Seconds, on the reading replica's monotonic clock, since its heartbeat last changed (`silence`).
    silent_s: float = 0.0


def handoff_role(me: Peer, peers: list[Peer], adopted: bool = False) -> str | None:
    """None when this is the only live replica; "predecessor" when a younger one is alive (this one is
    being replaced), "successor" when an older one is alive (this one replaces it). A peer silent for more
    than STALE_S is gone.

    `adopted`: this replica has taken its predecessor's state. That predecessor's heartbeat stays until
    it has finished stopping, a moment after its hand-over; it must not make this one a successor a
    second time, whose end (the predecessor leaving "without" a hand-over) would drop answers in transit."""
    others = [p for p in peers if p.replica_id != me.replica_id and p.silent_s <= STALE_S
              and not (adopted and _older(p, me))]
    if not others:
        return None
    return "successor" if any(_older(p, me) for p in others) else "predecessor"


def _older(a: Peer, b: Peer) -> bool:
    """Whether `a` started before `b` (the replica id breaks a tie, so two replicas never both are)."""
    return (a.started_at, a.replica_id) < (b.started_at, b.replica_id)


# A first sighting's silence is the wall clocks' difference, capped: enough to call a long-silent peer gone,
# never enough to forget it (a clock step misjudges it for one beat, and its next heartbeat sets it right).
FIRST_SIGHTING_CAP_S = 2 * STALE_S


def silence(heard: tuple[float, float] | None, seen_at: float, wall_age_s: float,
            now: float) -> tuple[tuple[float, float], float]:
    """How long a peer has been silent, from what this replica heard of it before. `heard`: (the heartbeat time
    it last read, when on its monotonic clock it read that one first), None at the first sighting; `seen_at`:
    the heartbeat time read now; `wall_age_s`: this replica's wall clock minus `seen_at`; `now`: its monotonic
    clock. Returns the new `heard` and the silence in seconds."""
    if heard is not None and heard[0] == seen_at:  # no heartbeat since
        return heard, now - heard[1]
    if heard is not None:  # it beat since the last read
        return (seen_at, now), 0.0
    since = now - min(max(wall_age_s, 0.0), FIRST_SIGHTING_CAP_S)
    return (seen_at, since), now - since


class PeerRegistry:
    """This replica's heartbeat and the others', under one key per replica of one application."""

    def __init__(self, app_name: str, replica_id: str, started_at: float, actor_name: str | None = None, *,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self.prefix = f"{KEY_PREFIX}{app_name}:"
        self.me = Peer(replica_id, started_at, started_at, actor_name)
        self.key = self.prefix + replica_id
        self._clock, self._wall_clock = clock, wall_clock
        self._heard: dict[str, tuple[float, float]] = {}  # replica id -> `silence`'s `heard`

    def beat(self) -> tuple[Peer, list[Peer]]:
        """Write this replica's heartbeat; read every live replica's (this one's included), each with its
        silence. A replica whose actor is gone (killed, crashed: no hand-over) is forgotten at once rather
        than after STALE_S, so that the usual recovery starts without delay."""
        from ray.experimental import internal_kv as kv

        wall, now = self._wall_clock(), self._clock()
        self.me = Peer(self.me.replica_id, self.me.started_at, wall, self.me.actor_name)
        kv._internal_kv_put(self.key, json.dumps({"started_at": self.me.started_at, "seen_at": wall,
                                                  "actor_name": self.me.actor_name}), namespace=KV_NAMESPACE)
        peers, heard = [], {}
        for key in kv._internal_kv_list(self.prefix, namespace=KV_NAMESPACE):
            raw = kv._internal_kv_get(key, namespace=KV_NAMESPACE)
            if raw is None:
                continue
            try:
                v = json.loads(raw)
                peer = Peer(key.decode()[len(self.prefix):], float(v["started_at"]), float(v["seen_at"]),
                            v.get("actor_name"))
            except (ValueError, KeyError, TypeError):
                kv._internal_kv_del(key, namespace=KV_NAMESPACE)  # not ours to read: drop it
                continue
            if peer.replica_id == self.me.replica_id:
                peers.append(self.me)
                continue
            heard[peer.replica_id], silent = silence(self._heard.get(peer.replica_id), peer.seen_at,
                                                     wall - peer.seen_at, now)
            if silent > FORGET_S or not _alive(peer):
                kv._internal_kv_del(key, namespace=KV_NAMESPACE)
                del heard[peer.replica_id]
                continue
            peers.append(replace(peer, silent_s=silent))
        self._heard = heard  # (a key gone is forgotten: a replica id comes back only as a first sighting)
        return self.me, peers

    def leave(self) -> None:
        from ray.experimental import internal_kv as kv

        kv._internal_kv_del(self.key, namespace=KV_NAMESPACE)


def _alive(peer: Peer) -> bool:
    """Whether the peer's replica actor still exists (True when that cannot be told)."""
    if not peer.actor_name:
        return True
    import ray

    try:
        ray.get_actor(peer.actor_name, namespace=SERVE_NAMESPACE)
    except ValueError:  # no such actor: it died
        return False
    except Exception:  # noqa: BLE001 - the GCS is unreachable: go by the heartbeat's age
        return True
    return True
