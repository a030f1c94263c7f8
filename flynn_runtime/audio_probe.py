"""How long a voice note is, read from its container's header alone (no decoding, no dependency).

Used by the gateway (SendMessage) and the voice service (Transcribe) to refuse audio longer than
the cap before any decoder runs. WAV: frames / rate from the header. MP3: frame count of a
Xing/Info/VBRI header when present, else size x 8 / bitrate of the first frame (constant bit rate).
Ogg Opus: granule position of the last page / 48 kHz. Unknown containers give None: the decoder's own
caps (flynn_runtime.limits audio_seconds, voice_svc.audio_codec) bound them instead.
"""

from __future__ import annotations

import io
import struct
import wave

DEFAULT_MAX_SECONDS = 300  # five minutes: plenty for a voice note (issue 15)

_MP3_BITRATES = {  # kbit/s, MPEG-1 Layer III, and MPEG-2/2.5 Layer III
    1: (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 0),
    2: (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160, 0),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}


def container(data: bytes) -> str:
    """wav, ogg, mp3 or '' from the magic bytes."""
    if data[:4] == b"RIFF" and data[8:12] == b"WAVE":
        return "wav"
    if data[:4] == b"OggS":
        return "ogg"
    if data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and (data[1] & 0xE0) == 0xE0):
        return "mp3"
    return ""


def duration_seconds(data: bytes) -> float | None:
    kind = container(data)
    try:
        if kind == "wav":
            return _wav(data)
        if kind == "mp3":
            return _mp3(data)
        if kind == "ogg":
            return _ogg(data)
    except Exception:  # noqa: BLE001 - the stdlib WAV reader raises many types (even RuntimeError) on hostile input
        return None
    return None


def _wav(data: bytes) -> float | None:
    with wave.open(io.BytesIO(data), "rb") as w:
        rate = w.getframerate()
        frames = w.getnframes()
        frame_bytes = w.getnchannels() * w.getsampwidth()
    if rate <= 0 or frame_bytes <= 0:
        return None
    # A header may claim more frames than the body holds: count what is there.
    frames = min(frames, max(len(data) - 44, 0) // frame_bytes)
    return frames / rate


def _mp3(data: bytes) -> float | None:
    pos = 0
    if data[:3] == b"ID3" and len(data) >= 10:
        size = (data[6] << 21) | (data[7] << 14) | (data[8] << 7) | data[9]
        pos = 10 + size
    end = min(len(data) - 4, pos + 64 * 1024)
    while pos < end and not (data[pos] == 0xFF and (data[pos + 1] & 0xE0) == 0xE0):
        pos += 1
    if pos >= end:
        return None
    h = struct.unpack(">I", data[pos : pos + 4])[0]
    version = (h >> 19) & 3  # 3 = MPEG-1, 2 = MPEG-2, 0 = MPEG-2.5
    if version == 1 or ((h >> 17) & 3) != 1:  # reserved version, or not Layer III
        return None
    bitrate = _MP3_BITRATES[1 if version == 3 else 2][(h >> 12) & 0xF] * 1000
    rate_idx = (h >> 10) & 3
    if bitrate == 0 or rate_idx == 3:
        return None
    rate = _MP3_RATES[version][rate_idx]
    samples_per_frame = 1152 if version == 3 else 576
    mono = ((h >> 6) & 3) == 3
    side = (17 if mono else 32) if version == 3 else (9 if mono else 17)
    tag = data[pos + 4 + side : pos + 8 + side]
    if tag in (b"Xing", b"Info"):
        flags = struct.unpack(">I", data[pos + 8 + side : pos + 12 + side])[0]
        if flags & 1:
            frames = int(struct.unpack(">I", data[pos + 12 + side : pos + 16 + side])[0])
            return frames * samples_per_frame / rate
    vbri = data[pos + 36 : pos + 40]
    if vbri == b"VBRI":
        frames = int(struct.unpack(">I", data[pos + 50 : pos + 54])[0])
        return frames * samples_per_frame / rate
    return (len(data) - pos) * 8 / bitrate


def _ogg(data: bytes) -> float | None:
    if b"OpusHead" not in data[:512]:
        return None
    last = data.rfind(b"OggS")
    if last < 0 or last + 14 > len(data):
        return None
    granule = int(struct.unpack("<q", data[last + 6 : last + 14])[0])
    return max(granule, 0) / 48000
