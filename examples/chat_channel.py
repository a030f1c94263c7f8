"""A minimal chat channel adapter on stdin/stdout, talking only to the gateway.

    python -m examples.chat_channel --addr 127.0.0.1:50050 --token $CHANNEL_TOKEN --channel cli --session cli:me

Each line typed is sent with Gateway/SendMessage (its idempotency key is a fresh id, so a retried
send is never run twice); replies for the channel arrive on Gateway/StreamReplies and are printed,
audio replies as a notice. The stream resumes from the last cursor after any disconnect and skips
reply ids it has printed already, as every adapter should.

Commands: `/stop` cancels the session's run and its queue (Gateway/CancelRun); `/voice FILE` sends
FILE (WAV, Ogg/Opus or MP3) as a voice note, transcribed by the gateway when audio is enabled.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from typing import cast

import grpc
from flynn.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, run_control_pb2

from flynn_runtime.backoff import Backoff
from flynn_runtime.channels import auth_metadata, client_channel
from flynn_runtime.tls import caller_credentials

KIND = {
    run_control_pb2.REPLY_KIND_FINAL: "reply",
    run_control_pb2.REPLY_KIND_REACTION: "reaction",
    run_control_pb2.REPLY_KIND_ACK: "ack",
    run_control_pb2.REPLY_KIND_NOTICE: "notice",
}


def render(reply: run_control_pb2.Reply) -> str:
    kind = KIND.get(reply.kind, "reply")
    if reply.kind == run_control_pb2.REPLY_KIND_ACK:
        return f"[{kind}] {reply.emoji} on {reply.reply_to_message_id}"
    line = f"[{kind}] {reply.text}"
    if reply.delivery == run_control_pb2.DELIVERY_MODE_AUDIO:
        seconds = reply.audio.duration_ms / 1000
        line += f"  (audio attached: {len(reply.audio.content)} bytes, {seconds:.1f} s)"
    elif reply.delivery == run_control_pb2.DELIVERY_MODE_TEXT_AFTER_FALLBACK:
        line += f"  (spoken reply unavailable: {reply.tts_fallback_reason}; sent as text)"
    return line


async def follow_replies(
    stub: gateway_pb2_grpc.GatewayStub, md: tuple[tuple[str, str], ...], channel: str
) -> None:
    cursor = 0
    seen: set[str] = set()
    backoff = Backoff(0.2, 5.0)
    while True:
        try:
            call = stub.StreamReplies(
                gateway_pb2.GatewayStreamRepliesRequest(after_cursor=cursor, channels=[channel]), metadata=md
            )
            async for msg in cast(AsyncIterator[gateway_pb2.GatewayStreamRepliesResponse], call):
                backoff.reset()
                cursor = max(cursor, msg.reply.cursor)
                if msg.reply.reply_id in seen:
                    continue
                seen.add(msg.reply.reply_id)
                print(render(msg.reply), flush=True)
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                print(f"[error] {e.code().name}: {e.details()}", file=sys.stderr, flush=True)
                return
        await asyncio.sleep(backoff.next_delay())


async def read_lines() -> asyncio.Queue[str | None]:
    queue: asyncio.Queue[str | None] = asyncio.Queue(maxsize=100)
    loop = asyncio.get_running_loop()

    def reader() -> None:
        for line in sys.stdin:
            asyncio.run_coroutine_threadsafe(queue.put(line.rstrip("\n")), loop).result()
        asyncio.run_coroutine_threadsafe(queue.put(None), loop).result()

    loop.run_in_executor(None, reader)
    return queue


async def main_async(ns: argparse.Namespace) -> int:
    md = auth_metadata(ns.token)
    async with client_channel(ns.addr, credentials=getattr(ns, "credentials", None)) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        follower = asyncio.create_task(follow_replies(stub, md, ns.channel))
        lines = await read_lines()
        while (line := await lines.get()) is not None:
            if not line.strip():
                continue
            text, audio = line, None
            if line.startswith("/voice "):
                path = line.removeprefix("/voice ").strip()
                try:
                    audio = common_pb2.Audio(content=open(path, "rb").read())  # noqa: SIM115, ASYNC230
                except OSError as e:
                    print(f"[error] cannot read {path}: {e}", flush=True)
                    continue
                text = ""
            if line.strip() == "/stop":
                try:
                    resp = await stub.CancelRun(
                        gateway_pb2.GatewayCancelRunRequest(
                            session_key=ns.session,
                            scope=run_control_pb2.CANCEL_SCOPE_SESSION_AND_QUEUE,
                            reason="user /stop",
                        ),
                        metadata=md,
                        timeout=5,
                    )
                    print(
                        f"[stop] {run_control_pb2.CancelOutcome.Name(resp.outcome)} {resp.run_id}", flush=True
                    )
                except grpc.aio.AioRpcError as e:
                    print(f"[error] {e.code().name}: {e.details()}", flush=True)
                continue
            try:
                sent = await stub.SendMessage(
                    gateway_pb2.SendMessageRequest(
                        channel=ns.channel,
                        session_key=ns.session,
                        sender=ns.sender,
                        text=text,
                        audio=audio,
                        idempotency_key=f"cli-{uuid.uuid4()}",
                    ),
                    metadata=md,
                    timeout=10,
                )
                heard = f" (heard: {sent.transcript!r})" if sent.transcript else ""
                print(
                    f"[sent] {run_control_pb2.Disposition.Name(sent.disposition)} {sent.run_id}{heard}",
                    flush=True,
                )
            except grpc.aio.AioRpcError as e:
                print(f"[error] {e.code().name}: {e.details()}", flush=True)
        await asyncio.sleep(ns.linger)
        follower.cancel()
    return 0


def main() -> None:
    p = argparse.ArgumentParser(description="Chat on stdin/stdout through the Flynn gateway")
    p.add_argument("--addr", default=os.environ.get("FLYNN_ADDR", "127.0.0.1:50050"))
    p.add_argument("--token", default=os.environ.get("FLYNN_TOKEN", ""), help="a channel (or operator) token")
    p.add_argument(
        "--cacert",
        default=os.environ.get("FLYNN_CACERT", ""),
        help="CA of a gateway serving TLS (flynn-dev up --tls: <data dir>/tls/ca.pem)",
    )
    p.add_argument("--channel", default="cli")
    p.add_argument("--session", default="cli:local")
    p.add_argument("--sender", default=os.environ.get("USER", "me"))
    p.add_argument(
        "--linger", type=float, default=2.0, help="seconds to keep printing replies after stdin ends"
    )
    ns = p.parse_args()
    ns.credentials = caller_credentials(ns.cacert)  # read here: not inside the event loop
    sys.exit(asyncio.run(main_async(ns)))


if __name__ == "__main__":
    main()
