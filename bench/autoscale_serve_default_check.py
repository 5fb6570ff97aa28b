"""Checks the simulator's re-implementation of Ray Serve's default autoscaling rule
(`autoscale_model.controllers.ServeDefault`) against the installed Ray: both are fed the same random
request counts and replica states for 3000 control-loop ticks (Ray's clock mocked), and every decision
must be equal. Not a unit test because importing ray.serve takes tens of seconds on a busy machine.

    .venv/bin/python bench/autoscale_serve_default_check.py
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ray.serve.autoscaling_policy as rp  # noqa: E402
from ray.serve.config import AutoscalingConfig, AutoscalingContext  # noqa: E402

from autoscale_model.controllers import ServeDefault, ServeDefaultConfig, _ServePoolState  # noqa: E402


def main(steps: int = 3000, seed: int = 0) -> int:
    clock = [0.0]
    rp.time = type("Clock", (), {"time": staticmethod(lambda: clock[0])})  # Ray's delay logic reads time.time()
    wrapped = rp._apply_autoscaling_config(rp.replica_queue_length_autoscaling_policy)  # what Serve's controller calls
    cfg, mine, state = AutoscalingConfig(min_replicas=1, max_replicas=16), ServeDefaultConfig(1, 16), _ServePoolState()
    rng = random.Random(seed)
    target = running = 1
    policy_state: dict = {}
    mismatches = 0
    for i in range(steps):
        clock[0] = float(i)
        total = max(0.0, rng.gauss(8, 6)) if (i // 200) % 2 else rng.random()
        if rng.random() < 0.2:
            running = target  # replicas come up some ticks after they are asked for
        ctx = AutoscalingContext(
            deployment_id=None, deployment_name="VisionEncoder", app_name="dotsvlm", current_num_replicas=running,
            target_num_replicas=target, running_replicas=[], total_num_requests=total, total_queued_requests=0,
            aggregated_metrics={}, raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=16,
            policy_state=dict(policy_state), last_scale_up_time=None, last_scale_down_time=None,
            current_time=clock[0], config=cfg)
        theirs, policy_state = wrapped(ctx)
        theirs = max(1, min(16, math.ceil(theirs)))  # autoscaling_state's apply_bounds
        ours = max(1, min(16, math.ceil(ServeDefault._decide(mine, state, total, running, target, clock[0]))))
        mismatches += theirs != ours
        target = theirs
    print(f"{steps} ticks, {mismatches} decisions differ from Ray {__import__('ray').__version__}'s default policy")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
