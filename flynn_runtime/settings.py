"""Process settings shared by every service: flags, with FLYNN_* environment variables as defaults.

Every flag has an environment variable of the same name (--data-dir <-> FLYNN_DATA_DIR), which is
what the Helm chart sets. tests/contract/test_settings_env.py and the chart tests cross-check them.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from flynn_runtime.limits import Limits
from flynn_runtime.tls import CLIENT_AUTH_CHOICES, TlsFiles

# Backend services the gateway (and other services) may call, with their default local ports.
BACKENDS = ("config", "queue", "reactions", "nodes", "voice")
DEFAULT_PORTS = {
    "gateway": 50050,
    "config": 50051,
    "queue": 50052,
    "reactions": 50053,
    "nodes": 50054,
    "voice": 50055,
}


@dataclass(frozen=True)
class Settings:
    service: str
    listen: str
    metrics_listen: str
    data_dir: Path
    addresses: dict[str, str]
    tokens_file: Path | None
    service_token: str
    grace_seconds: float
    port_file: Path | None
    log_level: str
    instance_id: str
    max_message_bytes: int
    max_concurrent_streams: int
    trusted_proxies: str = ""
    proxy_protocol_listen: str = ""
    extra: dict[str, object] = field(default_factory=dict)
    #: postgresql://… of the shared database; empty = embedded SQLite files under data_dir.
    database_url: str = ""
    #: File holding the database password (a mounted Secret); overrides a password in the URL.
    database_password_file: Path | None = None
    tls: TlsFiles = field(default_factory=TlsFiles)
    limits: Limits = field(default_factory=Limits)

    def address(self, backend: str) -> str:
        return self.addresses.get(backend, "")

    def extra_int(self, name: str, default: int) -> int:
        """A service's own integer flag (parsed into `extra` by its add_args); `default` when absent."""
        value = self.extra.get(name, default)
        assert isinstance(value, int | str), f"{name}: {value!r}"
        return int(value)

    def deployed(self, backend: str) -> bool:
        """False when the backend is left out of this deployment on purpose: its address is set empty
        (`--voice-addr ""`, FLYNN_VOICE_ADDR="", what the chart sets for `voice.enabled: false`)."""
        return bool(self.address(backend).strip())


def _env(name: str, default: str) -> str:
    return os.environ.get(f"FLYNN_{name.upper().replace('-', '_')}", default)


def env_arg(
    p: argparse.ArgumentParser,
    name: str,
    default: str,
    help: str,
    *,
    type: Callable[[str], object] = str,
    env: str = "",
) -> None:
    """Add `--name`, whose default is $FLYNN_NAME (or $FLYNN_<env> when the variable is named
    otherwise) when set, else `default`; the help names the variable."""
    var = (env or name).replace("-", "_").upper()
    p.add_argument(f"--{name}", type=type, default=type(_env(var, default)), help=f"{help} (FLYNN_{var})")


