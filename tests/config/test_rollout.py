"""Rollout buckets: committed vectors, an independent MurmurHash3, and monotonic percentage raises."""

from __future__ import annotations

import json
from pathlib import Path

import mmh3
import pytest
from flynn.v1 import config_pb2

from flynn_runtime import rollout, targeting
from tests.config.murmur3_ref import bucket as ref_bucket
from tests.config.murmur3_ref import murmur3_x86_32

VECTORS = json.loads((Path(__file__).parent / "data" / "rollout_vectors.json").read_text(encoding="utf-8"))[
    "vectors"
]


def test_reference_murmur3_matches_published_values() -> None:
    # Published MurmurHash3_x86_32 test values (SMHasher / reference implementation).
    assert murmur3_x86_32(b"", 0) == 0
    assert murmur3_x86_32(b"", 1) == 0x514E28B7
    assert murmur3_x86_32(b"", 0xFFFFFFFF) == 0x81F16F39
    assert murmur3_x86_32(b"\x00\x00\x00\x00", 0) == 0x2362F9DE
    assert murmur3_x86_32(b"hello", 0) == 0x248BFA47
    assert murmur3_x86_32(b"The quick brown fox jumps over the lazy dog", 0) == 0x2E4FF723


def test_vectors_are_many_and_include_non_ascii() -> None:
    assert len(VECTORS) >= 30
    assert sum(1 for v in VECTORS if not (v["salt"] + v["key"]).isascii()) >= 5


@pytest.mark.parametrize("v", VECTORS, ids=lambda v: v["hashed_key"][:40])
def test_committed_vectors(v: dict[str, object]) -> None:
    salt, key = str(v["salt"]), str(v["key"])
    data = f"{salt}/{key}".encode()
    assert rollout.hashed_key(salt, key) == v["hashed_key"]
    assert mmh3.hash(data, 0, signed=False) == v["murmur3_x86_32"] == murmur3_x86_32(data)
    assert rollout.bucket(salt, key) == v["bucket"] == ref_bucket(salt, key)


def test_raising_a_rollout_never_removes_a_session() -> None:
    sessions = [f"telegram:{i}" for i in range(10_000)]
    previous: set[str] = set()
    sizes = []
    for bp in (500, 1000, 5000):
        r = config_pb2.Rollout(basis_points=bp, stickiness=config_pb2.STICKINESS_SESSION)
        inside = {
            s
            for s in sessions
            if targeting.rollout_decision(r, "tts.enabled", targeting.Target(session_key=s)).value
        }
        assert previous <= inside, f"raising to {bp} removed {len(previous - inside)} sessions"
        previous = inside
        sizes.append(len(inside))
    # Roughly the asked share (sanity, wide margins): 5%, 10%, 50% of 10k.
    assert 350 < sizes[0] < 650 and 800 < sizes[1] < 1200 and 4700 < sizes[2] < 5300
