"""Fixtures of the run-control tests."""

from __future__ import annotations

import pytest

from queue_svc import metrics


@pytest.fixture
def dup_finals_before() -> float:
    return metrics.DUPLICATE_FINALS_SUPPRESSED._value.get()
