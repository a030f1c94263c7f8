"""Cost as the state grows, on SQLite and PostgreSQL: each service on an empty store beside a full one.

    .venv/bin/python -m bench.state_growth [--scale 1.0] [--backends sqlite,postgresql]

"Full" is 100,000 sessions and 1,000,000 run events (run control), 1,000 config revisions and 10,000
canvas artifacts of 4 KiB (times `--scale`; each count can be set on its own). Every store is made by
its service (one start on the empty store: tables, migrations, the config seed), then filled straight
with the rows the service writes (bench/state_growth_fill.py; PostgreSQL with COPY, then VACUUM
ANALYZE as after a restore), and the three services (config_svc, queue_svc, nodes_svc) start again as
real processes, each on its own data dir and, on PostgreSQL, one shared database (one schema each).
The same steps on an empty store give the other column. Printed per backend, empty vs full and their
ratio:

- per service: start-up to SERVING, resident memory (VmRSS, after the requests below), one /metrics
  scrape (p50 of 5);
- run control: ListRuns first page (50 runs; both stores first take 60 fresh messages so both pages
  are full), GetSession of a session loaded from the store (not in memory: a stored idle session of
  the fill, or on the empty store one of the 60 after it left memory; `--session-idle-seconds 1`) and
  of a session in memory, submit->ack p50/p99 to sessions not in memory (stored idle sessions of the
  fill, new sessions on the empty store: the same reads and writes);
- config: UpdateConfig commit->ack p50 (60 changes, which also fill the first page on both stores),
  ListRevisions first page, WatchConfig snapshot (stream opened -> SNAPSHOT received);
- canvas: 64 KiB PutArtifact p50/p99 (300, over 64 names, which fill the first page on both stores),
  ListArtifacts first page and with a prefix only 10 names share, GetArtifact of a 64 KiB artifact.

Targets (issue 13): start-up <= 10 s, memory that does not grow with idle state, every per-request
figure within 1.5x of the empty store. Figures are printed, never asserted; the machine's load
average is printed with each table. Bounded: every call has a timeout; at --scale 1 the whole run
takes a few minutes (mostly the fill). `--scale 0.001` is a smoke run (tests/bench).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import psycopg
from flynn.v1 import canvas_pb2, canvas_pb2_grpc, config_pb2, config_pb2_grpc
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc

from bench import state_growth_fill as fill
from bench.storage_queue import database_env
from flynn_launcher.local_postgres import LocalPostgres
from tests.support.config import field_update
from tests.support.mesh import ServiceProcess, Tokens, make_tokens
from tests.support.nodes import config_yaml as nodes_yaml
from tests.support.nodes import nodes_config

QUEUE_CONFIG = "server: {queue: {mode: followup}, agent: {think_time: 0s, chunks: 1}}\n"
SERVICES = ("config", "queue", "nodes")
FIRST_PAGE = 50


@dataclass(frozen=True)
class Scale:
    sessions: int
    events: int
    revisions: int
    artifacts: int
    artifact_bytes: int
    acks: int
    puts: int
    samples: int


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


# --- the services -------------------------------------------------------------------------------


def services(root: Path, tokens: Tokens) -> dict[str, ServiceProcess]:
    (root / "queue.yaml").write_text(QUEUE_CONFIG)
    (root / "nodes.yaml").write_text(nodes_yaml(nodes_config()))
    quiet = ["--log-level", "warning"]
    return {
        "config": ServiceProcess("config", "config_svc.main", root / "config", tokens, extra=quiet),
        "queue": ServiceProcess(
            "queue",
            "queue_svc.main",
            root / "queue",
            tokens,
            extra=["--queue-config-file", str(root / "queue.yaml"), "--session-idle-seconds", "1", *quiet],
        ),  # fmt: skip
        "nodes": ServiceProcess(
            "nodes",
            "nodes_svc.main",
            root / "nodes",
            tokens,
            extra=["--nodes-config", str(root / "nodes.yaml"), *quiet],
        ),  # fmt: skip
    }


def fill_stores(procs: dict[str, ServiceProcess], url: str, scale: Scale) -> None:
    if url:
        with psycopg.connect(url) as conn:
            fill.fill_queue_pg(conn, scale.sessions, scale.events)
            fill.fill_config_pg(conn, scale.revisions)
            fill.fill_canvas_pg(conn, scale.artifacts, scale.artifact_bytes)
        fill.settle_pg(url)
    else:
        fill.fill_queue_sqlite(
            procs["queue"].data_dir / "queue" / "run_control.db", scale.sessions, scale.events
        )
        fill.fill_config_sqlite(procs["config"].data_dir / "config" / "config.db", scale.revisions)
        fill.fill_canvas_sqlite(procs["nodes"].data_dir / "canvas", scale.artifacts, scale.artifact_bytes)


def scrape_ms(proc: ServiceProcess, n: int = 5) -> float:
    port = int((proc.data_dir / f".{proc.service}.port").read_text().split()[1])
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
            r.read()
        out.append(ms_since(t0))
    return pct(out, 50)


# --- per-request figures ------------------------------------------------------------------------


@dataclass
class Stack:
    """One store's three running services ("empty" or "full")."""

    state: str
    url: str
    tokens: Tokens
    procs: dict[str, ServiceProcess]
    fill_seconds: float = 0.0

    @property
    def full(self) -> bool:
        return self.state == "full"

    @property
    def md(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.tokens.operator}"),)


