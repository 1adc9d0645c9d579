"""What the frozen encoders take besides images and series: an audio item carries its own sample rate, so
every encoder is called the same way, `encode(items, ids)`."""

import math
from dataclasses import dataclass

import numpy as np

# the encoder kind of a series model with its own trainable encoder (WaveNet): its items are the normalised values
RAW_SERIES = "raw"
SAMPLE_RATE = 16000  # what every speech encoder here was trained at
RATE_RANGE = (4000, 192000)


MAX_CHANNELS = 16  # more columns than this is a [channels, samples] array, not channels


@dataclass(frozen=True, eq=False)
class Audio:
    wave: np.ndarray  # [samples] or [samples, channels]: floats in [-1, 1], or integer PCM (scaled to them)
    rate: int  # Hz


def pcm_to_float(pcm: np.ndarray) -> np.ndarray:
    """Integer PCM as soundfile reads it, in [-1, 1): signed by 2^(bits-1), unsigned (8-bit WAV) about its middle."""
    half = float(2 ** (8 * pcm.dtype.itemsize - 1))
    values = pcm.astype(np.float64)
    return ((values - half if np.issubdtype(pcm.dtype, np.unsignedinteger) else values) / half).astype(np.float32)


def to_16k_mono(audio: Audio, sample_id: str) -> np.ndarray:
    """The clip as float32 mono at 16 kHz (channels averaged, other rates resampled); nonsense rates, empty
    clips and NaN/inf samples are refused naming the sample."""
    if not isinstance(audio, Audio):
        raise ValueError(f"sample {sample_id}: expected an Audio(wave, rate) item, got {type(audio).__name__}")
    wave, rate = audio.wave, audio.rate
    if hasattr(wave, "numpy"):  # a torch tensor: its integer PCM is scaled as an array's
        wave = wave.numpy()
    if isinstance(wave, np.ndarray) and np.issubdtype(wave.dtype, np.integer):  # PCM as scipy's wavfile reads it
        wave = pcm_to_float(wave)
    wave = np.asarray(wave, dtype=np.float32)
    if (isinstance(rate, bool) or not isinstance(rate, int | float | np.integer | np.floating)
            or not math.isfinite(rate) or rate != int(rate)):
        raise ValueError(f"sample {sample_id}: the sample rate must be a whole number of Hz, got {rate!r}")
    rate = int(rate)  # 44100.0 as a rate read from metadata gives it
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise ValueError(f"sample {sample_id}: sample rate {rate} Hz is outside {RATE_RANGE[0]}-{RATE_RANGE[1]} Hz")
    if wave.ndim == 2 and wave.shape[1] > MAX_CHANNELS:  # torchaudio's layout: each channel would be a 2-sample clip
        raise ValueError(f"sample {sample_id}: a {wave.shape} waveform has {wave.shape[1]} channels; give it as "
                         "[samples, channels] (transpose a [channels, samples] array)")
    if wave.ndim == 2:  # [samples, channels]
        wave = wave.mean(axis=1)
    if wave.ndim != 1 or wave.size == 0:
        raise ValueError(f"sample {sample_id}: expected a non-empty mono or [samples, channels] waveform, "
                         f"got {wave.shape}")
    if not np.isfinite(wave).all():
        raise ValueError(f"sample {sample_id}: the waveform has NaN or inf samples")
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly  # scipy: slow to import, only resampling needs it

        g = math.gcd(rate, SAMPLE_RATE)
        wave = resample_poly(wave, SAMPLE_RATE // g, rate // g).astype(np.float32)
    return wave
