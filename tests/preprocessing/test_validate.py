"""Decoding checks: each bad input is refused with a reason a person can act on; odd-but-fine ones convert."""

import io
import struct

import numpy as np
import pytest
from PIL import Image

from modrwkv.tokenizer import WorldTokenizer
from preprocessing.validate import Limits, Rejected, check_series, check_text, decode_audio, decode_image

from .bad_inputs import huge_header_flac, huge_header_png, png_bytes, truncated_jpeg, wav_bytes

LIMITS = Limits()


def test_images():
    image = decode_image(png_bytes((20, 30)), LIMITS)
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    with pytest.raises(Rejected, match="empty file"):
        decode_image(b"", LIMITS)
    with pytest.raises(Rejected, match="not a readable image"):
        decode_image(truncated_jpeg(), LIMITS)
    with pytest.raises(Rejected, match="possible decompression bomb"):
        decode_image(huge_header_png(), LIMITS)  # over PIL's own hard limit
    with pytest.raises(Rejected, match="claims 9000x9000 pixels, over the limit of 67108864"):
        decode_image(huge_header_png(9000, 9000), LIMITS)  # PIL would only warn; our limit refuses
    phone = io.BytesIO()
    Image.new("L", (8000, 6000)).save(phone, "PNG")  # 48 megapixels, as phones take them
    assert decode_image(phone.getvalue(), LIMITS).shape == (6000, 8000, 3)
    for size, refused in (((8000, 1), True), ((1, 101), True), ((100, 1), False), ((3000, 300), False)):
        thin = io.BytesIO()
        Image.new("L", size).save(thin, "PNG")  # 8000x1: a 105-byte file a shortest-side resize made 1.8M pixels
        if refused:
            with pytest.raises(Rejected, match=f"image is {size[0]}x{size[1]}, a side over 100 times the other"):
                decode_image(thin.getvalue(), LIMITS)
        else:
            assert decode_image(thin.getvalue(), LIMITS).shape == (size[1], size[0], 3)
    with pytest.raises(Rejected, match="not a readable image"):
        decode_image(b"this is text", LIMITS)
    im_file = image_bytes(np.zeros((20, 20, 3), np.uint8), "IM").replace(b"20*20", b"20*2.")  # a corrupt size
    with pytest.raises(Rejected, match="not a readable image"):  # PIL's IM reader raises TypeError on it
        decode_image(im_file, LIMITS)
    # a DDS header of pixel format flags PIL does not know: NotImplementedError, which stopped the job
    dds = b"DDS " + struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + bytes(44) + struct.pack("<2I", 32, 3) + bytes(104)
    with pytest.raises(Rejected, match="not a readable image: NotImplementedError: Unknown pixel format flags 3"):
        decode_image(dds, LIMITS)


