"""Run control on the real config service through ConfigWatcher: a change applies to the next message."""

from __future__ import annotations

from pathlib import Path

import grpc
from flynn.v1 import config_pb2
from flynn.v1 import run_control_pb2 as pb
from flynn.v1 import run_control_pb2_grpc as pb_grpc
from google.protobuf import field_mask_pb2

from flynn_runtime.config_watcher import ConfigWatcher
from flynn_runtime.server import running
from queue_svc.app import QueueApp
from tests.support.config import client_settings, config_server, stub, write_seed
from tests.support.mesh import Tokens


async def test_mode_change_applies_to_the_next_message(tmp_path: Path, tokens: Tokens) -> None:
    seed = write_seed(
        tmp_path / "seed.yaml", {"server": {"queue": {"mode": "followup"}, "agent": {"think_time": "2s"}}}
    )
    async with config_server(tmp_path / "cfg", tokens, seed_file=seed) as cfg_srv:
        settings = client_settings("queue", tmp_path / "q", tokens, cfg_srv.address)
        async with running(settings, QueueApp) as srv:
            app = srv.app
            assert isinstance(app, QueueApp) and isinstance(app.config, ConfigWatcher)
            assert await app.config.wait_for_revision(1, 10)
            md = tokens.md("operator")
            ch = grpc.aio.insecure_channel(srv.address)
            q = pb_grpc.RunControlStub(ch)

            async def submit(text: str) -> pb.SubmitMessageResponse:
                req = pb.SubmitMessageRequest(session_key="s", channel="c", text=text, idempotency_key=text)
                resp: pb.SubmitMessageResponse = await q.SubmitMessage(req, metadata=md, timeout=10)
                return resp

            a = await submit("a")
            b = await submit("b")
            assert (a.disposition, b.disposition) == (pb.DISPOSITION_STARTED, pb.DISPOSITION_QUEUED)
            head = app.config.revision
            change = config_pb2.FlynnConfig()
            change.server.queue.mode = config_pb2.QUEUE_MODE_INTERRUPT
            cfg_stub = stub(cfg_srv.address, tokens.operator)  # keep a reference: it owns its channel
            resp = await cfg_stub.UpdateConfig(
                config_pb2.UpdateConfigRequest(
                    config=change,
                    update_mask=field_mask_pb2.FieldMask(paths=["server.queue.mode"]),
                    expected_revision=head,
                    reason="test: interrupt",
                ),
                timeout=10,
            )
            assert await app.config.wait_for_revision(resp.revision, 10)
            c = await submit("c")
            assert c.disposition == pb.DISPOSITION_INTERRUPTED_PREVIOUS and c.interrupted_run_id == a.run_id
            assert c.effective_mode.mode == config_pb2.QUEUE_MODE_INTERRUPT
            assert c.effective_mode.config_revision == resp.revision
            await ch.close(None)
