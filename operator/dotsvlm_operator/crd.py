"""Generate the DotsVLMDeployment CustomResourceDefinition from the pydantic models.

Kubernetes wants a *structural* OpenAPI v3 schema: no `$ref`, no `anyOf` with null, `default`s
written in place, boolean `exclusiveMinimum`. Pydantic emits JSON Schema 2020-12, so this module
converts one into the other; the models stay the only place where a field is described.
"""

from __future__ import annotations

import argparse
import copy
import json
from typing import Any

import yaml

from dotsvlm_operator import models, naming

# JSON Schema keys that a structural schema does not accept (or that only add noise).
_DROP = {"title", "$defs", "additionalProperties_false"}


def _convert(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_convert(x, defs) for x in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").rsplit("/", 1)[-1]])
        # The field's own description/extras win over the class's.
        target.update(node)
        node = target
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        options = [o for o in node["anyOf"] if o != {"type": "null"}]
        if len(options) != 1:
            raise ValueError(f"cannot express anyOf {node['anyOf']} in a structural schema")
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        inner = options[0]
        if "$ref" in inner:
            inner = _convert(inner, defs)
        node = {**inner, **outer}
        if "$ref" in node:
            return _convert(node, defs)
    if node.get("default", 0) is None:
        del node["default"]
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "additionalProperties":
            if value is False or value is True:
                continue  # structural schemas prune unknown fields by default; `true` is implied by preserve-unknown
            out[key] = _convert(value, defs)
        elif key == "properties":
            out[key] = {name: _convert(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = _convert(value, defs)
        elif key == "exclusiveMinimum":
            out["minimum"] = value
            out["exclusiveMinimum"] = True
        elif key == "exclusiveMaximum":
            out["maximum"] = value
            out["exclusiveMaximum"] = True
        else:
            out[key] = value
    _say_default(out)
    if out.get("type") == "object" and "properties" in out:
        required = set(out.get("required", []))
        for name, sub in out["properties"].items():
            # A nested object that always exists (pydantic default_factory, so not Optional) defaults to its
            # fully expanded defaults: the API server checks CEL rules against the default itself.
            optional = "anyOf" in node["properties"][name]
            if (name not in required and not optional and sub.get("type") == "object" and "properties" in sub
                    and "default" not in sub and not sub.get("required")):
                sub["default"] = {k: v["default"] for k, v in sub["properties"].items() if "default" in v}
    return out


def _say_default(node: dict[str, Any]) -> None:
    """Write a field's scalar default into its description: `kubectl explain` shows the description, never the
    schema's `default`, so a user could not see what a field left out becomes (vision.minReplicas: 1, api.port:
    8000, ...). A description that already speaks of its default is left as it is."""
    default, description = node.get("default"), node.get("description")
    if (description and isinstance(default, (bool, int, float, str)) and "default" not in description.lower()
            and default != ""):
        shown = default if isinstance(default, str) else json.dumps(default)
        node["description"] = f"{description.rstrip()}{'' if description.rstrip().endswith('.') else '.'} Default: {shown}."


def _schema_of(model: type[models._Api]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _convert(raw, raw.get("$defs", {}))


def _order(d: Any) -> Any:
    """Stable key order for readable YAML: type/description first, then the rest sorted."""
    if isinstance(d, list):
        return [_order(x) for x in d]
    if not isinstance(d, dict):
        return d
    first = [k for k in ("type", "description") if k in d]
    return {k: _order(d[k]) for k in first + sorted(k for k in d if k not in first)}


def openapi_schema() -> dict[str, Any]:
    spec = _schema_of(models.DotsVLMDeploymentSpec)
    status = _schema_of(models.DotsVLMDeploymentStatus)
    conditions = status["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    status.pop("default", None)
    return {
        "x-kubernetes-validations": [{
            "rule": f"size(self.metadata.name) <= {naming.MAX_NAME_LENGTH} && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
            "message": "metadata.name must start with a letter, contain only lowercase letters, digits and '-', "
                       f"and be at most {naming.MAX_NAME_LENGTH} characters long: it prefixes the names of the Services the operator "
                       "creates (e.g. <name>-ray-head), which must be DNS labels",
        }],
        "type": "object",
        "description": "DotsVLMDeployment serves the dots.vlm1 vision-language model on Ray Serve, with the vision "
                       "encoder and the LLM in two separately scaled GPU pools and an OpenAI-compatible API.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of this object (dotsvlm.io/v1alpha1)."},
            "kind": {"type": "string", "description": "Kind of this object (DotsVLMDeployment)."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


PRINTER_COLUMNS = [
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
     "description": "Whether the API answers with every pool at its minimum."},
    {"name": "Vision", "type": "string", "jsonPath": ".status.vision.readyOfDesired",
     "description": "Ready / desired vision replicas (desired: Ray Serve's autoscaling target)."},
    {"name": "LLM", "type": "string", "jsonPath": ".status.llm.readyOfDesired",
     "description": "Ready / desired LLM replicas (desired: Ray Serve's autoscaling target)."},
    {"name": "Queue", "type": "integer", "jsonPath": ".status.queue.depth",
     "description": "Items waiting in the tensor queue between the pools."},
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint",
     "description": "Base URL of the OpenAI-compatible API."},
    {"name": "Vision-Scaling", "type": "string", "priority": 1, "jsonPath": ".status.vision.lastDecision.reason",
     "description": "Reason of the autoscaler's latest decision for the vision pool."},
    {"name": "LLM-Scaling", "type": "string", "priority": 1, "jsonPath": ".status.llm.lastDecision.reason",
     "description": "Reason of the autoscaler's latest decision for the LLM pool."},
    {"name": "Reason", "type": "string", "priority": 1, "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
     "description": "Why the deployment is (not) ready."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{naming.PLURAL}.{naming.GROUP}",
            "labels": {"app.kubernetes.io/name": "dotsvlm", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": naming.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": naming.KIND,
                "listKind": f"{naming.KIND}List",
                "plural": naming.PLURAL,
                "singular": naming.SINGULAR,
                "shortNames": naming.SHORT_NAMES,
                "categories": ["dotsvlm"],
            },
            "versions": [{
                "name": naming.VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": PRINTER_COLUMNS,
                "schema": {"openAPIV3Schema": _order(openapi_schema())},
            }],
        },
    }


HEADER = "# Generated by `dotsvlm crd` from operator/dotsvlm_operator/models.py. Do not edit by hand.\n"


def render() -> str:
    return HEADER + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)


def cli_main(args: argparse.Namespace) -> int:
    print(render(), end="")
    return 0
