"""End to end with real processes: config service + run control (queue_svc) + voice service.

Replies on a channel with tts enabled are spoken when the voice service works, and are delivered
as text with delivery TEXT_AFTER_FALLBACK and a reason when the voice service is killed, its engines
hang past tts.deadline, or all of them fail. The count of finals delivered by StreamReplies always
equals the count of runs. tts.enabled and tts.enabled_channels apply live (changed via ConfigService).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from flynn.v1 import config_pb2, config_pb2_grpc, run_control_pb2_grpc
from flynn.v1 import run_control_pb2 as rc_pb2
from google.protobuf import field_mask_pb2

from flynn_runtime.channels import MAX_RECONNECT_BACKOFF_S
from tests.support.mesh import ServiceProcess, Tokens, free_port, make_tokens
from tests.support.voice import inspect_wav

CHANNEL = "voice-chat"
SEED = f"""
server:
  queue:
    mode: collect
    quiet_window: 20ms
  agent:
    think_time: 10ms
    chunks: 1
tts:
  enabled: true
  enabled_channels: [{CHANNEL}]
  engines: [piper, espeak-ng]
  deadline: 2s
  encoding: LINEAR16
"""
FINAL = rc_pb2.REPLY_KIND_FINAL
_seq = itertools.count()


@dataclass
class Mesh:
    root: Path
    tokens: Tokens
    config: ServiceProcess
    queue: ServiceProcess
    voice_port: int
    voice: ServiceProcess | None = None
    channels: list[grpc.Channel] = field(default_factory=list)

    def md(self) -> tuple[tuple[str, str], ...]:
        return self.tokens.md("operator")

    def start_voice(self, *flags: str) -> ServiceProcess:
        self.stop_voice()
        data = self.root / f"voice-{next(_seq)}"
        self.voice = ServiceProcess(
            "voice",
            "voice_svc.main",
            data,
            self.tokens,
            port=self.voice_port,
            addresses={"config": self.config.address},
            extra=list(flags),
        ).start(timeout=90)
        return self.voice

    def stop_voice(self, kill: bool = False) -> None:
        if self.voice is not None:
            if kill:
                self.voice.kill9()
            else:
                self.voice.stop()
            self.voice = None

    def rc(self) -> run_control_pb2_grpc.RunControlStub:
        ch = grpc.insecure_channel(self.queue.address)
        self.channels.append(ch)
        return run_control_pb2_grpc.RunControlStub(ch)

    def cfg(self) -> config_pb2_grpc.ConfigServiceStub:
        ch = grpc.insecure_channel(self.config.address)
        self.channels.append(ch)
        return config_pb2_grpc.ConfigServiceStub(ch)

    def set_tts(
        self, paths: list[str], tts: config_pb2.TtsConfig, services: tuple[str, ...] = ("queue",)
    ) -> int:
        cfg = self.cfg()
        head = cfg.GetConfig(config_pb2.GetConfigRequest(), metadata=self.md(), timeout=10).revision
        new = config_pb2.FlynnConfig(tts=tts)
        resp = cfg.UpdateConfig(
            config_pb2.UpdateConfigRequest(
                config=new,
                update_mask=field_mask_pb2.FieldMask(paths=paths),
                expected_revision=head,
                reason="voice e2e test",
            ),
            metadata=self.md(),
            timeout=10,
        )
        revision = resp.revision
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until the services report they applied the revision
            watchers = cfg.ListWatchers(
                config_pb2.ListWatchersRequest(), metadata=self.md(), timeout=10
            ).watchers
            applied = {w.identity.service for w in watchers if w.connected and w.applied_revision >= revision}
            if set(services) <= applied:
                return revision
            time.sleep(0.1)
        raise TimeoutError(f"{services} did not apply revision {revision}")

    def submit(self, n: int, channel: str = CHANNEL) -> list[str]:
        """n messages, each in its own session (one run, one final each); returns the session keys."""
        rc, tag = self.rc(), f"{time.monotonic_ns()}"
        sessions = [f"{channel}:e2e-{tag}-{i}" for i in range(n)]
        for i, s in enumerate(sessions):
            rc.SubmitMessage(
                rc_pb2.SubmitMessageRequest(
                    session_key=s,
                    channel=channel,
                    sender="u",
                    text=f"hello number {i}",
                    idempotency_key=f"m-{s}",
                ),
                metadata=self.md(),
                timeout=10,
            )
        return sessions

    def finals(self, sessions: list[str], timeout: float = 60.0) -> dict[str, list[rc_pb2.Reply]]:
        """Every FINAL reply StreamReplies delivers for these sessions, waiting until each has one."""
        wanted = set(sessions)
        got: dict[str, list[rc_pb2.Reply]] = {s: [] for s in sessions}
        call = self.rc().StreamReplies(
            rc_pb2.StreamRepliesRequest(after_cursor=0), metadata=self.md(), timeout=timeout
        )
        try:
            for resp in call:
                r = resp.reply
                if r.kind == FINAL and r.session_key in wanted:
                    got[r.session_key].append(r)
                if all(got.values()):
                    break
        finally:
            call.cancel()  # type: ignore[no-untyped-call]
        # Read once more past the end so a duplicate delivery would be seen.
        return got

    def close(self) -> None:
        for ch in self.channels:
            ch.close()
        self.stop_voice()
        self.queue.stop()
        self.config.stop()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    root = Path(tmp_path_factory.mktemp("voice-e2e"))
    tokens = make_tokens(root)
    seed = root / "seed.yaml"
    seed.write_text(SEED)
    config = ServiceProcess(
        "config", "config_svc.main", root / "config", tokens, extra=["--seed-file", str(seed)]
    ).start()
    voice_port = free_port()
    queue = ServiceProcess(
        "queue",
        "queue_svc.main",
        root / "queue",
        tokens,
        addresses={"config": config.address, "voice": f"127.0.0.1:{voice_port}"},
    ).start()
    m = Mesh(root, tokens, config, queue, voice_port)
    try:
        yield m
    finally:
        m.close()


def assert_all_delivered_once(got: dict[str, list[rc_pb2.Reply]]) -> list[rc_pb2.Reply]:
    counts = {s: len(rs) for s, rs in got.items()}
    assert all(c == 1 for c in counts.values()), counts  # delivered finals == finals, no loss, no duplicate
    return [rs[0] for rs in got.values()]


def test_replies_carry_audio_when_voice_works(mesh: Mesh) -> None:
    mesh.start_voice()
    replies = assert_all_delivered_once(mesh.finals(mesh.submit(3)))
    for r in replies:
        assert r.delivery == rc_pb2.DELIVERY_MODE_AUDIO, (r.delivery, r.tts_fallback_reason)
        assert r.text and r.audio.voice in ("piper", "espeak-ng")
        facts = inspect_wav(r.audio.content)
        assert facts.rate == r.audio.sample_rate_hertz == 22050 and facts.voiced_fraction > 0.3


@pytest.mark.parametrize(
    ("scenario", "flags"),
    [
        ("killed", ()),
        ("hanging", ("--hang-engines", "piper,espeak-ng")),
        ("failing", ("--fail-engines", "piper,espeak-ng")),
    ],
)
def test_every_reply_is_delivered_as_text_when_voice_fails(
    mesh: Mesh, scenario: str, flags: tuple[str, ...]
) -> None:
    if scenario == "killed":
        mesh.start_voice()
        mesh.stop_voice(kill=True)  # SIGKILL: nothing listens on the voice port any more
    else:
        mesh.start_voice(*flags)
        # Run control's channel to voice may be between reconnect attempts (an earlier case killed
        # voice on this port): it tries again within MAX_RECONNECT_BACKOFF_S, then reaches it.
        time.sleep(MAX_RECONNECT_BACKOFF_S + 0.3)
    sessions = mesh.submit(4)
    replies = assert_all_delivered_once(mesh.finals(sessions))
    for r in replies:
        assert r.delivery == rc_pb2.DELIVERY_MODE_TEXT_AFTER_FALLBACK, r
        assert r.tts_fallback_reason, r
        assert r.text and not r.audio.content
    reasons = {r.tts_fallback_reason for r in replies}
    expected = {
        "killed": {"voice_unavailable"},
        # The voice service answers ALL_ENGINES_FAILED (cause timeout) just inside the caller's deadline,
        # or the deadline wins: either way the reply says timeout.
        "hanging": {"timeout"},
        "failing": {"engine_error"},
    }[scenario]
    assert reasons <= expected, reasons
    if scenario == "failing":
        assert mesh.voice is not None
        log = mesh.voice.log_tail(400)
        assert '"tts engine failed"' in log and '"cause": "engine_error"' in log


def test_voice_killed_with_syntheses_in_flight(mesh: Mesh) -> None:
    mesh.start_voice()
    sessions = mesh.submit(4)
    time.sleep(0.05)  # let some syntheses start
    mesh.stop_voice(kill=True)
    replies = assert_all_delivered_once(mesh.finals(sessions))
    for r in replies:
        if r.delivery == rc_pb2.DELIVERY_MODE_AUDIO:
            assert r.audio.content and not r.tts_fallback_reason
        else:
            assert r.delivery == rc_pb2.DELIVERY_MODE_TEXT_AFTER_FALLBACK and r.tts_fallback_reason, r
            assert r.text and not r.audio.content


def test_engine_chain_follows_live_config(mesh: Mesh) -> None:
    mesh.start_voice()
    mesh.set_tts(["tts.engines"], config_pb2.TtsConfig(engines=["espeak-ng"]), services=("queue", "voice"))
    try:
        for r in assert_all_delivered_once(mesh.finals(mesh.submit(2))):
            assert r.delivery == rc_pb2.DELIVERY_MODE_AUDIO and r.audio.voice == "espeak-ng", r
    finally:
        mesh.set_tts(
            ["tts.engines"], config_pb2.TtsConfig(engines=["piper", "espeak-ng"]), services=("queue", "voice")
        )


def test_tts_off_and_channel_removed_apply_live(mesh: Mesh) -> None:
    mesh.start_voice()
    assert all(
        r.delivery == rc_pb2.DELIVERY_MODE_AUDIO
        for r in assert_all_delivered_once(mesh.finals(mesh.submit(1)))
    )

    mesh.set_tts(["tts.enabled"], config_pb2.TtsConfig(enabled=False))
    for r in assert_all_delivered_once(mesh.finals(mesh.submit(2))):
        assert r.delivery == rc_pb2.DELIVERY_MODE_TEXT and not r.audio.content and not r.tts_fallback_reason

    mesh.set_tts(["tts.enabled"], config_pb2.TtsConfig(enabled=True))
    assert all(
        r.delivery == rc_pb2.DELIVERY_MODE_AUDIO
        for r in assert_all_delivered_once(mesh.finals(mesh.submit(1)))
    )

    mesh.set_tts(["tts.enabled_channels"], config_pb2.TtsConfig(enabled_channels=["some-other-channel"]))
    for r in assert_all_delivered_once(mesh.finals(mesh.submit(2))):
        assert r.delivery == rc_pb2.DELIVERY_MODE_TEXT and not r.audio.content

    mesh.set_tts(["tts.enabled_channels"], config_pb2.TtsConfig(enabled_channels=[CHANNEL]))
    assert all(
        r.delivery == rc_pb2.DELIVERY_MODE_AUDIO
        for r in assert_all_delivered_once(mesh.finals(mesh.submit(1)))
    )
