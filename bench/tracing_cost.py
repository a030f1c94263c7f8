"""The tracing work of one message on the e2e path, replayed in one process: CPU per message.

    .venv/bin/python -m bench.tracing_cost [--messages 3000] [--ratio 1.0] [--repeat 3]

bench/e2e.py --tracing measures what tracing costs a whole mesh, but on a shared machine its
throughput figures move by more than the cost itself. This replays, in one process and without any
gRPC, the calls the gateway and run control make for one message through the gateway (the same
functions, with the SDK and the OTLP exporter's encoder configured as in a service):

- gateway: the `SendMessage` server span, its attributes, the `traceparent` put into the forwarded
  metadata, the span's end; and `flynn.reply.delivered` when it sends the final on the channel's
  StreamReplies stream;
- run control: the `SubmitMessage` server span (parent: that traceparent), the causation stamped, the
  run events of a followup run (received, queued, started, output, completed) through RunTracer, the
  agent run opened in the running span, and the run-duration exemplar (paced);
- the OTLP encoding of the spans recorded (what the batch processor's thread does, in batches of 512).

It prints thread CPU per message for the calls (GC off while measuring: the replay keeps every span
queued, which a service never does) and for the encoding, and the spans and attributes per message.
The figure is the code's own cost: compare two revisions with it on any machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from typing import Any

from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb

ENV = {
    "OTEL_TRACES_EXPORTER": "otlp",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",  # never reached: nothing is exported
    "OTEL_BSP_SCHEDULE_DELAY": "3600000",
    "OTEL_BSP_MAX_QUEUE_SIZE": "10000000",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "10000000",
}


class _Context:
    """The part of a grpc.aio ServicerContext that forward_metadata reads."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._md = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._md


