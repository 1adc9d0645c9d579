"""Broken and odd raw files, built the way they occur in the wild."""

import io
import struct
import zlib

import numpy as np
import soundfile
from PIL import Image


def png_bytes(size=(32, 32), seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def truncated_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def huge_header_png(width=100_000, height=100_000) -> bytes:
    """A valid small PNG whose IHDR claims a huge size (CRC fixed, so only the size check can catch it)."""
    data = bytearray(png_bytes((4, 4)))
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of header fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def wav_bytes(seconds=0.5, rate=16000, channels=1, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    wave = 0.1 * rng.standard_normal((int(seconds * rate), channels)).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def huge_header_flac(frames=2**36 - 1, rate=16000) -> bytes:
    """A valid tiny FLAC whose STREAMINFO claims `frames` samples (the most it can say: 50 days at 16 kHz, 256 GiB
    decoded) at `rate` Hz (at most about 1 MHz), as a corrupt header may; nothing checks those fields."""
    buf = io.BytesIO()
    soundfile.write(buf, np.zeros(1600, np.float32), 16000, format="FLAC", subtype="PCM_16")
    data = bytearray(buf.getvalue())
    fields = int.from_bytes(data[18:26], "big")  # rate (20 bits), channels, bits per sample, frames (36 bits)
    fields = fields & ~(2**36 - 1) & (2**44 - 1) | frames | rate << 44
    data[18:26] = fields.to_bytes(8, "big")
    return bytes(data)
