"""Run-control tests: fixtures come from tests/conftest.py (tokens) and tests/support/queue.py (servers)."""
