"""Fixtures for the model tests: one tiny checkpoint (fp32 and FP8) written per session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dotsvlm_serving.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_fp8_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dotsvlm_serving.model.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny8") / "ckpt", seed=0, fp8=True)


@pytest.fixture(scope="session")
def tiny_config(tiny_dir: Path):
    from dotsvlm_serving.model.config import load_config

    return load_config(tiny_dir)


@pytest.fixture(scope="session")
def tiny_llm(tiny_dir: Path):
    from dotsvlm_serving.model.checkpoint import load_llm

    return load_llm(tiny_dir)


@pytest.fixture(scope="session")
def tiny_tower(tiny_dir: Path):
    from dotsvlm_serving.model.checkpoint import load_vision_tower

    return load_vision_tower(tiny_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_dir: Path):
    from dotsvlm_serving.model.prompt import load_tokenizer

    return load_tokenizer(tiny_dir)
