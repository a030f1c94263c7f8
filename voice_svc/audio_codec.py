"""Audio containers and conversions, following the Google Cloud TTS/STT conventions.

LINEAR16 is 16-bit little-endian mono PCM inside a WAV container (headerless when streamed);
OGG_OPUS and MP3 are encoded and decoded by the ffmpeg CLI (Debian package, a GPL build) in a
subprocess; without ffmpeg those encodings are refused as unsupported. Recognition input is turned
into 16 kHz mono PCM here, bounded before decoding: audio longer than the cap (default 300 s) is
refused from its header, ffmpeg is told the container (never probes), its output is cut at the cap
and read bounded, and at most a few decodes run at once (DecoderPool). Bad input raises INVALID_ARGUMENT
naming the field; no grpc in this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import wave
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
from flynn.v1 import common_pb2

from flynn_runtime import audio_probe
from flynn_runtime.audio_probe import DEFAULT_MAX_SECONDS
from flynn_runtime.errors import Code, FlynnError, invalid_argument, resource_exhausted

RECOGNITION_RATE = 16000
MIN_RATE = 8000
MAX_RATE = 48000
# Opus only runs at these rates; other rates are resampled to 48 kHz before encoding.
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)

LINEAR16 = common_pb2.AUDIO_ENCODING_LINEAR16
OGG_OPUS = common_pb2.AUDIO_ENCODING_OGG_OPUS
MP3 = common_pb2.AUDIO_ENCODING_MP3
UNSPECIFIED = common_pb2.AUDIO_ENCODING_UNSPECIFIED


@dataclass(frozen=True)
class Pcm:
    """Mono 16-bit little-endian samples at a rate."""

    data: bytes
    sample_rate: int

    @property
    def samples(self) -> int:
        return len(self.data) // 2

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate if self.sample_rate else 0.0

    def concat(self, other: Pcm) -> Pcm:
        if self.sample_rate != other.sample_rate and self.data:
            other = resample(other, self.sample_rate)
        return Pcm(self.data + other.data, other.sample_rate if not self.data else self.sample_rate)


def wav_bytes(pcm: Pcm) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(pcm.sample_rate)
        w.writeframes(pcm.data)
    return buf.getvalue()


@dataclass(frozen=True)
class WavInfo:
    channels: int
    sample_width: int
    sample_rate: int
    frames: bytes


def parse_wav(data: bytes, field: str = "audio_content") -> WavInfo:
    """Read a PCM WAV; INVALID_ARGUMENT on `field` when it is not one."""
    try:
        with wave.open(io.BytesIO(data), "rb") as w:
            info = WavInfo(w.getnchannels(), w.getsampwidth(), w.getframerate(), w.readframes(w.getnframes()))
    except Exception as e:  # the stdlib reader raises many types (even RuntimeError) on hostile input
        raise invalid_argument(field, f"is not a readable PCM WAV file ({type(e).__name__})") from e
    if info.sample_width != 2:
        raise invalid_argument(field, f"WAV must hold 16-bit samples, has {8 * info.sample_width}-bit")
    if not 1 <= info.channels <= 8 or not MIN_RATE <= info.sample_rate <= 192000:
        raise invalid_argument(
            field, f"WAV header is implausible ({info.channels} channels, {info.sample_rate} Hz)"
        )
    if not info.frames:
        raise invalid_argument(field, "WAV holds no samples")
    return info


def to_mono(frames: bytes, channels: int) -> bytes:
    if channels == 1:
        return frames
    a = np.frombuffer(frames[: len(frames) // (2 * channels) * 2 * channels], dtype="<i2").reshape(
        -1, channels
    )
    return bytes(a.mean(axis=1).astype("<i2").tobytes())


def resample(pcm: Pcm, rate: int) -> Pcm:
    """Linear-interpolation resampling (adequate for speech at these rates; no extra dependency)."""
    if pcm.sample_rate == rate or not pcm.data:
        return Pcm(pcm.data, rate)
    src = np.frombuffer(pcm.data, dtype="<i2").astype(np.float32)
    n_out = max(1, int(round(len(src) * rate / pcm.sample_rate)))
    x_out = np.arange(n_out, dtype=np.float64) * (pcm.sample_rate / rate)
    out = np.interp(x_out, np.arange(len(src), dtype=np.float64), src)
    return Pcm(np.clip(out, -32768, 32767).astype("<i2").tobytes(), rate)


def is_silent(pcm: Pcm, threshold: int = 100) -> bool:
    if not pcm.data:
        return True
    a = np.frombuffer(pcm.data, dtype="<i2")
    return int(np.abs(a.astype(np.int32)).max()) < threshold


FFMPEG_TIMEOUT = 30.0


def ffmpeg_path() -> str | None:
    return shutil.which("ffmpeg")


async def encode(pcm: Pcm, encoding: int) -> tuple[bytes, int]:
    """Encoded audio and its sample rate (Opus may change the rate)."""
    if encoding in (UNSPECIFIED, LINEAR16):
        return wav_bytes(pcm), pcm.sample_rate
    if encoding == OGG_OPUS:
        if pcm.sample_rate not in OPUS_RATES:
            pcm = resample(pcm, 48000)
        return await _ffmpeg_encode(pcm, "ogg", "libopus", "32k"), pcm.sample_rate
    if encoding == MP3:
        return await _ffmpeg_encode(pcm, "mp3", "libmp3lame", "64k"), pcm.sample_rate
    raise invalid_argument("audio_config.encoding", f"unsupported encoding {encoding}")


async def _run_ffmpeg(args: list[str], data: bytes, max_output: int | None = None) -> bytes:
    """Run the ffmpeg CLI (Debian package, a GPL build: kept behind a process boundary).

    With `max_output`, at most that many bytes (plus one, to tell) are read before ffmpeg is killed."""
    binary = ffmpeg_path()
    if binary is None:
        raise FileNotFoundError("ffmpeg")
    proc = await asyncio.create_subprocess_exec(
        binary, "-hide_banner", "-loglevel", "error", "-nostdin", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    stdin, stdout, stderr = proc.stdin, proc.stdout, proc.stderr
    limit = max_output + 1 if max_output is not None else None

    async def feed() -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            stdin.write(data)
            await stdin.drain()
            stdin.close()

    async def collect() -> bytes:
        chunks: list[bytes] = []
        size = 0
        while limit is None or size < limit:
            chunk = await stdout.read(65536 if limit is None else min(65536, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)

    try:
        _, out, err = await asyncio.wait_for(
            asyncio.gather(feed(), collect(), stderr.read(64 * 1024)), FFMPEG_TIMEOUT
        )
        if limit is not None and len(out) >= limit:
            return out  # the caller refuses it; ffmpeg is killed below
        await asyncio.wait_for(proc.wait(), FFMPEG_TIMEOUT)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            with contextlib.suppress(Exception):
                await proc.wait()
    if proc.returncode != 0:
        raise ValueError(err.decode(errors="replace").strip()[-300:] or f"ffmpeg exited {proc.returncode}")
    return out


async def _ffmpeg_encode(pcm: Pcm, fmt: str, codec: str, bit_rate: str) -> bytes:
    if ffmpeg_path() is None:
        raise invalid_argument(
            "audio_config.encoding", f"{fmt} output needs ffmpeg, which is not installed here"
        )
    args = ["-f", "s16le", "-ar", str(pcm.sample_rate), "-ac", "1", "-i", "pipe:0"]
    args += ["-c:a", codec, "-b:a", bit_rate, "-f", fmt, "pipe:1"]
    try:
        return await _run_ffmpeg(args, pcm.data)
    except (OSError, ValueError, TimeoutError) as e:
        raise FlynnError(Code.UNAVAILABLE, f"{fmt} encoding failed: {e}", reason="ENCODER_FAILED") from e


class DecoderPool:
    """At most `slots` ffmpeg decodes at once; a request that cannot get a slot within `wait` seconds is
    refused with RESOURCE_EXHAUSTED / DECODERS_BUSY (retry after a second) instead of queueing."""

    def __init__(self, slots: int = 2, wait: float = 1.0) -> None:
        self.slots = slots
        self._sem = asyncio.Semaphore(slots)
        self._wait = wait

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._sem.acquire(), self._wait)
        except TimeoutError:
            raise resource_exhausted(
                f"all {self.slots} audio decoders are busy; retry later",
                reason="DECODERS_BUSY",
                retry_after=1.0,
            ) from None
        try:
            yield
        finally:
            self._sem.release()


_DEFAULT_POOL: DecoderPool | None = None


def _default_pool() -> DecoderPool:
    global _DEFAULT_POOL
    if _DEFAULT_POOL is None:
        _DEFAULT_POOL = DecoderPool()
    return _DEFAULT_POOL


def too_long(field: str, seconds: float, max_seconds: float) -> FlynnError:
    return invalid_argument(
        field,
        f"is {seconds:.0f} s of audio; at most {max_seconds:.0f} s allowed (a voice note, not a recording)",
        reason="AUDIO_TOO_LONG",
    )


async def decode_compressed(
    data: bytes,
    fmt: str,
    *,
    field: str = "audio_content",
    max_seconds: float = DEFAULT_MAX_SECONDS,
    pool: DecoderPool | None = None,
) -> Pcm:
    """Decode Ogg/Opus or MP3 to 16 kHz mono PCM; INVALID_ARGUMENT when it cannot be decoded or is too long.

    The container is named to ffmpeg (`-f ogg` / `-f mp3`: no format probing of hostile input), the
    output is cut at max_seconds + 1 and read bounded, and decodes run under the pool's limit."""
    if ffmpeg_path() is None:
        raise invalid_argument(
            "config.encoding", "compressed input needs ffmpeg, which is not installed here"
        )
    cap = max_seconds + 1
    args = ["-f", fmt, "-i", "pipe:0", "-vn", "-t", f"{cap:g}"]
    args += ["-f", "s16le", "-ac", "1", "-ar", str(RECOGNITION_RATE), "pipe:1"]
    max_bytes = int(cap * RECOGNITION_RATE * 2)
    async with (pool or _default_pool()).slot():
        try:
            out = await _run_ffmpeg(args, data, max_output=max_bytes)
        except (OSError, ValueError, TimeoutError) as e:
            raise invalid_argument(field, f"cannot be decoded ({str(e)[:200]})") from e
    pcm = Pcm(out[: len(out) // 2 * 2], RECOGNITION_RATE)
    if not pcm.data:
        raise invalid_argument(field, "holds no decodable audio")
    if pcm.duration_s > max_seconds:
        raise too_long(field, pcm.duration_s, max_seconds)
    return pcm


def sniff(data: bytes) -> str:
    """Container guessed from magic bytes: wav, ogg, mp3 or ''."""
    return audio_probe.container(data)


async def recognition_input(
    data: bytes,
    encoding: int,
    sample_rate_hertz: int,
    *,
    max_seconds: float = DEFAULT_MAX_SECONDS,
    pool: DecoderPool | None = None,
) -> Pcm:
    """The request's audio as 16 kHz mono PCM, or INVALID_ARGUMENT naming the offending field.

    Audio longer than `max_seconds` is refused from its header before any decoding (and again from
    the decoded length, should a header lie). A WAV header's values win (any rate and channel count
    is resampled/mixed down); headerless LINEAR16 must be 16 kHz mono and say so in
    config.sample_rate_hertz.
    """
    kind = sniff(data)
    claimed = audio_probe.duration_seconds(data)
    if kind == "" and encoding == LINEAR16:
        claimed = len(data) / (2 * RECOGNITION_RATE)
    if claimed is not None and claimed > max_seconds:
        raise too_long("audio_content", claimed, max_seconds)
    if kind == "wav":
        info = parse_wav(data)
        pcm = Pcm(to_mono(info.frames, info.channels), info.sample_rate)
        if pcm.duration_s > max_seconds:
            raise too_long("audio_content", pcm.duration_s, max_seconds)
        return resample(pcm, RECOGNITION_RATE)
    if encoding == OGG_OPUS or (encoding == UNSPECIFIED and kind == "ogg"):
        if kind != "ogg":
            raise invalid_argument("audio_content", "is not an Ogg stream (config.encoding is OGG_OPUS)")
        return await decode_compressed(data, "ogg", max_seconds=max_seconds, pool=pool)
    if encoding == MP3 or (encoding == UNSPECIFIED and kind == "mp3"):
        if kind != "mp3":
            raise invalid_argument("audio_content", "is not MP3 audio (config.encoding is MP3)")
        return await decode_compressed(data, "mp3", max_seconds=max_seconds, pool=pool)
    if encoding == LINEAR16:
        if sample_rate_hertz != RECOGNITION_RATE:
            raise invalid_argument(
                "config.sample_rate_hertz",
                f"headerless LINEAR16 must be 16000 Hz mono and say so; got {sample_rate_hertz}",
            )
        if len(data) % 2:
            raise invalid_argument("audio_content", "headerless LINEAR16 must hold whole 16-bit samples")
        return Pcm(data, RECOGNITION_RATE)
    raise invalid_argument(
        "audio_content", "is not a WAV, Ogg or MP3 file; send headerless PCM with config.encoding LINEAR16"
    )
