"""The app builder's translation of ServeAppConfig into Serve options (no Ray cluster needed)."""

from __future__ import annotations

import pytest

from dotsvlm_serving.app import build_app, parse_config
from dotsvlm_serving.serve_config import (CONTROL_RESOURCE, CONTROL_RESOURCE_CAPACITY, LLM_POOL_RESOURCE,
                                          RESTART_DIGEST_ENV, AutoscalingTargets, LLMPoolConfig, ServeAppConfig,
                                          actor_options, autoscaling, llm_placement, replica_options)


def test_pool_pinning_only_when_configured() -> None:
    assert actor_options(num_gpus=0, pool_resource=None, num_cpus=0) == {"num_cpus": 0}
    assert actor_options(num_gpus=8, pool_resource=LLM_POOL_RESOURCE, num_cpus=1) == {
        "num_cpus": 1, "num_gpus": 8, "resources": {LLM_POOL_RESOURCE: 1}}


def test_autoscaling_from_targets() -> None:
    t = AutoscalingTargets(min_replicas=0, max_replicas=4, initial_replicas=1, target_ongoing_requests=2)
    # Serve applies the bounds; dotsvlm's policy applies the windows, so Serve's own delays are zero.
    assert autoscaling(t) == {"min_replicas": 0, "max_replicas": 4, "initial_replicas": 1, "target_ongoing_requests": 2,
                              "upscale_delay_s": 0.0, "downscale_delay_s": 0.0, "look_back_period_s": 10.5}
    fixed = replica_options(AutoscalingTargets(min_replicas=2, max_replicas=2))["autoscaling_config"]
    assert (fixed["min_replicas"], fixed["max_replicas"]) == (2, 2)  # a fixed pool: equal bounds


def test_invalid_config_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="model_path"):
        parse_config({})
    with pytest.raises(ValueError, match="min_replicas"):
        parse_config({"model_path": "/m", "vision": {"autoscaling": {"min_replicas": 3, "max_replicas": 1}}})


def test_a_config_file_with_the_custom_resources_names_is_told_the_serve_configs() -> None:
    from pydantic import ValidationError

    from dotsvlm_serving.embedded import config_errors, local_config

    with pytest.raises(ValidationError) as ei:
        local_config("/m", {"vision": {"minReplicas": 0}, "llm": {"max_running_requests": 0, "foo": 1}})
    text = config_errors(ei.value, "my.yaml")
    assert text.startswith("--config my.yaml does not fit the Serve config") and "examples/serve-autoscaling.yaml" in text
    assert "  vision.minReplicas: not a field here (names are snake_case here: min_replicas, not minReplicas)" in text
    assert "  llm.foo: not a field here\n" in text + "\n" and "llm.max_running_requests: Input should be greater" in text
    assert "errors.pydantic.dev" not in text


def test_build_app_binds_the_four_deployments_with_pool_resources() -> None:
    cfg = ServeAppConfig.model_validate({
        "model_path": "/models/x", "device": "cuda",
        "vision": {"gpus_per_replica": 1, "pool_resource": "dotsvlm_pool_vision",
                   "autoscaling": {"min_replicas": 0, "max_replicas": 3}},
        "llm": {"gpus_per_replica": 8, "pool_resource": LLM_POOL_RESOURCE}})
    app = build_app(cfg.model_dump(mode="json"))
    ingress = app._bound_deployment
    assert ingress.name == "Ingress"
    bound = {a._bound_deployment.name: a._bound_deployment for a in ingress.init_args[1:]}
    assert set(bound) == {"VisionEncoder", "TensorQueue", "LLMServer"}
    vision_opts = bound["VisionEncoder"].ray_actor_options
    assert vision_opts["resources"] == {"dotsvlm_pool_vision": 1} and vision_opts["num_gpus"] == 1
    assert bound["VisionEncoder"]._deployment_config.autoscaling_config.max_replicas == 3
    assert bound["LLMServer"].ray_actor_options["resources"] == {LLM_POOL_RESOURCE: 1}
    assert "resources" not in bound["TensorQueue"].ray_actor_options  # no control resource: unpinned
    assert "resources" not in ingress.ray_actor_options


def test_ingress_and_queue_ask_for_the_control_resource_when_set() -> None:
    cfg = ServeAppConfig.model_validate({"model_path": "/models/x", "control_resource": CONTROL_RESOURCE})
    ingress = build_app(cfg.model_dump(mode="json"))._bound_deployment
    bound = {a._bound_deployment.name: a._bound_deployment for a in ingress.init_args[1:]}
    assert ingress.ray_actor_options["resources"] == {CONTROL_RESOURCE: 1}
    assert bound["TensorQueue"].ray_actor_options["resources"] == {CONTROL_RESOURCE: 1}
    # Both stay 0-CPU: the resource places them, it does not take a CPU from the head.
    assert ingress.ray_actor_options["num_cpus"] == 0 and bound["TensorQueue"].ray_actor_options["num_cpus"] == 0
    assert "resources" not in bound["VisionEncoder"].ray_actor_options


