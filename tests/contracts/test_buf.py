"""buf lint / format / breaking on the protos, against the committed baseline image."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from tests.contracts.conftest import BASELINE, ROOT


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


def test_buf_lint(buf: str) -> None:
    out = run(buf, "lint")
    assert out.returncode == 0, out.stdout + out.stderr


def test_buf_format_clean(buf: str) -> None:
    out = run(buf, "format", "-d", "--exit-code")
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr


def test_no_breaking_change_against_the_baseline(buf: str) -> None:
    assert BASELINE.exists(), "create it with: buf build -o protos/baseline/flynn-v1.binpb"
    out = run(buf, "breaking", "--against", str(BASELINE))
    assert out.returncode == 0, out.stdout + out.stderr


def _copy_module(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(ROOT / "protos" / "flynn", tmp_path / "protos" / "flynn")
    return tmp_path


def test_breaking_check_fails_when_a_field_is_removed(buf: str, tmp_path: Path) -> None:
    module = _copy_module(tmp_path)
    proto = module / "protos" / "flynn" / "v1" / "config.proto"
    text = proto.read_text()
    edited = re.sub(r"(message GetConfigRequest \{\n(?:\s*//.*\n)*)\s*int64 revision = 1;\n", r"\1", text)
    assert edited != text, "the field to remove was not found"
    proto.write_text(edited)
    out = run(buf, "breaking", "--against", str(BASELINE), cwd=module)
    assert out.returncode != 0
    assert 'Previously present field "1" with name "revision" on message "GetConfigRequest" was deleted' in (
        out.stdout + out.stderr
    )


def test_breaking_check_fails_when_a_method_is_removed(buf: str, tmp_path: Path) -> None:
    module = _copy_module(tmp_path)
    proto = module / "protos" / "flynn" / "v1" / "voice.proto"
    text = proto.read_text()
    edited = re.sub(r"\n\s*//[^\n]*\n\s*rpc ListVoices\([^)]*\) returns \([^)]*\);", "", text)
    assert edited != text
    proto.write_text(edited)
    out = run(buf, "breaking", "--against", str(BASELINE), cwd=module)
    assert out.returncode != 0
    assert "ListVoices" in out.stdout + out.stderr
