"""The Helm chart's files agree with the repository: its CRD is the generated one, its values are
documented and valid. (Rendering and the API server: tests/operator/test_chart.py.)"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "dotsvlm-operator"


@pytest.mark.parametrize("source, copy", [
    ("crds/dotsvlm.io_dotsvlmdeployments.yaml", "files/crds/dotsvlm.io_dotsvlmdeployments.yaml"),
    ("crds/kopf-peering.yaml", "crds/kopf-peering.yaml"),
])
def test_chart_crds_are_copies_of_the_generated_ones(source: str, copy: str) -> None:
    assert (CHART / copy).read_text() == (REPO / source).read_text(), (
        f"charts/dotsvlm-operator/{copy} differs from {source}: run `make crd` and commit both")


def test_chart_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert chart["appVersion"] == version, "Chart.yaml appVersion must equal pyproject.toml's version"


def _undocumented_values(text: str) -> list[str]:
    """Leaf values with no comment line directly above them or above one of their parent keys."""
    key_line = re.compile(r"^(\s*)([A-Za-z0-9_.\-]+):(.*)$")
    stack: list[tuple[int, str, bool]] = []  # (indent, key, documented)
    previous = ""
    missing = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        match = key_line.match(line)
        if match:
            indent, key, rest = len(match.group(1)), match.group(2), match.group(3).strip()
            while stack and stack[-1][0] >= indent:
                stack.pop()
            documented = previous.lstrip().startswith("#") or any(d for _, _, d in stack)
            nxt = next((x for x in lines[i + 1:] if x.strip() and not x.lstrip().startswith("#")), "")
            is_parent = rest == "" and len(nxt) - len(nxt.lstrip()) > indent
            if not is_parent and not documented:
                missing.append(".".join([k for _, k, _ in stack] + [key]))
            stack.append((indent, key, documented))
        if line.strip():
            previous = line
    return missing


def test_every_value_has_a_comment() -> None:
    assert _undocumented_values((CHART / "values.yaml").read_text()) == []
    # The check itself can fail.
    assert _undocumented_values("a:\n  # ok\n  b: 1\n  c: 2\n") == ["a.c"]


def test_default_values_pass_the_schema_and_typos_do_not() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)
    with pytest.raises(jsonschema.ValidationError, match="replicas"):
        jsonschema.validate({**values, "replicas": 2}, schema)
    # Every value in values.yaml is described by the schema (a new value without a schema entry fails here).
    assert set(values) <= set(schema["properties"])
