"""Build Flynn's container images (Dockerfile) with podman, or docker when only docker runs.

    scripts/build-image                    # FROM the published python image (pinned by digest)
    scripts/build-image --base debian      # FROM a base made here: mmdebstrap + podman import
    scripts/build-image --tag dev --no-voice

Steps, each cached under the cache directory (FLYNN_CACHE_DIR, else /var/cache/flynn as root, else
~/.cache/flynn), so a second run on the same machine only rebuilds what changed:
1. wheelhouse/: `pip download --no-deps --require-hashes` of every lock the image installs, outside
   the build (PyPI is not reachable with verified TLS from inside a build here, nor at all in an
   air-gapped network); skipped while the locks are unchanged.
2. with --base debian: base/debian-bookworm-minbase-nodoc.tar from `mmdebstrap --variant=minbase
   bookworm` (SOURCE_DATE_EPOCH fixed; dpkg set to leave out manuals, translations and docs but
   copyright files), imported once as localhost/flynn-debian-base and passed to the build
   by its own digest.
3. the build, target by target (base, build, build-voice, voice, runtime), with the wheelhouse as the
   build context "wheels"; then the size of each stage's image is printed.

Images: localhost/flynn:<tag> (runtime) and localhost/flynn-voice:<tag> (voice).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
# What the image installs (requirements-dev.lock and -browser.lock are the checkout's tools only).
IMAGE_LOCKS = (
    "requirements.lock",
    "requirements-build.lock",
    "requirements-voice.lock",
    "requirements-models.lock",
)
STAGES = ("base", "build", "build-voice", "voice", "runtime")
FINAL = {"runtime": "localhost/flynn", "voice": "localhost/flynn-voice"}
DEBIAN_BASE = "localhost/flynn-debian-base"
DEBIAN_SUITE = "bookworm"
# Podman's default limits exceed these machines' hard limits (nofile 20000): containers start only
# with explicit, lower ones.
ULIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")
SOURCE_DATE_EPOCH = "1700000000"
# dpkg in the base (and in every image built on it) leaves out manuals, translations and docs, but
# keeps each package's copyright file (the licences of the GPL packages ship with the image).
DPKG_OPTS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/info/*",
)
BASE_FLAVOUR = "minbase-nodoc"


def log(msg: str) -> None:
    print(f"[build-image] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    env = os.environ.get("FLYNN_CACHE_DIR")
    if env:
        path = Path(env)
    elif os.geteuid() == 0:
        path = Path("/var/cache/flynn")
    else:
        path = Path.home() / ".cache" / "flynn"
    path.mkdir(parents=True, exist_ok=True)
    return path


def engine() -> list[str]:
    """The container engine command: rootful podman with runc, else a docker whose daemon answers."""
    if shutil.which("podman"):
        return ["podman", "--runtime", "runc"] if shutil.which("runc") else ["podman"]
    if shutil.which("docker"):
        ok = subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0
        if ok:
            return ["docker"]
    raise SystemExit("no container engine: install podman and runc (scripts/bootstrap.sh --with-image)")


def published_base() -> str:
    match = re.search(r"^ARG BASE_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert match, "Dockerfile: no ARG BASE_IMAGE default"
    return match.group(1)


def _pip_python() -> str:
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def locks_digest() -> str:
    h = hashlib.sha256()
    for name in IMAGE_LOCKS:
        h.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return h.hexdigest()


def wheelhouse(cache: Path) -> Path:
    """Every wheel the image installs, downloaded and hash-checked outside the build."""
    dest = cache / "wheelhouse"
    stamp = dest / ".locks-sha256"
    want = locks_digest()
    if stamp.exists() and stamp.read_text() == want:
        return dest
    dest.mkdir(parents=True, exist_ok=True)
    for name in IMAGE_LOCKS:
        log(f"wheelhouse: pip download {name}")
        cmd = [_pip_python(), "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps"]
        subprocess.run([*cmd, "--require-hashes", "-d", str(dest), "-r", str(ROOT / name)], check=True)
    stamp.write_text(want)
    return dest


def debian_base(cache: Path, eng: list[str]) -> str:
    """A Debian minbase made from Debian's packages, imported once; returned pinned by its digest."""
    tar = cache / "base" / f"debian-{DEBIAN_SUITE}-{BASE_FLAVOUR}.tar"
    if not tar.exists():
        if not shutil.which("mmdebstrap"):
            raise SystemExit("--base debian needs mmdebstrap (scripts/bootstrap.sh --with-image)")
        tar.parent.mkdir(parents=True, exist_ok=True)
        part = tar.with_suffix(".tar.part")
        log(f"base: mmdebstrap --variant=minbase {DEBIAN_SUITE} {tar}")
        env = dict(os.environ, SOURCE_DATE_EPOCH=SOURCE_DATE_EPOCH)
        opts = [f"--dpkgopt={o}" for o in DPKG_OPTS]
        cmd = ["mmdebstrap", "--variant=minbase", "--format=tar", "--quiet", *opts, DEBIAN_SUITE, str(part)]
        subprocess.run(cmd, check=True, env=env)
        part.rename(tar)
    tar_sha = hashlib.sha256(tar.read_bytes()).hexdigest()
    ref = f"{DEBIAN_BASE}:{DEBIAN_SUITE}-{tar_sha[:16]}"
    if subprocess.run([*eng, "image", "inspect", ref], capture_output=True).returncode != 0:
        log(f"base: import {tar.name} as {ref}")
        subprocess.run([*eng, "import", str(tar), ref], check=True, stdout=subprocess.DEVNULL)
    digest = _inspect(eng, ref, "{{.Digest}}")
    return f"{DEBIAN_BASE}@{digest}" if digest.startswith("sha256:") else ref


