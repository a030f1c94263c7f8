"""Shared runtime every Flynn service starts through (bootstrap, auth, errors, metrics, audit)."""

VERSION = "0.1.0"
