"""Sticky percentage rollout buckets, identical in every service (DESIGN.md §3).

bucket = (murmur3_x86_32(utf8("<salt>/<key>"), seed=0) * 10000) >> 32, in [0, 10000).
A key is inside a rollout of `basis_points` when bucket < basis_points, so raising the
percentage only ever adds keys.
"""

from __future__ import annotations

import mmh3

BASIS_POINTS_MAX = 10_000


def hashed_key(salt: str, key: str) -> str:
    return f"{salt}/{key}"


def bucket(salt: str, key: str) -> int:
    h = mmh3.hash(hashed_key(salt, key).encode("utf-8"), 0, signed=False)
    return (h * BASIS_POINTS_MAX) >> 32


def in_rollout(salt: str, key: str, basis_points: int) -> bool:
    if basis_points <= 0:
        return False
    if basis_points >= BASIS_POINTS_MAX:
        return True
    return bucket(salt, key) < basis_points