def test_multi_gpu_llm_replica_is_a_placement_group_of_one_gpu_bundles() -> None:
    """TP16 over two 8-GPU nodes: no node has 16 GPUs, so one actor asking for 16 would never start; vLLM's
    Ray executor takes bundles of one GPU each from the replica's placement group."""
    llm = LLMPoolConfig(engine="transformers", gpus_per_replica=1, pool_resource=LLM_POOL_RESOURCE)
    assert llm_placement(llm, num_cpus=1) == {"ray_actor_options": {"num_cpus": 1, "num_gpus": 1,
                                                                    "resources": {LLM_POOL_RESOURCE: 1}}}
    llm = LLMPoolConfig(gpus_per_replica=16, tensor_parallel=16, nodes_per_replica=2, pool_resource=LLM_POOL_RESOURCE)
    assert llm.engine == "vllm"
    opts = llm_placement(llm, num_cpus=1)
    assert opts["ray_actor_options"] == {"num_cpus": 1, "resources": {LLM_POOL_RESOURCE: 1}}
    bundles = opts["placement_group_bundles"]
    assert bundles[0] == {"CPU": 1, LLM_POOL_RESOURCE: 1}
    assert bundles[1:] == [{"GPU": 1, LLM_POOL_RESOURCE: 1}] * 16
    assert opts["placement_group_strategy"] == "PACK"
    # The replica actor must fit in the first bundle (Ray Serve's rule).
    assert opts["ray_actor_options"]["num_cpus"] <= bundles[0]["CPU"]
    # One node: strictly packed on it.
    single = llm_placement(LLMPoolConfig(gpus_per_replica=8, tensor_parallel=8, pool_resource=LLM_POOL_RESOURCE),
                           num_cpus=1)
    assert single["placement_group_strategy"] == "STRICT_PACK" and len(single["placement_group_bundles"]) == 9
    # vllm on one GPU: a plain actor holding it.
    one = llm_placement(LLMPoolConfig(engine="vllm", gpus_per_replica=1), num_cpus=1)
    assert set(one) == {"ray_actor_options"} and one["ray_actor_options"]["num_gpus"] == 1
    # Serve accepts the options on a real deployment.
    cfg = ServeAppConfig.model_validate({"model_path": "/m", "device": "cuda", "llm": llm.model_dump(mode="json")})
    bound = {a._bound_deployment.name: a._bound_deployment
             for a in build_app(cfg.model_dump(mode="json"))._bound_deployment.init_args[1:]}
    llm_config = bound["LLMServer"]._replica_config
    assert llm_config.placement_group_bundles == bundles
    assert llm_config.placement_group_strategy == "PACK"


def test_vision_batches_fifo_by_pixel_budget() -> None:
    import asyncio

    from dotsvlm_serving.deployments.vision_encoder import VisionEncoder, _Job

    async def main() -> None:
        enc = object.__new__(VisionEncoder)  # the batching policy alone, no model
        enc.cfg = ServeAppConfig.model_validate({"model_path": "/m", "vision": {"max_batch_pixels": 100_000}}).vision_encoder_config()
        loop = asyncio.get_running_loop()
        enc._jobs = [_Job([], px, loop.create_future(), 0.0) for px in (40_000, 50_000, 20_000, 150_000, 10_000)]
        enc._jobs[1].future.cancel()  # a caller that went away is skipped
        assert [j.pixels for j in enc._next_batch()] == [40_000, 20_000]  # 150k would overflow: it waits
        assert [j.pixels for j in enc._next_batch()] == [150_000]  # larger than the budget: runs alone
        assert [j.pixels for j in enc._next_batch()] == [10_000]
        assert enc._next_batch() == []

    asyncio.run(main())


_KEEP: list[object] = []


def _draining_server(queue: object, engine: object):
    """An LLMServer with fake queue and engine and its run loop started: what `__del__` drains."""
    import asyncio

    from dotsvlm_serving.deployments.llm import LLMServer

    srv = object.__new__(LLMServer)
    srv.queue, srv.engine = queue, engine
    srv.consumer_id, srv._to_cancel, srv._publishing, srv._outbox, srv._sent = "c", set(), None, [], {}
    srv._delivery = {}
    srv._last_take, srv._draining, srv._drained = 0.0, False, asyncio.Event()
    srv._take_overdue_at, srv._taking = None, None
    srv.cfg, srv._active, srv._lost, srv._discarding = None, set(), False, False
    srv._unacked, srv._failed_steps, srv._step_error = [], 0, ""
    srv._publish_failing_since, srv._publish_error = None, ""
    srv._run_task = asyncio.create_task(srv._run_forever())
    srv._hb_task = asyncio.create_task(asyncio.sleep(3600))
    srv._publishing_metrics = asyncio.create_task(asyncio.sleep(3600))
    _KEEP.append(srv)  # never garbage-collected here: that would call the async __del__ unawaited
    return srv


class _StepsEngine:
    def health_error(self) -> None:  # healthy (InferenceEngine's default)
        return None

    """An engine with `steps` decode steps of one request left (tokens, the last a finish), room for more;
    its shutdown is noted in `calls`."""

    def __init__(self, steps: int, calls: list[str]) -> None:
        self.steps_left, self.calls = steps, calls

    def has_work(self) -> bool:
        return self.steps_left > 0

    def free_slots(self) -> int:
        return 4

    def free_tokens(self) -> int:
        return 1000

    async def shutdown(self) -> None:
        self.calls.append("engine shutdown")

    async def step(self) -> list[dict]:
        self.steps_left -= 1
        return [{"request_id": "r", "type": "finish" if self.steps_left == 0 else "token"}]

    def stats(self) -> dict:
        return {}