def build_parser(service: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"flynn-{service}", description=f"Flynn {service} service")
    port = DEFAULT_PORTS.get(service, 0)
    p.add_argument(
        "--listen", default=_env("listen", f"127.0.0.1:{port}"), help="gRPC host:port (FLYNN_LISTEN)"
    )
    p.add_argument(
        "--metrics-listen",
        default=_env("metrics_listen", "127.0.0.1:0"),
        help="Prometheus host:port, empty to disable (FLYNN_METRICS_LISTEN)",
    )
    p.add_argument(
        "--data-dir", default=_env("data_dir", "./.flynn-data"), help="data directory (FLYNN_DATA_DIR)"
    )
    for backend in BACKENDS:
        p.add_argument(
            f"--{backend}-addr",
            default=_env(f"{backend}_addr", f"127.0.0.1:{DEFAULT_PORTS[backend]}"),
            help=f"address of the {backend} service (FLYNN_{backend.upper()}_ADDR); "
            "empty: not deployed (calls to it answer UNIMPLEMENTED/NOT_DEPLOYED)",
        )
    p.add_argument(
        "--tokens-file", default=_env("tokens_file", ""), help="token hashes file (FLYNN_TOKENS_FILE)"
    )
    p.add_argument(
        "--service-token-file",
        default=_env("service_token_file", ""),
        help="file holding this service's own bearer token for calls to other services (FLYNN_SERVICE_TOKEN_FILE; "
        "FLYNN_SERVICE_TOKEN is read when no file is given)",
    )
    p.add_argument(
        "--grace-seconds",
        type=float,
        default=float(_env("grace_seconds", "10")),
        help="shutdown grace (FLYNN_GRACE_SECONDS)",
    )
    p.add_argument(
        "--port-file", default=_env("port_file", ""), help="write '<grpc> <metrics>' ports here once bound"
    )
    p.add_argument("--log-level", default=_env("log_level", "info"), help="log level (FLYNN_LOG_LEVEL)")
    p.add_argument(
        "--instance-id",
        default=_env("instance_id", f"{socket.gethostname()}/{os.getpid()}"),
        help="instance name reported to the config service (FLYNN_INSTANCE_ID)",
    )
    p.add_argument(
        "--max-message-bytes",
        type=int,
        default=int(_env("max_message_bytes", str(16 * 1024 * 1024))),
        help="largest gRPC message accepted or sent (FLYNN_MAX_MESSAGE_BYTES)",
    )
    p.add_argument(
        "--max-concurrent-streams",
        type=int,
        default=int(_env("max_concurrent_streams", "4096")),
        help="pending-request limit of the server (FLYNN_MAX_CONCURRENT_STREAMS)",
    )
    _add_network_args(p)
    _add_tls_args(p)
    _add_limit_args(p, service)
    return p


def _add_network_args(p: argparse.ArgumentParser) -> None:
    """Proxies in front of the service, and the shared database."""
    p.add_argument(
        "--trusted-proxies",
        default=_env("trusted_proxies", ""),
        help="comma-separated IPs/CIDRs of proxies whose X-Forwarded-For is believed (FLYNN_TRUSTED_PROXIES; "
        "empty: none, the peer address is the client)",
    )
    p.add_argument(
        "--proxy-protocol-listen",
        default=_env("proxy_protocol_listen", ""),
        help="host:port of a second listener for load balancers that send the PROXY protocol (v1/v2); "
        "its header is believed only from --trusted-proxies (FLYNN_PROXY_PROTOCOL_LISTEN; empty: off)",
    )
    p.add_argument(
        "--database-url",
        default=_env("database_url", ""),
        help="postgresql://user@host:port/dbname of the shared database; empty keeps the embedded SQLite "
        "files under --data-dir (FLYNN_DATABASE_URL)",
    )
    p.add_argument(
        "--database-password-file",
        default=_env("database_password_file", ""),
        help="file holding the database password, e.g. a mounted Secret (FLYNN_DATABASE_PASSWORD_FILE)",
    )


def _path_arg(p: argparse.ArgumentParser, name: str, help: str) -> None:
    env_arg(p, name, "", help)


def _add_tls_args(p: argparse.ArgumentParser) -> None:
    _path_arg(p, "tls-cert-file", "PEM certificate this server presents; reloaded when it changes")
    _path_arg(p, "tls-key-file", "PEM private key of --tls-cert-file")
    _path_arg(
        p, "tls-ca-file", "mesh CA: calls to services use mutual TLS and this server asks for client certs"
    )
    _path_arg(
        p, "tls-client-cert-file", "client certificate presented to other services (default: --tls-cert-file)"
    )
    _path_arg(p, "tls-client-key-file", "private key of --tls-client-cert-file")
    _path_arg(p, "local-listen", "extra plaintext port on loopback only, for in-pod probes when TLS is on")
    p.add_argument(
        "--tls-client-auth",
        choices=CLIENT_AUTH_CHOICES,
        default=_env("tls_client_auth", "auto"),
        help="ask callers for a client certificate: auto = when --tls-ca-file is set, except on the gateway "
        "(FLYNN_TLS_CLIENT_AUTH)",
    )


