"""flynn.v1.Gateway: the channel adapters' door, in front of run control.

The caller's own authorization travels on to run control (which checks the role again and records
the real actor); the caller's deadline and cancellation do too.

Voice notes (`audio`) take the inbound voice path (gateway/inbound_voice.py): when
targeting.audio_enabled says so for the session, the gateway transcribes them through the voice
service (with its own service token: channels may not call Voice directly) within audio.deadline,
keeps the audio as a canvas artifact `inbound/<session>/<idempotency key>` (or, when canvas refuses
or the note is above its size limit, as a sha256 + size reference only), and submits the transcript
as the message text with the audio as an attachment. With audio disabled the message is refused
(FAILED_PRECONDITION, reason AUDIO_DISABLED, audited). A transcription that fails puts a NOTICE reply
in the outbox telling the user ("your voice note could not be understood"), audits it, and answers
with an error naming the cause (reason TRANSCRIPTION_FAILED): never a silent loss.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
from flynn.v1 import gateway_pb2, gateway_pb2_grpc, run_control_pb2, run_control_pb2_grpc
from grpc.aio import ServicerContext

from flynn_runtime import audio_probe, auth, delivery_trace, rich_status, tracing
from flynn_runtime.channels import downstream_timeout
from flynn_runtime.config_source import ConfigSource
from flynn_runtime.server import Runtime, until_stopping
from flynn_runtime.validation import Violations
from gateway.backends import Backends
from gateway.forwarder import forward_metadata, relay_error, stream_timeout
from gateway.inbound_voice import MAX_AUDIO_BYTES, InboundVoice

Ctx = ServicerContext[Any, Any]
RUN_CONTROL = "queue"
UNARY_TIMEOUT = 30.0
MAX_TEXT_BYTES = 32 * 1024


#: Trailing metadata in which a run-control replica names the session's owner (queue_svc/forwarding.py).
OWNER_HEADER = "x-flynn-owner"
#: Sessions and runs whose owner replica is remembered (the oldest are forgotten first).
MAX_OWNERS = 20_000


class Owners:
    """Which run-control replica owns a session (and so its runs), as the replicas said in their
    answers. Used only when run control is a list of addresses and only for an address of that list:
    a cancel goes straight to the owner instead of to any replica that would forward it there. A wrong
    or stale entry costs nothing but that hop: the replica reached forwards to the real owner."""

    def __init__(self, replicas: str) -> None:
        bare = replicas.removeprefix("ipv4:").removeprefix("ipv6:")
        listed = [a.strip() for a in bare.split(",")] if "," in bare and ":///" not in bare else []
        self.replicas = frozenset(a for a in listed if a)
        self._by_key: dict[str, str] = {}

    def remember(self, trailing: object, *keys: str) -> None:
        owner = next((str(v) for k, v in cast(Any, trailing or ()) if k == OWNER_HEADER), "")
        if owner not in self.replicas:
            return
        for key in keys:
            if key:
                self._by_key.pop(key, None)
                if len(self._by_key) >= MAX_OWNERS:
                    del self._by_key[next(iter(self._by_key))]
                self._by_key[key] = owner

    def of(self, *keys: str) -> str:
        return next((self._by_key[k] for k in keys if k in self._by_key), "")

    def forget(self, *keys: str) -> None:
        for key in keys:
            self._by_key.pop(key, None)


def _span_attributes(request: gateway_pb2.SendMessageRequest, context: Ctx) -> dict[str, Any]:
    """SendMessage's span attributes, set once when the call ends (the two flags only when true: each
    attribute costs its span's recording and export)."""
    attrs: dict[str, Any] = {"flynn.session": request.session_key, "flynn.channel": request.channel}
    if request.HasField("audio"):
        attrs["flynn.voice_note"] = True
    if any(k == tracing.TRACEPARENT for k, _ in context.invocation_metadata() or ()):
        attrs["flynn.traceparent_from_channel"] = True
    return attrs


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, runtime: Runtime, backends: Backends, config: ConfigSource) -> None:
        self._runtime = runtime
        self._backends = backends
        self._stub = run_control_pb2_grpc.RunControlStub(backends.channel(RUN_CONTROL))
        self._voice = InboundVoice(runtime, config)
        self._owners = Owners(backends.address(RUN_CONTROL) if backends.deployed(RUN_CONTROL) else "")
        self._replica_stubs: dict[str, run_control_pb2_grpc.RunControlStub] = {}

    def _stub_for(self, owner: str) -> run_control_pb2_grpc.RunControlStub:
        """The owner replica's own channel when it is known, else the balanced one."""
        if not owner:
            return self._stub
        stub = self._replica_stubs.get(owner)
        if stub is None:
            stub = self._replica_stubs[owner] = run_control_pb2_grpc.RunControlStub(
                self._backends.replica_channel(RUN_CONTROL, owner)
            )
        return stub

    async def _fail(self, context: Ctx, err: grpc.aio.AioRpcError) -> None:
        await relay_error(context, err, RUN_CONTROL, self._backends.address(RUN_CONTROL))

    async def SendMessage(
        self, request: gateway_pb2.SendMessageRequest, context: Ctx
    ) -> gateway_pb2.SendMessageResponse:
        v = Violations()
        v.text("channel", request.channel, required=True, max_bytes=64)
        v.text("session_key", request.session_key, required=True, max_bytes=256)
        v.text("idempotency_key", request.idempotency_key, required=True, max_bytes=256)
        v.text("sender", request.sender, required=False, max_bytes=256)
        v.text("text", request.text, required=False, max_bytes=MAX_TEXT_BYTES)
        has_audio = request.HasField("audio")
        if not request.text and not has_audio:
            v.add("text", "is required unless audio is given")
        if has_audio:
            seconds = audio_probe.duration_seconds(request.audio.content)
            max_seconds = self._runtime.settings.limits.audio_seconds
            if not request.audio.content:
                v.add("audio.content", "is empty: a voice note needs its audio bytes")
            elif seconds is not None and seconds > max_seconds:
                # From the container header: refused before anything is decoded.
                v.add("audio.content", f"is {seconds:.0f} s of audio; at most {max_seconds} s allowed")
            elif len(request.audio.content) > MAX_AUDIO_BYTES:
                v.add("audio.content", f"is {len(request.audio.content)} bytes; at most {MAX_AUDIO_BYTES}")
            if request.audio.sample_rate_hertz < 0:
                v.add("audio.sample_rate_hertz", "must not be negative")
        v.raise_if_any()
        p = auth.principal()
        if p is not None and not p.serves(request.channel):  # the door refuses before any work
            raise auth.channel_denied(p, request.channel)
        traced = _span_attributes(request, context) if tracing.recording() else None
        text = request.text
        transcript = ""
        attachments: list[Any] = []
        if has_audio:
            if traced is not None:  # set now: the transcription may fail (a voice note is no hot path)
                tracing.set_attributes(traced)
                traced = {}
            note = await self._voice.take(request, context)
            transcript = note.transcript
            text = f"{request.text}\n{transcript}" if request.text else transcript
            attachments.append(note.attachment)
        submit = run_control_pb2.SubmitMessageRequest(
            session_key=request.session_key,
            channel=request.channel,
            sender=request.sender,
            text=text,
            idempotency_key=request.idempotency_key,
            mode_override=request.mode_override,
            attachments=attachments,
        )
        try:
            call: Any = self._stub.SubmitMessage(
                submit,
                timeout=downstream_timeout(context, UNARY_TIMEOUT),
                metadata=forward_metadata(context, self._backends.hop_metadata()),
            )
            resp = await call
        except grpc.aio.AioRpcError as err:
            if traced:
                tracing.set_attributes(traced)
            await self._fail(context, err)
            raise
        if self._owners.replicas:
            self._owners.remember(
                await call.trailing_metadata(), f"s:{request.session_key}", f"r:{resp.run_id}"
            )
        if traced is not None:
            traced["flynn.message.id"] = resp.message_id  # (the run: on SubmitMessage)
            tracing.set_attributes(traced)
        return gateway_pb2.SendMessageResponse(
            message_id=resp.message_id,
            disposition=resp.disposition,
            run_id=resp.run_id,
            transcript=transcript,
            effective_mode=resp.effective_mode,
        )

    async def StreamReplies(
        self, request: gateway_pb2.GatewayStreamRepliesRequest, context: Ctx
    ) -> AsyncIterator[gateway_pb2.GatewayStreamRepliesResponse]:
        p = auth.principal()
        scope = p.channel_scope if p is not None else None
        channels = list(request.channels) or (sorted(scope) if scope is not None else [])
        for ch in channels:
            if p is not None and not p.serves(ch):
                raise auth.channel_denied(p, ch)
        traced = tracing.ENABLED  # the channel's replies leave the mesh here: flynn.reply.delivered
        metadata = forward_metadata(context, self._backends.hop_metadata())
        if traced:  # ... recorded here, not again by run control
            metadata += ((delivery_trace.DELIVERY_SPAN_HEADER, "gateway"),)
        call = self._stub.StreamReplies(
            run_control_pb2.StreamRepliesRequest(
                after_cursor=request.after_cursor, channels=channels, from_now=request.from_now
            ),
            timeout=stream_timeout(context),
            metadata=metadata,
        )

        async def replies() -> AsyncIterator[gateway_pb2.GatewayStreamRepliesResponse]:
            async for resp in cast(AsyncIterator[run_control_pb2.StreamRepliesResponse], call):
                if resp.HasField("reply"):
                    if traced:
                        delivery_trace.delivered(resp.reply)
                    yield gateway_pb2.GatewayStreamRepliesResponse(reply=resp.reply)
                else:  # the first answer of a from_now stream: where it starts
                    yield gateway_pb2.GatewayStreamRepliesResponse(start_after_cursor=resp.start_after_cursor)

        try:
            async for item in until_stopping(self._runtime, replies()):
                yield cast(gateway_pb2.GatewayStreamRepliesResponse, item)
        except grpc.aio.AioRpcError as err:
            await self._fail(context, err)
        finally:
            call.cancel()

    async def CancelRun(
        self, request: gateway_pb2.GatewayCancelRunRequest, context: Ctx
    ) -> gateway_pb2.GatewayCancelRunResponse:
        cancel = run_control_pb2.CancelRunRequest(
            run_id=request.run_id, session_key=request.session_key, scope=request.scope, reason=request.reason
        )
        # Straight to the session's owner when a replica named it (several replicas listed), so the
        # cancel does not pay a forwarding hop; any replica would forward it there otherwise.
        keys = (
            f"r:{request.run_id}" if request.run_id else "",
            f"s:{request.session_key}" if request.session_key else "",
        )
        owner = self._owners.of(*keys) if self._owners.replicas else ""
        while True:
            try:
                call: Any = self._stub_for(owner).CancelRun(
                    cancel,
                    timeout=downstream_timeout(context, UNARY_TIMEOUT),
                    metadata=forward_metadata(context, self._backends.hop_metadata()),
                )
                resp = await call
                break
            except grpc.aio.AioRpcError as err:
                self._owners.forget(*keys)
                if owner and err.code() == grpc.StatusCode.UNAVAILABLE and not rich_status.answered(err):
                    owner = ""  # the remembered owner is gone: any replica finds the new one
                    continue
                await self._fail(context, err)
                raise
        if self._owners.replicas:
            self._owners.remember(await call.trailing_metadata(), *keys)
        return gateway_pb2.GatewayCancelRunResponse(
            outcome=resp.outcome, run_id=resp.run_id, state=resp.state, dropped_messages=resp.dropped_messages
        )