def image_bytes(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def test_wide_grayscale_images_keep_their_gradient():
    """PIL's convert("RGB") clips 16-bit, 32-bit int and float grayscale to 0..255: a 16-bit scan came out near
    white, a float one in [0, 1] black."""
    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    expected = np.rint(ramp * 255)
    for pixels, fmt in (((ramp * 65535).astype(np.uint16), "PNG"), ((ramp * 65535).astype(np.uint16), "TIFF"),
                        ((ramp * 4e6 - 1e6).astype(np.int32), "TIFF"), (ramp.astype(np.float32), "TIFF")):
        image = decode_image(image_bytes(pixels, fmt), LIMITS)
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        assert (image == image[..., :1]).all()  # gray stays gray
        assert np.abs(image[..., 0] - expected).max() <= 1, (pixels.dtype, fmt)
    dim = decode_image(image_bytes(np.full((8, 8), 257 * 40, np.uint16), "PNG"), LIMITS)
    assert (dim == 40).all()  # 16-bit: by its full range, not stretched
    holes = np.ones((8, 8), np.float32)
    holes[2, 3] = np.nan
    with pytest.raises(Rejected, match="1 of the image's pixels are NaN or inf"):
        decode_image(image_bytes(holes, "TIFF"), LIMITS)


def test_transparency_is_laid_on_white_and_photos_turned_upright():
    """A diagram drawn in black on a transparent background decoded black on black (PIL drops the alpha); a
    portrait photo a phone stores on its side (EXIF orientation 6) decoded on its side. As transformers'
    `load_image` and `convert_to_rgb` give them, so evaluation's images match the caches'."""
    from transformers.image_transforms import convert_to_rgb
    from transformers.image_utils import load_image

    drawing = np.zeros((20, 20, 4), np.uint8)
    drawing[10, :, 3] = 255  # one opaque black line
    for pixels, mode in ((drawing, "RGBA"), (drawing[..., [0, 3]], "LA")):
        image = decode_image(image_bytes(pixels, "PNG"), LIMITS)
        assert (image[0] == 255).all() and (image[10] == 0).all(), mode
        assert np.array_equal(image, np.asarray(convert_to_rgb(Image.fromarray(pixels, mode))))
    palette = Image.fromarray(drawing[..., 0]).convert("P")
    buf = io.BytesIO()
    palette.save(buf, "PNG", transparency=0)  # a palette image's transparent index
    assert (decode_image(buf.getvalue(), LIMITS) == 255).all()

    photo = Image.fromarray(np.tile(np.arange(40, dtype=np.uint8) * 6, (20, 1))[..., None].repeat(3, 2))
    exif = photo.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    buf = io.BytesIO()
    photo.save(buf, "JPEG", exif=exif, quality=95)
    upright = decode_image(buf.getvalue(), LIMITS)
    assert upright.shape == (40, 20, 3)
    assert np.array_equal(upright, np.asarray(load_image(Image.open(io.BytesIO(buf.getvalue()))).convert("RGB")))


def test_audio():
    audio = decode_audio(wav_bytes(0.5, rate=8000, channels=2), LIMITS)  # 8 kHz stereo: accepted, resampled
    assert audio.rate == 16000 and audio.wave.shape == (8000,) and audio.wave.dtype == np.float32
    with pytest.raises(Rejected, match="not a readable audio file"):
        decode_audio(b"just some text, named .wav", LIMITS)
    with pytest.raises(Rejected, match="empty file"):
        decode_audio(b"", LIMITS)
    with pytest.raises(Rejected, match="over the limit of 1.0 s"):
        decode_audio(wav_bytes(2.0), Limits(max_audio_seconds=1.0))
    with pytest.raises(Rejected, match="the audio has no samples"):
        decode_audio(wav_bytes(0.0), LIMITS)


def test_audio_length_is_checked_from_the_header_before_anything_is_decoded(monkeypatch):
    """Decoding allocates what the header claims: a corrupt one claiming 50 days (256 GiB of samples) is refused
    from the header, where decoding it would end the job with a MemoryError."""
    import soundfile

    with pytest.raises(Rejected, match=r"4294967\.3 s of audio, over the limit of 30\.0 s"):
        decode_audio(huge_header_flac(), LIMITS)

    def out_of_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(soundfile.SoundFile, "read", out_of_memory)  # a header within the limit, a host without
    with pytest.raises(Rejected, match="needs more memory than this process has"):
        decode_audio(wav_bytes(0.5), LIMITS)
    # 29 s at 1 MHz: within the length limit, a gigabyte decoded; the rate is refused from the header (read fails)
    with pytest.raises(Rejected, match="sample rate 1000000 Hz is outside 4000-192000 Hz"):
        decode_audio(huge_header_flac(frames=29_000_000, rate=1_000_000), LIMITS)


def test_audio_channels_are_averaged_as_they_are_decoded():
    """Decoded whole, 64 channels would take 64 times the mono clip's memory (a corrupt header may claim 1024)."""
    import tracemalloc

    import soundfile

    data = wav_bytes(2.0, channels=64)  # 8 MiB as float32, 125 KiB mono
    tracemalloc.start()
    audio = decode_audio(data, LIMITS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 3 * 2**20, peak
    whole = soundfile.read(io.BytesIO(data), dtype="float32")[0].mean(axis=1)
    np.testing.assert_allclose(audio.wave, whole, atol=1e-6)


def test_a_truncated_wav_is_rejected_not_read_short():
    """libsndfile counts a WAV's frames from the bytes there: cut short, it decoded as shorter audio, and an ASR
    sample kept its whole transcript. A streaming writer's unknown size (0xFFFFFFFF, SoX's 0x7FFFF000) is none."""
    data = wav_bytes(0.5)
    assert data[36:40] == b"data"  # a 44-byte header claiming 8000 samples
    with pytest.raises(Rejected, match="a truncated WAV file: its data chunk declares 16000 bytes, 8000 are there"):
        decode_audio(data[: 44 + 2 * 4000], LIMITS)
    for unknown in (0xFFFFFFFF, 0x7FFFF000):  # streaming writers' (SoX's to a pipe: the second)
        streamed = data[:40] + unknown.to_bytes(4, "little") + data[44 : 44 + 2 * 4000]
        audio = decode_audio(streamed, LIMITS)  # what it holds, all of it
        np.testing.assert_allclose(audio.wave, decode_audio(data, LIMITS).wave[:4000], atol=1e-6)


def test_series_and_text():
    assert check_series(list(range(10)), LIMITS).dtype == np.float64  # a level's digits kept (see below)
    with pytest.raises(Rejected, match="10 NaN or inf values"):
        check_series([float("nan")] * 10, LIMITS)
    with pytest.raises(Rejected, match="fewer than 8"):
        check_series([1.0, 2.0], LIMITS)
    for bad in ([10**400] * 10, ["a"] * 10, [[1.0], [2.0, 3.0]] * 5):  # JSON a client may send the served model
        with pytest.raises(Rejected, match="series is not a list of numbers"):
            check_series(bad, LIMITS)
    tokenizer = WorldTokenizer()
    check_text([{"role": "user", "text": "<image>"}, {"role": "assistant", "text": "seven"}], tokenizer, "image", 1)
    with pytest.raises(Rejected, match=r"turn 1 \(assistant\) is empty"):
        check_text([{"role": "user", "text": "<audio>\nTranscribe."}, {"role": "assistant", "text": "  "}], tokenizer,
                   "audio", 1)
    # a LLaVA record of a human turn alone: nothing to learn or score (a micro-batch of such samples stopped a
    # run); a series window's answer is its target
    with pytest.raises(Rejected, match="no assistant turn: nothing to learn or score"):
        check_text([{"role": "user", "text": "<image>\nWhat is it?"}], tokenizer, "image", 1)
    check_text([{"role": "user", "text": "<series>\nForecast."}], tokenizer, "series", 1)


@pytest.mark.parametrize("modality, n_items, user_text, reason", [
    ("image", 0, "What does the <image> tag do in HTML?", "1 modality placeholders but 0 feature items"),
    ("image", 2, "<image>\nWhat is it?", "1 modality placeholders but 2 feature items"),
    ("image", 0, "What does the <audio> tag do in HTML?", "holds <audio>, a placeholder of another modality"),
    ("audio", 1, "<audio>\nTranscribe <series>.", "holds <series>, a placeholder of another modality"),
])
def test_a_text_whose_placeholders_do_not_match_its_items_is_rejected(modality, n_items, user_text, reason):
    """The cache's lengths and the collator count one placeholder of the sample's modality per item: a text that
    says otherwise is rejected before anything is encoded."""
    turns = [{"role": "user", "text": user_text}, {"role": "assistant", "text": "An answer."}]
    with pytest.raises(Rejected, match=reason):
        check_text(turns, WorldTokenizer(), modality, n_items)


def test_a_series_at_a_high_level_keeps_its_movement():
    """A counter at 1e7 that moves by hundredths: float32 (an ulp of 1 there) rounded the window flat before it was
    z-scored; the window the model reads is the movement, and the stats undo it to the original values."""
    import torch

    from preprocessing.encoders.series import normalized
    from preprocessing.validate import normalised_lookback

    movement = 0.01 * np.sin(np.arange(64) / 3)
    expected = (movement - movement.mean()) / movement.std(ddof=1)
    window, mean, std = normalised_lookback(1e7 + movement, LIMITS, "meter-3")
    assert window.dtype == torch.float32
    np.testing.assert_allclose(window[:, 0].numpy(), expected, atol=1e-5)
    np.testing.assert_allclose((window.double() * std + mean)[:, 0].numpy(), 1e7 + movement, rtol=0, atol=1e-8)
    np.testing.assert_allclose(normalized(1e7 + movement, "meter-3").numpy(), expected, atol=1e-5)  # the encoders'
    with pytest.raises(Rejected, match="sample huge-1: the series' values are too large to normalise"):
        normalised_lookback([1e200, -1e200] * 5, LIMITS, "huge-1")  # finite, but the spread is not