def turns(stacks: list[Stack], i: int) -> list[Stack]:
    """Both stores in turn, the first one alternating: load and noise of a shared machine fall on both."""
    return stacks if i % 2 == 0 else stacks[::-1]


async def timed(call: Awaitable[object]) -> float:
    t0 = time.perf_counter()
    await call
    return ms_since(t0)


Samples = dict[str, dict[str, list[float]]]


def samples(stacks: list[Stack], *keys: str) -> Samples:
    return {s.state: {k: [] for k in keys} for s in stacks}


async def queue_figures(stacks: list[Stack], scale: Scale) -> Samples:
    out = samples(stacks, "list_runs", "get_session_store", "get_session_memory", "acks")
    chans = {s.state: grpc.aio.insecure_channel(s.procs["queue"].address) for s in stacks}
    stubs = {k: pb_grpc.RunControlStub(c) for k, c in chans.items()}

    def submit(s: Stack, key: str, idem: str) -> Awaitable[object]:
        return stubs[s.state].SubmitMessage(
            pb.SubmitMessageRequest(session_key=key, channel="bench", text="hi", idempotency_key=idem),
            metadata=s.md, timeout=10,
        )  # fmt: skip

    try:
        for i in range(FIRST_PAGE + 10):  # both stores: a full first page of fresh runs
            for s in turns(stacks, i):
                await submit(s, f"seed{i}", f"seed{i}")
        await asyncio.sleep(3.5)  # the seed sessions leave memory (--session-idle-seconds 1)
        for i in range(scale.samples):
            for s in turns(stacks, i):
                lr = pb.ListRunsRequest(page_size=FIRST_PAGE)
                out[s.state]["list_runs"].append(
                    await timed(stubs[s.state].ListRuns(lr, metadata=s.md, timeout=10))
                )
        for i in range(scale.samples):
            for s in turns(stacks, i):
                # Full: a stored idle session of the fill; empty: a seed session, now out of memory.
                key = f"g{(i * 997) % scale.sessions}" if s.full else f"seed{i % (FIRST_PAGE + 10)}"
                req = pb.GetSessionRequest(session_key=key)
                for k in ("get_session_store", "get_session_memory"):  # loads it, then finds it in memory
                    out[s.state][k].append(
                        await timed(stubs[s.state].GetSession(req, metadata=s.md, timeout=10))
                    )
        for i in range(scale.acks):
            for s in turns(stacks, i):
                # Sessions not in memory: stored idle ones (full), new ones (empty): a read, then the writes.
                key = f"g{(i * 331 + 17) % scale.sessions}" if s.full else f"new{i}"
                out[s.state]["acks"].append(await timed(submit(s, key, f"new{i}")))
    finally:
        for c in chans.values():
            await c.close(None)
    return out