class Replay:
    def __init__(self) -> None:
        from flynn_runtime import tracing
        from queue_svc.run_trace import RunTracer

        self.tracing = tracing
        self.runs = RunTracer()
        self.spent = 0.0

    def timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.thread_time()
        try:
            return fn(*args)
        finally:
            self.spent += time.thread_time() - t0

    def gateway(self, i: int) -> str:
        from gateway.forwarder import forward_metadata

        tr = self.tracing
        md = (("authorization", "Bearer x"),)
        span = self.timed(tr.server_span, "/flynn.v1.Gateway/SendMessage", md)
        forwarded = dict(self.timed(forward_metadata, _Context(md), (("x-flynn-hop", "1"),)))
        self.timed(self._gateway_attributes, i)
        if span is not None:
            self.timed(tr.end_server_span, span, "OK")
        return str(forwarded[tr.TRACEPARENT])

    def _gateway_attributes(self, i: int) -> None:
        tr = self.tracing
        if tr.recording():  # the handler's one set_attributes call, when its call ends
            attrs = {"flynn.session": f"bench:s{i % 200}", "flynn.channel": "bench"}
            attrs["flynn.message.id"] = f"msg_{i:020d}"
            tr.set_attributes(attrs)

    def queue(self, i: int, traceparent: str) -> pb.Reply:
        from queue_svc.store import InputRow, RunRow

        tr = self.tracing
        span = self.timed(
            tr.server_span, "/flynn.v1.RunControl/SubmitMessage", (("traceparent", traceparent),)
        )
        causation = self.timed(tr.stamp, None).SerializeToString()
        mid, rid = f"msg_{i:020d}", f"run_{i:020d}"
        now = time.time()
        row = RunRow(run_id=rid, session_key=f"bench:s{i % 200}", channel="bench", state=pb.RUN_STATE_QUEUED,
                     mode=config_pb2.QUEUE_MODE_FOLLOWUP, inputs=[InputRow(mid, "b", "hi")],
                     create_time=now, causation=causation)  # fmt: skip

        def event(type_: int, **fields: Any) -> None:
            ev = pb.RunEvent(type=type_, session_key=row.session_key, channel="bench", **fields)  # type: ignore[arg-type]
            ev.time.FromNanoseconds(time.time_ns())
            ev.causation.ParseFromString(causation)
            self.timed(self.runs.event, ev, row)

        event(pb.RUN_EVENT_TYPE_MESSAGE_RECEIVED, message_id=mid, text="hi", sender="b")
        event(pb.RUN_EVENT_TYPE_RUN_QUEUED, run_id=rid, state=1)
        row.start_time = now
        event(pb.RUN_EVENT_TYPE_RUN_STARTED, run_id=rid, state=2)
        self.timed(self._submit_attributes, row.session_key, mid, rid)
        if span is not None:
            self.timed(tr.end_server_span, span, "OK")
        tr._api.context.attach(tr._api.root)  # the run's task: outside the RPC's context
        self.timed(self._open_agent_run, rid, causation)
        event(pb.RUN_EVENT_TYPE_RUN_OUTPUT, run_id=rid, state=2, text="reply")
        row.final_reply_id = f"rep_{i:020d}"
        event(pb.RUN_EVENT_TYPE_RUN_COMPLETED, run_id=rid, state=4, text="reply")
        self.timed(self._exemplar, row.causation)
        reply = pb.Reply(reply_id=row.final_reply_id, run_id=rid, kind=pb.REPLY_KIND_FINAL, text="reply")
        reply.causation.ParseFromString(causation)
        return reply

    def edge(self, reply: pb.Reply) -> None:
        """The gateway sends the reply on the channel's StreamReplies stream: flynn.reply.delivered."""
        from flynn_runtime.delivery_trace import delivered

        self.timed(delivered, reply)

    def _exemplar(self, causation: bytes) -> None:
        from queue_svc.metrics import SUBMIT_TO_FINAL_EXEMPLARS

        tr = self.tracing  # as RunControl._finish: paced, at most one per bucket per second
        SUBMIT_TO_FINAL_EXEMPLARS.exemplar(0.003, lambda: tr.exemplar(tr.traceparent_of(causation)))

    def _submit_attributes(self, session: str, mid: str, rid: str) -> None:
        if self.tracing.recording():
            self.tracing.set_attributes({"flynn.session": session, "flynn.message.id": mid, "flynn.run.id": rid,
                                         "flynn.disposition": "started", "flynn.queue.mode": "followup"})  # fmt: skip

    def _open_agent_run(self, run_id: str, causation: bytes) -> None:
        with self.runs.running(run_id, causation):
            pass

    def message(self, i: int) -> None:
        import contextvars

        traceparent = contextvars.copy_context().run(self.gateway, i)  # each RPC: its own task context
        reply = contextvars.copy_context().run(self.queue, i, traceparent)
        contextvars.copy_context().run(self.edge, reply)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=3000)
    p.add_argument("--ratio", type=float, default=1.0, help="sampling ratio (parentbased_traceidratio)")
    p.add_argument("--repeat", type=int, default=3, help="passes; the fastest is printed")
    p.add_argument(
        "--official-encoder", action="store_true", help="encode with OpenTelemetry's encode_spans instead"
    )
    ns = p.parse_args()
    os.environ.update(
        ENV, OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG=str(ns.ratio)
    )
    from flynn_runtime import tracing

    assert tracing.configure("bench")
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    batches: Any = tracing._provider._active_span_processor._span_processors[0]._batch_processor
    queue: Any = batches._queue
    # What the service's exporter thread does with a batch (flynn_runtime.otlp_encoding), or the
    # official encoder for comparison.
    translate = encode_spans if ns.official_encoder else batches._exporter._translate_data
    replay = Replay()
    for i in range(300):  # warm up
        replay.message(i)
    best: tuple[float, float, int, int] | None = None
    for _ in range(ns.repeat):
        queue.clear()
        gc.collect()
        replay.spent = 0.0
        gc.disable()
        for i in range(ns.messages):
            replay.message(i)
        gc.enable()
        spans = list(queue)
        queue.clear()
        t0 = time.thread_time()
        for k in range(0, len(spans), 512):
            translate(spans[k : k + 512]).SerializeToString()
        encoded = time.thread_time() - t0
        attrs = sum(len(s.attributes) + sum(len(e.attributes or ()) + 1 for e in s.events) for s in spans)
        got = (replay.spent, encoded, len(spans), attrs)
        if best is None or got[0] + got[1] < best[0] + best[1]:
            best = got
    assert best is not None
    spent, encoded, n_spans, n_attrs = best
    n = ns.messages
    print(
        f"tracing work per message (sampling {ns.ratio:g}; fastest of {ns.repeat} passes of {n} messages): "
        f"{n_spans / n:.2f} spans, {n_attrs / n:.1f} attributes and events; CPU: calls "
        f"{spent / n * 1e6:.0f} us + OTLP encoding {encoded / n * 1e6:.0f} us = {(spent + encoded) / n * 1e6:.0f} us"
    )
    tracing.shutdown()


if __name__ == "__main__":
    main()