def test_llm_replica_drains_before_leaving() -> None:
    """Graceful shutdown: no new work is taken, running requests finish, their events are delivered,
    then the replica leaves the queue (which hands back anything still leased)."""
    import asyncio

    calls: list[str] = []

    class Call:
        def __init__(self, name: str, result):
            self.name, self.result = name, result

        def __await__(self):
            calls.append(self.name)
            if False:
                yield
            return self.result

    class Method:
        def __init__(self, name: str, result):
            self.name, self.result = name, result

        def remote(self, *a):
            return Call(self.name, self.result)

    class FakeQueue:
        take = Method("take", [])
        publish = Method("publish", [])
        leave = Method("leave", None)

    async def main() -> None:
        srv = _draining_server(FakeQueue(), _StepsEngine(3, calls))
        await srv.__del__()
        assert srv.engine.steps_left == 0  # ran to completion
        assert "take" not in calls  # draining: nothing new taken
        assert calls[-2:] == ["leave", "engine shutdown"] and "publish" in calls[:-2]  # delivered, then left

    asyncio.run(main())


def test_a_draining_llm_replica_delivers_the_finish_event_of_its_last_step_before_it_leaves() -> None:
    """The engine's step runs in a thread and reports no work as soon as the last request finishes,
    before the step returns its finish event. Leaving the queue then would turn that finish into
    "the LLM replica shut down while generating this answer" for a stream that got every token."""
    import asyncio

    log: list[tuple[str, object]] = []

    class Method:
        def __init__(self, name: str, result):
            self.name, self.result = name, result

        def remote(self, *args):
            log.append((self.name, [e["type"] for e in args[1]] if self.name == "publish" else None))

            async def call():
                await asyncio.sleep(0.01)
                return self.result
            return call()

    class FakeQueue:
        take = Method("take", [])
        publish = Method("publish", [])
        leave = Method("leave", None)

    class SlowStepEngine:
        def health_error(self) -> None:  # healthy (InferenceEngine's default)
            return None

        tokens_left = 3

        def has_work(self) -> bool:
            return self.tokens_left > 0

        def free_slots(self) -> int:
            return 0

        def free_tokens(self) -> int:
            return 0

        async def step(self) -> list[dict]:
            self.tokens_left -= 1  # the thread's state changes first...
            await asyncio.sleep(0.3)  # ...the events come back a decode step later
            return [{"request_id": "r", "type": "finish" if self.tokens_left == 0 else "token"}]

        async def shutdown(self) -> None:
            log.append(("engine shutdown", None))

        def stats(self) -> dict:
            return {}

    async def main() -> None:
        srv = _draining_server(FakeQueue(), SlowStepEngine())
        await asyncio.sleep(0.45)  # inside the second step
        await srv.__del__()
        published = [t for name, types in log if name == "publish" for t in types]
        assert published == ["token", "token", "finish"], log
        names = [name for name, _ in log]
        assert names.index("leave") > max(i for i, n in enumerate(names) if n == "publish"), log

    asyncio.run(main())


def test_an_idle_llm_replica_whose_queue_is_deleted_with_it_leaves_without_waiting_out_the_drain(monkeypatch) -> None:
    """Deleting the application deletes the queue's deployment with the LLM's: the idle replica's take in
    flight then waits for a queue replica that never comes (Serve holds such a call), and its drain used to
    wait the whole DRAIN_TIMEOUT_S (50 s). Nothing runs and nothing is left to send: it leaves at once."""
    import asyncio
    import time

    from dotsvlm_serving.deployments.llm import LLMServer

    monkeypatch.setattr(LLMServer, "TAKE_OVERDUE_S", 0.2)
    monkeypatch.setattr(LLMServer, "LEAVE_TIMEOUT_S", 0.2)
    calls: list[str] = []

    class Method:
        def __init__(self, name: str) -> None:
            self.name = name

        def remote(self, *args):
            calls.append(self.name)

            async def never():
                await asyncio.Event().wait()
            return never()

    class GoneQueue:
        take, publish, leave = Method("take"), Method("publish"), Method("leave")

    async def main() -> None:
        srv = _draining_server(GoneQueue(), _StepsEngine(0, calls))
        await asyncio.sleep(0.05)  # the loop is in its take
        started = time.monotonic()
        await srv.__del__()
        assert time.monotonic() - started < 5, "the drain waited for a queue that is gone"
        assert calls == ["take", "leave", "engine shutdown"], calls
        assert srv._run_task.cancelled()

    asyncio.run(main())


