"""espeak-ng (Debian package, GPL-3.0) run as a subprocess per sentence: `espeak-ng --stdout`.

The process boundary keeps the GPL engine out of Flynn's address space; a cancelled or timed-out
request kills its subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import subprocess
from collections.abc import AsyncIterator

from voice_svc.audio_codec import Pcm
from voice_svc.engines import ENGINE_ERROR, UNAVAILABLE, EngineFailure, SpeechOptions, VoiceDesc

DEFAULT_VOICE = "en-us"
BASE_WPM = 175


def _wav_pcm(data: bytes) -> Pcm:
    """espeak-ng streams a WAV whose size fields are placeholders: read fmt, take the rest after data."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise EngineFailure(ENGINE_ERROR, "espeak-ng did not write a WAV")
    pos, rate = 12, 0
    while pos + 8 <= len(data):
        tag, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        if tag == b"fmt ":
            channels, rate, _, _, bits = struct.unpack("<HIIHH", data[pos + 10 : pos + 24])
            if channels != 1 or bits != 16:
                raise EngineFailure(ENGINE_ERROR, f"espeak-ng wrote {channels} channels of {bits}-bit audio")
        elif tag == b"data":
            body = data[pos + 8 :]
            return Pcm(body[: len(body) // 2 * 2], rate)
        pos += 8 + size + (size & 1)
    raise EngineFailure(ENGINE_ERROR, "espeak-ng WAV has no data")


class EspeakEngine:
    name = "espeak-ng"

    def __init__(self, binary: str = "espeak-ng") -> None:
        self._binary = shutil.which(binary)
        self._voices: list[VoiceDesc] | None = None

    def unavailable_reason(self) -> str | None:
        return None if self._binary else "espeak-ng is not installed (apt-get install espeak-ng)"

    def voices(self) -> list[VoiceDesc]:
        if self._binary is None:
            return []
        if self._voices is None:
            self._voices = self._list_voices()
        return self._voices

    def _list_voices(self) -> list[VoiceDesc]:
        assert self._binary is not None
        try:
            out = subprocess.run(
                [self._binary, "--voices"], capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return [VoiceDesc(DEFAULT_VOICE, ("en-US",), self.name, 22050)]
        seen: dict[str, VoiceDesc] = {}
        for line in out.splitlines()[1:]:
            cols = line.split()
            if len(cols) < 5 or cols[4].startswith("mb/"):  # mbrola voices need extra packages
                continue
            lang = cols[1]
            if lang not in seen:
                seen[lang] = VoiceDesc(lang, (_bcp47(lang),), self.name, 22050)
        return list(seen.values())

    def pick_voice(self, name: str, language_code: str) -> str | None:
        names = {v.name.lower(): v.name for v in self.voices()}

        def lookup(key: str) -> str | None:
            key = key.lower()
            if key in names:
                return names[key]
            return next((n for k, n in names.items() if k.startswith(f"{key}-")), None)

        if name:
            return lookup(name)
        if not language_code:
            return DEFAULT_VOICE
        return lookup(language_code) or lookup(language_code.split("-")[0])

    async def start(self) -> None:
        self.voices()

    async def close(self) -> None:
        return None

    async def synthesize(self, sentences: list[str], opts: SpeechOptions) -> AsyncIterator[Pcm]:
        if self._binary is None:
            raise EngineFailure(UNAVAILABLE, "espeak-ng is not installed")
        if opts.fault == "fail":
            raise EngineFailure(ENGINE_ERROR, "fault injected: espeak-ng made to fail")
        if opts.fault == "hang":
            await asyncio.Event().wait()
        wpm = str(max(80, min(450, int(BASE_WPM * (opts.speaking_rate or 1.0)))))
        for sentence in sentences:
            yield await self._speak(sentence, opts.voice or DEFAULT_VOICE, wpm)

    async def _speak(self, text: str, voice: str, wpm: str) -> Pcm:
        assert self._binary is not None
        proc = await asyncio.create_subprocess_exec(
            self._binary,
            "--stdout",
            "--stdin",
            "-v",
            voice,
            "-s",
            wpm,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await proc.communicate(text.encode("utf-8"))
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        if proc.returncode != 0:
            raise EngineFailure(
                ENGINE_ERROR, f"espeak-ng exited {proc.returncode}: {err.decode(errors='replace')[:200]}"
            )
        return _wav_pcm(out)


def _bcp47(lang: str) -> str:
    parts = lang.split("-")
    if len(parts) >= 2 and len(parts[1]) == 2:
        parts[1] = parts[1].upper()
    return "-".join(parts)
