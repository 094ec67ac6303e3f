"""Fixtures shared by every test layer. Layer-specific fixtures go in each folder's own conftest.py."""

from __future__ import annotations

import pathlib

import pytest


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The built-in demo model (tiny random Wan2.1 T2V, diffusers format), built once per test session.

    Built in a private cache dir, never the user's: ``SPMD_DIFF_CACHE=<this>.parent`` makes a child process's
    ``demo_model_dir()`` find this very build. Treat it as read-only: copy it before changing anything.
    """
    from spmd_diff.models.demo import demo_model_dir as build_in_cache

    return build_in_cache(tmp_path_factory.mktemp("spmd_diff_cache"))
