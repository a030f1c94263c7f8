"""What an operator sees with real grpcurl against the nodes process."""

from __future__ import annotations

import asyncio
import json

from tests.support.mesh import grpcurl
from tests.support.nodes import NodesHarness


async def test_grpcurl_tokens_and_canvas_errors(harness: NodesHarness) -> None:
    h = harness
    op = h.tokens.operator
    listed = await asyncio.to_thread(grpcurl, h.address, "list")
    assert "flynn.v1.Nodes" in listed.stdout and "flynn.v1.Canvas" in listed.stdout
    issued = await asyncio.to_thread(
        grpcurl,
        h.address,
        "flynn.v1.Nodes/IssueNodeToken",
        token=op,
        data='{"node_id":"desk-1","role":"desktop"}',
    )
    assert issued.returncode == 0, issued.stderr
    body = json.loads(issued.stdout)
    assert body["token"].startswith("fln_") and body["token_id"].startswith("ntok_")
    bad = await asyncio.to_thread(
        grpcurl,
        h.address,
        "flynn.v1.Canvas/PutArtifact",
        token=op,
        data='{"name":"../etc/passwd","content_type":"text/plain","content":"eA=="}',
    )
    assert bad.returncode != 0
    out = bad.stdout + bad.stderr
    assert "InvalidArgument" in out and '"field":"name"' in out.replace(" ", "")
    off = await asyncio.to_thread(
        grpcurl,
        h.address,
        "flynn.v1.Nodes/InvokeNode",
        token=op,
        data='{"node_id":"desk-1","command":"device.info"}',
    )
    assert "NotFound" in off.stdout + off.stderr or "FailedPrecondition" in off.stdout + off.stderr