def _inspect(eng: list[str], ref: str, fmt: str) -> str:
    out = subprocess.run(
        [*eng, "image", "inspect", "--format", fmt, ref], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@dataclass(frozen=True)
class Built:
    runtime: str
    voice: str
    base: str
    sizes: dict[str, int]
    seconds: float


def build(
    base: str = "published",
    tag: str = "dev",
    voice: bool = True,
    quiet: bool = False,
    every_stage: bool = True,
) -> Built:
    """Build the images; every_stage=False builds only the two final targets (no per-stage sizes)."""
    start = time.monotonic()
    eng = engine()
    cache = cache_dir()
    wheels = wheelhouse(cache)
    base_ref = (
        debian_base(cache, eng) if base == "debian" else (published_base() if base == "published" else base)
    )
    log(f"base image: {base_ref}")
    stages = [s for s in STAGES if (voice or "voice" not in s) and (every_stage or s in FINAL)]
    sizes: dict[str, int] = {}
    for stage in stages:
        ref = FINAL.get(stage, "localhost/flynn-stage") + (f":{tag}" if stage in FINAL else f":{tag}-{stage}")
        cmd = [*eng, "build", *ULIMITS, "--build-context", f"wheels={wheels}"]
        cmd += ["--build-arg", f"BASE_IMAGE={base_ref}", "--target", stage, "-t", ref, "-f", str(DOCKERFILE)]
        log(f"stage {stage} -> {ref}")
        proc = subprocess.run(
            [*cmd, str(ROOT)],
            stdout=subprocess.PIPE if quiet else None,
            stderr=subprocess.STDOUT if quiet else None,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stdout or "")[-4000:]
            hint = ""
            if stage == "base" and base == "published":
                hint = (
                    f"\n(is {base_ref} pullable here? without a registry: scripts/build-image --base debian)"
                )
            raise SystemExit(f"build of stage {stage} failed (exit {proc.returncode})\n{tail}{hint}")
        sizes[stage] = int(_inspect(eng, ref, "{{.Size}}"))
    built = Built(
        runtime=f"{FINAL['runtime']}:{tag}",
        voice=f"{FINAL['voice']}:{tag}" if voice else "",
        base=base_ref,
        sizes=sizes,
        seconds=time.monotonic() - start,
    )
    print_sizes(built)
    return built


def print_sizes(built: Built) -> None:
    print(f"{'stage':<12} {'size':>9}  image")
    for stage, size in built.sizes.items():
        name = FINAL.get(stage, "localhost/flynn-stage")
        print(f"{stage:<12} {size / 1e6:>6.0f} MB  {name}")
    print(f"base: {built.base}")
    print(f"built in {built.seconds:.0f} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--base",
        default="published",
        help="published (python image pinned in the Dockerfile), debian (made here), or an image reference",
    )
    ap.add_argument("--tag", default="dev")
    ap.add_argument("--no-voice", action="store_true", help="skip the voice image")
    ap.add_argument("--json", action="store_true", help="print the result as JSON on the last line")
    args = ap.parse_args()
    built = build(base=args.base, tag=args.tag, voice=not args.no_voice)
    if args.json:
        print(json.dumps(built.__dict__))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
