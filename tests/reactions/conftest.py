"""Fixtures of the reactions tests."""

from __future__ import annotations
