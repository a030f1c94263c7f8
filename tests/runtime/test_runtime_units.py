"""Unit tests of the shared runtime's pure parts: auth policy, failure limiter, rich errors,
validation, ids, backoff and gate targeting."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest
from flynn.v1 import config_pb2

from flynn_runtime import auth, errors, ids, rich_status, targeting
from flynn_runtime.backoff import Backoff
from flynn_runtime.validation import Violations, page_size


def _store() -> auth.TokenStore:
    return auth.TokenStore.from_mapping(
        {
            auth.hash_token("op-secret"): auth.Principal("alice", auth.Role.OPERATOR),
            auth.hash_token("ch-secret"): auth.Principal("telegram", auth.Role.CHANNEL),
        }
    )


def test_every_public_method_of_every_service_has_a_policy() -> None:
    from gateway.descriptors import flynn_services

    services = flynn_services()
    assert len(services) == 11
    for svc in services:
        for m in svc.methods:
            assert auth.required_roles(f"/{svc.full_name}/{m.name}") is not None, m.full_name


def test_authenticator_roles_and_unknown_methods() -> None:
    a = auth.Authenticator(_store())
    md = {"authorization": "Bearer op-secret"}
    assert a.authenticate("/flynn.v1.ConfigService/UpdateConfig", md, "ipv4:1.2.3.4:5") == auth.Principal(
        "alice", auth.Role.OPERATOR, sha256=auth.hash_token("op-secret")
    )
    assert a.authenticate("/grpc.health.v1.Health/Check", {}, "p") is None
    with pytest.raises(errors.FlynnError) as e:
        a.authenticate("/flynn.v1.ConfigService/UpdateConfig", {"authorization": "Bearer ch-secret"}, "p")
    assert e.value.code is errors.Code.PERMISSION_DENIED
    with pytest.raises(errors.FlynnError) as e:
        a.authenticate("/flynn.v1.ConfigService/UpdateConfig", {}, "p")
    assert e.value.code is errors.Code.UNAUTHENTICATED
    with pytest.raises(errors.FlynnError) as e:
        a.authenticate("/flynn.v1.Secret/Backdoor", md, "p")
    assert e.value.code is errors.Code.PERMISSION_DENIED


def test_failed_authentications_never_lock_out_a_valid_credential() -> None:
    a = auth.Authenticator(_store(), auth.FailureLimiter(max_failures=3, window_seconds=60))
    for port in range(3):
        with pytest.raises(errors.FlynnError) as e:
            a.authenticate(
                "/flynn.v1.RunControl/GetRun", {"authorization": f"Bearer nope{port}"}, f"ipv4:9.9.9.9:{port}"
            )
        assert e.value.reason == "INVALID_TOKEN"
    # past the limit, wrong tokens from that address are told to back off ...
    with pytest.raises(errors.FlynnError) as e:
        a.authenticate("/flynn.v1.RunControl/GetRun", {"authorization": "Bearer nope"}, "ipv4:9.9.9.9:77")
    assert e.value.code is errors.Code.RESOURCE_EXHAUSTED and e.value.retry_after_seconds
    # ... but the right token from the very same address is accepted
    assert a.authenticate(
        "/flynn.v1.RunControl/GetRun", {"authorization": "Bearer op-secret"}, "ipv4:9.9.9.9:78"
    )
    # a missing token is not a guess: never counted, never rate limited
    for _ in range(10):
        with pytest.raises(errors.FlynnError) as e:
            a.authenticate("/flynn.v1.RunControl/GetRun", {}, "ipv4:7.7.7.7:1")
        assert e.value.reason == "MISSING_TOKEN"
    assert a.limiter.retry_after("addr:7.7.7.7") is None


def test_client_address_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    a = auth.Authenticator(_store(), trusted_proxies=auth.parse_networks("10.0.0.0/8"))
    xff = {"x-forwarded-for": "198.51.100.9, 10.1.2.3"}
    assert a.client_address(xff, "ipv4:10.0.0.5:4444") == "198.51.100.9"
    assert a.client_address(xff, "ipv4:203.0.113.1:4444") == "203.0.113.1"  # not a trusted proxy
    assert a.client_address({}, "ipv6:[::1]:5") == "::1"
    forged = {"x-flynn-client-address": "1.1.1.1", "x-flynn-forwarded-by": "ch-secret"}
    assert a.client_address(forged, "ipv4:203.0.113.1:4444") == "203.0.113.1"  # only the gateway vouches
    with pytest.raises(ValueError, match="bad trusted proxy"):
        auth.parse_networks("10.0.0.0/8, not-an-ip")


def test_principal_scopes() -> None:
    entry = {"name": "queue", "role": "service", "sha256": "ab"}
    queue = auth.principal_from_entry(entry)
    assert queue.may_call("/flynn.v1.Voice/Synthesize") and not queue.may_call("/flynn.v1.Nodes/InvokeNode")
    tg = auth.principal_from_entry({"name": "telegram", "role": "channel", "sha256": "cd"})
    assert tg.channels == frozenset({"telegram"}) and tg.serves("telegram") and not tg.serves("slack")
    unknown = auth.principal_from_entry({"name": "mystery", "role": "service", "sha256": "ef"})
    assert not unknown.may_call("/flynn.v1.ConfigService/GetConfig")


def test_rich_status_carries_violations_reason_and_retry() -> None:
    err = errors.invalid_fields(
        [errors.FieldViolation("session_key", "is required"), errors.FieldViolation("text", "too long")]
    )
    proto = rich_status.to_status_proto(err)
    assert proto.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "session_key" in proto.message and "text" in proto.message
    status = rich_status.to_grpc_status(errors.unavailable("queue down", retry_after=2.5))
    assert status.code == grpc.StatusCode.UNAVAILABLE
    assert any(k == "grpc-status-details-bin" for k, _ in status.trailing_metadata)


def test_violations_collect_every_field() -> None:
    v = Violations()
    v.text("session_key", "", required=True)
    v.text("text", "x" * 100, max_bytes=10)
    v.identifier("idempotency_key", "bad key!")
    v.int_range("page_size", 5000, 0, 500)
    with pytest.raises(errors.FlynnError) as e:
        v.raise_if_any()
    assert [x.field for x in e.value.violations] == ["session_key", "text", "idempotency_key", "page_size"]
    assert page_size(0) == 50
    with pytest.raises(errors.FlynnError):
        page_size(-1)


def test_ids_are_prefixed_time_ordered_and_checkable() -> None:
    a, b = ids.new_id("run"), ids.new_id("run")
    assert ids.is_id(a, "run") and not ids.is_id(a, "msg") and not ids.is_id("run_bad", "run")
    assert len(a) == len("run_") + 26 and a != b


def test_backoff_grows_with_jitter_and_resets() -> None:
    b = Backoff(0.1, 1.0)
    delays = [b.next_delay() for _ in range(8)]
    assert 0.05 <= delays[0] <= 0.1
    assert all(0.5 <= d <= 1.0 for d in delays[5:])
    b.reset()
    assert b.next_delay() <= 0.1
    with pytest.raises(ValueError):
        Backoff(0, 1)


def test_gate_precedence_session_then_channel_then_rollout_then_global() -> None:
    cfg = config_pb2.FlynnConfig()
    q = cfg.server.queue
    q.mode = config_pb2.QUEUE_MODE_FOLLOWUP
    q.overrides.sessions["s1"] = config_pb2.QUEUE_MODE_STEER
    q.overrides.channels["tg"] = config_pb2.QUEUE_MODE_INTERRUPT
    q.rollout.mode = config_pb2.QUEUE_MODE_COLLECT
    q.rollout.rollout.basis_points = 10_000
    t = targeting.Target
    assert targeting.queue_mode(cfg, t("s1", "tg")).value == config_pb2.QUEUE_MODE_STEER
    assert targeting.queue_mode(cfg, t("s2", "tg")).value == config_pb2.QUEUE_MODE_INTERRUPT
    assert targeting.queue_mode(cfg, t("s2", "slack")).value == config_pb2.QUEUE_MODE_COLLECT
    q.rollout.rollout.basis_points = 0
    d = targeting.queue_mode(cfg, t("s2", "slack"))
    assert d.value == config_pb2.QUEUE_MODE_FOLLOWUP and d.source == config_pb2.VALUE_SOURCE_GLOBAL
    over = targeting.queue_mode(cfg, t("s1", "tg"), config_pb2.QUEUE_MODE_FOLLOWUP)
    assert over.source == config_pb2.VALUE_SOURCE_MESSAGE_OVERRIDE
    cfg.tts.enabled = True
    assert not targeting.tts_enabled(cfg, t("s", "voice")).value  # channel not listed
    cfg.tts.enabled_channels.append("voice")
    assert targeting.tts_enabled(cfg, t("s", "voice")).value


def test_token_store_reports_hashes_that_stop_being_valid(tmp_path: Path) -> None:
    path = tmp_path / "tokens.yaml"
    auth.write_tokens_file(
        path, {"alice": (auth.Role.OPERATOR, "a-secret"), "bob": (auth.Role.OPERATOR, "b-secret")}
    )
    store = auth.TokenStore(path)
    gone: list[set[str]] = []
    store.on_revoke.append(gone.append)
    assert store.lookup("b-secret") is not None
    # issued principals and revocations pushed by the config service
    carol = auth.Principal("carol", auth.Role.CHANNEL, frozenset({"tg"}), sha256=auth.hash_token("c-secret"))
    store.set_issued({carol.sha256: carol}, frozenset())
    assert store.lookup("c-secret") == carol
    store.set_issued({}, frozenset({auth.hash_token("a-secret")}))
    assert gone == [{auth.hash_token("a-secret"), carol.sha256}]
    assert store.lookup("a-secret") is None and store.lookup("c-secret") is None
    # a hash removed from the file
    auth.write_tokens_file(path, {"alice": (auth.Role.OPERATOR, "a-secret")})
    os.utime(path, (time.time() + 5, time.time() + 5))
    store.poll()
    assert gone[-1] == {auth.hash_token("b-secret")} and store.lookup("b-secret") is None


def test_audio_probe_never_raises_on_hostile_bytes() -> None:
    import os

    from flynn_runtime.audio_probe import duration_seconds

    samples = [b"", b"RIFF\x10\x00\x00\x00WAVEjunkjunk", b"OggS" + b"\x00" * 500, b"ID3" + b"\xff" * 20]
    samples += [b"\xff\xfb" + os.urandom(n) for n in (0, 2, 100, 5000)] + [
        os.urandom(4096) for _ in range(50)
    ]
    for data in samples:
        d = duration_seconds(data)
        assert d is None or d >= 0


def test_call_limiter_counts_and_refuses() -> None:
    from flynn_runtime.errors import Code, FlynnError
    from flynn_runtime.limits import CallLimiter, Limits

    lim = CallLimiter(Limits(total_calls=3, public_streams=1))
    lim.acquire(public=True)
    try:
        lim.acquire(public=True)
    except FlynnError as e:
        assert e.code is Code.RESOURCE_EXHAUSTED and e.reason == "TOO_MANY_PUBLIC_STREAMS"
    else:
        raise AssertionError("second public stream accepted")
    lim.acquire(public=False)
    lim.acquire(public=False)
    try:
        lim.acquire(public=False)
    except FlynnError as e:
        assert e.reason == "TOO_MANY_CALLS"
    else:
        raise AssertionError("fourth call accepted")
    lim.release(public=True)
    lim.acquire(public=True)
    assert lim.calls == 3 and lim.public == 1 and lim.refused == 2
