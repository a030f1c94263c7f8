"""The replay tool on the shipped example rules and labelled corpus."""

from __future__ import annotations

from pathlib import Path

import pytest

from reactions_svc import replay

CORPUS = Path(replay.__file__).parent / "corpus"


def test_shipped_corpus_and_rules(capsys: pytest.CaptureFixture[str]) -> None:
    lines = (CORPUS / "example_corpus.jsonl").read_text().splitlines()
    assert len(lines) >= 200
    code = replay.main(
        [
            "--rules",
            str(CORPUS / "example_rules.yaml"),
            "--corpus",
            str(CORPUS / "example_corpus.jsonl"),
            "--max-fp-rate",
            "0.03",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "precision" in out and "recall" in out and "false-positive rate" in out
    report = replay.replay(replay.load_rules(CORPUS / "example_rules.yaml"), lines)
    assert report.events == len(lines)
    assert report.total.fp_rate <= 0.03 and report.total.tp > 200
    assert report.skip_reasons["recursion_guard"] > 0 and report.skip_reasons["cooldown"] > 0


def test_first_draft_rules_fail_the_gate(capsys: pytest.CaptureFixture[str]) -> None:
    code = replay.main(
        [
            "--rules",
            str(CORPUS / "example_rules_v1_keywords.yaml"),
            "--corpus",
            str(CORPUS / "example_corpus.jsonl"),
            "--max-fp-rate",
            "0.03",
            "--show-errors",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "false positive: help-desk" in out and "'no help needed, thanks!'" in out


def test_invalid_rules_are_refused_with_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "automation:\n  reactions:\n"
        "    - {id: r1, enabled: true, trigger: {event: message_received, regex: '(x'}, actions: [{reply: {text: hi}}]}\n"
    )
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("")
    assert replay.main(["--rules", str(bad), "--corpus", str(corpus)]) == 2
    assert "automation.reactions[0].trigger.regex" in capsys.readouterr().err
