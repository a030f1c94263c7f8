"""One memory budget for all regexes of the reaction rules (issue 15), through the real gateway:
a rule list whose regexes do not fit their shares of the budget is refused with INVALID_ARGUMENT
naming each offending regex field, and nothing is committed; a list that fits is accepted."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from flynn.v1 import config_pb2, config_pb2_grpc
from google.protobuf import field_mask_pb2

from flynn_runtime import config_yaml
from flynn_runtime.rich_status import from_rpc_error
from tests.support.mesh import ServiceProcess, Tokens, as_call, free_port, make_tokens

BUDGET = 200_000  # bytes: 20 regexes get 5,000 bytes each (two compilations per regex)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Tokens]]:
    root = tmp_path_factory.mktemp("regexbudget")
    tokens = make_tokens(root)
    config = ServiceProcess(
        "config",
        "config_svc.main",
        root / "config",
        tokens,
        env={"FLYNN_REGEX_MEMORY_BUDGET_BYTES": str(BUDGET)},
    )
    gw = None
    try:
        config.start(timeout=60)
        dead = {b: f"127.0.0.1:{free_port()}" for b in ("queue", "reactions", "nodes", "voice")}
        gw = ServiceProcess(
            "gateway", "gateway.main", root / "gateway", tokens, addresses={"config": config.address, **dead}
        ).start(timeout=60)
        yield gw.address, tokens
    finally:
        if gw is not None:
            gw.stop()
        config.stop()


def _rules(regexes: list[str]) -> config_pb2.FlynnConfig:
    return config_yaml.dict_to_config(
        {
            "automation.reactions": [
                {
                    "id": f"r{i}",
                    "trigger": {"event": "message_received", "regex": rx},
                    "actions": [{"ack": {"emoji": "👀"}}],
                }
                for i, rx in enumerate(regexes)
            ]
        }
    )


def _update(address: str, tokens: Tokens, cfg: config_pb2.FlynnConfig) -> config_pb2.UpdateConfigResponse:
    with grpc.insecure_channel(address) as ch:
        stub = config_pb2_grpc.ConfigServiceStub(ch)
        head = stub.GetConfig(
            config_pb2.GetConfigRequest(), metadata=tokens.md("operator"), timeout=10
        ).revision
        resp: config_pb2.UpdateConfigResponse = stub.UpdateConfig(
            config_pb2.UpdateConfigRequest(
                config=cfg,
                update_mask=field_mask_pb2.FieldMask(paths=["automation.reactions"]),
                expected_revision=head,
                reason="regex budget test",
            ),
            metadata=tokens.md("operator"),
            timeout=30,
        )
    return resp


def test_regexes_over_the_total_budget_are_refused_naming_each_field(gateway: tuple[str, Tokens]) -> None:
    address, tokens = gateway
    heavy = [r"\w{500}" if i % 2 else r"\bhello\b" for i in range(20)]
    with pytest.raises(grpc.RpcError) as ei:
        _update(address, tokens, _rules(heavy))
    assert as_call(ei.value).code() == grpc.StatusCode.INVALID_ARGUMENT
    rich = from_rpc_error(ei.value)  # type: ignore[arg-type]
    assert rich is not None
    fields = {v.field for v in rich.violations}
    heavy_fields = {f"automation.reactions[{i}].trigger.regex" for i in range(1, 20, 2)}
    # Every heavy regex is named, each once; an error echoes a bounded number of violations and
    # counts the rest (ErrorInfo violations_omitted), so the trailer stays within gRPC's limits.
    omitted = int(rich.metadata.get("violations_omitted", "0"))
    assert fields <= heavy_fields and len(rich.violations) == len(fields)
    assert len(fields) + omitted == len(heavy_fields), (sorted(fields), omitted)
    assert all("memory budget of 200000 bytes" in v.description for v in rich.violations)


def test_regexes_within_the_budget_are_accepted(gateway: tuple[str, Tokens]) -> None:
    address, tokens = gateway
    resp = _update(address, tokens, _rules([r"\bhello\b", r"(foo|bar)\s+\d+", r"\w{500}"]))
    assert resp.revision >= 2
