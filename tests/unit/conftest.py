"""Fixtures of the pure/fast layer."""

from typing import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for the module: tiny tensors gain nothing from threads, and rank threads sharing 2 cores
    would only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
