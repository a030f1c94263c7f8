"""flynn_runtime.tracing without a mesh: off costs nothing (no OpenTelemetry import), configuration
from the OTEL_* environment, the sampled flag."""

from __future__ import annotations

import os
import subprocess
import sys

from flynn_runtime import tracing
from tests.support.mesh import ROOT

OFF_PROBE = """
import sys
from flynn_runtime import tracing, server, channels, logs, audit
import queue_svc.app, gateway.app, reactions_svc.app, nodes_svc.app
assert tracing.configure("probe") is False
assert tracing.stamp(None) is None and tracing.exemplar() is None and tracing.current_ids() is None
ch = channels.client_channel("127.0.0.1:1")  # no token, tracing off: no interceptor at all
assert not getattr(ch, "_unary_unary_interceptors", None), "an interceptor was installed"
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
print("ok")
"""


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    clean.update(env, PYTHONPATH=f"{ROOT}:{ROOT / 'gen'}")
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=clean, cwd=ROOT, timeout=60
    )


def test_tracing_off_imports_no_opentelemetry_and_installs_nothing() -> None:
    out = _python(OFF_PROBE)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
    out = _python(OFF_PROBE, OTEL_TRACES_EXPORTER="none")
    assert out.returncode == 0, out.stderr


def test_only_the_otlp_exporter_turns_tracing_on() -> None:
    out = _python(
        "from flynn_runtime import tracing; print(tracing.configure('x'))", OTEL_TRACES_EXPORTER="zipkin"
    )
    assert out.stdout.strip() == "False"
    probe = (
        "from flynn_runtime import tracing; on = tracing.configure('x');"
        "print(on, tracing.CAPTURE_CONTENT, tracing._provider.resource.attributes['service.name'])"
    )
    out = _python(
        probe,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
        OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT="true",
    )
    assert out.stdout.split() == ["True", "True", "flynn-x"], out.stderr
    out = _python(
        probe,
        OTEL_TRACES_EXPORTER="otlp",
        OTEL_SERVICE_NAME="edge-gw",
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:9",
    )
    assert out.stdout.split() == ["True", "False", "edge-gw"], out.stderr


def test_sampled_reads_the_flags_bit() -> None:
    tid, sid = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    assert tracing.sampled(f"00-{tid}-{sid}-01")
    assert tracing.sampled(f"00-{tid}-{sid}-03")  # sampled, random trace id
    assert not tracing.sampled(f"00-{tid}-{sid}-00")
    assert not tracing.sampled(f"00-{tid}-{sid}-02")
    assert not tracing.sampled("") and not tracing.sampled("garbage")
