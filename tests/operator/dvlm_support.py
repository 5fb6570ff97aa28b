"""Helpers shared by the operator tests (imported by name: tests/operator is on sys.path)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "dotsvlm.io_dotsvlmdeployments.yaml"
PEERING_CRD_FILE = REPO / "crds" / "kopf-peering.yaml"
EXAMPLES = REPO / "examples"


def load_example(name: str) -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())
