"""Replay a labelled event corpus against a rule set and print precision, recall and false-positive rate.

    python -m reactions_svc.replay --rules reactions_svc/corpus/example_rules.yaml \
        --corpus reactions_svc/corpus/example_corpus.jsonl [--show-errors] [--max-fp-rate 0.03]

Rules: a YAML config in the format of config/flynn.yaml (only automation.reactions is read; a bare list
of rules or {reactions: [...]} works too), validated like the config service does.
Corpus: JSON lines {"event": {...ReactionEvent fields...}, "expected": [rule ids], "at": seconds}; `type`
and `causation.origin` take friendly names (message_received, reaction). `at` is the event's time on
a simulated clock (cooldowns and fire windows run on it); it defaults to the previous event + 1 s.

The engine runs offline, exactly as the service evaluates (same compiler, same order, same state
rules), without acting. Figures, over (event, rule) decisions of rules listening to the event type:
  precision            TP / (TP + FP)
  recall               TP / (TP + FN)
  false-positive rate  FP / (TP + FP): the share of fires that should not have happened, the same
                       definition as the rollout gate (flagged false positives / matches, <= 3%)
  fall-out             FP / (FP + TN): the classical false-positive rate, for reference
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from flynn.v1 import common_pb2, config_pb2, reactions_pb2
from google.protobuf import json_format

from flynn_runtime import config_yaml
from reactions_svc import engine
from reactions_svc.proposed_rules import validate_rule_list
from reactions_svc.rules import RuleSet


def load_rules(path: Path) -> list[config_pb2.ReactionRule]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        data = {"automation": {"reactions": data}}
    elif isinstance(data, dict) and "reactions" in data and "automation" not in data:
        data = {"automation": {"reactions": data["reactions"]}}
    cfg = config_yaml.dict_to_config(data)
    return list(cfg.automation.reactions)


def parse_event(d: dict[str, Any]) -> reactions_pb2.ReactionEvent:
    d = dict(d)
    if "type" in d and isinstance(d["type"], str):
        d["type"] = config_yaml.enum_from_text(config_pb2.ReactionEventType.DESCRIPTOR, d["type"])
    cz = d.get("causation")
    if isinstance(cz, dict) and isinstance(cz.get("origin"), str):
        cz = dict(cz)
        cz["origin"] = config_yaml.enum_from_text(common_pb2.Origin.DESCRIPTOR, cz["origin"])
        d["causation"] = cz
    ev = reactions_pb2.ReactionEvent()
    json_format.ParseDict(d, ev)
    return ev


@dataclass
class Tally:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, predicted: bool, expected: bool) -> None:
        if predicted and expected:
            self.tp += 1
        elif predicted:
            self.fp += 1
        elif expected:
            self.fn += 1
        else:
            self.tn += 1

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def fp_rate(self) -> float:
        return self.fp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def fall_out(self) -> float:
        return self.fp / (self.fp + self.tn) if self.fp + self.tn else 0.0


@dataclass
class Report:
    events: int = 0
    total: Tally = field(default_factory=Tally)
    per_rule: dict[str, Tally] = field(default_factory=dict)
    skip_reasons: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def replay(rules: Sequence[config_pb2.ReactionRule], lines: Sequence[str]) -> Report:
    rs = RuleSet(list(rules), 0)
    state = engine.FireState()
    report = Report()
    for c in rs.rules:
        report.per_rule[c.id] = Tally()
    clock = 0.0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        row = json.loads(line)
        ev = parse_event(row["event"])
        clock = float(row.get("at", clock + 1.0))
        expected = set(row.get("expected", []))
        unknown = expected - set(rs.by_id)
        if unknown:
            raise ValueError(f"corpus line {n}: expected rule ids not in the rule set: {sorted(unknown)}")
        result = engine.evaluate(ev, rs, state, clock)
        report.events += 1
        for t in result.traces:
            if not t.listening and t.rule_id not in expected:
                continue  # a rule of another event type: not a decision about this event
            predicted, wanted = t.matched, t.rule_id in expected
            report.per_rule[t.rule_id].add(predicted, wanted)
            report.total.add(predicted, wanted)
            if not t.matched:
                name = engine.reason_name(t.reason)
                report.skip_reasons[name] = report.skip_reasons.get(name, 0) + 1
            if predicted != wanted:
                kind = "false positive" if predicted else "false negative"
                why = "" if predicted else f" ({engine.reason_name(t.reason)}: {t.detail})"
                text = ev.text if len(ev.text) <= 60 else ev.text[:60] + "…"
                report.errors.append(
                    f"{kind}: {t.rule_id} on {ev.event_id} {text!r}{why} [{row.get('note', '')}]"
                )
    return report


def render(report: Report, rules_path: str, corpus_path: str) -> str:
    out = [
        f"rules:  {rules_path} ({len(report.per_rule)} rules)",
        f"corpus: {corpus_path} ({report.events} events)",
        "",
        f"{'rule':<22} {'TP':>5} {'FP':>5} {'FN':>5} {'TN':>5} {'precision':>10} {'recall':>8} {'fp rate':>8}",
    ]
    for rid, t in sorted(report.per_rule.items()):
        out.append(
            f"{rid:<22} {t.tp:>5} {t.fp:>5} {t.fn:>5} {t.tn:>5} {t.precision:>10.3f} {t.recall:>8.3f} {t.fp_rate:>8.3f}"
        )
    t = report.total
    out += [
        f"{'ALL':<22} {t.tp:>5} {t.fp:>5} {t.fn:>5} {t.tn:>5} {t.precision:>10.3f} {t.recall:>8.3f} {t.fp_rate:>8.3f}",
        "",
        f"precision           {t.precision:.3f}",
        f"recall              {t.recall:.3f}",
        f"false-positive rate {t.fp_rate:.3f}  (FP / fires; the rollout gate is <= 0.030)",
        f"fall-out            {t.fall_out:.3f}  (FP / (FP + TN))",
        "skips by reason     " + ", ".join(f"{k}={v}" for k, v in sorted(report.skip_reasons.items())),
    ]
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reactions_svc.replay", description=__doc__.split("\n")[0])
    p.add_argument("--rules", required=True, help="YAML rules (config/flynn.yaml format)")
    p.add_argument("--corpus", required=True, help="labelled corpus, JSON lines")
    p.add_argument("--show-errors", action="store_true", help="list every false positive and false negative")
    p.add_argument(
        "--max-fp-rate", type=float, default=None, help="exit 1 when the false-positive rate is above"
    )
    args = p.parse_args(argv)
    try:
        rules = load_rules(Path(args.rules))
    except config_yaml.ConfigParseError as err:
        print(f"invalid rules file: {err}", file=sys.stderr)
        return 2
    violations = validate_rule_list(rules)
    if violations:
        for v in violations:
            print(f"invalid rule: {v.field}: {v.description}", file=sys.stderr)
        return 2
    report = replay(rules, Path(args.corpus).read_text(encoding="utf-8").splitlines())
    print(render(report, args.rules, args.corpus))
    if args.show_errors:
        print("\nerrors:")
        for e in report.errors:
            print("  " + e)
    if args.max_fp_rate is not None and report.total.fp_rate > args.max_fp_rate:
        print(f"\nFAIL: false-positive rate {report.total.fp_rate:.3f} > {args.max_fp_rate:.3f}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
