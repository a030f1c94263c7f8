"""The canvas archive file: every artifact with its kept versions and metadata, and a manifest of
sha256 per version (no gRPC here; flynn_cli/canvas_cmds.py talks to the mesh).

One tar file (gzip-compressed when its name ends in .gz or .tgz):

    versions/000001/3.bin     content of version 3 of the first artifact
    …
    manifest.json             written last: format, creation time, source, and per artifact its
                              name and kept versions (version, etag, content type, sha256, size,
                              update time, actor, path of its content in the archive)

`write` goes to a temporary file next to the target and renames it into place only after `verify`
read it back from disk: every version listed is there, with the size and sha256 the manifest says.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

FORMAT = "flynn-canvas-archive"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ArchiveError(Exception):
    """The archive is unreadable, incomplete or does not match its manifest."""


@dataclass(frozen=True)
class VersionEntry:
    version: int
    etag: str
    content_type: str
    sha256: str
    size_bytes: int
    update_time: str
    actor: str
    path: str


@dataclass
class ArtifactEntry:
    name: str
    versions: list[VersionEntry] = field(default_factory=list)

    @property
    def latest(self) -> VersionEntry:
        return max(self.versions, key=lambda v: v.version)


@dataclass
class Manifest:
    created: str
    source: str
    artifacts: list[ArtifactEntry] = field(default_factory=list)

    @property
    def version_count(self) -> int:
        return sum(len(a.versions) for a in self.artifacts)

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": self.created,
            "source": self.source,
            "artifacts": [
                {"name": a.name, "versions": [asdict(v) for v in a.versions]} for a in self.artifacts
            ],
        }
        return json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"

    @staticmethod
    def from_json(data: bytes) -> Manifest:
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
                raise ArchiveError(f"not a {FORMAT} v{FORMAT_VERSION} archive")
            return Manifest(
                created=str(doc["created"]),
                source=str(doc["source"]),
                artifacts=[
                    ArtifactEntry(str(a["name"]), [VersionEntry(**v) for v in a["versions"]])
                    for a in doc["artifacts"]
                ],
            )
        except (ValueError, KeyError, TypeError) as e:
            raise ArchiveError(f"unreadable manifest: {e}") from None


@dataclass(frozen=True)
class Version:
    """One version as read from the mesh, content included."""

    name: str
    version: int
    etag: str
    content_type: str
    sha256: str
    update_time: str
    actor: str
    content: bytes


def _gz(name: str) -> bool:
    return name.endswith((".gz", ".tgz"))


def _open_for_writing(path: Path, name: str) -> tarfile.TarFile:
    return tarfile.open(path, "w:gz") if _gz(name) else tarfile.open(path, "w")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o600
    tar.addfile(info, io.BytesIO(data))


def write(path: Path, source: str, artifacts: Iterable[tuple[str, Iterable[Version]]]) -> Manifest:
    """Write every artifact's versions, then the manifest; verify; move into place. Raises ArchiveError
    when content read from the mesh does not match the sha256 the mesh reported for it."""
    manifest = Manifest(created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), source=source)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _open_for_writing(tmp, path.name) as tar:
            for i, (name, versions) in enumerate(artifacts, start=1):
                entry = ArtifactEntry(name)
                for v in versions:
                    digest = hashlib.sha256(v.content).hexdigest()
                    if digest != v.sha256:
                        raise ArchiveError(
                            f"{name} version {v.version}: content has sha256 {digest}, the canvas says {v.sha256}"
                        )
                    member = f"versions/{i:06d}/{v.version}.bin"
                    _add(tar, member, v.content)
                    entry.versions.append(
                        VersionEntry(
                            v.version,
                            v.etag,
                            v.content_type,
                            v.sha256,
                            len(v.content),
                            v.update_time,
                            v.actor,
                            member,
                        )
                    )
                entry.versions.sort(key=lambda e: e.version)
                if entry.versions:
                    manifest.artifacts.append(entry)
            _add(tar, MANIFEST, manifest.to_json())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        verify(tmp, gz_name=path.name)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return manifest


def _open(path: Path, gz_name: str | None = None) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:gz") if _gz(gz_name or path.name) else tarfile.open(path, "r")
    except (OSError, tarfile.TarError) as e:
        raise ArchiveError(f"cannot read {path}: {e}") from None


def read_manifest(path: Path, gz_name: str | None = None) -> Manifest:
    with _open(path, gz_name) as tar:
        return _manifest_of(tar)


def _manifest_of(tar: tarfile.TarFile) -> Manifest:
    try:
        fh = tar.extractfile(MANIFEST)
    except KeyError:
        raise ArchiveError(f"no {MANIFEST}: not a canvas archive (or an incomplete one)") from None
    if fh is None:
        raise ArchiveError(f"{MANIFEST} is not a file")
    return Manifest.from_json(fh.read())


def verify(path: Path, gz_name: str | None = None) -> Manifest:
    """Every version of the manifest is in the archive with its size and sha256."""
    with _open(path, gz_name) as tar:
        manifest = _manifest_of(tar)
        for a in manifest.artifacts:
            for v in a.versions:
                data = _member(tar, v.path)
                if len(data) != v.size_bytes or hashlib.sha256(data).hexdigest() != v.sha256:
                    raise ArchiveError(f"{a.name} version {v.version}: content does not match its sha256")
    return manifest


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    try:
        fh = tar.extractfile(name)
    except KeyError:
        raise ArchiveError(f"{name} is missing") from None
    if fh is None:
        raise ArchiveError(f"{name} is not a file")
    return fh.read()


def contents(path: Path) -> Iterator[tuple[ArtifactEntry, VersionEntry, bytes]]:
    """Every version with its content, artifacts in manifest order, versions ascending (verified)."""
    with _open(path) as tar:
        manifest = _manifest_of(tar)
        for a in manifest.artifacts:
            for v in sorted(a.versions, key=lambda e: e.version):
                data = _member(tar, v.path)
                if hashlib.sha256(data).hexdigest() != v.sha256:
                    raise ArchiveError(f"{a.name} version {v.version}: content does not match its sha256")
                yield a, v, data
