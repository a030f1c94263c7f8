"""flynn.v1.RunControl: validate, call the domain (run_control.RunControl), map to protos."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc
from grpc.aio import ServicerContext

from flynn_runtime import delivery_trace, errors, tracing
from flynn_runtime.auth import actor, principal
from flynn_runtime.channels import downstream_timeout
from flynn_runtime.enum_names import short_name, short_names
from flynn_runtime.ids import is_id
from flynn_runtime.server import Runtime
from flynn_runtime.validation import Violations, page_size
from queue_svc import access, metrics
from queue_svc.fanout import Fanout, Stopped, Subscription
from queue_svc.forwarding import OWNER, OwnerMoved, OwnerUnreachable, Peers
from queue_svc.ownership import NotOwner
from queue_svc.run_control import CancelInput, RunControl, SubmitInput, run_to_proto

MAX_TEXT = 32 * 1024
QUEUE_MODES = config_pb2.QueueMode.values()
# SubmitMessage's span attributes (short enum names), looked up instead of derived per call.
_DISPOSITIONS = short_names(pb.Disposition)
_MODES = short_names(config_pb2.QueueMode)
T = TypeVar("T")


def _run_id(v: Violations, field: str, value: str, required: bool) -> None:
    if not value:
        if required:
            v.add(field, "is required")
        return
    if not is_id(value, "run"):
        v.add(field, 'must be a run id: "run_" followed by 26 Crockford base32 characters')


def _channels(v: Violations, channels: list[str]) -> None:
    v.check(len(channels) <= 100, "channels", "at most 100 channels")
    for i, ch in enumerate(channels[:100]):
        v.check(0 < len(ch) <= 64, f"channels[{i}]", "must be 1..64 characters")


def _page_token(token: str) -> int:
    if not token:
        return 1 << 62
    try:
        value = int(base64.urlsafe_b64decode(token.encode() + b"==").decode())
    except Exception:
        raise errors.invalid_argument("page_token", "is not a token returned by ListRuns") from None
    if value <= 0:
        raise errors.invalid_argument("page_token", "is not a token returned by ListRuns")
    return value


def _token(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode().rstrip("=") if seq else ""


class RunControlServicer(pb_grpc.RunControlServicer):
    def __init__(
        self,
        runtime: Runtime,
        rc: Callable[[], RunControl],
        max_sessions_per_principal: int = access.DEFAULT_MAX_SESSIONS_PER_PRINCIPAL,
    ) -> None:
        self._runtime = runtime
        self._rc = rc
        self._max_sessions = max_sessions_per_principal
        self._peers = Peers(credentials=runtime.channel_credentials())

    @property
    def rc(self) -> RunControl:
        return self._rc()

    async def _owned(
        self,
        method: str,
        request: Any,
        context: ServicerContext[Any, Any],
        serve: Callable[[], Awaitable[T]],
        says_owner: bool = True,
    ) -> T | Any:
        """Serve a call about one session here when this replica owns it (or adopts it), else forward
        it to the owner (ownership.py). When the owner cannot be reached (it died, or is paused), wait
        for its lease to expire, then adopt the session here, within the caller's deadline. A call served
        by the owner names it in its trailing metadata (`says_owner`; forwarding.OWNER)."""
        deadline = time.monotonic() + downstream_timeout(context, 30.0)
        unreachable: set[str] = set()
        while True:
            try:
                served = await serve()
            except NotOwner as e:
                if e.address not in unreachable:
                    try:
                        return await self._peers.forward(
                            method, request, context, e.address, deadline, e.hinted
                        )
                    except OwnerMoved:
                        self.rc.forget_owner(e.session_key)  # a stale hint: look the owner up afresh
                        continue
                    except OwnerUnreachable:
                        self.rc.forget_owner(e.session_key)
                        unreachable.add(e.address)
                        if e.hinted:
                            continue  # the lease read afresh says who owns it now, or how long to wait
                wait = max(e.expires_in, 0.0) + 0.05
                if time.monotonic() + wait >= deadline:
                    raise errors.unavailable(
                        f"the run-control replica owning session {e.session_key!r} is unreachable; "
                        "its lease has not expired yet: retry",
                        reason="SESSION_OWNER_UNREACHABLE",
                        retry_after=wait,
                    ) from None
                await asyncio.sleep(wait)
                continue
            if says_owner and self.rc.replica is not None:
                context.set_trailing_metadata(((OWNER, self.rc.replica.ownership.settings.address),))
            return served

    async def SubmitMessage(
        self, request: pb.SubmitMessageRequest, context: ServicerContext[Any, Any]
    ) -> pb.SubmitMessageResponse:
        v = Violations()
        v.text("session_key", request.session_key, required=True, max_bytes=1024)
        v.check(len(request.session_key) <= 256, "session_key", "is longer than 256 characters")
        v.text("channel", request.channel, required=True, max_bytes=256)
        v.check(len(request.channel) <= 64, "channel", "is longer than 64 characters")
        v.text("sender", request.sender, max_bytes=1024)
        v.check(len(request.sender) <= 256, "sender", "is longer than 256 characters")
        v.text("text", request.text, required=not request.attachments, max_bytes=MAX_TEXT)
        v.text("idempotency_key", request.idempotency_key, required=True, max_bytes=1024)
        v.check(len(request.idempotency_key) <= 256, "idempotency_key", "is longer than 256 characters")
        v.enum_known("mode_override", request.mode_override, QUEUE_MODES)
        v.raise_if_any()
        p = principal()
        access.check_causation(p, request.HasField("causation"))
        access.check_channel(p, request.channel)
        await access.check_session(p, self.rc, request.session_key)
        await access.check_session_cap(p, self.rc, request.session_key, self._max_sessions)
        return await self._owned("SubmitMessage", request, context, lambda: self._submit(request))

    async def _submit(self, request: pb.SubmitMessageRequest) -> pb.SubmitMessageResponse:
        res = await self.rc.submit(
            SubmitInput(
                session_key=request.session_key,
                channel=request.channel,
                sender=request.sender,
                text=request.text,
                idempotency_key=request.idempotency_key,
                mode_override=request.mode_override,
                # Tracing on: the causation carries this span's context, stored with message and run.
                causation=tracing.stamp(request.causation if request.HasField("causation") else None),
                actor=actor(),
            )
        )
        if tracing.recording():
            tracing.set_attributes(
                {
                    "flynn.session": request.session_key,
                    "flynn.message.id": res.message_id,
                    "flynn.run.id": res.run_id or None,
                    "flynn.disposition": _DISPOSITIONS[res.disposition],
                    "flynn.queue.mode": _MODES[res.effective_mode.mode],
                    **tracing.content("flynn.message.text", request.text),
                }
            )
        await self.rc.durable()  # persisted before acknowledged
        return pb.SubmitMessageResponse(
            message_id=res.message_id,
            disposition=res.disposition,
            run_id=res.run_id,
            effective_mode=res.effective_mode,
            original_disposition=res.original_disposition,
            interrupted_run_id=res.interrupted_run_id,
            event_seq=res.durable_event_seq,
        )

    async def CancelRun(
        self, request: pb.CancelRunRequest, context: ServicerContext[Any, Any]
    ) -> pb.CancelRunResponse:
        t0 = time.perf_counter()
        v = Violations()
        _run_id(v, "run_id", request.run_id, required=False)
        v.check(len(request.session_key) <= 256, "session_key", "is longer than 256 characters")
        v.enum_known("scope", request.scope, pb.CancelScope.values())
        v.text("reason", request.reason, max_bytes=1024)
        scope = request.scope
        if scope == pb.CANCEL_SCOPE_UNSPECIFIED:
            scope = pb.CANCEL_SCOPE_RUN if request.run_id else pb.CANCEL_SCOPE_SESSION
        if scope == pb.CANCEL_SCOPE_RUN and not request.run_id:
            v.add("run_id", "is required with CANCEL_SCOPE_RUN")
        if scope != pb.CANCEL_SCOPE_RUN and not request.session_key and not request.run_id:
            v.add("session_key", "is required to cancel a session")
        v.raise_if_any()
        p = principal()
        if request.run_id and p is not None and p.channel_scope is not None:
            access.check_channel(p, (await self.rc.get_run(request.run_id)).channel)
        await access.check_session(p, self.rc, request.session_key)
        return await self._owned("CancelRun", request, context, lambda: self._cancel(request, scope, t0))

    async def _cancel(self, request: pb.CancelRunRequest, scope: int, t0: float) -> pb.CancelRunResponse:
        res = await self.rc.cancel(
            CancelInput(
                run_id=request.run_id,
                session_key=request.session_key,
                scope=scope,
                reason=request.reason,
                actor=actor(),
            )
        )
        await self.rc.durable()  # cancel_requested is durable before the answer
        if res.outcome == pb.CANCEL_OUTCOME_CANCEL_REQUESTED:
            metrics.CANCEL_TO_ACK.observe(time.perf_counter() - t0, tracing.exemplar())
        if tracing.recording():
            tracing.set_attributes(
                {
                    "flynn.session": request.session_key or None,
                    "flynn.run.id": res.run_id or None,
                    "flynn.cancel.outcome": short_name(pb.CancelOutcome, res.outcome),
                }
            )
        return pb.CancelRunResponse(
            outcome=res.outcome,
            run_id=res.run_id,
            state=res.state,
            dropped_messages=res.dropped_messages,
        )

    async def GetRun(
        self, request: pb.GetRunRequest, context: ServicerContext[Any, Any]
    ) -> pb.GetRunResponse:
        v = Violations()
        _run_id(v, "run_id", request.run_id, required=True)
        v.raise_if_any()
        return await self._owned("GetRun", request, context, lambda: self._get_run(request), says_owner=False)

    async def _get_run(self, request: pb.GetRunRequest) -> pb.GetRunResponse:
        row = await self.rc.get_run(request.run_id)
        access.check_channel(principal(), row.channel)
        run = run_to_proto(row)
        await self.rc.durable()  # never show a state a crash could take back
        return pb.GetRunResponse(run=run)

    async def ListRuns(
        self, request: pb.ListRunsRequest, context: ServicerContext[Any, Any]
    ) -> pb.ListRunsResponse:
        v = Violations()
        v.check(len(request.session_key) <= 256, "session_key", "is longer than 256 characters")
        v.enum_known("state", request.state, pb.RunState.values())
        v.raise_if_any()
        size = page_size(request.page_size)
        before = _page_token(request.page_token)
        await self.rc.durable()  # list what is on disk, including this caller's latest writes
        rows, next_seq = await self.rc.list_runs(request.session_key, request.state, size, before)
        return pb.ListRunsResponse(runs=[run_to_proto(r) for r in rows], next_page_token=_token(next_seq))

    async def GetSession(
        self, request: pb.GetSessionRequest, context: ServicerContext[Any, Any]
    ) -> pb.GetSessionResponse:
        v = Violations()
        v.text("session_key", request.session_key, required=True, max_bytes=1024)
        v.check(len(request.session_key) <= 256, "session_key", "is longer than 256 characters")
        v.raise_if_any()
        await access.check_session(principal(), self.rc, request.session_key)
        return await self._owned("GetSession", request, context, lambda: self._get_session(request))

    async def _get_session(self, request: pb.GetSessionRequest) -> pb.GetSessionResponse:
        session = await self.rc.get_session(request.session_key)
        await self.rc.durable()
        return pb.GetSessionResponse(session=session)

    async def WatchRunEvents(
        self, request: pb.WatchRunEventsRequest, context: ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.WatchRunEventsResponse]:
        v = Violations()
        v.check(request.after_seq >= 0, "after_seq", "must not be negative")
        v.check(
            not (request.from_now and request.after_seq),
            "after_seq",
            "must be 0 with from_now (or unset from_now)",
        )
        v.check(len(request.session_key) <= 256, "session_key", "is longer than 256 characters")
        _channels(v, list(request.channels))
        v.raise_if_any()
        rc = self.rc
        key, skip_output = request.session_key, request.exclude_output
        p = principal()
        await access.check_session(p, rc, key)
        channels = access.channel_filter(p, list(request.channels))
        after = request.after_seq
        if request.from_now:
            # The durable end of the log now: what a cursor may point at (events_after never goes past it).
            after = await rc.events_head()
            yield pb.WatchRunEventsResponse(start_after_seq=after)

        def keep(ev: pb.RunEvent) -> bool:
            if key and ev.session_key != key:
                return False
            if channels is not None and ev.channel not in channels:
                return False
            return not (skip_output and ev.type == pb.RUN_EVENT_TYPE_RUN_OUTPUT)

        stream = replay_then_live(
            rc.events,
            lambda after: rc.events_after(after, key),
            lambda ev: ev.global_seq,
            keep,
            after,
            self._runtime.stopping,
            self._runtime.shutting_down_error,
            _close_when_done(context),
        )
        async for ev in stream:
            yield pb.WatchRunEventsResponse(event=ev)

    async def StreamReplies(
        self, request: pb.StreamRepliesRequest, context: ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.StreamRepliesResponse]:
        v = Violations()
        v.check(request.after_cursor >= 0, "after_cursor", "must not be negative")
        v.check(
            not (request.from_now and request.after_cursor),
            "after_cursor",
            "must be 0 with from_now (or unset from_now)",
        )
        _channels(v, list(request.channels))
        v.raise_if_any()
        rc = self.rc
        channels = access.channel_filter(principal(), list(request.channels))
        after = request.after_cursor
        if request.from_now:
            after = await rc.replies_head()
            yield pb.StreamRepliesResponse(start_after_cursor=after)

        def keep(r: pb.Reply) -> bool:
            return channels is None or r.channel in channels

        stream = replay_then_live(
            rc.replies,
            rc.replies_after,
            lambda r: r.cursor,
            keep,
            after,
            self._runtime.stopping,
            self._runtime.shutting_down_error,
            _close_when_done(context),
        )
        # flynn.reply.delivered where the reply leaves the mesh: here unless the caller (the gateway,
        # for a channel's stream) records it itself.
        traced = tracing.ENABLED and not delivery_trace.recorded_by_caller(context.invocation_metadata())
        async for r in stream:
            if traced:
                delivery_trace.delivered(r)
            yield pb.StreamRepliesResponse(reply=r)

    async def PostReply(
        self, request: pb.PostReplyRequest, context: ServicerContext[Any, Any]
    ) -> pb.PostReplyResponse:
        v = Violations()
        if request.kind == pb.REPLY_KIND_FINAL:
            v.add("kind", "REPLY_KIND_FINAL is reserved to runs; use REACTION, ACK or NOTICE")
        elif request.kind not in (pb.REPLY_KIND_REACTION, pb.REPLY_KIND_ACK, pb.REPLY_KIND_NOTICE):
            v.add("kind", f"must be REACTION, ACK or NOTICE, got {request.kind}")
        v.text("session_key", request.session_key, required=True, max_bytes=1024)
        v.check(len(request.session_key) <= 256, "session_key", "is longer than 256 characters")
        v.text("channel", request.channel, required=True, max_bytes=256)
        v.check(len(request.channel) <= 64, "channel", "is longer than 64 characters")
        v.text("idempotency_key", request.idempotency_key, required=True, max_bytes=1024)
        v.check(len(request.idempotency_key) <= 256, "idempotency_key", "is longer than 256 characters")
        if request.kind == pb.REPLY_KIND_ACK:
            v.text("reply_to_message_id", request.reply_to_message_id, required=True, max_bytes=256)
            v.text("emoji", request.emoji, required=True, max_bytes=64)
        else:
            v.text("text", request.text, required=request.kind != pb.REPLY_KIND_ACK, max_bytes=MAX_TEXT)
        v.raise_if_any()
        access.check_causation(principal(), request.HasField("causation"))
        reply = pb.Reply(
            kind=request.kind,
            session_key=request.session_key,
            channel=request.channel,
            text=request.text,
            reply_to_message_id=request.reply_to_message_id,
            emoji=request.emoji,
        )
        if request.HasField("causation"):
            reply.causation.CopyFrom(request.causation)
        if tracing.ENABLED:  # the reply's delivery joins the poster's trace
            stamped = tracing.stamp(reply.causation)
            if stamped is not None:
                reply.causation.CopyFrom(stamped)
        return await self._owned("PostReply", request, context, lambda: self._post_reply(request, reply))

    async def _post_reply(self, request: pb.PostReplyRequest, reply: pb.Reply) -> pb.PostReplyResponse:
        stored, duplicate = await self.rc.post_reply(reply, request.idempotency_key, request.speak)
        await self.rc.durable()
        return pb.PostReplyResponse(reply=stored, duplicate=duplicate)


def _close_when_done(context: ServicerContext[Any, Any]) -> list[Callable[[], None]]:
    """Cleanups run when the RPC ends however it ends: a cancelled stream's generator may be
    finalized only much later (by the garbage collector), its subscription must not wait for that."""
    cleanups: list[Callable[[], None]] = []

    def run(_: object) -> None:
        for fn in cleanups:
            fn()

    context.add_done_callback(run)  # type: ignore[arg-type]
    return cleanups


async def replay_then_live(
    fanout: Fanout[T],
    fetch: Callable[[int], Awaitable[list[T]]],
    seq: Callable[[T], int],
    keep: Callable[[T], bool],
    after: int,
    stopping: asyncio.Event,
    shutting_down: Callable[[], Exception],
    cleanups: list[Callable[[], None]] | None = None,
) -> AsyncIterator[T]:
    """Stored items after `after`, then live ones, without a gap or a repeat; ends with
    `shutting_down()` (UNAVAILABLE) when `stopping` is set.

    Subscribes before reading the store, so an item committed while the backlog is read is either
    in the backlog or in the subscription; duplicates are dropped by sequence number. A subscriber
    that overflows re-reads its gap from the store.
    """
    last = after
    sub: Subscription[T] | None = None
    stopper = asyncio.ensure_future(stopping.wait())
    stopper.add_done_callback(lambda _: sub.stop() if sub is not None else None)
    if cleanups is not None:  # the caller may end us from outside (the RPC's done callback)
        cleanups.append(lambda: None if stopper.cancel() else None)
    try:
        while True:
            if stopping.is_set():
                raise shutting_down()
            sub = fanout.subscribe(keep)
            if cleanups is not None:
                cleanups.append(sub.close)
            try:
                while True:
                    batch = await fetch(last)
                    for item in batch:
                        last = seq(item)
                        if keep(item):
                            yield item
                    if len(batch) < 500:
                        break
                while True:
                    try:
                        live = await sub.next()
                    except Stopped:
                        raise shutting_down() from None
                    if live is None:
                        break  # overflowed: resync from the store
                    n = seq(live)
                    if n <= last:
                        continue
                    last = n
                    if keep(live):
                        yield live
            finally:
                sub.close()
    finally:
        stopper.cancel()