async def config_figures(stacks: list[Stack], scale: Scale) -> Samples:
    out = samples(stacks, "commits", "list_revisions", "watch_snapshot")
    chans = {s.state: grpc.aio.insecure_channel(s.procs["config"].address) for s in stacks}
    stubs = {k: config_pb2_grpc.ConfigServiceStub(c) for k, c in chans.items()}
    try:
        head = {}
        for s in stacks:
            got = await stubs[s.state].GetConfig(config_pb2.GetConfigRequest(), metadata=s.md, timeout=10)
            head[s.state] = got.revision
            # The fill is what the service reads: every revision of it.
            assert got.revision == (scale.revisions if s.full else 1), (s.state, got.revision)
        for i in range(FIRST_PAGE + 10):  # both stores: a full first page, and commit->ack
            for s in turns(stacks, i):
                req = field_update("server.queue.cap", 5000 + i, head=head[s.state], reason="bench")
                t0 = time.perf_counter()
                r = await stubs[s.state].UpdateConfig(req, metadata=s.md, timeout=10)
                out[s.state]["commits"].append(ms_since(t0))
                head[s.state] = r.revision
        for i in range(scale.samples):
            for s in turns(stacks, i):
                lrev = config_pb2.ListRevisionsRequest(page_size=FIRST_PAGE)
                t = await timed(stubs[s.state].ListRevisions(lrev, metadata=s.md, timeout=10))
                out[s.state]["list_revisions"].append(t)
        for i in range(scale.samples):
            for s in turns(stacks, i):
                ident = config_pb2.WatcherIdentity(service="bench", instance_id=f"growth-{i}", version="1")
                t0 = time.perf_counter()
                call = stubs[s.state].WatchConfig(
                    config_pb2.WatchConfigRequest(identity=ident), metadata=s.md, timeout=10
                )
                first = await call.read()
                out[s.state]["watch_snapshot"].append(ms_since(t0))
                call.cancel()
                assert isinstance(first, config_pb2.WatchConfigResponse)
                assert first.kind == config_pb2.WATCH_EVENT_KIND_SNAPSHOT and first.revision == head[s.state]
    finally:
        for c in chans.values():
            await c.close(None)
    return out


async def canvas_figures(stacks: list[Stack], scale: Scale) -> Samples:
    out = samples(stacks, "puts", "list_artifacts", "list_prefix", "get_artifact")
    chans = {s.state: grpc.aio.insecure_channel(s.procs["nodes"].address) for s in stacks}
    stubs = {k: canvas_pb2_grpc.CanvasStub(c) for k, c in chans.items()}
    try:
        for s in stacks:
            if s.full:  # the fill is there, whole (the store checks the sha256 of what it returns)
                got = await stubs[s.state].GetArtifact(
                    canvas_pb2.GetArtifactRequest(name="fill/000000"), metadata=s.md, timeout=10
                )
                assert len(got.artifact.content) == scale.artifact_bytes
        for i in range(scale.puts):  # over 64 names: both stores get a full first page of them
            for s in turns(stacks, i):
                put = canvas_pb2.PutArtifactRequest(
                    name=f"bench/{i % 64:02d}",
                    content_type="application/octet-stream",
                    content=os.urandom(32) * 2048,
                )  # 64 KiB
                out[s.state]["puts"].append(
                    await timed(stubs[s.state].PutArtifact(put, metadata=s.md, timeout=10))
                )
        for i in range(scale.samples):
            for s in turns(stacks, i):
                lreq = canvas_pb2.ListArtifactsRequest(page_size=FIRST_PAGE)
                t = await timed(stubs[s.state].ListArtifacts(lreq, metadata=s.md, timeout=10))
                out[s.state]["list_artifacts"].append(t)
                # A prefix few names share (bench/0*): the page must not cost a scan of every name after it.
                pre = canvas_pb2.ListArtifactsRequest(prefix="bench/0", page_size=FIRST_PAGE)
                out[s.state]["list_prefix"].append(
                    await timed(stubs[s.state].ListArtifacts(pre, metadata=s.md, timeout=10))
                )
        for i in range(scale.samples):
            for s in turns(stacks, i):
                req2 = canvas_pb2.GetArtifactRequest(name=f"bench/{i % min(64, scale.puts):02d}")
                out[s.state]["get_artifact"].append(
                    await timed(stubs[s.state].GetArtifact(req2, metadata=s.md, timeout=10))
                )
    finally:
        for c in chans.values():
            await c.close(None)
    return out


