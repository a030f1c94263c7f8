"""Run control's cost as its state grows, on SQLite and PostgreSQL: an empty store beside a full one.

    .venv/bin/python -m bench.state_growth [--sessions 100000] [--events 1000000]

For each backend the store is filled directly (rows as run control writes them: one completed run,
its message and its final per session, `events / sessions` run events each), then queue_svc starts as
a real process, takes 60 messages (so that both stores have a full first page of runs), and the bench
prints: start-up time to SERVING, resident memory (VmRSS), one /metrics
scrape, ListRuns first page (p50 of 20), GetSession of an idle session (p50 of 20), and submit->ack
p50/p99 over 300 messages to stored sessions, beside the same figures on an empty store. Config
revisions and canvas artifacts belong to the config and nodes services (bench/storage).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg
from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc

from bench.storage_queue import database_env
from flynn_launcher.local_postgres import LocalPostgres
from tests.support.mesh import ServiceProcess, make_tokens

CONFIG = "server: {queue: {mode: followup}, agent: {think_time: 0s, chunks: 1}}\n"
COMPLETED = pb.RUN_STATE_COMPLETED


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def rows(sessions: int, events: int) -> Iterator[tuple[str, list[tuple[object, ...]]]]:
    """(table, rows) chunks of a filled store, in insert order."""
    per = max(events // sessions, 4)
    gseq = 0
    chunk = 5000
    for base in range(0, sessions, chunk):
        ses: list[tuple[object, ...]] = []
        msgs: list[tuple[object, ...]] = []
        runs: list[tuple[object, ...]] = []
        evs: list[tuple[object, ...]] = []
        reps: list[tuple[object, ...]] = []
        for i in range(base, min(base + chunk, sessions)):
            key, run_id, mid = f"g{i}", f"run_G{i:025d}", f"msg_G{i:025d}"
            ses.append((key, "bench", 1, 1, per))
            eff = pb.EffectiveMode(mode=config_pb2.QUEUE_MODE_FOLLOWUP).SerializeToString()
            msgs.append((mid, key, f"k{i}", "bench", "u", "hello", 2, 1, run_id, "", eff, gseq + 1, 1.0, b""))
            inputs = json.dumps([{"id": mid, "sender": "u", "text": "hello"}])
            runs.append((run_id, key, "bench", COMPLETED, 2, inputs, "[]", "", "", "echo: hello",
                         "rpl_" + run_id[4:], 1.0, 1.0, None, 2.0, 1, "", b""))  # fmt: skip
            for j in range(per):
                gseq += 1
                ev = pb.RunEvent(global_seq=gseq, session_seq=j + 1, event_id=f"evt_{gseq}", session_key=key,
                                 channel="bench", run_id=run_id, type=pb.RUN_EVENT_TYPE_RUN_OUTPUT, text="x")  # fmt: skip
                evs.append((gseq, key, j + 1, int(ev.type), ev.SerializeToString()))
            reply = pb.Reply(reply_id="rpl_" + run_id[4:], kind=pb.REPLY_KIND_FINAL, run_id=run_id,
                             session_key=key, channel="bench", text="echo: hello", cursor=i + 1)  # fmt: skip
            reps.append(
                (reply.reply_id, i + 1, 1, run_id, key, "bench", "", "none", reply.SerializeToString())
            )
        yield "sessions", ses
        yield "messages", msgs
        yield "runs", runs
        yield "events", evs
        yield "replies", reps


COLS = {
    "sessions": "session_key, channel, message_count, run_count, last_session_seq",
    "messages": "message_id, session_key, idempotency_key, channel, sender, text, mode, disposition, run_id, "
    "interrupted_run_id, effective_mode, event_seq, receive_time, causation",
    "runs": "run_id, session_key, channel, state, mode, inputs, steered, error_kind, error_message, output, "
    "final_reply_id, create_time, start_time, cancel_request_time, end_time, attempt, cancel_reason, causation",
    "events": "global_seq, session_key, session_seq, type, data",
    "replies": "reply_id, cursor, kind, run_id, session_key, channel, idempotency_key, speech_state, data",
}


def fill_sqlite(path: Path, sessions: int, events: int) -> None:
    db = sqlite3.connect(path)
    db.execute("BEGIN")
    for table, chunk in rows(sessions, events):
        marks = ", ".join("?" * len(COLS[table].split(",")))
        db.executemany(f"INSERT INTO {table} ({COLS[table]}) VALUES ({marks})", chunk)
    db.execute("COMMIT")
    db.close()


def fill_pg(url: str, sessions: int, events: int) -> None:
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        for table, chunk in rows(sessions, events):
            with cur.copy(f"COPY flynn_queue.{table} ({COLS[table]}) FROM STDIN") as copy:
                for r in chunk:
                    copy.write_row(r)
        conn.commit()


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def requests(address: str, token: str, filled: int) -> dict[str, float]:
    md = (("authorization", f"Bearer {token}"),)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.RunControlStub(ch)
        # Both stores get 60 fresh runs first, so ListRuns' first page holds 50 runs in both.
        for i in range(60):
            await stub.SubmitMessage(
                pb.SubmitMessageRequest(session_key=f"seed{i}", channel="bench", text="hi", idempotency_key=f"seed{i}"),
                metadata=md, timeout=10,
            )  # fmt: skip
        await asyncio.sleep(0.5)
        lr, gs, acks = [], [], []
        for _ in range(20):
            t0 = time.perf_counter()
            await stub.ListRuns(pb.ListRunsRequest(page_size=50), metadata=md, timeout=10)
            lr.append((time.perf_counter() - t0) * 1000)
        for i in range(20):
            key = f"g{(i * 997) % filled}" if filled else "x"
            if not filled and i == 0:
                await stub.SubmitMessage(pb.SubmitMessageRequest(session_key="x", channel="bench", text="hi", idempotency_key="x"),
                                         metadata=md, timeout=10)  # fmt: skip
            t0 = time.perf_counter()
            await stub.GetSession(pb.GetSessionRequest(session_key=key), metadata=md, timeout=10)
            gs.append((time.perf_counter() - t0) * 1000)
        for i in range(300):
            t0 = time.perf_counter()
            await stub.SubmitMessage(
                pb.SubmitMessageRequest(session_key=f"g{(i * 331) % max(filled, 1)}", channel="bench", text="hi", idempotency_key=f"new{i}"),
                metadata=md, timeout=10,
            )  # fmt: skip
            acks.append((time.perf_counter() - t0) * 1000)
    return {
        "list_runs": pct(lr, 50),
        "get_session": pct(gs, 50),
        "ack_p50": pct(acks, 50),
        "ack_p99": pct(acks, 99),
    }


def measure(root: Path, url: str, fill: tuple[int, int] | None) -> dict[str, float]:
    tokens = make_tokens(root)
    cfg = root / "queue.yaml"
    cfg.write_text(CONFIG)
    with database_env(url):
        proc = ServiceProcess("queue", "queue_svc.main", root / "queue", tokens,
                              extra=["--queue-config-file", str(cfg), "--log-level", "warning"])  # fmt: skip
        if fill is not None:
            proc.start(timeout=120)  # creates the schema
            proc.stop()
            if url:
                fill_pg(url, *fill)
            else:
                fill_sqlite(root / "queue" / "queue" / "run_control.db", *fill)
        t0 = time.perf_counter()
        proc.start(timeout=300)
    startup = time.perf_counter() - t0
    try:
        assert proc.proc is not None
        port = int((proc.data_dir / ".queue.port").read_text().split()[1])
        t1 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            r.read()
        scrape = (time.perf_counter() - t1) * 1000
        out = asyncio.run(requests(proc.address, tokens.operator, fill[0] if fill else 0))
        out.update(startup=startup, rss=rss_mib(proc.proc.pid), scrape=scrape)
    finally:
        proc.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=100_000)
    ap.add_argument("--events", type=int, default=1_000_000)
    args = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="flynn-bench-growth-") as d:
        root = Path(d)
        root.chmod(0o755)
        (root / "pg").mkdir()
        (root / "pg").chmod(0o755)
        server = LocalPostgres(root / "pg", fsync=True)
        server.init()
        server.start()
        try:
            for backend in ("sqlite", "postgresql"):
                for state in ("empty", "full"):
                    url = server.create_database(f"g_{backend}_{state}") if backend == "postgresql" else ""
                    fill = (args.sessions, args.events) if state == "full" else None
                    results[f"{backend} {state}"] = measure(root / backend / state, url, fill)
        finally:
            server.stop("fast")
    cols = list(results)
    print(f"run control state growth: {args.sessions} sessions, {args.events} run events (full) vs empty")
    print(f"  {'':34}" + "".join(f"{c:>18}" for c in cols))
    for label, key, fmt in (
        ("start-up to SERVING (s)", "startup", "{:.2f}"),
        ("resident memory (MiB)", "rss", "{:.0f}"),
        ("/metrics scrape (ms)", "scrape", "{:.1f}"),
        ("ListRuns first page p50 (ms)", "list_runs", "{:.2f}"),
        ("GetSession p50 (ms)", "get_session", "{:.2f}"),
        ("submit->ack p50 (ms)", "ack_p50", "{:.2f}"),
        ("submit->ack p99 (ms)", "ack_p99", "{:.2f}"),
    ):
        print(f"  {label:34}" + "".join(f"{fmt.format(results[c][key]):>18}" for c in cols))


if __name__ == "__main__":
    main()