def _int_arg(p: argparse.ArgumentParser, name: str, default: int, help: str) -> None:
    env_arg(p, name, str(default), help, type=int)


def _add_limit_args(p: argparse.ArgumentParser, service: str) -> None:
    d = Limits()
    # The gateway's callers are outside, one connection each; an internal service's one connection from
    # the gateway carries every caller's streams (1000 nodes' Connect, say), so it gets the total cap.
    per_connection = d.streams_per_connection if service == "gateway" else d.total_calls
    _int_arg(p, "max-streams-per-connection", per_connection, "HTTP/2 concurrent streams per connection")
    _int_arg(
        p, "max-total-calls", d.total_calls, "concurrent calls of all callers; more get RESOURCE_EXHAUSTED"
    )
    _int_arg(
        p,
        "max-public-streams",
        d.public_streams,
        "concurrent unauthenticated health Watch and reflection streams; more get RESOURCE_EXHAUSTED",
    )
    _int_arg(p, "max-audio-seconds", d.audio_seconds, "longest voice note accepted, in seconds")
    _int_arg(p, "audio-decoders", d.audio_decoders, "audio decodes (ffmpeg) run at once by the voice service")
    p.add_argument(
        "--reflection-requires-token",
        default=_env("reflection_requires_token", "false"),
        choices=("true", "false"),
        help="server reflection needs a bearer token (FLYNN_REFLECTION_REQUIRES_TOKEN)",
    )


def parse(
    service: str,
    argv: Sequence[str] | None = None,
    add_args: Callable[[argparse.ArgumentParser], None] | None = None,
) -> Settings:
    parser = build_parser(service)
    if add_args is not None:
        add_args(parser)
    ns = parser.parse_args(argv)
    known = {a.dest for a in build_parser(service)._actions}
    extra = {k: v for k, v in vars(ns).items() if k not in known}
    token = ""
    if ns.service_token_file:
        token = Path(ns.service_token_file).read_text().strip()
    else:
        token = os.environ.get("FLYNN_SERVICE_TOKEN", "")
    return Settings(
        service=service,
        listen=ns.listen,
        metrics_listen=ns.metrics_listen,
        data_dir=Path(ns.data_dir),
        addresses={b: getattr(ns, f"{b}_addr") for b in BACKENDS},
        tokens_file=Path(ns.tokens_file) if ns.tokens_file else None,
        service_token=token,
        grace_seconds=ns.grace_seconds,
        port_file=Path(ns.port_file) if ns.port_file else None,
        log_level=ns.log_level,
        instance_id=ns.instance_id,
        max_message_bytes=ns.max_message_bytes,
        max_concurrent_streams=ns.max_concurrent_streams,
        trusted_proxies=ns.trusted_proxies,
        proxy_protocol_listen=ns.proxy_protocol_listen,
        extra=extra,
        database_url=ns.database_url,
        database_password_file=Path(ns.database_password_file) if ns.database_password_file else None,
        tls=TlsFiles(
            cert_file=_opt_path(ns.tls_cert_file),
            key_file=_opt_path(ns.tls_key_file),
            ca_file=_opt_path(ns.tls_ca_file),
            client_cert_file=_opt_path(ns.tls_client_cert_file),
            client_key_file=_opt_path(ns.tls_client_key_file),
            client_auth=ns.tls_client_auth,
            local_listen=ns.local_listen,
        ),
        limits=Limits(
            streams_per_connection=ns.max_streams_per_connection,
            total_calls=ns.max_total_calls,
            public_streams=ns.max_public_streams,
            reflection_requires_token=ns.reflection_requires_token == "true",
            audio_seconds=ns.max_audio_seconds,
            audio_decoders=ns.audio_decoders,
        ),
    )


def _opt_path(value: str) -> Path | None:
    return Path(value) if value else None