def test_an_llm_replica_publishes_a_requests_first_and_last_event_at_once_and_the_tokens_between_in_batches() -> None:
    """One publish call per PUBLISH_INTERVAL_S while the engine decodes, not one per step: the first token
    (time to first token) and the finish are not held back, every event arrives once, in order."""
    import asyncio
    import time

    from dotsvlm_serving.deployments.llm import LLMServer

    sent: list[tuple[float, list[str]]] = []

    class Method:
        def __init__(self, name: str, result):
            self.name, self.result = name, result

        def remote(self, *args):
            if self.name == "publish":
                sent.append((time.monotonic(), [f"{e['type']}{e['i']}" for e in args[1]]))

            async def call():
                await asyncio.sleep(0.001)
                return self.result
            return call()

    class FakeQueue:
        take = Method("take", [])
        publish = Method("publish", [])
        leave = Method("leave", None)

    class Engine:
        def health_error(self) -> None:  # healthy (InferenceEngine's default)
            return None

        steps, started_at = 0, 0.0

        def has_work(self) -> bool:
            return self.steps < 60

        def free_slots(self) -> int:
            return 1  # (an idle loop waits in take: the fake's take answers [] after 1 ms)

        def free_tokens(self) -> int:
            return 0

        async def step(self) -> list[dict]:
            await asyncio.sleep(0.002)  # a 2 ms decode step
            self.steps += 1
            if self.steps == 1:
                self.started_at = time.monotonic()
            return [{"request_id": "r", "type": "finish" if self.steps == 60 else "token"}]

        async def shutdown(self) -> None:
            pass

        def stats(self) -> dict:
            return {}

    async def main() -> None:
        engine = Engine()
        srv = _draining_server(FakeQueue(), engine)
        deadline = time.monotonic() + 10
        while not (sent and sent[-1][1][-1].startswith("finish")) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        finished_at = time.monotonic()
        await srv.__del__()
        events = [e for _, batch in sent for e in batch]
        assert events == [f"token{i}" for i in range(59)] + ["finish59"], sent  # each once, in order
        assert sent[0][1] == ["token0"] and sent[0][0] - engine.started_at < 0.01  # the first token at once
        assert finished_at - sent[-1][0] < 0.05  # the finish without waiting out an interval
        assert len(sent) <= 2 + (sent[-1][0] - sent[0][0]) / LLMServer.PUBLISH_INTERVAL_S + 1, sent  # batched
        assert len(sent) < 30, sent  # 60 steps of 2 ms: far fewer calls than steps

    asyncio.run(main())


def test_an_autoscaled_pool_puts_dotsvlm_policy_on_the_application() -> None:
    """Every deployment reports to the policy (autoscaling config, fast metrics push); the deploy body
    names dotsvlm's policy with the spec's knobs; fixed sizes need none of it."""
    from dotsvlm_serving.serve_config import (AUTOSCALING_POLICY_PATH, INGRESS_DEPLOYMENT, LLM_DEPLOYMENT,
                                              QUEUE_DEPLOYMENT, VISION_DEPLOYMENT)

    cfg = ServeAppConfig.model_validate({"model_path": "/m", "vision": {"autoscaling": {"min_replicas": 0,
                                                                                       "max_replicas": 4}}})
    app = build_app(cfg.model_dump(mode="json"))
    ingress = app._bound_deployment
    bound = {a._bound_deployment.name: a._bound_deployment for a in ingress.init_args[1:]}
    bound[ingress.name] = ingress
    assert set(bound) == {INGRESS_DEPLOYMENT, VISION_DEPLOYMENT, QUEUE_DEPLOYMENT, LLM_DEPLOYMENT}
    for name, dep in bound.items():
        auto = dep._deployment_config.autoscaling_config
        assert auto is not None, f"{name} must report to the policy"
        assert dep.ray_actor_options["runtime_env"]["env_vars"]["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"]
    assert bound[VISION_DEPLOYMENT]._deployment_config.autoscaling_config.min_replicas == 0
    assert bound[QUEUE_DEPLOYMENT]._deployment_config.autoscaling_config.max_replicas == 1
    policy = cfg.deploy_body()["applications"][0]["autoscaling_policy"]
    assert policy == {"policy_function": AUTOSCALING_POLICY_PATH}, "no setting in the policy (Ray hashes it)"
    settings = bound[INGRESS_DEPLOYMENT]._deployment_config.user_config["autoscaling"]
    assert "image_ttft_s" in settings["slo"] and settings["vision"]["idle_to_zero_s"] == 300

    # Fixed sizes run the same policy between equal bounds: turning autoscaling on later restarts nothing.
    fixed = ServeAppConfig.model_validate({"model_path": "/m"})
    assert fixed.deploy_body()["applications"][0]["autoscaling_policy"] == policy
    assert fixed.ingress_config().autoscaling is not None
    ingress = build_app(fixed.model_dump(mode="json"))._bound_deployment
    auto = ingress._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (1, 1)


def test_engine_defaults_and_option_errors_say_what_to_fix() -> None:
    assert LLMPoolConfig().engine == "transformers"
    assert LLMPoolConfig(gpus_per_replica=8, tensor_parallel=8).engine == "vllm"
    assert LLMPoolConfig(engine="vllm", memory_fraction=0.8, chunked_prefill=True, max_prefill_tokens=4096,
                         cuda_graph_max_batch_size=64).memory_fraction == 0.8
    with pytest.raises(ValueError, match="set llm.engine to vllm to shard the model"):
        LLMPoolConfig(engine="transformers", gpus_per_replica=16, tensor_parallel=16, nodes_per_replica=2)
    with pytest.raises(ValueError, match="llm.memory_fraction, llm.cuda_graph_max_batch_size only apply to the vllm"):
        LLMPoolConfig(memory_fraction=0.5, cuda_graph_max_batch_size=8)
    with pytest.raises(ValueError, match="chunked prefill, which is off"):
        LLMPoolConfig(engine="vllm", chunked_prefill=False, max_prefill_tokens=1024)
    with pytest.raises(ValueError, match="engine"):
        LLMPoolConfig(engine="sglang")


def _deployments(cfg: ServeAppConfig) -> dict[str, dict]:
    return {d["name"]: d for d in cfg.deploy_body()["applications"][0]["deployments"]}


def _code_version(cfg: ServeAppConfig) -> str:
    """What the installed Ray stamps on every deployment of a config-deployed application."""
    from ray.serve._private.deploy_utils import get_app_code_version
    from ray.serve.schema import ServeDeploySchema

    return get_app_code_version(ServeDeploySchema.model_validate(cfg.deploy_body()).applications[0])


