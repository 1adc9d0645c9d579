"""Speech encoders at 16 kHz: WavLM (50 Hz features) and the Whisper encoder (padded to 30 s, output trimmed
to the real audio's length). Items are `preprocessing.items.Audio`: other sample rates are resampled; nonsense
rates and empty clips are refused."""

import math

import torch
from transformers import Wav2Vec2FeatureExtractor, WavLMModel, WhisperConfig, WhisperFeatureExtractor, WhisperModel
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from ..items import SAMPLE_RATE, to_16k_mono
from .base import FrozenEncoder, require_local_dir


def load_whisper_encoder(path):
    """A full WhisperModel save or an encoder-only one (what our converters write: no decoder weights to fake)."""
    if "WhisperEncoder" in (WhisperConfig.from_pretrained(path).architectures or []):
        return HFWhisperEncoder.from_pretrained(path, local_files_only=True)
    return WhisperModel.from_pretrained(path, local_files_only=True).get_encoder()


class WhisperEncoder(FrozenEncoder):
    kind = "whisper"
    frame_samples = 320  # 100 mel frames/s, then a stride-2 convolution: one output per 20 ms

    def __init__(self, model_dir, device="cpu", dtype=torch.float32):
        path = require_local_dir(model_dir)
        super().__init__(path, load_whisper_encoder(path), device, dtype)
        self.features = WhisperFeatureExtractor(feature_size=self.model.config.num_mel_bins)
        self.max_samples = self.features.n_samples  # 30 s

    @property
    def output_dim(self) -> int:
        return self.model.config.d_model

    def encode_batch(self, items, ids) -> list[torch.Tensor]:
        clips = [to_16k_mono(audio, sid) for audio, sid in zip(items, ids)]
        for clip, sid in zip(clips, ids):
            if clip.size > self.max_samples:
                raise ValueError(f"sample {sid}: {clip.size / SAMPLE_RATE:.1f} s is longer than Whisper's 30 s window")
        mel = self.features(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features
        hidden = self.model(mel.to(self.device, self.dtype)).last_hidden_state.float().cpu()
        return [h[: math.ceil(c.size / self.frame_samples)] for h, c in zip(hidden, clips)]


class WavLMEncoder(FrozenEncoder):
    kind = "wavlm"

    def __init__(self, model_dir, device="cpu", dtype=torch.float32):
        path = require_local_dir(model_dir)
        super().__init__(path, WavLMModel.from_pretrained(path, local_files_only=True), device, dtype)
        self.features = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                                 do_normalize=True, return_attention_mask=True)

    def encode_batch(self, items, ids) -> list[torch.Tensor]:
        clips = [to_16k_mono(audio, sid) for audio, sid in zip(items, ids)]
        batch = self.features(clips, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding=True)
        hidden = self.model(batch.input_values.to(self.device, self.dtype),
                            attention_mask=batch.attention_mask.to(self.device)).last_hidden_state.float().cpu()
        lengths = self.model._get_feat_extract_output_lengths(torch.tensor([c.size for c in clips]))
        return [h[: int(n)] for h, n in zip(hidden, lengths)]


AUDIO_ENCODERS = {cls.kind: cls for cls in (WhisperEncoder, WavLMEncoder)}
