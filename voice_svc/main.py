"""The voice service process: `python -m voice_svc.main` (flynn-voice).

Fault injection (tests and drills only): `--fail-engines piper,espeak-ng` makes those engines fail
with engine_error; `--hang-engines piper` makes them never answer (the chain times them out and
kills the piper worker). Environment: FLYNN_VOICE_FAIL_ENGINES / FLYNN_VOICE_HANG_ENGINES.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import grpc
from flynn.v1 import voice_pb2_grpc

from flynn_runtime import config_yaml, settings
from flynn_runtime.config_source import ConfigSource, StaticConfig
from flynn_runtime.config_watcher import ConfigWatcher
from flynn_runtime.server import Runtime, ServiceApp, run_service
from flynn_runtime.settings import env_arg
from voice_svc.engines import FaultSwitch
from voice_svc.espeak_engine import EspeakEngine
from voice_svc.piper_engine import PiperEngine
from voice_svc.recognizers import SphinxEngine, WhisperEngine
from voice_svc.servicer import VoiceServicer
from voice_svc.voice_chain import VoiceChain

log = logging.getLogger(__name__)


def add_args(p: argparse.ArgumentParser) -> None:
    env_arg(
        p,
        "fail-engines",
        "",
        "FAULT INJECTION: comma-separated engines that fail with engine_error",
        env="voice_fail_engines",
    )
    env_arg(
        p,
        "hang-engines",
        "",
        "FAULT INJECTION: comma-separated engines that never answer",
        env="voice_hang_engines",
    )
    env_arg(
        p,
        "voice-config-file",
        "",
        "YAML FlynnConfig used instead of watching the config service (for tools, benchmarks and tests "
        "without the mesh)",
    )


class VoiceApp(ServiceApp):
    service_names = ("flynn.v1.Voice",)

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime)
        extra = runtime.settings.extra
        self.faults = FaultSwitch.parse(
            str(extra.get("fail_engines", "")), str(extra.get("hang_engines", ""))
        )
        self.config = self._config_source(str(extra.get("voice_config_file") or ""))
        self.chain = VoiceChain(
            self.config,
            tts=[PiperEngine(), EspeakEngine()],
            stt=[WhisperEngine(), SphinxEngine()],
            faults=self.faults,
        )
        if self.faults.fail or self.faults.hang:
            log.warning(
                "voice fault injection active",
                extra={"fail": sorted(self.faults.fail), "hang": sorted(self.faults.hang)},
            )

    def _config_source(self, config_file: str) -> ConfigSource:
        if config_file:
            return StaticConfig(
                config_yaml.yaml_to_config(Path(config_file).read_text(encoding="utf-8")), revision=1
            )
        return ConfigWatcher(self.runtime)

    def register(self, server: grpc.aio.Server) -> None:
        voice_pb2_grpc.add_VoiceServicer_to_server(VoiceServicer(self.runtime, self.chain), server)

    async def start(self) -> None:
        start = getattr(self.config, "start", None)
        if start is not None:
            await start()
        await self.chain.start()

    async def stop(self) -> None:
        stop = getattr(self.config, "stop", None)
        if stop is not None:
            await stop()

    async def close(self) -> None:
        await self.chain.close()


def main() -> None:
    run_service(settings.parse("voice", add_args=add_args), VoiceApp)


if __name__ == "__main__":
    main()
