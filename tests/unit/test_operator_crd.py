"""The checked-in CRD is exactly what the models generate, and the schema is structural."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from dotsvlm_operator import crd, models, naming

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "dotsvlm.io_dotsvlmdeployments.yaml"


def test_checked_in_crd_matches_dotsvlm_crd_output() -> None:
    out = subprocess.run([sys.executable, "-m", "dotsvlm_operator.cli", "crd"], capture_output=True, text=True, check=True).stdout
    assert out == CRD_FILE.read_text(), (
        "crds/dotsvlm.io_dotsvlmdeployments.yaml is stale: run `make crd` (or `dotsvlm crd > crds/...`) and commit it")


def test_the_crd_is_the_same_whatever_was_imported_before() -> None:
    """typing caches `Literal[...] | None` by the literal's values, not their order: the engine enum came out in
    the order of whichever equal type was cached, and a process that had imported much before (the whole test
    suite) generated ["vllm", "transformers"] where the file says ["transformers", "vllm"]."""
    script = ("import typing, yaml, dotsvlm_serving.serve_config\n"
              "for clear in typing._cleanups: clear()  # as a long import history evicts the cache\n"
              "from dotsvlm_operator import crd\n"
              f"print(crd.crd_manifest() == yaml.safe_load(open({str(CRD_FILE)!r})))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "True"


def _walk(node, path="schema"):
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")


def test_schema_is_structural_and_every_field_is_described() -> None:
    schema = crd.openapi_schema()
    for path, node in _walk(schema):
        assert not (isinstance(node, dict) and ("$ref" in node or "$defs" in node or "title" in node and isinstance(node.get("title"), str))), path
        if isinstance(node, dict) and "properties" in node:
            for name, sub in node["properties"].items():
                if name in ("metadata",):
                    continue
                assert sub.get("description"), f"{path}.properties.{name} has no description"
                assert "type" in sub or sub.get("x-kubernetes-int-or-string"), f"{path}.{name} has no type"
        if isinstance(node, dict) and "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string"), f"{path}: anyOf is only allowed for int-or-string"


def test_defaults_and_cel_rules_come_from_the_models() -> None:
    spec = crd.openapi_schema()["properties"]["spec"]
    llm = spec["properties"]["llm"]
    # Fully expanded, so the API server fills in the pool's own defaults (and CEL rules hold on them).
    assert llm["default"]["nodesPerReplica"] == 1 and spec["properties"]["vision"]["default"]["autoscaling"][
        "targetOngoingRequests"] == 4.0
    # The LLM pool's target has no fixed default: it follows maxRunningRequests (3/4 of it).
    assert "targetOngoingRequests" not in llm["default"]["autoscaling"]
    assert llm["properties"]["contextLength"]["default"] == models.LLMPool().context_length
    rules = [r["rule"] for r in llm["x-kubernetes-validations"]]
    assert "self.gpusPerReplica % self.nodesPerReplica == 0" in rules
    # Optional objects get no default (they stay absent).
    assert "default" not in spec["properties"]["api"]["properties"]["apiKeySecretRef"]
    assert spec["required"] == ["image", "model"]


def test_printer_columns_and_status_subresource() -> None:
    version = crd.crd_manifest()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    names = [c["name"] for c in version["additionalPrinterColumns"]]
    assert names[:5] == ["Ready", "Vision", "LLM", "Queue", "Endpoint"] and names[-1] == "Age"
    wide = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"] if c.get("priority") == 1}
    assert wide["Vision-Scaling"] == ".status.vision.lastDecision.reason"
    assert crd.crd_manifest()["spec"]["names"]["shortNames"] == ["dvlm"]


def test_samples_validate_against_the_models() -> None:
    for name in ("dotsvlm.yaml", "dotsvlm-small.yaml"):
        obj = yaml.safe_load((REPO / "examples" / name).read_text())
        spec = models.DotsVLMDeploymentSpec.model_validate(obj["spec"])
        assert obj["apiVersion"] == naming.API_VERSION and obj["kind"] == naming.KIND
        assert spec.llm.gpus_per_replica % spec.llm.nodes_per_replica == 0
    full = models.DotsVLMDeploymentSpec.model_validate(yaml.safe_load((REPO / "examples" / "dotsvlm.yaml").read_text())["spec"])
    assert (full.llm.tensor_parallel, full.llm.nodes_per_replica, full.llm.gpus_per_pod) == (16, 2, 8)
    assert (full.llm.context_length, full.llm.max_running_requests, full.model.quantization) == (65536, 64, "fp8")


def test_a_spec_read_without_the_crd_refuses_what_kubernetes_would_refuse_in_a_pod() -> None:
    import pytest
    from pydantic import ValidationError

    for bad in ({"requests": {"cpu": -4}}, {"limits": {"memory": "-1Gi"}}, {"limits": {"memory": "1.2.3Gi"}}):
        with pytest.raises(ValidationError, match="is not a Kubernetes quantity"):
            models.Resources.model_validate(bad)
    assert models.Resources.model_validate({"requests": {"cpu": 16, "memory": "200Gi"}, "limits": {"cpu": "16000m"}})
    with pytest.raises(ValidationError, match="without a key must have operator Exists"):
        models.Toleration.model_validate({"operator": "Equal", "value": "x"})
    with pytest.raises(ValidationError, match="tolerationSeconds applies only to effect NoExecute"):
        models.Toleration.model_validate({"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 5})
    assert models.Toleration.model_validate({"operator": "Exists"})
    assert models.Toleration.model_validate({"key": "gpu", "operator": "Exists", "effect": "NoExecute",
                                             "tolerationSeconds": 30})


def test_a_spec_read_without_the_crd_refuses_requests_kubernetes_refuses_against_limits() -> None:
    """A request above its limit (or a huge-pages / extended-resource request without an equal limit, or an extended
    resource in fractions) passed admission, then every apply of the pool's Deployment got a 422. The CRD refuses
    them now (tests/operator: exactly those Kubernetes refuses), and so does the model, naming the resource."""
    import pytest
    from pydantic import ValidationError

    refused = [
        ({"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}},
         r"resources.requests.memory \(2Gi\) is above resources.limits.memory \(1Gi\)"),
        ({"requests": {"cpu": 4}, "limits": {"cpu": "2500m"}}, "resources.requests.cpu"),
        ({"requests": {"hugepages-2Mi": "1Gi", "memory": "1Gi"}}, "with no resources.limits.hugepages-2Mi"),
        ({"requests": {"example.com/fpga": 1}, "limits": {"example.com/fpga": 2}},
         "cannot be overcommitted: set resources.limits for them, equal to resources.requests"),
        ({"limits": {"example.com/fpga": "500m"}}, "is counted in whole units"),
        ({"requests": {"hugepages-2Mi": "1Gi"}, "limits": {"hugepages-2Mi": "1Gi"}},
         "huge pages need a cpu or memory request or limit beside them"),
    ]
    for res, message in refused:
        with pytest.raises(ValidationError, match=message):
            models.Resources.model_validate(res)
    for ok in ({"requests": {"cpu": "1.5", "memory": "1Gi"}, "limits": {"cpu": "1500m", "memory": "1024Mi"}},
               {"requests": {"hugepages-2Mi": "1Gi", "memory": "1Gi"}, "limits": {"hugepages-2Mi": "1024Mi"}},
               {"limits": {"example.com/fpga": 2}}, {"requests": {"ephemeral-storage": "10G"},
                                                     "limits": {"ephemeral-storage": "1e10"}}):
        assert models.Resources.model_validate(ok)
    assert models.quantity_value("1.5Ki") == 1536 and models.quantity_value("250m") * 4 == 1


def test_secret_key_names_that_kubernetes_refuses_are_refused_in_the_spec() -> None:
    """api.apiKeySecretRef.key or a Redis passwordSecretRef key that is no Secret data key ('api keys', 'a/b', '..x')
    was admitted, then the pods that read it were refused (every apply got a 422)."""
    import pytest
    from pydantic import ValidationError

    for key in ("api keys", "team/keys", "..keys", ".", "..", "keys:1"):
        with pytest.raises(ValidationError, match="should match pattern"):
            models.SecretKeyRef.model_validate({"name": "keys", "key": key})
        with pytest.raises(ValidationError, match="should match pattern"):
            models.RedisPasswordRef.model_validate({"name": "pw", "key": key})
    for key in ("api-keys", "API_KEYS", ".hidden", "keys.txt", "a..b"):
        assert models.SecretKeyRef.model_validate({"name": "keys", "key": key}).key == key
    crd = yaml.safe_load((REPO / "crds" / "dotsvlm.io_dotsvlmdeployments.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["api"]["properties"]["apiKeySecretRef"]["properties"]["key"]["pattern"] == models.SECRET_KEY_PATTERN


def test_kubectl_explain_can_tell_each_scalar_default() -> None:
    """`kubectl explain` prints a field's description, not the schema's default: what vision.minReplicas or api.port
    become when left out was nowhere to see. The description now ends with it (unless it speaks of its default)."""
    spec = crd.openapi_schema()["properties"]["spec"]["properties"]
    assert spec["vision"]["properties"]["minReplicas"]["description"].endswith("Default: 1.")
    assert spec["api"]["properties"]["port"]["description"].endswith("Default: 8000.")
    assert spec["api"]["properties"]["serviceType"]["description"].endswith("Default: ClusterIP.")
    assert spec["monitoring"]["properties"]["enabled"]["description"].endswith("Default: true.")
    upscale = spec["vision"]["properties"]["autoscaling"]["properties"]["upscaleDelaySeconds"]["description"]
    assert upscale.count("Default") == 1  # it says its default in its own words

    def walk(node: dict, path: str) -> None:
        if isinstance(node.get("default"), (bool, int, float, str)) and node.get("description"):
            assert "default" in node["description"].lower(), f"{path}: its default is not in its description"
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{name}")
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]")
    walk(crd.openapi_schema()["properties"]["spec"], "spec")


def test_an_image_with_whitespace_is_refused_in_the_spec() -> None:
    """Kubernetes refuses a container image with whitespace at either end: 'repo:tag ' (a template's stray space)
    passed admission, then every Ray Deployment's apply got a 422."""
    import pytest
    from pydantic import ValidationError

    base = yaml.safe_load((REPO / "examples" / "dotsvlm-small.yaml").read_text())["spec"]
    for image in ("ghcr.io/x/serving:0.1.0 ", " ghcr.io/x/serving:0.1.0", "ghcr.io/x/serving :0.1.0"):
        with pytest.raises(ValidationError, match="should match pattern"):
            models.DotsVLMDeploymentSpec.model_validate({**base, "image": image})
    assert models.DotsVLMDeploymentSpec.model_validate({**base, "image": "ghcr.io/x/serving:0.1.0@sha256:" + "a" * 64})


def test_exa_quantities_are_read_as_kubernetes_reads_them() -> None:
    """'1E' (exa) and '2Ei' (exbi) are Kubernetes quantities the CRD admits, but the model took the 'E' for an
    exponent and refused the spec with "invalid literal for int() with base 10: ''" (InvalidSpec)."""
    import pytest
    from pydantic import ValidationError

    assert models.quantity_value("1E") == 10**18 and models.quantity_value("1.5E") == 15 * 10**17
    assert models.quantity_value("2Ei") == 2 * 1024**6
    assert models.quantity_value("1E3") == 1000 and models.quantity_value("5e-3") * 200 == 1
    assert models.Resources.model_validate({"requests": {"ephemeral-storage": "1E"},
                                            "limits": {"ephemeral-storage": "1Ei", "example.com/fpga": "1E"}})
    with pytest.raises(ValidationError, match=r"resources.requests.memory \(2E\) is above resources.limits.memory"):
        models.Resources.model_validate({"requests": {"memory": "2E"}, "limits": {"memory": "1Ei"}})
