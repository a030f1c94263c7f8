"""The companion node CLI as an operator runs it: connects, answers, stops on SIGTERM or a final refusal."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from flynn.v1 import nodes_pb2

from tests.support.mesh import ROOT
from tests.support.nodes import NodesHarness, eventually


def _spawn(addr: str, node_id: str, token: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}")
    args = [
        sys.executable,
        "-m",
        "examples.companion_node",
        "--addr",
        addr,
        "--node-id",
        node_id,
        "--token",
        token,
    ]
    return subprocess.Popen(
        args + ["--role", "desktop"], cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True
    )


async def test_cli_registers_answers_and_stops(harness: NodesHarness, tmp_path: Path) -> None:
    h = harness
    tok = await h.issue("cli-1")
    proc = await asyncio.to_thread(_spawn, h.address, "cli-1", tok.token)
    try:
        await eventually(lambda: "cli-1" in h.app.registry.sessions, within=30, what="CLI node online")
        got = [
            m
            async for m in h.nodes.InvokeNode(
                nodes_pb2.InvokeNodeRequest(node_id="cli-1", command="device.info"),
                metadata=h.op(),
                timeout=10,
            )
        ]
        assert got[-1].result.ok and "hostname" in got[-1].result.result_json
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(proc.communicate, None, 20)
        assert proc.returncode == 0 and "stopped" in err
        # Wrong token: the CLI refuses to loop and exits non-zero with the reason.
        bad = await asyncio.to_thread(_spawn, h.address, "cli-1", "fln_wrong")
        _, err = await asyncio.to_thread(bad.communicate, None, 30)
        assert bad.returncode == 1 and "UNAUTHENTICATED" in err
    finally:
        if proc.poll() is None:
            proc.kill()
