"""Every command and FLYNN_* setting named by the Dockerfile and the chart exists in the code."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import re
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from flynn_runtime import settings, topology
from flynn_runtime.server import Runtime, ServiceApp, running
from tests.helm.conftest import ROOT, Manifest, parse, render
from tests.helm.test_manifests import console_workload, env_of, main_container, pod_specs, workloads
from tests.support.mesh import Tokens, make_settings

SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def resolve(script: str) -> Callable[..., Any]:
    module, _, func = SCRIPTS[script].partition(":")
    target = getattr(importlib.import_module(module), func)
    assert callable(target)
    return target  # type: ignore[no-any-return]


def dockerfile_commands() -> list[str]:
    """Executables in CMD/ENTRYPOINT (exec form) and in RUN lines that call a flynn-* script."""
    out = []
    for m in re.finditer(r"^(CMD|ENTRYPOINT)\s+(\[.*\])", DOCKERFILE, re.M):
        out.append(eval(m.group(2))[0])  # noqa: S307 - a JSON list of strings from our own file
    instructions = re.sub(r"\\\n", " ", DOCKERFILE).splitlines()  # continuation lines joined
    out += re.findall(r"\b(flynn-[a-z]+)\b(?= )", "\n".join(i for i in instructions if i.startswith("RUN ")))
    return out


def test_topology_scripts_are_console_scripts() -> None:
    for info in topology.SERVICES.values():
        assert SCRIPTS[info.console_script] == f"{info.module}:main", info.name


def test_dockerfile_entrypoints_exist() -> None:
    cmds = dockerfile_commands()
    assert cmds[0] == "/usr/bin/tini" and "flynn-gateway" in cmds and "flynn-healthcheck" in cmds
    for cmd in cmds:
        if cmd.startswith("flynn"):
            resolve(cmd)


def test_dockerfile_copies_every_package_the_project_installs() -> None:
    sources = [
        src.rstrip("/")
        for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE, re.M)
        for src in line.split()[:-1]
    ]
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
    packages = {p.rstrip("*").removesuffix(".") for p in includes if "." not in p.rstrip("*")} - {"flynn"}
    assert packages <= set(sources), packages - set(sources)
    assert "gen" in sources and "requirements.lock" in sources
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for path in sources:
        assert (ROOT / path).exists(), f"Dockerfile copies {path}, which is not in the repository"
        assert f"!{path}" in ignore or f"!{path}/" in ignore, f".dockerignore excludes {path}"


def test_dockerfile_is_non_root_and_pinned() -> None:
    # The published base is pinned by digest (a base made locally is passed by its own digest).
    assert re.search(
        r"^ARG BASE_IMAGE=(docker\.io/library/)?python:3\.11\.\d+-slim-bookworm@sha256:[a-f0-9]{64}$",
        DOCKERFILE,
        re.M,
    )
    stages = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^FROM \S+ AS (\S+)\n(.*?)(?=^FROM |\Z)", DOCKERFILE, re.M | re.S)
    }
    for image in ("runtime", "voice"):
        users = re.findall(r"^USER (\S+)", stages[image], re.M)
        assert users and users[-1].split(":")[0] not in ("root", "0"), image
    assert "espeak-ng" in stages["voice"] and "espeak-ng" not in stages["runtime"]
    # Python packages only from the hash-pinned locks, offline, exactly as locked.
    installs = re.findall(r"pip install ([^;]+);?", DOCKERFILE)
    assert installs and all(
        "-r " not in i or ("--no-deps" in i and "--require-hashes" in i) for i in installs
    )
    assert "PIP_NO_INDEX=1" in DOCKERFILE


def chart_commands(docs: list[Manifest]) -> Iterator[tuple[str, str]]:
    for where, spec in pod_specs(docs):
        for c in spec["containers"] + spec.get("initContainers", []):
            argv = c.get("command", []) + c.get("args", [])
            yield where, argv[0]


def test_chart_commands_are_console_scripts(rendered: list[Manifest]) -> None:
    seen = set()
    for where, cmd in chart_commands(rendered):
        assert cmd in SCRIPTS, f"{where} runs {cmd}, not a console script of pyproject.toml"
        assert "main" in SCRIPTS[cmd]
        resolve(cmd)
        seen.add(cmd)
    assert seen == {i.console_script for i in topology.SERVICES.values()} | {
        "flynn-healthcheck",
        "flynn-console",
    }


class _Captured(Exception):
    def __init__(self, add_args: Callable[[argparse.ArgumentParser], None] | None) -> None:
        self.add_args = add_args


# Processes the chart runs besides the gRPC services of topology: name -> module of their main().
OTHER_PROCESSES = {"console": "console.main"}


def service_parser(name: str) -> argparse.ArgumentParser:
    """The parser the real `<pkg>.main.main()` builds: shared flags plus the service's own add_args."""
    module_name = OTHER_PROCESSES[name] if name in OTHER_PROCESSES else topology.SERVICES[name].module
    module = importlib.import_module(module_name)

    def capture(service: str, argv: Any = None, add_args: Any = None) -> settings.Settings:
        assert service == name
        raise _Captured(add_args)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(_Captured) as exc:
        mp.setattr(settings, "parse", capture)
        if hasattr(module, "parse"):
            mp.setattr(module, "parse", capture)
        module.main()
    parser = settings.build_parser(name)
    if exc.value.add_args is not None:
        exc.value.add_args(parser)
    return parser


