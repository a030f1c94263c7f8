"""The speech hook: text first, audio when Voice answers in time, text fallback with a reason otherwise."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
from flynn.v1 import common_pb2, voice_pb2, voice_pb2_grpc
from flynn.v1 import run_control_pb2 as pb

from flynn_runtime.audit import read_audit
from flynn_runtime.server import Runtime, ServiceApp, running
from queue_svc import metrics
from tests.support.mesh import Tokens, free_port, make_settings
from tests.support.queue import queue_service, wait_for


class FakeVoice(voice_pb2_grpc.VoiceServicer):
    """A Voice server for these tests: 'ok' returns a few bytes of audio, 'hang' never answers, 'empty' none."""

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.calls: list[tuple[str, float | None]] = []

    async def Synthesize(
        self, request: voice_pb2.SynthesizeRequest, context: Any
    ) -> voice_pb2.SynthesizeResponse:
        self.calls.append((request.text, context.time_remaining()))
        if self.behaviour == "hang":
            await asyncio.sleep(60)
        if self.behaviour == "error":
            await context.abort(grpc.StatusCode.INTERNAL, "engine crashed")
        content = b"" if self.behaviour == "empty" else b"RIFF....WAVEfake"
        return voice_pb2.SynthesizeResponse(
            audio_content=content, encoding=request.audio_config.encoding, sample_rate_hertz=22050, duration_ms=500,
            engine="fake",
        )  # fmt: skip


class FakeVoiceApp(ServiceApp):
    service_names = ("flynn.v1.Voice",)

    def __init__(self, runtime: Runtime, voice: FakeVoice) -> None:
        super().__init__(runtime)
        self.voice = voice

    def register(self, server: grpc.aio.Server) -> None:
        voice_pb2_grpc.add_VoiceServicer_to_server(self.voice, server)


TTS = "tts: {enabled: true, enabled_channels: [voice], deadline: %s}"


async def final_reply(q: Any, run_id: str) -> pb.Reply:
    async def get() -> list[pb.Reply]:
        return [r for r in q.replies() if r.run_id == run_id]

    return (await wait_for(get, lambda rs: len(rs) == 1))[0]


def fallback_count(reason: str) -> float:
    return metrics.TTS_FALLBACKS.labels(reason)._value.get()


async def test_speech_not_wanted_is_plain_text(tmp_path: Path, tokens: Tokens) -> None:
    async with queue_service(tmp_path, tokens, TTS % "1s") as q:
        a = await q.submit("s", "hi", channel="text-only")
        r = await final_reply(q, a.run_id)
        assert r.delivery == pb.DELIVERY_MODE_TEXT and r.text == "echo: hi" and not r.HasField("audio")


async def test_audio_attached_when_voice_answers(tmp_path: Path, tokens: Tokens) -> None:
    voice = FakeVoice("ok")
    async with running(
        make_settings("voice", tmp_path / "v", tokens), lambda rt: FakeVoiceApp(rt, voice)
    ) as vs:
        async with queue_service(tmp_path / "q", tokens, TTS % "2s", addresses={"voice": vs.address}) as q:
            a = await q.submit("s", "speak", channel="voice")
            r = await final_reply(q, a.run_id)
            assert r.delivery == pb.DELIVERY_MODE_AUDIO and r.text == "echo: speak"
            assert (
                r.audio.content == b"RIFF....WAVEfake"
                and r.audio.encoding == common_pb2.AUDIO_ENCODING_LINEAR16
            )
            assert (
                voice.calls[0][0] == "echo: speak"
                and voice.calls[0][1] is not None
                and voice.calls[0][1] <= 2.1
            )


async def test_voice_unavailable_falls_back_to_text(tmp_path: Path, tokens: Tokens) -> None:
    before = fallback_count("voice_unavailable")
    nowhere = f"127.0.0.1:{free_port()}"
    async with queue_service(tmp_path, tokens, TTS % "2s", addresses={"voice": nowhere}) as q:
        a = await q.submit("s", "speak", channel="voice")
        r = await final_reply(q, a.run_id)
        assert (
            r.delivery == pb.DELIVERY_MODE_TEXT_AFTER_FALLBACK
            and r.tts_fallback_reason == "voice_unavailable"
        )
        assert r.text == "echo: speak"
        assert fallback_count("voice_unavailable") == before + 1
        audit = read_audit(tmp_path / "audit" / "queue.jsonl")
        fb = [x for x in audit if x["event"] == "tts_fallback"]
        assert fb and fb[0]["reason"] == "voice_unavailable" and fb[0]["run_id"] == a.run_id
        evs = [e for e in q.events("s") if e.type == pb.RUN_EVENT_TYPE_TTS_FALLBACK]
        assert [(e.run_id, e.reason) for e in evs] == [(a.run_id, "voice_unavailable")]


async def test_hanging_voice_times_out_and_text_arrives_after_the_deadline(
    tmp_path: Path, tokens: Tokens
) -> None:
    voice = FakeVoice("hang")
    async with running(
        make_settings("voice", tmp_path / "v", tokens), lambda rt: FakeVoiceApp(rt, voice)
    ) as vs:
        async with queue_service(tmp_path / "q", tokens, TTS % "400ms", addresses={"voice": vs.address}) as q:
            stream = q.stub.StreamReplies(pb.StreamRepliesRequest(), metadata=q.md)
            t0 = time.monotonic()
            a = await q.submit("s", "speak", channel="voice")
            b = await q.submit("s2", "no voice here", channel="plain")
            # The speech wait does not hold back other replies, nor the session's next run.
            first = (await asyncio.wait_for(stream.read(), 10)).reply
            assert first.run_id == b.run_id
            c = await q.submit("s", "next", channel="voice")
            rc = await q.wait_run(c.run_id)
            assert rc.state == pb.RUN_STATE_COMPLETED
            second = (await asyncio.wait_for(stream.read(), 10)).reply
            elapsed = time.monotonic() - t0
            stream.cancel()
            assert second.run_id == a.run_id
            assert (
                second.delivery == pb.DELIVERY_MODE_TEXT_AFTER_FALLBACK
                and second.tts_fallback_reason == "timeout"
            )
            assert second.text == "echo: speak"
            assert elapsed >= 0.4  # it waited for the deadline, not forever (bounded by the 10 s read above)


async def test_engine_error_and_empty_audio(tmp_path: Path, tokens: Tokens) -> None:
    for behaviour, reason in (("error", "engine_error"), ("empty", "empty_audio")):
        voice = FakeVoice(behaviour)
        async with running(
            make_settings("voice", tmp_path / behaviour, tokens),
            lambda rt, voice=voice: FakeVoiceApp(rt, voice),
        ) as vs:
            async with queue_service(
                tmp_path / f"q-{behaviour}", tokens, TTS % "2s", addresses={"voice": vs.address}
            ) as q:
                a = await q.submit(f"s-{behaviour}", "x", channel="voice")  # one database on postgresql
                r = await final_reply(q, a.run_id)
                assert (r.delivery, r.tts_fallback_reason) == (pb.DELIVERY_MODE_TEXT_AFTER_FALLBACK, reason)


async def test_pending_speech_at_restart_goes_out_as_text(tmp_path: Path, tokens: Tokens) -> None:
    voice = FakeVoice("hang")
    async with running(
        make_settings("voice", tmp_path / "v", tokens), lambda rt: FakeVoiceApp(rt, voice)
    ) as vs:
        async with queue_service(tmp_path / "q", tokens, TTS % "30s", addresses={"voice": vs.address}) as q:
            a = await q.submit("s", "speak", channel="voice")
            await q.wait_run(a.run_id)
            await wait_for(lambda: asyncio.sleep(0, voice.calls), bool)
            assert q.replies() == []  # durable, but pending speech: not streamed yet
    async with queue_service(tmp_path / "q", tokens, TTS % "30s") as q:
        replies = q.replies()
        assert [(r.run_id, r.delivery, r.tts_fallback_reason) for r in replies] == [
            (a.run_id, pb.DELIVERY_MODE_TEXT_AFTER_FALLBACK, "restart")
        ]


async def test_post_reply_speak(tmp_path: Path, tokens: Tokens) -> None:
    voice = FakeVoice("ok")
    async with running(
        make_settings("voice", tmp_path / "v", tokens), lambda rt: FakeVoiceApp(rt, voice)
    ) as vs:
        async with queue_service(tmp_path / "q", tokens, TTS % "2s", addresses={"voice": vs.address}) as q:
            req = pb.PostReplyRequest(kind=pb.REPLY_KIND_REACTION, session_key="s", channel="voice", text="hey",
                                      idempotency_key="r1", speak=True)  # fmt: skip
            resp = await q.stub.PostReply(req, metadata=q.md)
            assert resp.reply.cursor == 0  # pending speech
            got = await wait_for(lambda: asyncio.sleep(0, q.replies()), lambda rs: len(rs) == 1)
            assert got[0].delivery == pb.DELIVERY_MODE_AUDIO and got[0].reply_id == resp.reply.reply_id
