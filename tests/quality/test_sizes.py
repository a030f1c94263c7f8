"""Size gates: no handwritten function over 80 lines, no class over 500 lines.

Long functions and classes are where a reader loses the thread; the limits keep the heart of each
service readable in one sitting. Every handwritten Python file counts (services, runtime, CLI,
launcher, console, examples, benchmarks, scripts and tests); generated code (gen/) does not. Lines
are counted from the first decorator to the last line of the body, docstrings and comments included.

The few that stay above a limit are listed in ALLOWED with the reason; the test fails on any new
one, and on an entry that no longer needs its place (so the list only shrinks).
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 500

_FAULT_SCENARIO = (
    "one fault scenario against real processes (start, load, kill -9 or stop the database, restart, "
    "check the invariants): its steps share the live processes and the counts taken before the fault, "
    "and read in order; each phase is commented"
)

# "path::qualified name": why it stays longer than the limit.
ALLOWED: dict[str, str] = {
    "tests/runtime/test_database_outage.py::test_postgres_crash_under_load": _FAULT_SCENARIO,
    "tests/flow/test_fault.py::test_mixed_load_survives_kill9_of_each_stateful_service": _FAULT_SCENARIO,
    "tests/reactions/test_with_queue.py::test_real_queue_sigkill_mid_stream_and_recursion_guard": _FAULT_SCENARIO,
    "tests/nodes/test_canvas_crash.py::test_sigkill_during_puts_loses_no_acknowledged_put": _FAULT_SCENARIO,
    "tests/gateway/test_rough_edges.py::test_huge_ids_and_many_bad_entries_keep_the_error_model": (
        "a table of bad inputs against one running mesh, each row a call and its expected error; "
        "the length is the table"
    ),
    "tests/config/test_config_process.py::test_cli_against_a_real_server": (
        "the CLI's commands in the order an operator runs them against one real server, each "
        "step reading what the previous one wrote"
    ),
    "tests/gateway/test_launcher.py::test_up_status_restart_and_stop": (
        "the launcher's life cycle on one real mesh (up, status, restart a child, stop), each step on "
        "the state the previous one left"
    ),
    "tests/flow/test_playbook.py::test_every_rollback_command_flips_its_behaviour_everywhere": (
        "the rollback playbook of docs/operations, command by command against one mesh, each checked "
        "on every service it reaches"
    ),
    "tests/tracing/test_traces.py::test_a_voice_message_without_traceparent_is_one_trace_started_by_the_gateway": (
        "one trace across the gateway, voice and run control, asserted span by span as the exported "
        "trace reads"
    ),
}


def _python_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    tracked = [ROOT / n for n in out.stdout.splitlines() if not n.startswith("gen/")]
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return sorted({*tracked, *(ROOT / n for n in untracked if not n.startswith("gen/"))})


def _too_long(tree: ast.AST, path: str) -> dict[str, int]:
    """{"path::qualified name": lines} of the functions and classes over their limit."""
    found: dict[str, int] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                lines = (child.end_lineno or child.lineno) - first + 1
                limit = MAX_CLASS_LINES if isinstance(child, ast.ClassDef) else MAX_FUNCTION_LINES
                name = f"{prefix}{child.name}"
                if lines > limit:
                    found[f"{path}::{name}"] = lines
                walk(child, f"{name}.")
            else:
                walk(child, prefix)

    walk(tree, "")
    return found


def offenders() -> dict[str, int]:
    found: dict[str, int] = {}
    for path in _python_files():
        if path.is_file():
            rel = path.relative_to(ROOT).as_posix()
            found.update(_too_long(ast.parse(path.read_text(encoding="utf-8"), rel), rel))
    return found


def test_no_new_long_functions_or_classes() -> None:
    new = {k: n for k, n in offenders().items() if k not in ALLOWED}
    assert not new, (
        f"over {MAX_FUNCTION_LINES} lines (function) or {MAX_CLASS_LINES} lines (class); split them: "
        + ", ".join(f"{k} ({n} lines)" for k, n in sorted(new.items()))
    )


def test_the_allowlist_only_names_what_still_needs_it() -> None:
    stale = sorted(set(ALLOWED) - set(offenders()))
    assert not stale, f"within the limits now; remove from ALLOWED: {', '.join(stale)}"


def test_the_gate_counts_what_it_says() -> None:
    long_body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    source = (
        f"class C:\n    def ok(self) -> None:\n        pass\n\n@decorator\ndef f() -> None:\n{long_body}\n"
    )
    found = _too_long(ast.parse(source), "m.py")
    assert found == {"m.py::f": MAX_FUNCTION_LINES + 2}