def _changed(a: ServeAppConfig, b: ServeAppConfig) -> set[str]:
    before, after = _deployments(a), _deployments(b)
    return {name for name in before if before[name] != after[name]}


def test_each_deployment_gets_only_its_own_slice_and_the_model_is_the_only_args() -> None:
    cfg = ServeAppConfig.model_validate({
        "model_path": "/m", "llm": {"context_length": 2048, "max_running_requests": 4},
        "queue": {"enqueue_timeout_s": 3, "lease_timeout_s": 4}, "vision": {"max_batch_pixels": 500_000}})
    app = cfg.deploy_body()["applications"][0]
    assert app["args"] == {"model_path": "/m", "served_model_name": "dots.vlm1", "device": "cpu", "dtype": "float32"}
    slices = {name: d["user_config"] for name, d in _deployments(cfg).items()}
    assert slices["VisionEncoder"]["max_batch_pixels"] == 500_000 and "context_length" not in slices["VisionEncoder"]
    assert slices["TensorQueue"] == cfg.queue.model_dump(mode="json")
    assert slices["LLMServer"]["context_length"] == 2048 and slices["LLMServer"]["lease_timeout_s"] == 4
    assert slices["LLMServer"]["kv_cache_tokens"] == cfg.llm.kv_cache_budget() == slices["Ingress"]["kv_cache_tokens"]
    assert slices["Ingress"]["enqueue_timeout_s"] == 3 and "max_batch_pixels" not in slices["Ingress"]
    # The builder binds the same options in code (serve.run), and only the model and handles as arguments.
    bound = build_app(cfg.model_dump(mode="json"))._bound_deployment
    assert bound._deployment_config.user_config == slices["Ingress"]
    assert bound.init_args[0] == cfg.served_model()


def test_a_pool_change_touches_only_that_deployment_and_never_rays_code_version() -> None:
    """Ray restarts every replica when the application's code version changes (its args, its runtime
    env, its autoscaling policy); per deployment, a changed `user_config` only reconfigures, changed
    actor options restart. The vision batch budget and the LLM's engine settings reach only their own
    deployment's options."""
    base = ServeAppConfig.model_validate({"model_path": "/m"})
    vision = base.model_copy(update={"vision": base.vision.model_copy(update={"max_batch_pixels": 1_000_000})})
    assert _changed(base, vision) == {"VisionEncoder"}
    assert _code_version(vision) == _code_version(base)
    assert _deployments(vision)["VisionEncoder"]["ray_actor_options"] == _deployments(base)["VisionEncoder"]["ray_actor_options"]

    llm = ServeAppConfig.model_validate({"model_path": "/m", "llm": {"max_running_requests": 8}})
    # The ingress checks requests against the KV budget it follows from (in place); the LLM restarts.
    assert _changed(base, llm) == {"LLMServer", "Ingress"}
    assert _code_version(llm) == _code_version(base)
    env = lambda c: _deployments(c)["LLMServer"]["ray_actor_options"]["runtime_env"]["env_vars"]  # noqa: E731
    assert env(llm)[RESTART_DIGEST_ENV] != env(base)[RESTART_DIGEST_ENV]

    # The lease applies in place: the LLM's user_config changes, its actor options do not.
    lease = ServeAppConfig.model_validate({"model_path": "/m", "queue": {"lease_timeout_s": 20}})
    assert _changed(base, lease) == {"LLMServer", "TensorQueue"}
    assert env(lease) == env(base)

    # The model is the application's args: a change to it restarts everything.
    assert _code_version(ServeAppConfig.model_validate({"model_path": "/other"})) != _code_version(base)


def _versions(cfg: ServeAppConfig) -> dict[str, object]:
    """Each deployment's version as the installed Ray computes it from the deploy body."""
    from ray.serve._private.config import DeploymentConfig
    from ray.serve._private.version import DeploymentVersion

    code = _code_version(cfg)
    out = {}
    for name, d in _deployments(cfg).items():
        config = DeploymentConfig(user_config=d["user_config"], autoscaling_config=d.get("autoscaling_config"),
                                  num_replicas=d.get("num_replicas"),
                                  **{k: d[k] for k in ("graceful_shutdown_timeout_s",) if k in d})
        out[name] = DeploymentVersion(code, config, d["ray_actor_options"],
                                      placement_group_bundles=d.get("placement_group_bundles"),
                                      placement_group_strategy=d.get("placement_group_strategy"))
    return out


AUTOSCALED = {"model_path": "/m", "vision": {"autoscaling": {"min_replicas": 0, "max_replicas": 4}},
              "llm": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}}