def _parse_with(name: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    # Defaults are read from the environment when the parser is built, so build it under `env`.
    for k in list(os.environ):
        if k.startswith("FLYNN_"):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    try:
        parser = service_parser(name)
        return vars(parser.parse_args([]))
    finally:
        for k in list(os.environ):
            if k.startswith("FLYNN_"):
                os.environ.pop(k)


def unread_env_vars(name: str, container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """FLYNN_* variables of a container that the service's parser does not turn into its setting."""
    env = {k: (v if v != "<valueFrom>" else "pod-0") for k, v in env_of(container).items()}
    assert all(k.startswith("FLYNN_") for k in env), "the chart sets only Flynn settings"
    baseline = _parse_with(name, {}, monkeypatch)
    everything = _parse_with(name, env, monkeypatch)  # the chart's values parse as a whole
    unread = []
    for var, value in env.items():
        changed = {k for k, v in _parse_with(name, {var: value}, monkeypatch).items() if baseline[k] != v}
        if not changed:  # the chart's value equals the default: probe with another one
            changed = {k for k, v in _parse_with(name, {var: "7"}, monkeypatch).items() if baseline[k] != v}
        if not changed:
            unread.append(var)
        for dest in changed:
            if isinstance(everything[dest], bool):  # a switch: "1" turns it on
                assert everything[dest] is (value == "1"), (var, dest)
            elif not var.endswith("_FILE"):
                assert str(everything[dest]).removesuffix(".0") == str(value).removesuffix(".0"), (var, dest)
    return unread


@pytest.mark.parametrize("name", sorted(topology.SERVICES))
def test_every_flynn_env_var_the_chart_sets_is_read_by_the_service(
    rendered: list[Manifest], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert unread_env_vars(name, main_container(workloads(rendered)[name]), monkeypatch) == []


def test_every_flynn_env_var_the_chart_sets_is_read_by_the_console(
    rendered: list[Manifest], monkeypatch: pytest.MonkeyPatch
) -> None:
    container = main_container(console_workload(rendered))
    assert {"FLYNN_HTTP_LISTEN", "FLYNN_GATEWAY_ADDR", "FLYNN_DATA_DIR"} <= set(env_of(container))
    assert unread_env_vars("console", container, monkeypatch) == []


def test_console_env_cross_check_covers_the_secure_cookie_switch(
    helm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = parse(
        render(
            helm,
            "--set", "console.secureCookie=true",
            "--set", "console.extraEnv[0].name=FLYNN_NOT_A_SETTING", "--set", "console.extraEnv[0].value=x",
        )
    )  # fmt: skip
    container = main_container(console_workload(docs))
    assert env_of(container)["FLYNN_SECURE_COOKIE"] == "1"
    assert unread_env_vars("console", container, monkeypatch) == ["FLYNN_NOT_A_SETTING"]


def test_env_cross_check_catches_a_setting_nobody_reads(helm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = parse(
        render(
            helm,
            "--set",
            "config.extraEnv[0].name=FLYNN_NOT_A_SETTING",
            "--set",
            "config.extraEnv[0].value=x",
            "--set",
            "config.extraEnv[1].name=FLYNN_BOOKMARK_SECONDS",
            "--set-string",
            "config.extraEnv[1].value=30",
        )
    )
    assert unread_env_vars("config", main_container(workloads(docs)["config"]), monkeypatch) == [
        "FLYNN_NOT_A_SETTING"
    ]


def test_healthcheck_cli_against_a_real_server(tokens: Tokens, tmp_path: Path) -> None:
    class Probe(ServiceApp):
        service_names = ("flynn.v1.Probe",)

        def register(self, server: grpc.aio.Server) -> None:
            pass

    async def scenario() -> tuple[int, int, str]:
        async with running(make_settings("gateway", tmp_path, tokens), lambda rt: Probe(rt)) as srv:
            exe = [sys.executable, "-m", "flynn_runtime.healthcheck", "--timeout", "10"]
            ok = await asyncio.create_subprocess_exec(
                *exe, f"{srv.address}/", f"{srv.address}/flynn.v1.Probe"
            )
            bad = await asyncio.create_subprocess_exec(
                *exe[:-1], "2", f"{srv.address}/flynn.v1.Missing", stdout=asyncio.subprocess.PIPE
            )
            out, _ = await asyncio.wait_for(bad.communicate(), 30)
            return await asyncio.wait_for(ok.wait(), 30), bad.returncode or 0, out.decode()

    ok_rc, bad_rc, bad_out = asyncio.run(scenario())
    assert ok_rc == 0
    assert bad_rc == 1 and "FAIL" in bad_out and "NOT_FOUND" in bad_out


def test_runtime_type_is_used() -> None:
    # Keeps the import of Runtime meaningful for readers: the probe app above is a real ServiceApp.
    assert issubclass(ServiceApp, object) and Runtime is not None


def test_dockerfile_env_names_settings_the_services_read(monkeypatch: pytest.MonkeyPatch) -> None:
    env_blocks = "".join(re.findall(r"^ENV .*?(?=^\S)", DOCKERFILE, re.M | re.S))
    image_env = dict(re.findall(r"\b(FLYNN_[A-Z0-9_]+)=(\S+)", env_blocks))
    assert {"FLYNN_DATA_DIR", "FLYNN_SEED_FILE"} <= set(image_env)
    for var, value in image_env.items():
        readers = [
            name
            for name in topology.SERVICES
            if not unread_env_vars(name, {"env": [{"name": var, "value": value}]}, monkeypatch)
        ]
        assert readers, f"no service reads {var} (set by the Dockerfile)"
