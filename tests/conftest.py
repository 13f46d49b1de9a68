"""Test tiers (DESIGN.md section 6): the folder a test lives in sets its marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("FFP_SHARED_DATA", REPO.parent / "shared" / "data"))
TIERS = ("core", "kernels", "nodes", "e2e")


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = Path(str(item.fspath)).relative_to(REPO / "tests").parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))
        if "gpu" in item.keywords:
            import torch

            if not torch.cuda.is_available():
                item.add_marker(pytest.mark.skip(reason="needs CUDA (no GPU on this machine)"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (real evaluation clips); skips when a checkout does not have it."""
    if not (SHARED_DATA / "manifest.json").is_file():
        pytest.skip(f"real test clips not found at {SHARED_DATA} (set FFP_SHARED_DATA)")
    return SHARED_DATA