def prepare(root: Path, state: str, url: str, scale: Scale) -> Stack:
    """A store made by its services (tables, migrations, the config seed: one start each), then filled
    when `state` is "full". Nothing is left running."""
    tokens = make_tokens(root)
    stack = Stack(state, url, tokens, services(root, tokens))
    with database_env(url):
        for p in stack.procs.values():
            p.start(timeout=120)
            p.stop()
    if stack.full:
        t0 = time.perf_counter()
        fill_stores(stack.procs, url, scale)
        stack.fill_seconds = time.perf_counter() - t0
    return stack


#: (figure, samples, percentile) of the per-request figures.
FIGURES = (
    ("list_runs", "list_runs", 50),
    ("get_session_store", "get_session_store", 50),
    ("get_session_memory", "get_session_memory", 50),
    ("ack_p50", "acks", 50),
    ("ack_p99", "acks", 99),
    ("commit_p50", "commits", 50),
    ("list_revisions", "list_revisions", 50),
    ("watch_snapshot", "watch_snapshot", 50),
    ("put_p50", "puts", 50),
    ("put_p99", "puts", 99),
    ("list_artifacts", "list_artifacts", 50),
    ("list_prefix", "list_prefix", 50),
    ("get_artifact", "get_artifact", 50),
)


def measure(stacks: list[Stack], scale: Scale) -> dict[str, dict[str, float]]:
    """Both stores' figures: start-ups one after the other, then every request in turns."""
    out: dict[str, dict[str, float]] = {s.state: {"fill_seconds": s.fill_seconds} for s in stacks}
    try:
        for s in stacks:
            with database_env(s.url):
                for name, p in s.procs.items():
                    t0 = time.perf_counter()
                    p.start(timeout=300)
                    out[s.state][f"startup_{name}"] = time.perf_counter() - t0
        raw: Samples = samples(stacks)
        for phase in (queue_figures, config_figures, canvas_figures):
            for state, got in asyncio.run(phase(stacks, scale)).items():
                raw[state].update(got)
        for i in range(5):  # scrapes in turns too
            for s in turns(stacks, i):
                for name, p in s.procs.items():
                    raw[s.state].setdefault(f"scrape_{name}", []).append(scrape_ms(p, 1))
        for s in stacks:
            r, o = raw[s.state], out[s.state]
            for key, samples_key, percentile in FIGURES:
                o[key] = pct(r[samples_key], percentile)
            for name, proc in s.procs.items():
                assert proc.proc is not None
                o[f"rss_{name}"] = rss_mib(proc.proc.pid)
                o[f"scrape_{name}"] = pct(r[f"scrape_{name}"], 50)
    finally:
        for s in stacks:
            for p in s.procs.values():
                p.stop()
    return out


# --- the table ----------------------------------------------------------------------------------

Check = Callable[[float, float], bool]


def within_1_5(empty: float, full: float) -> bool:
    return full <= 1.5 * empty


def startup_ok(empty: float, full: float) -> bool:
    return full <= 10.0 and empty <= 10.0


def memory_flat(empty: float, full: float) -> bool:
    return full <= 1.2 * empty


def rows() -> list[tuple[str, str, str, str, Check]]:
    """(label, key, format, target text, check(empty, full))."""
    out: list[tuple[str, str, str, str, Check]] = []
    for s in SERVICES:
        out.append((f"{s}: start-up to SERVING (s)", f"startup_{s}", "{:.2f}", "<= 10 s", startup_ok))
    for s in SERVICES:
        out.append((f"{s}: resident memory (MiB)", f"rss_{s}", "{:.0f}", "no growth", memory_flat))
    for s in SERVICES:
        out.append((f"{s}: /metrics scrape p50 (ms)", f"scrape_{s}", "{:.2f}", "<= 1.5x", within_1_5))
    for label, key in (
        ("queue: ListRuns first page p50 (ms)", "list_runs"),
        ("queue: GetSession from store p50 (ms)", "get_session_store"),
        ("queue: GetSession in memory p50 (ms)", "get_session_memory"),
        ("queue: submit->ack p50 (ms)", "ack_p50"),
        ("queue: submit->ack p99 (ms)", "ack_p99"),
        ("config: UpdateConfig commit->ack p50 (ms)", "commit_p50"),
        ("config: ListRevisions first page p50 (ms)", "list_revisions"),
        ("config: WatchConfig snapshot p50 (ms)", "watch_snapshot"),
        ("canvas: 64 KiB put p50 (ms)", "put_p50"),
        ("canvas: 64 KiB put p99 (ms)", "put_p99"),
        ("canvas: ListArtifacts first page p50 (ms)", "list_artifacts"),
        ("canvas: ListArtifacts prefix bench/0 p50 (ms)", "list_prefix"),
        ("canvas: GetArtifact 64 KiB p50 (ms)", "get_artifact"),
    ):
        out.append((label, key, "{:.2f}", "<= 1.5x", within_1_5))
    return out


