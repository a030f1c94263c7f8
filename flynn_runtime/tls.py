"""TLS for every hop: server credentials that reload their files, and the one client-credentials helper.

Settings (flynn_runtime.settings; each flag has its FLYNN_* variable):

- `--tls-cert-file`/`--tls-key-file`: the certificate this server presents. Without them the port is
  plaintext (the local default). The files are re-read when they change: gRPC asks on every new
  connection's handshake (a certificate-configuration fetcher), so a rotated certificate (cert-manager
  renewing a Secret, `flynn-dev` re-issuing one) is served without a restart; open connections keep
  the certificate they were set up with.
- `--tls-ca-file`: the mesh CA. With it, calls to other services use TLS verified against it and
  present this service's certificate as a client certificate (`--tls-client-cert-file`/
  `--tls-client-key-file` when it must be another one, as on the gateway whose served certificate is
  the public one), and this server requires a client certificate signed by it (mutual TLS).
- `--tls-client-auth`: `auto` (the default: required when a CA is given, except on the gateway, whose
  public callers carry bearer tokens, not certificates), `require` or `none`.
- `--local-listen`: an extra plaintext port on a loopback address only (127.0.0.1:PORT), for probes run
  inside the pod (`flynn-healthcheck` as the kubelet's exec probe: its native gRPC probe has no TLS).
  Loopback traffic never leaves the pod's network namespace.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

CLIENT_AUTH_CHOICES = ("auto", "require", "none")
# The one process whose callers are outside the mesh: it never asks them for a certificate by default.
EDGE_SERVICE = "gateway"


@dataclass(frozen=True)
class TlsFiles:
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None
    client_auth: str = "auto"
    local_listen: str = ""

    @property
    def serves_tls(self) -> bool:
        return self.cert_file is not None and self.key_file is not None

    @property
    def mesh_tls(self) -> bool:
        """Calls to other services use (mutual) TLS."""
        return self.ca_file is not None

    def requires_client_cert(self, service: str) -> bool:
        if self.client_auth == "none" or self.ca_file is None:
            return False
        return self.client_auth == "require" or service != EDGE_SERVICE

    def client_pair(self) -> tuple[Path | None, Path | None]:
        if self.client_cert_file is not None:
            return self.client_cert_file, self.client_key_file
        return self.cert_file, self.key_file


def _stamp(paths: list[Path]) -> tuple[tuple[int, int], ...]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


class ReloadingCertificate:
    """The served certificate, re-read when its files change (checked at most once per connection)."""

    def __init__(self, files: TlsFiles, require_client_cert: bool) -> None:
        assert files.cert_file is not None and files.key_file is not None
        self._files = files
        self._require = require_client_cert
        self._paths = [files.cert_file, files.key_file]
        if require_client_cert and files.ca_file is not None:
            self._paths.append(files.ca_file)
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths)
        self.reloads = 0
        self._initial = self._load()

    def _load(self) -> grpc.ServerCertificateConfiguration:
        f = self._files
        assert f.cert_file is not None and f.key_file is not None
        root = f.ca_file.read_bytes() if (self._require and f.ca_file is not None) else None
        return grpc.ssl_server_certificate_configuration(
            [(f.key_file.read_bytes(), f.cert_file.read_bytes())], root_certificates=root
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate-configuration fetcher: a new configuration when the files changed, else None."""
        try:
            with self._lock:
                stamp = _stamp(self._paths)
                if stamp == self._stamp:
                    return None
                config = self._load()
                self._stamp = stamp
                self.reloads += 1
        except OSError as e:  # half-written rotation: keep serving the previous certificate
            log.warning("TLS certificate not reloaded", extra={"error": str(e)})
            return None
        log.info("TLS certificate reloaded", extra={"cert_file": str(self._files.cert_file)})
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self.fetch,  # type: ignore[arg-type]  # grpc-stubs: the fetcher may return None (no change)
            require_client_authentication=self._require,
        )


def check_local_listen(address: str) -> str:
    """`address` when it is a loopback host:port, else SystemExit (it must never be reachable from outside)."""
    host = address.rpartition(":")[0].strip("[]")
    if host not in ("127.0.0.1", "::1", "localhost"):
        raise SystemExit(f"--local-listen must be a loopback address (127.0.0.1:PORT), not {address!r}")
    return address


def server_credentials(files: TlsFiles, service: str) -> grpc.ServerCredentials | None:
    """Credentials for the service's port, or None for plaintext."""
    if not files.serves_tls:
        if files.requires_client_cert(service):
            raise SystemExit("--tls-ca-file needs --tls-cert-file and --tls-key-file (mutual TLS)")
        return None
    return ReloadingCertificate(files, files.requires_client_cert(service)).credentials()


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials | None:
    """Credentials for calls to other services of the mesh: None (plaintext) unless a mesh CA is set."""
    if files.ca_file is None:
        return None
    cert, key = files.client_pair()
    return grpc.ssl_channel_credentials(
        root_certificates=files.ca_file.read_bytes(),
        private_key=key.read_bytes() if key is not None else None,
        certificate_chain=cert.read_bytes() if cert is not None else None,
    )


def caller_credentials(
    ca_file: str, cert_file: str = "", key_file: str = ""
) -> grpc.ChannelCredentials | None:
    """Credentials for a tool (CLI, console, launcher) calling a TLS port: None when no CA is given."""
    if not ca_file:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key_file).read_bytes() if key_file else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file else None,
    )
