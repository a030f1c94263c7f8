"""The repository stands alone: nothing in it points at files outside it (a person who clones
Flynn has only the repository), and every `DESIGN.md §N` citation names a section that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = re.compile(r"\.\./shared\b|/work/(shared|main|wt)\b")
SECTION_CITE = re.compile(r"DESIGN\.md`?\s*§(\d+)")


def _tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = []
    for name in out.splitlines():
        if name.startswith(("gen/", "protos/baseline/")) or name.endswith((".binpb", ".png", ".wav")):
            continue
        path = ROOT / name
        if path.is_file():
            files.append(path)
    return files


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return ""


def test_nothing_points_outside_the_repository() -> None:
    offenders = []
    for path in _tracked_text_files():
        if path == Path(__file__).resolve():
            continue
        for lineno, line in enumerate(_read(path).splitlines(), 1):
            if OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()[:120]}")
    assert not offenders, "references outside the repository:\n" + "\n".join(offenders)


def test_design_section_citations_exist() -> None:
    design = (ROOT / "docs/architecture/DESIGN.md").read_text(encoding="utf-8")
    sections = {int(m) for m in re.findall(r"^## (\d+)\.", design, flags=re.M)}
    assert sections, "docs/architecture/DESIGN.md has no numbered sections"
    missing = []
    for path in _tracked_text_files():
        for m in SECTION_CITE.finditer(_read(path)):
            if int(m.group(1)) not in sections:
                missing.append(f"{path.relative_to(ROOT)}: §{m.group(1)}")
    assert not missing, "citations of DESIGN.md sections that do not exist:\n" + "\n".join(missing)
