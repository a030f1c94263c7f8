"""The chart's workloads run from the built images with podman (tests/image/pods.py), used as a user would.

Every Deployment/StatefulSet of the render runs as one container with its rendered command, env,
volumes and securityContext (uid 10001, read-only root filesystem, no capabilities), on one podman
network where the Service names resolve to the pods; its startup, readiness and liveness probes pass.
Then, through the gateway container only: grpcurl with the operator token from the rendered Secret; a
message in and a reply out; on the voice channel a spoken reply (piper inside the voice image) and a
voice note heard by faster-whisper (inside the image); a companion node connecting from the host; the
voice note's canvas artifact surviving `podman kill` and a new nodes container on the same volume;
the `helm test` hook Pod run from the image; and every pod stopping with exit 0 on SIGTERM within its
grace period. Every container, volume and network is removed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from flynn.v1 import (
    canvas_pb2,
    canvas_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    nodes_pb2,
    nodes_pb2_grpc,
    run_control_pb2,
    voice_pb2,
    voice_pb2_grpc,
)

from tests.helm.conftest import ROOT
from tests.image.conftest import CHANNEL, Images, Rendered
from tests.image.pods import ChartOnPodman, Pod, podman
from tests.support.mesh import grpcurl

# The first test of a session also builds the images (cold: minutes; warm: about a minute).
pytestmark = pytest.mark.timeout(1800)

FINAL = run_control_pb2.REPLY_KIND_FINAL


def _secret(rendered: Rendered, suffix: str, key: str) -> str:
    obj = next(d for d in rendered.docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith(suffix))
    return base64.b64decode(obj["data"][key]).decode()


class Mesh:
    def __init__(self, chart: ChartOnPodman, rendered: Rendered) -> None:
        self.chart = chart
        self.operator = _secret(rendered, "-credentials", "operator-token")
        self.channel_token = rendered.channel_token
        self.gateway = f"{chart.pods['gateway'].ip}:{chart.pods['gateway'].port('grpc')}"
        self._ch = grpc.insecure_channel(
            self.gateway, options=[("grpc.max_receive_message_length", 64 << 20)]
        )

    def md(self, token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),)

    def send(
        self, session: str, key: str, text: str = "", audio: bytes = b""
    ) -> gateway_pb2.SendMessageResponse:
        req = gateway_pb2.SendMessageRequest(
            channel=CHANNEL, session_key=session, sender="image-test", text=text, idempotency_key=key
        )
        if audio:
            req.audio.CopyFrom(common_pb2.Audio(encoding=common_pb2.AUDIO_ENCODING_LINEAR16, content=audio))
        resp: gateway_pb2.SendMessageResponse = gateway_pb2_grpc.GatewayStub(self._ch).SendMessage(
            req, metadata=self.md(self.channel_token), timeout=90
        )
        return resp

    def final(self, run_id: str, timeout: float = 120) -> run_control_pb2.Reply:
        """Read the gateway's reply stream until the run's final reply (bounded)."""
        call = gateway_pb2_grpc.GatewayStub(self._ch).StreamReplies(
            gateway_pb2.GatewayStreamRepliesRequest(channels=[CHANNEL]),
            metadata=self.md(self.channel_token),
            timeout=timeout,
        )
        for item in call:
            if item.reply.kind == FINAL and item.reply.run_id == run_id:
                call.cancel()
                return item.reply
        raise AssertionError(f"the reply stream ended without a final reply for run {run_id}")

    def canvas(self) -> canvas_pb2_grpc.CanvasStub:
        return canvas_pb2_grpc.CanvasStub(self._ch)

    def close(self) -> None:
        self._ch.close()


@pytest.fixture(scope="module")
def mesh(images: Images, rendered: Rendered, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    chart = ChartOnPodman(
        rendered.docs,
        images={images.runtime: images.runtime, images.voice: images.voice},
        workdir=tmp_path_factory.mktemp("pods"),
    )
    with chart.running():
        m = Mesh(chart, rendered)
        try:
            yield m
        finally:
            m.close()
    assert chart.leftovers() == [], "the harness left containers, volumes or networks behind"


def spoken_wav(text: str, tmp: Path) -> bytes:
    out = tmp / "note.wav"
    subprocess.run(["espeak-ng", "-s", "140", "-w", str(out), text], check=True, timeout=30)
    return out.read_bytes()


def test_every_workload_runs_from_the_image_with_the_charts_security_context(mesh: Mesh) -> None:
    chart = mesh.chart
    assert set(chart.pods) == {"config", "queue", "reactions", "nodes", "voice", "gateway", "console"}
    for pod in chart.pods.values():
        info = json.loads(podman("inspect", pod.container).stdout)[0]
        host = info["HostConfig"]
        assert info["Config"]["User"] == "10001:10001", pod.name
        assert host["ReadonlyRootfs"] is True, pod.name
        assert "CAP_NET_BIND_SERVICE" not in (info["EffectiveCaps"] or []), pod.name
        assert info["EffectiveCaps"] in (None, []), f"{pod.name}: capabilities {info['EffectiveCaps']}"
        assert "no-new-privileges" in " ".join(host.get("SecurityOpt") or []), pod.name
        assert info["Config"]["Image"].startswith("localhost/flynn"), pod.name
        assert chart.writes_outside_volumes(pod) == [], pod.name
        chart.check_probes(pod)
    # The processes really are uid 10001 inside.
    top = podman("top", chart.pods["gateway"].container, "user", "args").stdout
    assert "flynn-gateway" in top and "root" not in top.split("\n", 1)[1], top


def test_grpcurl_through_the_gateway_with_the_token_from_the_rendered_secret(mesh: Mesh) -> None:
    out = grpcurl("-d", "{}", mesh.gateway, "flynn.v1.System/GetStatus", token=mesh.operator)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    health = {s["service"]: s.get("health") for s in status["services"]}
    assert set(health) >= {"config", "queue", "reactions", "nodes", "voice"}, status
    assert all(h == "SERVICE_HEALTH_SERVING" for h in health.values()), health
    denied = grpcurl("-d", "{}", mesh.gateway, "flynn.v1.System/GetStatus", token="flt_not-a-token")
    assert denied.returncode != 0 and "Unauthenticated" in denied.stderr, denied.stderr


def test_a_message_in_a_spoken_reply_out(mesh: Mesh) -> None:
    sent = mesh.send("voice-demo:me", "text-1", text="hello from the image test")
    assert sent.disposition == run_control_pb2.DISPOSITION_STARTED
    final = mesh.final(sent.run_id)
    assert "hello from the image test" in final.text
    assert final.delivery == run_control_pb2.DELIVERY_MODE_AUDIO, final.tts_fallback_reason
    assert len(final.audio.content) > 10_000 and final.audio.content[:4] == b"RIFF"


def test_speech_engines_and_models_are_inside_the_voice_image(mesh: Mesh, tmp_path: Path) -> None:
    voice = mesh.chart.pods["voice"]
    with grpc.insecure_channel(f"{voice.ip}:{voice.port('grpc')}") as ch:
        stub = voice_pb2_grpc.VoiceStub(ch)
        md = mesh.md(mesh.operator)  # operators may call every service directly
        for engine in ("piper", "espeak-ng"):
            spoken = stub.Synthesize(
                voice_pb2.SynthesizeRequest(text="The canvas survived.", engines=[engine]),
                metadata=md,
                timeout=60,
            )
            assert spoken.engine == engine and spoken.duration_ms > 300, spoken.attempts
        note = spoken_wav("good morning", tmp_path)
        for engine in ("faster-whisper", "pocketsphinx"):
            heard = stub.Transcribe(
                voice_pb2.TranscribeRequest(
                    audio_content=note, config=voice_pb2.RecognitionConfig(engines=[engine])
                ),
                metadata=md,
                timeout=90,
            )
            assert heard.engine == engine and heard.transcript.strip(), (engine, heard)
            if engine == "faster-whisper":  # pocketsphinx hears espeak's voice poorly; it only has to run
                assert "morning" in heard.transcript.lower(), heard
        # Ogg/Opus output needs ffmpeg, which only the voice image carries.
        ogg = stub.Synthesize(
            voice_pb2.SynthesizeRequest(
                text="ogg", audio_config=voice_pb2.AudioConfig(encoding=common_pb2.AUDIO_ENCODING_OGG_OPUS)
            ),
            metadata=md,
            timeout=60,
        )
        assert ogg.audio_content[:4] == b"OggS"


def test_voice_note_artifact_survives_kill_and_restart_of_the_nodes_pod(mesh: Mesh, tmp_path: Path) -> None:
    audio = spoken_wav("hello world", tmp_path)
    sent = mesh.send("voice-demo:note", "note-1", audio=audio)
    assert "world" in sent.transcript.lower(), sent
    final = mesh.final(sent.run_id)
    assert sent.transcript.strip() in final.text
    name = "inbound/voice-demo_note-" + hashlib.sha256(b"voice-demo:note").hexdigest()[:12] + "/note-1"
    md = mesh.md(mesh.operator)
    before = (
        mesh.canvas().GetArtifact(canvas_pb2.GetArtifactRequest(name=name), metadata=md, timeout=10).artifact
    )
    assert before.sha256 == hashlib.sha256(audio).hexdigest()

    mesh.chart.kill_and_restart("nodes")
    deadline = time.monotonic() + 60
    while True:
        try:
            after = mesh.canvas().GetArtifact(
                canvas_pb2.GetArtifactRequest(name=name), metadata=md, timeout=10
            )
            break
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    assert after.artifact.content == audio and after.artifact.version == before.version


def test_companion_node_connects_from_the_host(mesh: Mesh) -> None:
    stub = nodes_pb2_grpc.NodesStub(mesh._ch)
    md = mesh.md(mesh.operator)
    issued = stub.IssueNodeToken(
        nodes_pb2.IssueNodeTokenRequest(node_id="laptop", role="desktop"), metadata=md, timeout=10
    )
    cmd = [sys.executable, "-m", "examples.companion_node", "--addr", mesh.gateway]
    cmd += ["--node-id", "laptop", "--token", issued.token, "--role", "desktop"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={"PYTHONPATH": f"{ROOT}:{ROOT / 'gen'}", "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        node = None
        while time.monotonic() < deadline:
            nodes = stub.ListNodes(nodes_pb2.ListNodesRequest(), metadata=md, timeout=10).nodes
            node = next((n for n in nodes if n.node_id == "laptop"), None)
            if node is not None and node.status == nodes_pb2.NODE_STATUS_ONLINE:
                break
            time.sleep(0.3)
        assert node is not None and node.status == nodes_pb2.NODE_STATUS_ONLINE, node
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode is not None, out


def test_helm_test_hook_pod_passes_from_the_image(mesh: Mesh, rendered: Rendered) -> None:
    hook = next(
        d for d in rendered.docs
        if d["kind"] == "Pod" and d["metadata"].get("annotations", {}).get("helm.sh/hook") == "test"
    )  # fmt: skip
    code, log = mesh.chart.run_pod_to_completion(hook)
    assert code == 0, log
    assert log.count("ok  ") == len(hook["spec"]["containers"][0]["args"]) - 3, log


def test_pod_of_a_stateful_set_is_named_like_kubernetes_names_it(mesh: Mesh) -> None:
    nodes: Pod = mesh.chart.pods["nodes"]
    assert nodes.name.endswith("-0")
    hostname = podman("exec", nodes.container, "cat", "/etc/hostname").stdout.strip()
    assert hostname == nodes.name


def test_every_pod_stops_cleanly_on_sigterm_within_its_grace_period(mesh: Mesh) -> None:
    """Last: what the kubelet does on delete (SIGTERM through tini, then SIGKILL at the grace period)."""
    for pod in mesh.chart.pods.values():
        grace = int(pod.spec.get("terminationGracePeriodSeconds", 30))
        start = time.monotonic()
        podman("stop", "-t", str(grace), pod.container, timeout=grace + 30)
        elapsed = time.monotonic() - start
        status, code = mesh.chart.state(pod)
        assert status == "exited" and code == 0, f"{pod.name}: exit {code}\n{mesh.chart.logs(pod)}"
        assert elapsed < grace, f"{pod.name} took {elapsed:.1f} s of its {grace} s grace period"