@pytest.mark.parametrize("change", [
    {"llm": {"autoscaling": {"target_ongoing_requests": 6}}},
    {"llm": {"autoscaling": {"downscale_delay_s": 30, "replica_startup_s": 60, "vision_lead_weight": 0}}},
    {"vision": {"autoscaling": {"max_replicas": 6}}},
    {"llm": {"autoscaling": {"min_replicas": 2, "max_replicas": 5, "initial_replicas": 2}}},
    {"slo": {"image_ttft_s": 5, "inter_token_s": 0.1}},
    {"vision": {"autoscaling": {"min_replicas": 1, "max_replicas": 1}},
     "llm": {"autoscaling": {"min_replicas": 1, "max_replicas": 1}}},
], ids=["llm-target", "llm-windows", "vision-max", "llm-bounds", "slo", "autoscaling-off"])
def test_autoscaling_settings_restart_no_replica(change: dict) -> None:
    """Checked with the installed Ray's own version code: an autoscaling knob, a bound, the SLO, or turning
    both pools' autoscaling off (equal bounds) leaves
    the application's code version and every deployment's actor version alone (no replica restarts);
    only the Ingress (whose slice carries the policy's settings) reconfigures in place."""
    import copy

    raw = copy.deepcopy(AUTOSCALED)
    for section, values in change.items():
        raw.setdefault(section, {})
        for key, value in values.items():
            raw[section][key] = {**raw[section].get(key, {}), **value} if isinstance(value, dict) else value
    base, new = ServeAppConfig.model_validate(AUTOSCALED), ServeAppConfig.model_validate(raw)
    assert _code_version(new) == _code_version(base)
    before, after = _versions(base), _versions(new)
    for name in before:
        assert not before[name].requires_actor_restart(after[name]), name
    reconfigured = {name for name in before if before[name].requires_actor_reconfigure(after[name])}
    assert reconfigured <= {"Ingress"}, reconfigured
    assert _changed(base, new) <= {"Ingress", "VisionEncoder", "LLMServer"}


def test_a_longer_llm_drain_reconfigures_the_llm_replicas_in_place() -> None:
    """llm.drain_timeout_s travels in the LLM's slice (the replica reads it when it stops) and sets Serve's
    graceful shutdown timeout with the margin after it: the installed Ray applies both without a restart."""
    base = ServeAppConfig.model_validate({"model_path": "/m"})
    longer = ServeAppConfig.model_validate({"model_path": "/m", "llm": {"drain_timeout_s": 600}})
    llm = _deployments(longer)["LLMServer"]
    assert llm["graceful_shutdown_timeout_s"] == 610 and llm["user_config"]["drain_timeout_s"] == 600
    assert _deployments(base)["LLMServer"]["graceful_shutdown_timeout_s"] == 60  # the default drain: 50 s
    before, after = _versions(base)["LLMServer"], _versions(longer)["LLMServer"]
    assert not before.requires_actor_restart(after) and before.requires_actor_reconfigure(after)
    assert _changed(base, longer) == {"LLMServer"}


def test_each_autoscaling_knob_has_one_place_in_the_serve_config() -> None:
    """Serve's fields (bounds, target) travel in the deployment's autoscaling_config, every other knob and
    the SLO in the Ingress's slice; the policy gets each pool's targets back whole."""
    from ray.serve.config import AutoscalingConfig

    from dotsvlm_serving.serve_config import SERVE_AUTOSCALING_FIELDS, LLMAutoscaling, VisionAutoscaling

    cfg = ServeAppConfig.model_validate({**AUTOSCALED, "llm": {"autoscaling": {
        "min_replicas": 1, "max_replicas": 3, "initial_replicas": 2, "downscale_delay_s": 45}}})
    deps = _deployments(cfg)
    settings = deps["Ingress"]["user_config"]["autoscaling"]
    for pool, targets_cls, name in (("vision", VisionAutoscaling, "VisionEncoder"), ("llm", LLMAutoscaling, "LLMServer")):
        targets = getattr(cfg, pool).autoscaling
        serve = deps[name]["autoscaling_config"]
        assert set(settings[pool]) == set(targets_cls.model_fields) - SERVE_AUTOSCALING_FIELDS
        assert not set(settings[pool]) & set(serve) - {"upscale_delay_s", "downscale_delay_s"}
        assert (serve["upscale_delay_s"], serve["downscale_delay_s"]) == (0.0, 0.0), "Serve would delay on top"
        assert targets_cls.from_serve(settings[pool], AutoscalingConfig(**serve)) == targets
    assert settings["llm"]["downscale_delay_s"] == 45 and deps["LLMServer"]["autoscaling_config"]["initial_replicas"] == 2
    assert settings["slo"] == cfg.slo.model_dump(mode="json")
    for name in ("VisionEncoder", "TensorQueue", "LLMServer"):
        assert "autoscaling" not in deps[name]["user_config"], "the settings have one carrier"


def test_the_deploy_body_is_what_rays_schema_accepts_and_leaves_no_option_to_the_code() -> None:
    from ray.serve.schema import ServeDeploySchema

    for cfg in (ServeAppConfig.model_validate({"model_path": "/m"}),
                ServeAppConfig.model_validate({"model_path": "/m", "device": "cuda",
                                               "llm": {"gpus_per_replica": 16, "tensor_parallel": 16,
                                                       "nodes_per_replica": 2},
                                               "vision": {"autoscaling": {"min_replicas": 0, "max_replicas": 2}}})):
        ServeDeploySchema.model_validate(cfg.deploy_body())
        for name, d in _deployments(cfg).items():
            assert "ray_actor_options" in d and "user_config" in d, name
            assert "num_replicas" in d and "autoscaling_config" in d, name  # one of them None


