"""Decoding and checking raw inputs before they reach an encoder. Every check raises `Rejected` with a reason
a person can act on; the encode job records it in rejects.jsonl and goes on with the next sample."""

import dataclasses
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from modrwkv.conversation import PLACEHOLDERS, Turn, text_length

from .items import RATE_RANGE, SAMPLE_RATE, Audio, to_16k_mono


MONO_BLOCK_VALUES = 2**18  # values decoded at once (1 MiB of float32), whatever the channel count
# a processor that resizes the shortest side (CLIP's, DINOv2's: to 224 or 256 before the crop) scales a thin image's
# long side up by as much: a 105-byte 8000x1 PNG became a 224x1.8M-pixel array (MemoryError, the job lost). A fixed
# rule, as "decodable" is: a panorama is 10:1
MAX_ASPECT_RATIO = 100


class Rejected(ValueError):
    pass


@dataclass
class Limits:
    # a 48-megapixel phone photo passes; PIL's own bomb guard (89M pixels) only warns below twice its limit
    max_image_pixels: int = 8192 * 8192
    min_image_side: int = 1
    max_audio_seconds: float = 30.0
    min_audio_seconds: float = 0.05
    min_series_length: int = 8

    def __post_init__(self):
        for name in ("max_image_pixels", "min_image_side", "min_series_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"limits.{name} must be 1 or more, got {getattr(self, name)}")
        if not 0 <= self.min_audio_seconds < self.max_audio_seconds:
            raise ValueError(f"limits: need 0 <= min_audio_seconds < max_audio_seconds, got {self.min_audio_seconds} "
                             f"and {self.max_audio_seconds}")


# each modality's own limits (what the items of its stores passed)
LIMITS_OF = {"image": ("max_image_pixels", "min_image_side"), "audio": ("max_audio_seconds", "min_audio_seconds"),
             "series": ("min_series_length",)}


def keyed_limits(limits: Limits, modality: str) -> dict:
    """The limits a store of `modality` is keyed on: its own as set, the other modalities' at their defaults, so
    that a changed audio limit no longer re-keys (and re-encodes) an image store, and a store keyed with every
    limit at its default keeps its key."""
    return {**dataclasses.asdict(Limits()), **{name: getattr(limits, name) for name in LIMITS_OF[modality]}}


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """RGB uint8 [H, W, 3]. The size is checked from the header, before any pixel is decoded."""
    if not data:
        raise Rejected("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > limits.max_image_pixels:
                raise Rejected(f"image header claims {w}x{h} pixels, over the limit of {limits.max_image_pixels} "
                               "(possible decompression bomb)")
            if min(w, h) < limits.min_image_side:
                raise Rejected(f"image is {w}x{h}, smaller than {limits.min_image_side} pixels on a side")
            if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
                raise Rejected(f"image is {w}x{h}, a side over {MAX_ASPECT_RATIO} times the other (an encoder's "
                               "resize of its short side would make the long one as many times longer)")
            im.load()
            return as_rgb(im)  # PIL's conversion of the file's mode and palette: a damaged file's to fail, too
    except Rejected:
        raise
    except Image.DecompressionBombError as e:
        raise Rejected(f"possible decompression bomb: {e}") from None
    except MemoryError:
        raise
    # whatever a damaged file makes PIL's many decoders raise (OSError, SyntaxError, TypeError from the IM reader's
    # header, NotImplementedError from DDS's pixel formats, struct.error, EOFError...): that file's reject
    except Exception as e:
        raise Rejected(f"not a readable image: {type(e).__name__}: {e}") from None


EXIF_ORIENTATION = 0x0112


def as_rgb(im: Image.Image) -> np.ndarray:
    """A decoded image as the encoders read it, RGB uint8 [H, W, 3]: the encode job's and evaluation's alike. Turned
    upright as its EXIF orientation says (a phone stores a portrait photo on its side), and transparency laid on
    white as transformers' own conversion does (PIL drops the alpha, and a diagram drawn in black on a transparent
    background became black on black)."""
    if im.getexif().get(EXIF_ORIENTATION, 1) != 1:
        im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        return wide_gray_to_rgb(im)
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        on_white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(on_white, im.convert("RGBA")).convert("RGB"))
    return np.asarray(im.convert("RGB"))


def wide_gray_to_rgb(im: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit int or float grayscale image as RGB uint8. PIL's convert("RGB") clips these to 0..255,
    which turns a 16-bit scan near white and a float one in [0, 1] black. 16-bit images are scaled by their full
    range (0..65535); 32-bit int and float ones, which have no fixed range, by their own minimum and maximum (a
    constant image is black)."""
    pixels = np.asarray(im, dtype=np.float64)
    if im.mode.startswith("I;16"):
        scaled = pixels / 257.0
    else:
        if not np.isfinite(pixels).all():
            raise Rejected(f"{int((~np.isfinite(pixels)).sum())} of the image's pixels are NaN or inf")
        low, high = pixels.min(), pixels.max()
        scaled = (pixels - low) * (255.0 / (high - low)) if high > low else np.zeros_like(pixels)
    return np.repeat(np.rint(scaled).astype(np.uint8)[..., None], 3, axis=2)


def decode_audio(data: bytes, limits: Limits) -> Audio:
    """The clip as an encoder item: mono float32 at 16 kHz (other rates resampled, channels averaged). The rate and
    length are checked from the header, before any sample is decoded: decoding allocates what the header claims,
    and a corrupt header may claim days of audio, or seconds at a megahertz."""
    import soundfile  # here: whatever trains from cached features never loads libsndfile

    if not data:
        raise Rejected("empty file")
    check_wav_length(data)
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:  # libsndfile refuses a header with a rate of 0
            rate = f.samplerate
            if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:  # a corrupt one may claim a megahertz
                raise Rejected(f"sample rate {rate} Hz is outside {RATE_RANGE[0]}-{RATE_RANGE[1]} Hz")
            claimed = f.frames / rate
            if claimed > limits.max_audio_seconds:
                raise Rejected(f"{claimed:.1f} s of audio, over the limit of {limits.max_audio_seconds} s")
            wave = read_mono(f)
    except MemoryError:
        raise Rejected("decoding it needs more memory than this process has") from None
    except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        raise Rejected(f"not a readable audio file: {e}") from None
    if wave.shape[0] == 0:
        raise Rejected("the audio has no samples")
    seconds = wave.shape[0] / rate
    if seconds < limits.min_audio_seconds:
        raise Rejected(f"{seconds * 1000:.0f} ms of audio, "
                       f"under the minimum of {limits.min_audio_seconds * 1000:.0f} ms")
    try:
        return Audio(to_16k_mono(Audio(wave, rate), "audio"), SAMPLE_RATE)
    except ValueError as e:
        raise Rejected(str(e).removeprefix("sample audio: ")) from None


UNKNOWN_WAV_SIZE = 0x7FFF0000  # a data chunk declared this large or larger: written without knowing its length


def check_wav_length(data: bytes) -> None:
    """A RIFF WAV file cut short (a download or copy that stopped) decodes as shorter audio without a word:
    libsndfile counts its frames from the bytes there, and the sample would keep its whole transcript. Its data
    chunk's declared size says how many bytes should follow; 0, and sizes from 0x7FFF0000 (about 2 GiB) up, are a
    streaming writer's "unknown" (SoX writing to a pipe declares 0x7FFFF000, others 0xFFFFFFFF). RF64 and RIFX
    files are not checked."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    at = 12
    while at + 8 <= len(data):
        chunk, size = data[at:at + 4], int.from_bytes(data[at + 4:at + 8], "little")
        if chunk == b"data":
            present = len(data) - at - 8
            if 0 < size < UNKNOWN_WAV_SIZE and size > present:
                raise Rejected(f"a truncated WAV file: its data chunk declares {size} bytes, {present} are there")
            return
        at += 8 + size + size % 2  # chunks are padded to an even length


def read_mono(f) -> np.ndarray:
    """The clip with its channels averaged block by block: decoded whole, it would take the mono clip's memory
    times the channel count, and a corrupt header may claim a thousand channels."""
    blocksize = max(1, MONO_BLOCK_VALUES // f.channels)
    blocks = []
    while len(block := f.read(blocksize, dtype="float32", always_2d=True)):  # fewer than claimed when truncated
        blocks.append(block.mean(axis=1, dtype=np.float32))
    return np.concatenate(blocks) if blocks else np.zeros(0, np.float32)


def check_series(values, limits: Limits, name: str = "series") -> np.ndarray:
    """The values as float64: a series' level can dwarf its movement (a counter at 1e7 moving by 0.01), which float32
    would round away before the window is z-scored."""
    try:
        series = np.asarray(values, dtype=np.float64)
    except (OverflowError, TypeError, ValueError) as e:  # 10**400 (JSON has no limit), text, ragged lists
        raise Rejected(f"{name} is not a list of numbers: {e}") from None
    if series.ndim != 1 or series.size < limits.min_series_length:
        raise Rejected(f"{name} has {series.size} values, fewer than {limits.min_series_length}")
    if not np.isfinite(series).all():
        raise Rejected(f"{name} has {int((~np.isfinite(series)).sum())} NaN or inf values")
    return series


def normalised_lookback(values, limits: Limits, sample_id: str, name: str = "lookback"):
    """A lookback window checked and z-scored as the model reads it: (float32 window [L, 1], float64 mean, std). The encode
    job stores it; chat and the served model feed it to the same encoder."""
    import torch  # only series need it: the image and audio checks stay torch-free

    from modrwkv.wavenet import normalize_series

    lookback = check_series(values, limits, name)
    try:
        window, mean, std = normalize_series(torch.from_numpy(lookback)[:, None], sample_id)
    except ValueError as e:
        raise Rejected(str(e)) from None
    return window.float(), mean, std  # the window in the model's float32; the float64 stats undo it exactly


def check_text(turns: list[dict], tokenizer, modality: str, n_items: int) -> None:
    """Every assistant turn has words, a sample of media or text has one (a series window's answer is its target), the
    whole conversation tokenizes, and it holds one placeholder of the sample's own modality per item (a text-only
    sample none): what the cache's lengths and the collator rely on."""
    if modality != "series" and not any(turn["role"] == "assistant" for turn in turns):
        # nothing to learn or score: a micro-batch of such samples alone stopped a training run
        raise Rejected("no assistant turn: nothing to learn or score")
    for i, turn in enumerate(turns):
        words = turn["text"]
        for placeholder in PLACEHOLDERS.values():
            words = words.replace(placeholder, "")
        if not words.strip() and turn["role"] == "assistant":
            raise Rejected(f"turn {i} ({turn['role']}) is empty")
        try:
            tokenizer.encode(turn["text"], allow_special=True)
        except (ValueError, KeyError) as e:
            raise Rejected(f"turn {i} does not tokenize: {e}") from None
        other = [p for m, p in PLACEHOLDERS.items() if m != modality and p in turn["text"]]
        if other:
            raise Rejected(f"turn {i} holds {other[0]}, a placeholder of another modality than this {modality} "
                           "sample's")
    try:
        text_length(tokenizer, [Turn(t["role"], t["text"]) for t in turns], n_items)
    except ValueError as e:
        raise Rejected(str(e).removeprefix("sample ?: ")) from None

