"""The config service as a real process: SIGKILL loses no committed revision, watchers resume; grpcurl; CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import config_pb2, config_pb2_grpc

from flynn_cli.main import run as cli
from flynn_runtime.channels import client_channel
from flynn_runtime.config_watcher import ConfigWatcher
from flynn_runtime.server import Runtime
from tests.support.config import client_settings, field_update
from tests.support.mesh import ROOT, ServiceProcess, Tokens, grpcurl


@pytest.fixture
def config_proc(tmp_path: Path, tokens: Tokens) -> Iterator[ServiceProcess]:
    proc = ServiceProcess(
        "config", "config_svc.main", tmp_path / "config-svc", tokens, extra=["--bookmark-seconds", "0.5"]
    )
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def config_proc_any(tmp_path: Path, tokens: Tokens, database_url: str) -> Iterator[ServiceProcess]:
    """The config process on each backend (SQLite file, PostgreSQL)."""
    db = ["--database-url", database_url] if database_url else []
    proc = ServiceProcess(
        "config", "config_svc.main", tmp_path / "config-svc", tokens, extra=["--bookmark-seconds", "0.5", *db]
    )
    proc.start()
    yield proc
    proc.stop()


def _sync_stub(address: str) -> config_pb2_grpc.ConfigServiceStub:
    return config_pb2_grpc.ConfigServiceStub(grpc.insecure_channel(address))


async def test_sigkill_loses_no_committed_revision_and_watchers_resume(
    config_proc_any: ServiceProcess, tokens: Tokens, tmp_path: Path
) -> None:
    config_proc = config_proc_any
    runtimes = [
        Runtime(client_settings(f"svc{i}", tmp_path / f"svc{i}", tokens, config_proc.address))
        for i in range(3)
    ]
    watchers = [ConfigWatcher(rt, backoff_initial=0.05, backoff_max=0.5) for rt in runtimes]
    for w in watchers:
        await w.start()
    ch = client_channel(config_proc.address, tokens.operator)
    stub = config_pb2_grpc.ConfigServiceStub(ch)
    acknowledged: dict[int, int] = {}  # revision -> server.queue.cap committed in it
    stop = asyncio.Event()

    async def writer() -> None:
        cap = 100
        while not stop.is_set():
            try:
                head = (await stub.GetConfig(config_pb2.GetConfigRequest(), timeout=2)).revision
                resp = await stub.UpdateConfig(
                    field_update("server.queue.cap", cap, head=head, reason=f"cap {cap}"), timeout=2
                )
                acknowledged[resp.revision] = cap
                cap += 1
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.01)

    try:
        task = asyncio.create_task(writer())
        for _ in range(1000):
            if len(acknowledged) >= 30:
                break
            await asyncio.sleep(0.01)
        await asyncio.to_thread(config_proc.kill9)  # mid-burst: some UpdateConfig may be in flight
        await asyncio.sleep(0.3)
        stop.set()
        await task
        assert len(acknowledged) >= 30
        await asyncio.to_thread(config_proc.start)  # same port, same data dir
        for rev, cap in acknowledged.items():
            got = await stub.GetConfig(
                config_pb2.GetConfigRequest(revision=rev), timeout=10, wait_for_ready=True
            )
            assert got.config.server.queue.cap == cap, rev
        head = (await stub.GetConfig(config_pb2.GetConfigRequest(), timeout=5)).revision
        assert head >= max(acknowledged)
        listed = (
            await stub.ListRevisions(config_pb2.ListRevisionsRequest(page_size=500), timeout=5)
        ).revisions
        assert [r.revision for r in listed] == list(range(head, 0, -1))  # no gap, no half-written row
        # Watchers come back by themselves and follow new changes.
        resp = await stub.UpdateConfig(
            field_update("server.queue.mode", "interrupt", head=head, reason="after restart"), timeout=5
        )
        for w in watchers:
            assert await w.wait_for_revision(resp.revision, 20)
            assert w.config.server.queue.mode == config_pb2.QUEUE_MODE_INTERRUPT
        for _ in range(500):
            ws = await stub.ListWatchers(config_pb2.ListWatchersRequest(), timeout=5)
            if sum(1 for x in ws.watchers if x.connected and x.applied_revision == resp.revision) == 3:
                break
            await asyncio.sleep(0.02)
        assert sum(1 for x in ws.watchers if x.connected and x.applied_revision == resp.revision) == 3
    finally:
        for w in watchers:
            await w.stop()
        for rt in runtimes:
            await rt.close()
        await ch.close()


def test_invalid_update_through_grpcurl_shows_each_field(config_proc: ServiceProcess, tokens: Tokens) -> None:
    body = {
        "config": {
            "server": {"queue": {"mode": 7}, "nodes": {"allowedRoles": ["desktop", ""]}},
            "automation": {
                "reactions": [
                    {
                        "id": "dup",
                        "trigger": {"event": "REACTION_EVENT_TYPE_MESSAGE_RECEIVED", "regex": "(a"},
                        "actions": [{"ack": {"emoji": "x"}}],
                    },
                    {
                        "id": "dup",
                        "trigger": {"event": "REACTION_EVENT_TYPE_MESSAGE_RECEIVED"},
                        "actions": [{}],
                    },
                ]
            },
            "tts": {"rollout": {"basisPoints": 12000}},
        },
        "updateMask": {
            "paths": [
                "server.queue.mode",
                "server.nodes.allowed_roles",
                "automation.reactions",
                "tts.rollout",
                "server.queue.bogus",
            ]
        },
        "expectedRevision": 1,
        "reason": "grpcurl test",
    }
    res = grpcurl(
        "-format-error",
        config_proc.address,
        "flynn.v1.ConfigService/UpdateConfig",
        token=tokens.operator,
        data=json.dumps(body),
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert '"code": 3' in out, out  # INVALID_ARGUMENT
    for field in (
        "server.queue.mode",
        "server.nodes.allowed_roles[1]",
        "automation.reactions[0].trigger.regex",
        "automation.reactions[1].id",
        "automation.reactions[1].actions[0]",
        "tts.rollout.basis_points",
        "update_mask.paths[4]",
    ):
        assert field in out, f"{field} missing from grpcurl output:\n{out}"
    # Stale write through grpcurl: FAILED_PRECONDITION with the current revision.
    body2 = {
        "config": {"audio": {"enabled": False}},
        "updateMask": {"paths": ["audio.enabled"]},
        "expectedRevision": 5,
    }
    res = grpcurl(
        "-format-error",
        config_proc.address,
        "flynn.v1.ConfigService/UpdateConfig",
        token=tokens.operator,
        data=json.dumps(body2),
    )
    out = res.stdout + res.stderr
    assert res.returncode != 0 and '"code": 9' in out and "STALE_REVISION" in out, out
    assert '"current_revision":"1"' in out.replace(" ", ""), out


def test_cli_against_a_real_server(
    config_proc: ServiceProcess, tokens: Tokens, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--addr", config_proc.address, "--token", tokens.operator]

    def flynn(*args: str) -> tuple[int, str, str]:
        code = cli([*base, *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = flynn("config", "get", "server.queue.mode")
    assert code == 0 and out.splitlines() == ["# revision 1", "collect"]
    code, out, _ = flynn("config", "get", "server.nodes")
    assert code == 0 and "allowed_roles:" in out and "- desktop" in out

    code, out, _ = flynn("config", "set", "server.queue.mode", "interrupt", "--reason", "canary")
    assert (
        code == 0 and "committed revision 2" in out and 'server.queue.mode: "collect" -> "interrupt"' in out
    )
    code, out, err = flynn("config", "set", "server.queue.mode", "sometimes", "--reason", "x")
    assert code == 1 and "server.queue.mode" in err and "collect, followup, interrupt, steer" in err
    code, out, err = flynn("config", "set", "server.queue.mode", "steer")
    assert code == 2 and "--reason" in err

    # apply / diff of a file: every violated field listed by the server, non-zero exit.
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "server.queue.mode: collect\nserver.nodes.allowed_roles: ['']\nautomation.reactions:\n"
        "  - {id: x, trigger: {event: message_received, regex: '(a'}, actions: [{reply: {text: hi}}]}\n"
        "  - {id: x, trigger: {event: run_error}}\n"
    )
    code, out, err = flynn("config", "apply", str(bad), "--reason", "bad")
    assert code == 1
    for f in (
        "server.nodes.allowed_roles[0]",
        "automation.reactions[0].trigger.regex",
        "automation.reactions[1].id",
        "automation.reactions[1].actions",
    ):
        assert f in err, err
    seed = (ROOT / "config" / "flynn.yaml").read_text()
    good = tmp_path / "good.yaml"
    good.write_text(
        seed.replace("mode: collect ", "mode: followup ").replace(
            "enabled_channels: [voice-demo]", "enabled_channels: [voice-demo, telegram]"
        )
    )
    code, out, _ = flynn("config", "diff", str(good))
    assert (
        code == 0
        and "nothing committed" in out
        and "server.queue.mode" in out
        and "tts.enabled_channels" in out
    )
    code, out, _ = flynn("config", "apply", str(good), "--reason", "apply file")
    assert code == 0 and "committed revision 3" in out
    code, out, _ = flynn("config", "apply", str(good), "--reason", "again")
    assert code == 0 and "no change" in out

    code, out, _ = flynn("config", "history", "--limit", "10", "--diff")
    assert code == 0
    lines = [line for line in out.splitlines() if line[:6].strip().isdigit()]
    assert [int(line.split()[0]) for line in lines] == [3, 2, 1]
    assert "operator:operator" in out and "canary" in out and "seed" in out

    code, out, _ = flynn("config", "rollback", "1", "--reason", "revert all")
    assert code == 0 and "revision 4" in out
    code, out, _ = flynn("config", "get", "server.queue.mode")
    assert out.splitlines() == ["# revision 4", "collect"]
    code, out, _ = flynn("config", "history", "--limit", "1")
    assert "rollback->1" in out

    code, out, _ = flynn(
        "config", "explain", "server.queue.mode", "--session", "tg:1", "--channel", "telegram"
    )
    assert code == 0 and 'server.queue.mode = "collect"' in out and "source:" in out and "global" in out
    code, out, _ = flynn(
        "config", "explain", "automation.reactions.canvas-on-node-connect", "--session", "tg:1"
    )
    assert code == 0 and "bucket" in out and "1000 basis points" in out

    code, out, _ = flynn("config", "watchers")
    assert code == 0 and out.startswith("head revision 4")

    # Map entries one at a time, and unset.
    code, out, _ = flynn(
        "config", "set", "server.queue.overrides.sessions[tg:1.5]", "interrupt", "--reason", "vip"
    )
    assert code == 0 and "revision 5" in out and "server.queue.overrides.sessions[tg:1.5]" in out
    code, out, _ = flynn(
        "config", "set", "server.queue.overrides.sessions[tg:2]", "steer", "--reason", "vip2"
    )
    assert code == 0 and "revision 6" in out
    code, out, _ = flynn("config", "get", "server.queue.overrides.sessions")
    assert out.splitlines()[1:] == ["tg:1.5: interrupt", "tg:2: steer"]
    code, out, _ = flynn("config", "unset", "server.queue.overrides.sessions[tg:1.5]", "--reason", "done")
    assert code == 0 and "revision 7" in out
    code, out, _ = flynn("config", "explain", "server.queue.mode", "--session", "tg:2", "--channel", "tg")
    assert 'server.queue.mode = "steer"' in out and "session_override" in out
    code, out, _ = flynn("config", "unset", "tts.engines", "--reason", "default chain")
    assert code == 0 and "revision 8" in out and 'tts.engines: ["piper", "espeak-ng"] -> (unset)' in out

    # Errors: a stale write and an unreachable server exit non-zero with a readable message.
    code, out, err = flynn(
        "config", "set", "tts.enabled", "false", "--reason", "x", "--expected-revision", "2"
    )
    assert code == 1 and "FAILED_PRECONDITION" in err and "current_revision=8" in err
    code = cli(["--addr", "127.0.0.1:1", "--timeout", "1", "config", "get"])
    assert code == 1 and "UNAVAILABLE" in capsys.readouterr().err


def test_flynn_console_script(config_proc: ServiceProcess, tokens: Tokens) -> None:
    exe = Path(sys.executable).parent / "flynn"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "flynn_cli.main"]
    res = subprocess.run(
        [*cmd, "config", "get", "tts.engines"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "FLYNN_ADDR": config_proc.address,
            "FLYNN_TOKEN": tokens.operator,
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}",
        },
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == ["# revision 1", "- piper", "- espeak-ng"]
    res = subprocess.run(
        [*cmd, "config", "history"],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "FLYNN_ADDR": config_proc.address,
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}",
        },
    )
    assert res.returncode == 1 and "UNAUTHENTICATED" in res.stderr
