"""Core tier: tests marked `slow` (retraining runs) are skipped unless FFP_SLOW=1."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FFP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow (retraining); run with FFP_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