def report(
    backend: str, empty: dict[str, float], full: dict[str, float], scale: Scale, load: str
) -> list[str]:
    lines = [
        f"{backend}: full = {scale.sessions} sessions, {scale.events} run events, {scale.revisions} config "
        f"revisions, {scale.artifacts} artifacts of {scale.artifact_bytes} B (filled in "
        f"{full.get('fill_seconds', 0):.0f} s); load average {load}",
        f"  {'figure':44}{'empty':>10}{'full':>10}{'ratio':>8}  target",
    ]
    for label, key, fmt, target, check in rows():
        e, f = empty[key], full[key]
        ratio = f / e if e else float("nan")
        verdict = "ok" if check(e, f) else "MISSED"
        lines.append(f"  {label:44}{fmt.format(e):>10}{fmt.format(f):>10}{ratio:>7.2f}x  {target} {verdict}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiplies the four fill counts (0.001: smoke run)"
    )
    ap.add_argument("--sessions", type=int, default=0, help="run-control sessions (default 100,000 x scale)")
    ap.add_argument("--events", type=int, default=0, help="run events (default 1,000,000 x scale)")
    ap.add_argument("--revisions", type=int, default=0, help="config revisions (default 1,000 x scale)")
    ap.add_argument("--artifacts", type=int, default=0, help="canvas artifacts (default 10,000 x scale)")
    ap.add_argument("--artifact-bytes", type=int, default=4096, help="size of each filled artifact")
    ap.add_argument("--acks", type=int, default=300, help="submits timed for submit->ack")
    ap.add_argument("--puts", type=int, default=300, help="64 KiB canvas puts timed")
    ap.add_argument("--samples", type=int, default=20, help="calls timed for each p50 figure")
    ap.add_argument("--backends", default="sqlite,postgresql")
    args = ap.parse_args()

    def n(given: int, full: int) -> int:
        return given or max(1, int(full * args.scale))

    scale = Scale(
        sessions=n(args.sessions, 100_000), events=n(args.events, 1_000_000), revisions=max(2, n(args.revisions, 1_000)),
        artifacts=n(args.artifacts, 10_000), artifact_bytes=args.artifact_bytes, acks=args.acks,
        puts=max(1, args.puts), samples=max(1, args.samples),
    )  # fmt: skip
    out: list[str] = []
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="flynn-bench-growth-") as d:
        root = Path(d)
        root.chmod(0o755)
        (root / "pg").mkdir()
        (root / "pg").chmod(0o755)
        server = LocalPostgres(root / "pg", fsync=True)
        server.init()
        server.start()
        try:
            for backend in args.backends.split(","):
                load0 = os.getloadavg()[0]
                stacks = [
                    prepare(root / backend / state, state, server.create_database(f"growth_{state}")
                            if backend == "postgresql" else "", scale)
                    for state in ("empty", "full")
                ]  # fmt: skip
                cols = measure(stacks, scale)
                load = f"{load0:.1f} -> {os.getloadavg()[0]:.1f}"
                name = {"sqlite": "SQLite", "postgresql": "PostgreSQL"}.get(backend, backend)
                out += report(name, cols["empty"], cols["full"], scale, load)
                print("\n".join(out[-len(rows()) - 2 :]), flush=True)
        finally:
            server.stop("fast")
    print(f"\nstate growth, every backend ({time.perf_counter() - t_start:.0f} s in all):")
    print("\n".join(out))


if __name__ == "__main__":
    main()
