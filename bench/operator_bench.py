"""Operator benchmark on the test control plane (kwok fake nodes, real apiserver/scheduler/controllers).

Measures
  1. time from `create DotsVLMDeployment` to all of its 10 children present, p50/p95 over N resources,
     (a) one at a time and (b) N created at once;
  2. the operator's resident memory (RSS) with 0 and with 2N resources reconciled;
  3. the pod loop's cost with 2N resources: operator CPU seconds per resource per minute, and the calls
     to the Ray head / ingress and to the Kubernetes API per resource per minute, once all are settled.

Child arrival is timed with watches (no polling), from just before the create call returns.
The Ray head and the ingress are a fake (tests/support/fake_ray_head.py: Serve's targets, replicas and
the autoscaler's report; no Ray in kwok pods), answering at once.

    .venv/bin/python bench/operator_bench.py                # N=50: 100 resources in all
    .venv/bin/python bench/operator_bench.py --resources 10 # quick look

Writes bench/results/operator_bench.json and .md (with the command that produced them).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import yaml  # noqa: E402

EXPECTED = {"ConfigMap": ["{n}-serve-config"], "Deployment": ["{n}-llm", "{n}-ray-head", "{n}-vision"],
            "NetworkPolicy": ["{n}-ray"], "PodDisruptionBudget": ["{n}-llm", "{n}-vision"],
            "Secret": ["{n}-ray-token"], "Service": ["{n}-api", "{n}-ray-head"]}
N_CHILDREN = sum(len(v) for v in EXPECTED.values())


def cpu_cr(name: str) -> dict:
    cr = yaml.safe_load((REPO / "examples" / "dotsvlm-small.yaml").read_text())
    cr["metadata"]["name"] = name
    cr["spec"]["model"]["quantization"] = "none"
    cr["spec"]["vision"]["gpusPerReplica"] = 0
    cr["spec"]["llm"].update(gpusPerReplica=0, tensorParallel=1)
    return cr


class ChildClock:
    """Watches the child kinds in a namespace and records when each resource's last child appeared."""

    def __init__(self, namespace: str) -> None:
        from kubernetes import client, watch
        self.ns = namespace
        self.seen: dict[str, dict[str, float]] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        core, apps = client.CoreV1Api(), client.AppsV1Api()
        pol, net = client.PolicyV1Api(), client.NetworkingV1Api()
        self.lists = {"ConfigMap": core.list_namespaced_config_map, "Secret": core.list_namespaced_secret,
                      "Service": core.list_namespaced_service, "Deployment": apps.list_namespaced_deployment,
                      "PodDisruptionBudget": pol.list_namespaced_pod_disruption_budget,
                      "NetworkPolicy": net.list_namespaced_network_policy}
        self.watch = watch
        self.threads = [threading.Thread(target=self._run, args=(k, f), daemon=True) for k, f in self.lists.items()]
        for t in self.threads:
            t.start()

    def _run(self, kind: str, fn) -> None:
        while not self.stop.is_set():
            w = self.watch.Watch()
            try:
                for ev in w.stream(fn, self.ns, label_selector="dotsvlm.io/deployment", timeout_seconds=5):
                    if ev["type"] != "ADDED":
                        continue
                    meta = ev["object"].metadata
                    owner = meta.labels.get("dotsvlm.io/deployment")
                    with self.lock:
                        self.seen.setdefault(owner, {}).setdefault(f"{kind}/{meta.name}", time.monotonic())
            except Exception:  # noqa: BLE001 - a dropped watch is restarted
                time.sleep(0.2)

    def complete_at(self, name: str) -> float | None:
        with self.lock:
            got = self.seen.get(name, {})
            want = [f"{k}/{n.format(n=name)}" for k, names in EXPECTED.items() for n in names]
            if all(w in got for w in want):
                return max(got[w] for w in want)
        return None

    def close(self) -> None:
        self.stop.set()


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (from /proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def py_spy(pid: int, out: str, duration: float | None = None) -> subprocess.Popen:
    """py-spy recording the stacks of whichever thread of `pid` holds the GIL into `out` (collapsed stacks);
    it writes the file when `duration` ends or on SIGINT."""
    cmd = ["py-spy", "record", "--pid", str(pid), "--output", out, "--rate", "200", "--gil", "--format", "raw"]
    if duration is not None:
        cmd += ["--duration", str(int(duration))]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def apiserver_requests_by_kind(cluster) -> dict[str, float]:
    """apiserver_request_total per "VERB resource[/subresource]" (all clients; WATCH and LIST included)."""
    out = cluster.kubectl("get", "--raw", "/metrics").stdout
    counts: dict[str, float] = {}
    for line in out.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
        key = f"{labels.get('verb', '?')} {labels.get('resource', '?')}"
        if labels.get("subresource"):
            key += f"/{labels['subresource']}"
        counts[key] = counts.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def apiserver_requests(cluster) -> float:
    """apiserver_request_total over every verb and resource (all clients)."""
    return sum(apiserver_requests_by_kind(cluster).values())


def per_resource(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    """Requests per resource by kind between two readings, largest first (kinds under 0.1 left out)."""
    diff = {k: (after.get(k, 0.0) - before.get(k, 0.0)) / n for k in after}
    return {k: round(v, 1) for k, v in sorted(diff.items(), key=lambda kv: -kv[1]) if v >= 0.1}


def kinds_table(burst: dict[str, float], floor: dict[str, float]) -> str:
    keys = list(burst) + [k for k in floor if k not in burst]
    return "\n".join(f"| {k} | {burst.get(k, 0)} | {floor.get(k, 0)} |" for k in keys)


def create(api, ns: str, name: str) -> float:
    t0 = time.monotonic()
    api.create_namespaced_custom_object("dotsvlm.io", "v1alpha1", ns, "dotsvlmdeployments", cpu_cr(name))
    return t0


def wait_complete(clock: ChildClock, names: list[str], timeout: float) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    done: dict[str, float] = {}
    while len(done) < len(names):
        for n in names:
            if n not in done and (t := clock.complete_at(n)) is not None:
                done[n] = t
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(done)}/{len(names)} resources complete after {timeout}s")
        time.sleep(0.05)
    return done


def children_manifests(ns: str, name: str) -> list[dict]:
    """The children the operator made for `name`, as plain manifests (server-set fields removed)."""
    from kubernetes import client
    api = client.ApiClient()
    core, apps = client.CoreV1Api(), client.AppsV1Api()
    pol, net = client.PolicyV1Api(), client.NetworkingV1Api()
    reads = {"ConfigMap": core.read_namespaced_config_map, "Secret": core.read_namespaced_secret,
             "Service": core.read_namespaced_service, "Deployment": apps.read_namespaced_deployment,
             "PodDisruptionBudget": pol.read_namespaced_pod_disruption_budget,
             "NetworkPolicy": net.read_namespaced_network_policy}
    out = []
    for kind, names in EXPECTED.items():
        for n in names:
            obj = api.sanitize_for_serialization(reads[kind](n.format(n=name), ns))
            obj.pop("status", None)
            meta = obj["metadata"]
            for k in ("uid", "resourceVersion", "creationTimestamp", "managedFields", "ownerReferences", "generation",
                      "namespace"):
                meta.pop(k, None)
            # Ours stay (the Ray Deployments' recorded pod template is part of what the operator writes).
            (meta.get("annotations") or {}).pop("deployment.kubernetes.io/revision", None)
            if kind == "Service" and obj["spec"].get("clusterIP") != "None":  # headless stays headless
                for k in ("clusterIP", "clusterIPs"):
                    obj["spec"].pop(k, None)
            out.append(obj)
    return out


def floor_burst(ns: str, template: list[dict], old: str, names: list[str], threads: int) -> tuple[float, dict[str, float]]:
    """The same children for `names`, written directly with the operator's own client (server-side apply,
    as the operator writes them; no operator logic; one thread per resource, `threads` at once, as the
    operator does): what the control plane itself allows on this machine. All are asked for at once:
    returns that moment, and when a thread took each resource up (a resource may wait for a thread, as
    a resource waits for the operator's threads)."""
    from dotsvlm_operator.kube import Kube
    kube = Kube()
    text = json.dumps(template)

    def one(nm: str) -> float:
        t0 = time.monotonic()
        for obj in json.loads(text.replace(old, nm)):
            obj["metadata"]["namespace"] = ns
            kube.apply(obj)
        return t0

    with ThreadPoolExecutor(threads) as ex:
        asked = time.monotonic()
        return asked, dict(zip(names, ex.map(one, names)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resources", type=int, default=50, help="resources per phase (sequential, burst)")
    ap.add_argument("--settle", type=float, default=30.0, help="seconds to sample memory once all are reconciled")
    ap.add_argument("--loop-window", type=float, default=60.0, help="seconds over which the pod loop's cost is measured")
    ap.add_argument("--pod-loop-seconds", type=float, default=5.0, help="the operator's --pod-loop-seconds")
    ap.add_argument("--old-cli", action="store_true",
                    help="for an operator from before the pod loop (no --api-url-override / --pod-loop-seconds): "
                         "compare against it with PYTHONPATH=<old checkout>/operator:<old checkout>/serving")
    ap.add_argument("--floor-threads", type=int, default=None,
                    help="threads of the floor phase (default: the operator's, dotsvlm_operator.kube.KUBE_THREADS)")
    ap.add_argument("--profile-burst", metavar="FILE",
                    help="record the stacks of the operator thread that holds the GIL during the burst with py-spy (must be installed) into FILE (collapsed stacks, one per line)")
    ap.add_argument("--profile-loop", metavar="FILE",
                    help="the same for the pod loop's steady-state window")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "operator_bench"))
    args = ap.parse_args()
    n = args.resources

    from support.cluster import CACHE, CLUSTER_PREFIX, KubeCluster, build_binaries
    import urllib.request
    import uuid

    # The fake head runs in its own process: serving the operator's calls must not slow this process's
    # watches, which time the children's arrival.
    head = subprocess.Popen([sys.executable, str(REPO / "tests" / "support" / "fake_ray_head.py")], stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    head_url = head.stdout.readline().strip()

    def head_call(path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(head_url + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")
    load_start = round(os.getloadavg()[0], 1)  # the machine may be shared: the load says how much

    bin_dir = build_binaries()
    cluster = KubeCluster(f"{CLUSTER_PREFIX}{os.getpid()}-bench-{uuid.uuid4().hex[:4]}", CACHE / "kwok", bin_dir)
    cluster.start()
    op = None
    log_path = Path(tempfile.gettempdir()) / "operator_bench.operator.log"
    print(f"operator log: {log_path}", file=sys.stderr)
    log = open(log_path, "w")
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "dotsvlm.io_dotsvlmdeployments.yaml"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/dotsvlmdeployments.dotsvlm.io", "--timeout=60s")
        seq_ns, burst_ns = "bench-seq", "bench-burst"
        for ns in (seq_ns, burst_ns):
            cluster.kubectl("create", "namespace", ns)
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
        from kubernetes import client, config
        config.load_kube_config()
        api = client.CustomObjectsApi()

        env = dict(cluster.env, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        op = subprocess.Popen([str(REPO / ".venv" / "bin" / "dotsvlm"), "operator", "--namespace", seq_ns,
                               "--namespace", burst_ns, "--ray-head-url-override", head_url]
                              + ([] if args.old_cli else ["--api-url-override", head_url,
                                                          "--pod-loop-seconds", str(args.pod_loop_seconds)]),
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        time.sleep(5)  # start-up: let kopf list and watch before the first resource (idle memory below)
        rss_idle = rss_mib(op.pid)

        results: dict = {}
        # (a) one at a time
        clock = ChildClock(seq_ns)
        seq = []
        for i in range(n):
            name = f"seq-{i:03d}"
            t0 = create(api, seq_ns, name)
            seq.append(wait_complete(clock, [name], 60)[name] - t0)
        clock.close()
        # (c) the floor: the same children server-side applied without the operator, at once, in a namespace it ignores
        # (deleted again before (b): the test cluster's Service IP range holds about 250).
        floor_ns = "bench-floor"
        cluster.kubectl("create", "namespace", floor_ns)
        from dotsvlm_operator.kube import KUBE_THREADS
        clock = ChildClock(floor_ns)
        fnames = [f"floor-{i:03d}" for i in range(n)]
        floor_before = apiserver_requests_by_kind(cluster)
        floor_threads = args.floor_threads or KUBE_THREADS
        fasked, fstarts = floor_burst(floor_ns, children_manifests(seq_ns, "seq-000"), "seq-000", fnames, floor_threads)
        fdone = wait_complete(clock, fnames, 600)
        floor_kinds = per_resource(floor_before, apiserver_requests_by_kind(cluster), n)
        clock.close()
        floor = [fdone[nm] - fasked for nm in fnames]  # all asked for at once, as the burst's resources
        floor_in_thread = [fdone[nm] - fstarts[nm] for nm in fnames]
        cluster.kubectl("delete", "namespace", floor_ns, "--wait=true", "--timeout=600s", timeout=660)
        # (b) all at once
        clock = ChildClock(burst_ns)
        names = [f"burst-{i:03d}" for i in range(n)]
        burst_before = apiserver_requests_by_kind(cluster)
        spy = py_spy(op.pid, args.profile_burst) if args.profile_burst else None
        cpu_burst0 = cpu_seconds(op.pid)
        # All at once: one thread per create (one after another, the last create came seconds after the first).
        with ThreadPoolExecutor(len(names)) as ex:
            starts = dict(zip(names, ex.map(lambda nm: create(api, burst_ns, nm), names)))
        creates_s = max(starts.values()) - min(starts.values())
        done = wait_complete(clock, names, 600)
        burst_after = apiserver_requests_by_kind(cluster)
        cpu_burst = cpu_seconds(op.pid) - cpu_burst0
        if spy is not None:
            spy.send_signal(2)  # py-spy writes its file on SIGINT
            spy.wait(timeout=60)
        k8s_burst = sum(burst_after.values()) - sum(burst_before.values())
        burst_kinds = per_resource(burst_before, burst_after, n)
        clock.close()
        burst = [done[nm] - starts[nm] for nm in names]
        burst_all = max(done.values()) - min(starts.values())


        # Memory with 2n resources: wait until every resource has a status, then sample.
        def all_have_status() -> bool:
            for ns in (seq_ns, burst_ns):
                items = api.list_namespaced_custom_object("dotsvlm.io", "v1alpha1", ns, "dotsvlmdeployments")["items"]
                if not all((i.get("status") or {}).get("conditions") for i in items):
                    return False
            return True
        deadline = time.monotonic() + 600
        while not all_have_status():
            if time.monotonic() > deadline:
                raise TimeoutError("not every resource got a status")
            time.sleep(1)
        samples = []
        t_end = time.monotonic() + args.settle
        while time.monotonic() < t_end:
            samples.append(rss_mib(op.pid))
            time.sleep(1)

        # The pod loop's cost in steady state: every resource's loop reads Serve's targets and the report.
        for pool in ("vision", "llm"):
            head_call("/-/fake/decision", {"pool": pool, "desired": 1, "current": 1, "raw": 1, "reason": "Stable",
                                           "message": "1 replica(s) fit the load"})
        time.sleep(2 * args.pod_loop_seconds)
        k8s0, head0, cpu0, t0 = apiserver_requests(cluster), head_call("/-/fake/requests"), cpu_seconds(op.pid), time.monotonic()
        spy = py_spy(op.pid, args.profile_loop, duration=args.loop_window) if args.profile_loop else None
        time.sleep(args.loop_window)
        if spy is not None:
            spy.wait(timeout=60)
        k8s1, head1, cpu1, t1 = apiserver_requests(cluster), head_call("/-/fake/requests"), cpu_seconds(op.pid), time.monotonic()
        minutes, total = (t1 - t0) / 60, 2 * n
        served = lambda counts: sum(v for k, v in counts.items() if "/-/fake/" not in k)  # noqa: E731
        head_calls = served(head1) - served(head0)

        ms = lambda xs: [round(x * 1000, 1) for x in xs]  # noqa: E731
        results = {
            "command": " ".join([".venv/bin/python", "bench/operator_bench.py", *sys.argv[1:]]),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                         text=True).stdout.strip(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_average_1m_at_start": load_start, "load_average_1m_at_end": round(os.getloadavg()[0], 1)},
            "cluster": "kube-apiserver/controller-manager/scheduler v1.36.3 + etcd v3.6.8 on loopback, kwok fake nodes",
            "children_per_resource": N_CHILDREN,
            "create_to_all_children_ms": {
                "sequential": {"n": n, "p50": round(pct(seq, 50) * 1000, 1), "p95": round(pct(seq, 95) * 1000, 1),
                               "max": round(max(seq) * 1000, 1), "all": ms(seq)},
                "burst": {"n": n, "p50": round(pct(burst, 50) * 1000, 1), "p95": round(pct(burst, 95) * 1000, 1),
                          "max": round(max(burst) * 1000, 1), "all_done_s": round(burst_all, 2),
                          "apiserver_requests_per_resource_all_clients": round(k8s_burst / n, 1),
                          "apiserver_requests_per_resource_by_kind": burst_kinds,
                          "operator_cpu_s": round(cpu_burst, 2), "creates_spread_s": round(creates_s, 2),
                          "all": ms(burst)},
                "floor_direct_creates": {"n": n, "threads": floor_threads, "p50": round(pct(floor, 50) * 1000, 1),
                                         "p95": round(pct(floor, 95) * 1000, 1), "max": round(max(floor) * 1000, 1),
                                         "all_done_s": round(max(fdone.values()) - fasked, 2),
                                         "once_in_a_thread": {"p50": round(pct(floor_in_thread, 50) * 1000, 1),
                                                              "p95": round(pct(floor_in_thread, 95) * 1000, 1)},
                                         "apiserver_requests_per_resource_by_kind": floor_kinds, "all": ms(floor)},
            },
            "operator_rss_mib": {"idle_0_resources": round(rss_idle, 1), "resources": 2 * n,
                                 "mean": round(statistics.mean(samples), 1), "max": round(max(samples), 1),
                                 "settle_s": args.settle},
            "pod_loop": {"resources": total, "pod_loop_seconds": args.pod_loop_seconds, "window_s": round(t1 - t0, 1),
                         "operator_cpu_s_per_resource_per_min": round((cpu1 - cpu0) / minutes / total, 4),
                         "operator_cpu_percent_of_one_core": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
                         "head_and_ingress_calls_per_resource_per_min": round(head_calls / minutes / total, 1),
                         "apiserver_requests_per_resource_per_min_all_clients": round((k8s1 - k8s0) / minutes / total, 2)},
        }
        Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        c = results["create_to_all_children_ms"]
        r = results["operator_rss_mib"]
        lp = results["pod_loop"]
        md = f"""# Operator benchmark

Command: `{results['command']}` (commit {results['git_commit']}, {results['date_utc']})
Machine: {results['machine']['cpus']} CPUs, {results['machine']['platform']}; {results['cluster']}.
The operator, the control plane and this script share the machine (1-minute load average
{results['machine']['load_average_1m_at_start']} at the start, {results['machine']['load_average_1m_at_end']} at the end).

| measure | p50 | p95 | max |
|---|---|---|---|
| create -> all {N_CHILDREN} children present, one resource at a time (n={n}) | {c['sequential']['p50']} ms | {c['sequential']['p95']} ms | {c['sequential']['max']} ms |
| same, {n} resources created at once | {c['burst']['p50']} ms | {c['burst']['p95']} ms | {c['burst']['max']} ms |
| floor: the same {N_CHILDREN} children of {n} resources server-side applied directly, all asked for at once, no operator ({c['floor_direct_creates']['threads']} threads, one per resource, as the operator) | {c['floor_direct_creates']['p50']} ms | {c['floor_direct_creates']['p95']} ms | {c['floor_direct_creates']['max']} ms |
| the floor's time per resource once a thread takes it up (what earlier runs called the floor) | {c['floor_direct_creates']['once_in_a_thread']['p50']} ms | {c['floor_direct_creates']['once_in_a_thread']['p95']} ms | |

The floor is what this machine's control plane allows without any operator: the operator's burst p95 is
{c['burst']['p95'] / c['floor_direct_creates']['p95']:.2f}x the floor's, measured in the same run.

The burst's {n} creates (one thread each, from this script) were sent within {c['burst']['creates_spread_s']} s; each
resource's time counts from its own create. The floor's {n} resources all complete {c['floor_direct_creates']['all_done_s']} s after they were asked for.
All {n} burst resources complete {c['burst']['all_done_s']} s after the first create (the operator used
{c['burst']['operator_cpu_s']} CPU-s until then, of the machine's {results['machine']['cpus']} cores); the API server
answered {c['burst']['apiserver_requests_per_resource_all_clients']} requests per resource until then
(all clients: the creates, the operator, the controllers, kwok).

Requests per resource by verb and kind, all clients, until all children exist (the burst; the floor):

| request | burst | floor |
|---|---|---|
{kinds_table(c['burst']['apiserver_requests_per_resource_by_kind'], c['floor_direct_creates']['apiserver_requests_per_resource_by_kind'])}

Operator memory (RSS): {r['idle_0_resources']} MiB idle; with {r['resources']} resources reconciled
(and their {3 * r['resources']} pods watched) mean {r['mean']} MiB, max {r['max']} MiB over {r['settle_s']:.0f} s.

Pod loop with {lp['resources']} resources (every {lp['pod_loop_seconds']:g} s each: read Serve's targets and
the autoscaler's report, size the pools; status and Deployments written only on change), steady state
over {lp['window_s']:.0f} s:

| measure | per resource per minute |
|---|---|
| operator CPU | {lp['operator_cpu_s_per_resource_per_min']} CPU-s ({lp['operator_cpu_percent_of_one_core']}% of one core for all {lp['resources']}) |
| calls to the Ray head + ingress | {lp['head_and_ingress_calls_per_resource_per_min']} |
| Kubernetes API requests, all clients (controllers, kwok, operator) | {lp['apiserver_requests_per_resource_per_min_all_clients']} |
"""
        Path(args.out).with_suffix(".md").write_text(md)
        print(md)
        return 0
    finally:
        if op is not None and op.poll() is None:
            os.killpg(op.pid, 15)
            try:
                op.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(op.pid, 9)
        log.close()
        cluster.stop()
        head.terminate()
        head.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
