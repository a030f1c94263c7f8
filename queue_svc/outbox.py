"""The reply outbox and speech delivery of run control.

A reply is a row in the store's outbox. A plain-text reply takes its cursor (StreamReplies order) in
the operation that writes it; a reply to be spoken is written "pending" without a cursor, speech
runs after the commit (bounded by a semaphore), and a second operation gives it its cursor with the
audio or, when speech failed, as text with the fallback reason (and a TTS_FALLBACK event). At most
one final per run: its reply id is a function of the run id, and the store refuses a second one.
"""

from __future__ import annotations

import asyncio
import logging
import time

from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb

from flynn_runtime import targeting
from flynn_runtime.ids import new_id
from flynn_runtime.timestamps import timestamp
from queue_svc import metrics, speech
from queue_svc.group_commit import Op
from queue_svc.ledger import Ledger, _Live, _Session
from queue_svc.store import ReplyRow, RunRow

log = logging.getLogger(__name__)


def reply_id_for_run(run_id: str) -> str:
    """The final reply's id is a function of the run id: stable across attempts and restarts."""
    return "rpl_" + run_id.removeprefix("run_")


class Outbox:
    """Writes replies (finals and posted ones) and delivers them as text or speech."""

    def __init__(
        self, ledger: Ledger, synthesizer: speech.Synthesizer | None, speech_concurrency: int = 32
    ) -> None:
        self.ledger = ledger
        self.synthesizer = synthesizer
        self._speech_tasks: set[asyncio.Task[None]] = set()
        self._speech_sem = asyncio.Semaphore(speech_concurrency)

    @property
    def _stopping(self) -> bool:
        return self.ledger._stopping

    def stop(self) -> list[asyncio.Task[None]]:
        """Cancel speech in flight; returns the tasks to wait for (their replies stay pending)."""
        for t in self._speech_tasks:
            t.cancel()
        return list(self._speech_tasks)

    def recover(self, op: Op, pending: list[ReplyRow]) -> None:
        """Replies left pending at a restart (`pending`, read before the operation) go out as text,
        with reason "restart"."""
        for r in pending:
            reply = pb.Reply.FromString(r.data)
            s = self.ledger._session(op, reply.session_key, reply.channel)
            outcome = speech.SpeechOutcome(None, "restart", "pending at restart")
            self._publish_speech(op, s, reply, r, outcome)

    def _insert(
        self,
        op: Op,
        reply: pb.Reply,
        run_id: str,
        idempotency_key: str,
        speak: bool,
        final_known: bool = False,
    ) -> bool:
        """Queue the reply's row; spoken replies wait for speech, others take their cursor now."""
        if speak:
            inserted = self.ledger.store.insert_reply(
                ReplyRow(reply.reply_id, None, reply.kind, run_id, reply.session_key, reply.channel,
                         idempotency_key, "pending", reply.SerializeToString()),
                final_known=final_known,
            )  # fmt: skip
            if inserted:
                op.after.append(lambda: self._spawn_speech(reply))
            return inserted
        commit = self.ledger.commit
        commit.cursor += 1
        reply.cursor = commit.cursor
        reply.delivery = pb.DELIVERY_MODE_TEXT
        inserted = self.ledger.store.insert_reply(
            ReplyRow(reply.reply_id, reply.cursor, reply.kind, run_id, reply.session_key, reply.channel,
                     idempotency_key, "none", reply.SerializeToString()),
            final_known=final_known,
        )  # fmt: skip
        if inserted:
            op.replies.append(reply)
        else:
            commit.cursor -= 1
        return inserted

    def write_final(self, op: Op, s: _Session, live: _Live, text: str) -> None:
        """The run's one final reply (a second one is refused and counted)."""
        row = live.row
        reply_id = reply_id_for_run(row.run_id)
        speak = targeting.tts_enabled(self.ledger.config.config, targeting.Target(s.key, s.channel)).value
        reply = pb.Reply(
            reply_id=reply_id, kind=pb.REPLY_KIND_FINAL, run_id=row.run_id, session_key=s.key, channel=s.channel,
            text=text, create_time=timestamp(time.time()),
        )  # fmt: skip
        if row.causation:
            reply.causation.ParseFromString(row.causation)
        if not self._insert(op, reply, row.run_id, "", speak, final_known=bool(row.final_reply_id)):
            metrics.DUPLICATE_FINALS_SUPPRESSED.inc()
            log.warning("second final for a run suppressed", extra={"run_id": row.run_id})
        row.final_reply_id = reply_id

    async def post_reply(self, reply: pb.Reply, idempotency_key: str, speak: bool) -> tuple[pb.Reply, bool]:
        """PostReply: a reaction, ack or notice; (stored reply, duplicate)."""
        known = await self.ledger.store.reply_by_key(reply.session_key, idempotency_key)
        if known is not None:
            return pb.Reply.FromString(known.data), True
        reply.reply_id = new_id("rpl")
        reply.create_time.CopyFrom(timestamp(time.time()))
        target = targeting.Target(reply.session_key, reply.channel)
        want_speech = speak and targeting.tts_enabled(self.ledger.config.config, target).value
        await self.ledger._own(reply.session_key)
        await self.ledger._load_session(reply.session_key)  # no await after this: stays in memory
        self.ledger.store.check_writable()
        with self.ledger._op() as op:
            self.ledger._session(op, reply.session_key, reply.channel)
            self._insert(op, reply, "", idempotency_key, want_speech)
        return reply, False

    def _spawn_speech(self, reply: pb.Reply, speak_request: speech.SpeechRequest | None = None) -> None:
        if self._stopping:
            return
        task = asyncio.ensure_future(self._speech_task(reply, speak_request))
        self._speech_tasks.add(task)
        task.add_done_callback(self._speech_tasks.discard)

    async def _speech_task(self, reply: pb.Reply, req: speech.SpeechRequest | None) -> None:
        async with self._speech_sem:
            request = req or speech.request_for(self.ledger.config.config, reply.text)
            trace = self.ledger._trace
            if trace is None:
                outcome = await speech.speak(self.synthesizer, request)
            else:
                with trace.speech(reply):
                    outcome = await speech.speak(self.synthesizer, request)
                    trace.speech_outcome(outcome.fallback_reason, outcome.detail)
        row = await self.ledger.store.reply(reply.reply_id)
        if self._stopping or row is None or not self.ledger.owns(reply.session_key):
            return  # stopping, or stepped down: the session's new owner sends it as text
        s = await self.ledger._load_session(reply.session_key)
        if s is None:
            return
        with self.ledger._op() as op:
            self._publish_speech(op, s, reply, row, outcome)

    def _publish_speech(
        self, op: Op, s: _Session, reply: pb.Reply, row: ReplyRow, outcome: speech.SpeechOutcome
    ) -> None:
        """Give a pending reply its cursor, with the audio or as text after a fallback."""
        if row.speech_state != "pending":
            return
        self.ledger.commit.cursor += 1
        reply.cursor = self.ledger.commit.cursor
        if outcome.audio is not None:
            reply.delivery = pb.DELIVERY_MODE_AUDIO
            reply.audio.CopyFrom(outcome.audio)
        else:
            reply.delivery = pb.DELIVERY_MODE_TEXT_AFTER_FALLBACK
            reply.tts_fallback_reason = outcome.fallback_reason
            self._record_fallback(reply, outcome)
            self.ledger._event(op, s, pb.RUN_EVENT_TYPE_TTS_FALLBACK, message_id="",
                               reason=outcome.fallback_reason, text=reply.text,
                               run=self._run_row_for_event(reply))  # fmt: skip
        row.cursor, row.speech_state, row.data = reply.cursor, "done", reply.SerializeToString()
        self.ledger.store.update_reply(row)
        op.replies.append(reply)

    def _record_fallback(self, reply: pb.Reply, outcome: speech.SpeechOutcome) -> None:
        metrics.TTS_FALLBACKS.labels(outcome.fallback_reason).inc()
        log.warning(
            "tts fallback: reply sent as text (%s)",
            outcome.fallback_reason,
            extra={"reply_id": reply.reply_id, "run_id": reply.run_id, "reason": outcome.fallback_reason,
                   "detail": outcome.detail},
        )  # fmt: skip
        if self.ledger.audit is not None:
            self.ledger.audit.record(
                "tts_fallback", actor="system", reply_id=reply.reply_id, run_id=reply.run_id or None,
                session=reply.session_key, channel=reply.channel, reason=outcome.fallback_reason,
                detail=outcome.detail,
            )  # fmt: skip

    @staticmethod
    def _run_row_for_event(reply: pb.Reply) -> RunRow | None:
        if not reply.run_id:
            return None
        return RunRow(
            reply.run_id,
            reply.session_key,
            reply.channel,
            pb.RUN_STATE_UNSPECIFIED,
            config_pb2.QUEUE_MODE_UNSPECIFIED,
            [],
        )
