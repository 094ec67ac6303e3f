"""Fixtures shared by every test layer. Layer-specific fixtures go in each folder's own conftest.py."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The built-in demo model (tiny random Wan2.1 T2V, diffusers format), built once per test session.

    Built into a private temp dir, not the user's cache, so tests never depend on or change ``~/.cache``.
    Treat it as read-only: copy it before changing anything.
    """
    from spmd_diff.models.demo import build_demo_model

    return build_demo_model(tmp_path_factory.mktemp("demo_model") / "demo-v1")
