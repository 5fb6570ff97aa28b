"""Which replicas of the tensor queue are alive: each writes a heartbeat into Ray's internal KV (the GCS,
kept in Redis with gcsFaultTolerance), so that when Serve starts a replacement (its node drains, its
options change) the old and the new replica each learn the other exists and take their hand-over roles
(`TensorQueueCore.begin_handoff`). The decision is the pure `handoff_role`; `PeerRegistry` is the KV adapter
(blocking calls: run it in a thread).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

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
    seen_at: float
    actor_name: str | None = None  # its Serve replica actor, looked up to tell a killed replica at once


def handoff_role(me: Peer, peers: list[Peer], now: float, adopted: bool = False) -> str | None:
    """None when this is the only live replica; "predecessor" when a younger one is alive (this one is
    being replaced), "successor" when an older one is alive (this one replaces it).

    `adopted`: this replica has taken its predecessor's state. That predecessor's heartbeat stays until
    it has finished stopping, a moment after its hand-over; it must not make this one a successor a
    second time, whose end (the predecessor leaving "without" a hand-over) would drop answers in transit."""
    others = [p for p in peers if p.replica_id != me.replica_id and now - p.seen_at <= STALE_S
              and not (adopted and _older(p, me))]
    if not others:
        return None
    return "successor" if any(_older(p, me) for p in others) else "predecessor"


def _older(a: Peer, b: Peer) -> bool:
    """Whether `a` started before `b` (the replica id breaks a tie, so two replicas never both are)."""
    return (a.started_at, a.replica_id) < (b.started_at, b.replica_id)


class PeerRegistry:
    """This replica's heartbeat and the others', under one key per replica of one application."""

    def __init__(self, app_name: str, replica_id: str, started_at: float, actor_name: str | None = None) -> None:
        self.prefix = f"{KEY_PREFIX}{app_name}:"
        self.me = Peer(replica_id, started_at, started_at, actor_name)
        self.key = self.prefix + replica_id

    def beat(self) -> tuple[Peer, list[Peer]]:
        """Write this replica's heartbeat; read every live replica's (this one's included). A replica whose
        actor is gone (killed, crashed: no hand-over) is forgotten at once rather than after STALE_S, so
        that the usual recovery starts without delay."""
        from ray.experimental import internal_kv as kv

        now = time.time()
        self.me = Peer(self.me.replica_id, self.me.started_at, now, self.me.actor_name)
        kv._internal_kv_put(self.key, json.dumps({"started_at": self.me.started_at, "seen_at": now,
                                                  "actor_name": self.me.actor_name}), namespace=KV_NAMESPACE)
        peers = []
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
            if now - peer.seen_at > FORGET_S or (peer.replica_id != self.me.replica_id and not _alive(peer)):
                kv._internal_kv_del(key, namespace=KV_NAMESPACE)
                continue
            peers.append(peer)
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