def test_live_slices_apply_in_place() -> None:
    """The queue's limits change on a running core: a raised limit admits a waiting producer at once."""
    import asyncio

    from dotsvlm_serving.tensor_queue import QueueItem, TensorQueueCore

    async def main() -> None:
        core = TensorQueueCore(max_items=1, max_bytes=10_000)
        await core.put(QueueItem("a", 10, 1, None), 1.0)
        waiting = asyncio.create_task(core.put(QueueItem("b", 10, 1, None), 5.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        core.set_limits(max_items=2, max_bytes=10_000, lease_timeout_s=10.0, max_deliveries=2)
        await asyncio.wait_for(waiting, 1.0)
        assert core.stats()["depth"] == 2

    asyncio.run(main())


def test_dotsvlm_serve_pins_the_ingress_and_queue_to_its_own_node_which_advertises_the_resource() -> None:
    from dotsvlm_serving import embedded

    assert embedded.local_config("/m").control_resource == CONTROL_RESOURCE
    assert embedded.CONTROL_RESOURCES == {CONTROL_RESOURCE: CONTROL_RESOURCE_CAPACITY}


def test_an_llm_replica_the_queue_declared_lost_drops_its_copies_and_rejoins_under_a_new_id() -> None:
    """A replica that stalled past the lease timeout was declared lost; its request went to another
    replica. When the queue answers it with None, it must cancel its own copy, publish none of that copy's
    further events (the answer now comes from the other replica), and take work again under a new id only
    once its engine has let go of the copy (a redelivery of the same request may come back to it)."""
    import asyncio
    import time

    published: list[tuple[str, list[str]]] = []
    takes: list[str] = []

    class FakeQueue:
        class take:
            @staticmethod
            def remote(cid, *a):
                takes.append(cid)

                async def call():
                    await asyncio.sleep(0.01)
                    return [] if cid != "c" else None
                return call()

        class publish:
            @staticmethod
            def remote(cid, events, stats):
                published.append((cid, [e["type"] for e in events]))

                async def call():
                    return None if cid == "c" else []  # "c" was declared lost
                return call()

    class FakeEngine:
        def health_error(self) -> None:  # healthy (InferenceEngine's default)
            return None

        def __init__(self) -> None:
            self.running, self.cancelled = {"r"}, []

        def has_work(self) -> bool:
            return bool(self.running)

        def free_slots(self) -> int:
            return 0 if self.running else 4

        def free_tokens(self) -> int:
            return 1000

        def cancel(self, rid: str) -> None:
            self.cancelled.append(rid)

        async def step(self) -> list[dict]:
            await asyncio.sleep(0.01)
            if self.cancelled and "r" in self.running:
                self.running.clear()
                return [{"request_id": "r", "type": "finish", "finish_reason": "cancelled"}]
            return [{"request_id": "r", "type": "token", "text": "t"}]

        def stats(self) -> dict:
            return {}

    async def main() -> None:
        srv = _draining_server(FakeQueue(), FakeEngine())
        srv._active.add("r")
        deadline = time.monotonic() + 10
        while not any(cid != "c" for cid in takes):
            assert time.monotonic() < deadline, (takes, published)
            await asyncio.sleep(0.01)
        srv._run_task.cancel()
        assert srv.engine.cancelled == ["r"] and not srv.engine.running
        assert srv.consumer_id != "c" and all(cid == "c" for cid, _ in published), published
        assert "finish" not in [t for _, types in published for t in types]  # the dropped copy's end stays here

    asyncio.run(main())


def test_only_the_ingress_writes_an_access_log_line_per_call() -> None:
    """The calls between the deployments (several per request into the queue, a long-poll per LLM replica
    every second) would flood the logs; the Ingress keeps one line per HTTP request."""
    body = ServeAppConfig.model_validate({"model_path": "/m"}).deploy_body(http_port=8000)
    deps = {d["name"]: d for d in body["applications"][0]["deployments"]}
    assert "logging_config" not in deps["Ingress"]
    for name in ("VisionEncoder", "TensorQueue", "LLMServer"):
        assert deps[name]["logging_config"] == {"enable_access_log": False}, name


def test_a_vision_replica_whose_tower_fails_every_batch_fails_its_health_check(monkeypatch) -> None:
    """One failed batch (each caller gets the error) leaves the replica healthy; a run of them is a broken tower,
    and the health check says so, so Serve replaces it instead of it failing every image request sent to it."""
    import asyncio

    import pytest
    import torch

    from dotsvlm_serving import pipeline
    from dotsvlm_serving.deployments.vision_encoder import VisionEncoder, _Job
    from dotsvlm_serving.model.preprocess import PreprocessedImages

    def broken(*_a, **_k):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(pipeline, "encode_preprocessed", broken)

    async def main() -> None:
        enc = object.__new__(VisionEncoder)
        enc.cfg = ServeAppConfig.model_validate({"model_path": "/m", "vision": {"max_batch_wait_ms": 0}}).vision_encoder_config()
        enc._jobs, enc._wake, enc.tower, enc._encoding_images = [], asyncio.Event(), None, 0
        enc._failed_batches, enc._batch_error = 0, ""
        enc._loop = asyncio.create_task(enc._batch_forever())
        pre = PreprocessedImages(torch.zeros(4, 1176), torch.tensor([[1, 2, 2]]), [1])
        loop = asyncio.get_running_loop()
        for n in range(VisionEncoder.MAX_FAILED_BATCHES):
            enc.check_health()  # healthy until the run is long enough
            job = _Job(pre, 784, loop.create_future(), 0.0)
            enc._jobs.append(job)
            enc._wake.set()
            with pytest.raises(RuntimeError, match="vision encoder failed"):
                await asyncio.wait_for(job.future, 10)
        with pytest.raises(RuntimeError, match="the vision tower is broken: its last 3 batches failed.*CUDA error"):
            enc.check_health()
        enc._loop.cancel()

    asyncio.run(main())


def test_a_request_the_vision_tower_cannot_take_fails_alone_not_the_requests_batched_with_it(monkeypatch) -> None:
    """A batch packs several requests' images into one forward; when it failed, every caller got the error, so one
    request the tower could not take failed the others batched with it by chance (and, encoded again with them on
    the relay's retry, failed them twice). Now the batch's requests are encoded again each alone: only that one
    fails, the others get their embeddings, and the replica stays healthy."""
    import asyncio

    import pytest
    import torch

    from dotsvlm_serving import pipeline
    from dotsvlm_serving.deployments.vision_encoder import VisionEncoder, _Job
    from dotsvlm_serving.model.preprocess import PreprocessedImages

    forwards: list[int] = []

    def tower(_tower, pre, to_cpu=True):
        forwards.append(len(pre.num_tokens))
        if (pre.pixel_values == 7).any():
            raise RuntimeError("the tower cannot take this input")
        return list(torch.split(pre.pixel_values[::4, :4], pre.num_tokens))  # a row per 4 patches (merged)

    monkeypatch.setattr(pipeline, "encode_preprocessed", tower)

    class NoMetrics:
        def observe(self, *_a) -> None: ...

    async def batch_of(values: tuple[float, ...]) -> tuple[VisionEncoder, list]:
        """One batch of one-image requests (a request of 7s is one the tower cannot take): the encoder, answers."""
        enc = object.__new__(VisionEncoder)
        enc.cfg = ServeAppConfig.model_validate({"model_path": "/m", "vision": {"max_batch_wait_ms": 50}}).vision_encoder_config()
        enc._jobs, enc._wake, enc.tower, enc._encoding_images = [], asyncio.Event(), None, 0
        enc._failed_batches, enc._batch_error, enc.metrics = 0, "", NoMetrics()
        enc._stats = {"batches": 0, "images": 0, "pixels_total": 0.0, "encode_seconds_total": 0.0, "answers_direct": 0}
        enc._loop = asyncio.create_task(enc._batch_forever())
        loop = asyncio.get_running_loop()
        jobs = []
        for value in values:
            pre = PreprocessedImages(torch.full((4, 1176), value), torch.tensor([[1, 2, 2]]), [1])
            jobs.append(_Job(pre, 784, loop.create_future(), 0.0, 1))
        enc._jobs.extend(jobs)
        enc._wake.set()
        return enc, await asyncio.wait_for(asyncio.gather(*(j.future for j in jobs), return_exceptions=True), 10)

    async def stop(enc: VisionEncoder) -> None:
        enc._loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await enc._loop

    async def main() -> None:
        enc, (good1, bad, good2) = await batch_of((1.0, 7.0, 2.0))  # the second request: one the tower cannot take
        assert forwards[0] == 3  # one packed forward first
        assert isinstance(bad, RuntimeError) and "cannot take this input" in str(bad)
        assert float(good1[0][0]) == 1.0 and float(good2[0][0]) == 2.0
        enc.check_health()
        assert enc._failed_batches == 0
        await stop(enc)
        # Three such requests batched together by chance: one failed batch, not three (the replica is not
        # replaced for them; MAX_FAILED_BATCHES batches failing in a row still make it unhealthy).
        enc, answers = await batch_of((7.0, 7.0, 7.0))
        assert all(isinstance(a, RuntimeError) for a in answers)
        assert enc._failed_batches == 1
        enc.check_health()
        await stop(enc)

    asyncio.run(main())


def test_a_vision_caller_that_goes_away_lets_go_of_its_images_and_its_pixels_only_once_decoded() -> None:
    """A client that leaves cancels its vision call. Its decoded images were kept in the batching FIFO until the
    loop next looked (behind a running forward), and its pixels left the replica's gate at once although a thread
    was still decoding them, so the next request decoded beside them: more decoded memory than the limit. Now the
    job leaves at once, and the pixels stay held until the decode thread is done."""
    import asyncio
    import concurrent.futures
    import threading
    from types import SimpleNamespace

    import torch

    from dotsvlm_serving.admission import AmountGate
    from dotsvlm_serving.deployments.vision_encoder import VisionEncoder
    from dotsvlm_serving.model.preprocess import PreprocessedImages

    release = threading.Event()

    def prepare(images: list[bytes]) -> PreprocessedImages:
        if images == [b"slow"]:
            release.wait(10)
        return PreprocessedImages(torch.zeros(4, 1176), torch.tensor([[1, 2, 2]]), [1])

    async def main() -> None:
        enc = object.__new__(VisionEncoder)
        enc._gate, enc._gated_images, enc._preparing_images = AmountGate(1000), 0, 0
        enc._prepare_pool = concurrent.futures.ThreadPoolExecutor(2)
        enc._jobs, enc._wake, enc._prepare = [], asyncio.Event(), prepare
        enc.model_config = SimpleNamespace(preprocess=SimpleNamespace(patch_size=14))
        # Cancelled while its thread decodes: the pixels stay held until the thread is done.
        slow = asyncio.create_task(enc.encode([b"slow"], 700))
        await asyncio.sleep(0.05)
        assert enc._gate.held == 700
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        assert enc._gate.held == 700
        release.set()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if enc._gate.held == 0:
                break
        assert enc._gate.held == 0
        # Cancelled while its job waits for a batch (no batching loop here: it is busy): the job goes at once.
        waiting = asyncio.create_task(enc.encode([b"fast"], 700))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if enc._jobs:
                break
        assert len(enc._jobs) == 1 and enc._gate.held == 700
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        assert enc._jobs == [] and enc._gate.held == 0
        enc._prepare_pool.shutdown()

    asyncio.run(main())
