"""Speech encoders at 16 kHz: WavLM (50 Hz features) and the Whisper encoder (padded to 30 s, output trimmed
to the real audio's length; a longer clip read as consecutive 30 s windows). Items are `preprocessing.items.Audio`:
other sample rates are resampled; nonsense rates and empty clips are refused."""

import math
from pathlib import Path

import numpy as np
import torch
from transformers import (Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel, WhisperConfig, WhisperFeatureExtractor,
                          WhisperModel)
from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFWhisperEncoder

from ..items import SAMPLE_RATE, to_16k_mono
from .base import EncoderInputs, FrozenEncoder, check_model_type, require_local_dir, ships_processor


def load_whisper_encoder(path):
    """A full WhisperModel save or an encoder-only one (what our converters write: no decoder weights to fake)."""
    check_model_type(Path(path), "whisper", "whisper")
    if "WhisperEncoder" in (WhisperConfig.from_pretrained(path).architectures or []):
        return HFWhisperEncoder.from_pretrained(path, local_files_only=True)
    return WhisperModel.from_pretrained(path, local_files_only=True).get_encoder()


class LogMelInputs(EncoderInputs):
    """A clip -> Whisper's log-mel spectrograms of its consecutive 30 s windows (each padded to 30 s, as Whisper
    pads any clip) and each window's length at 16 kHz: {"mel": [windows, mel bins, 3000], "samples": [windows]}.
    Whisper sees 30 s at a time; a longer clip (LibriSpeech's test sets hold some of up to 35 s, which a test score
    must not leave out) is its windows one after the other, each encoded alone, their features joined in time."""

    def __init__(self, mel_bins: int):
        self.features = WhisperFeatureExtractor(feature_size=mel_bins)

    def prepare(self, audio, sample_id: str) -> dict[str, np.ndarray]:
        clip = to_16k_mono(audio, sample_id)
        window = self.features.n_samples
        pieces = [clip[start : start + window] for start in range(0, clip.size, window)]
        mel = self.features(pieces, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
        return {"mel": mel, "samples": np.asarray([piece.size for piece in pieces])}


class WhisperEncoder(FrozenEncoder):
    kind = "whisper"
    frame_samples = 320  # 100 mel frames/s, then a stride-2 convolution: one output per 20 ms

    def __init__(self, model_dir, device="cpu", dtype=torch.float32):
        path = require_local_dir(model_dir)
        model = load_whisper_encoder(path)
        super().__init__(path, model, LogMelInputs(model.config.num_mel_bins), device, dtype)

    @classmethod
    def build_inputs(cls, model_dir) -> LogMelInputs:
        return LogMelInputs(WhisperConfig.from_pretrained(require_local_dir(model_dir)).num_mel_bins)

    @property
    def output_dim(self) -> int:
        return self.model.config.d_model

    def forward(self, prepared) -> list[torch.Tensor]:
        """Every window of the batch's clips in one pass; each trimmed to its real audio, a clip's joined in time."""
        hidden = self.model(self.to_model([mel for p in prepared for mel in p["mel"]])).last_hidden_state.float().cpu()
        windows = iter(hidden)
        return [torch.cat([next(windows)[: math.ceil(int(n) / self.frame_samples)] for n in p["samples"]])
                for p in prepared]


class WaveformInputs(EncoderInputs):
    """A clip -> its 16 kHz samples, normalised to zero mean and unit variance if the model's feature extractor
    says so: {"wave": [samples]}. A clip shorter than one feature frame's `min_samples` is refused."""

    def __init__(self, normalize: bool = True, min_samples: int = 1):
        self.features = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0,
                                                 do_normalize=normalize)
        self.min_samples = min_samples

    def prepare(self, audio, sample_id: str) -> dict[str, np.ndarray]:
        clip = to_16k_mono(audio, sample_id)
        if clip.size < self.min_samples:
            raise ValueError(f"sample {sample_id}: {clip.size} samples at 16 kHz, fewer than the {self.min_samples} "
                             "of one feature frame")
        return {"wave": self.features([clip], sampling_rate=SAMPLE_RATE, return_tensors="np").input_values[0]}


def receptive_field(kernels, strides) -> int:
    """Input samples under one output frame of a stack of unpadded convolutions."""
    field, step = 1, 1
    for kernel, stride in zip(kernels, strides):
        field, step = field + (kernel - 1) * step, step * stride
    return field


class WavLMEncoder(FrozenEncoder):
    kind = "wavlm"
    # how much padding a transformer batch may add, as a share of its real frames: clips batch with others of
    # about their length. 0, each length alone: on a CPU any padding only costs (benchmarks/wavlm_batching.py, 0.25
    # ran at 0.7x); what a GPU gains from it is that benchmark's part of the GPU rehearsal
    max_padding = 0.0

    def __init__(self, model_dir, device="cpu", dtype=torch.float32):
        path = require_local_dir(model_dir)
        check_model_type(path, self.kind, "wavlm")
        model = WavLMModel.from_pretrained(path, local_files_only=True)
        if model.adapter is not None:  # `forward` runs the model's parts itself, without one
            raise ValueError(f"{path}: a WavLM with an adapter (add_adapter) is not supported")
        super().__init__(path, model, self.build_inputs(path, model.config), device, dtype)

    @classmethod
    def build_inputs(cls, model_dir, config=None) -> WaveformInputs:
        """The folder's feature extractor settings where it ships them (WavLM Base and Base+ read raw samples, Large
        normalised ones), else normalised samples; clips as short as one feature frame."""
        path = require_local_dir(model_dir)
        config = config or WavLMConfig.from_pretrained(path, local_files_only=True)
        normalize = (Wav2Vec2FeatureExtractor.from_pretrained(path, local_files_only=True).do_normalize
                     if ships_processor(path) else True)
        return WaveformInputs(normalize, receptive_field(config.conv_kernel, config.conv_stride))

    def forward(self, prepared) -> list[torch.Tensor]:
        """WavLMModel's forward, in two steps so that a clip's features never depend on its batch-mates: the
        convolutions (`convolved`), then the projection and transformer over clips of about the same length,
        right-padded and masked."""
        convolved = self.convolved([torch.from_numpy(p["wave"]).to(self.device, self.dtype) for p in prepared])
        features = [None] * len(convolved)
        for group in length_groups([len(c) for c in convolved], self.max_padding):
            frames = [len(convolved[i]) for i in group]
            mask = None if min(frames) == max(frames) else (
                torch.arange(max(frames), device=self.device)[None] < torch.tensor(frames, device=self.device)[:, None])
            hidden, _ = self.model.feature_projection(
                torch.nn.utils.rnn.pad_sequence([convolved[i] for i in group], batch_first=True))
            hidden = self.model.encoder(hidden, attention_mask=mask).last_hidden_state.float().cpu()
            for i, h in zip(group, hidden):
                features[i] = h[: len(convolved[i])]
        return features

    def convolved(self, waves: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each clip's convolutional features [frames, conv channels]."""
        if self.model.config.feat_extract_norm == "group":
            # WavLM Base/Base+: the first convolution's GroupNorm spans the whole time axis, padding included, so a
            # padded clip's features would depend on its batch-mates (measured: off by 40 % of their scale); each
            # clip's convolutions run alone (about a third of the model's work)
            return [self.model.feature_extractor(w[None])[0].T for w in waves]
        # WavLM Large normalises each frame alone: a zero-padded batch, each clip's frames cut to its own length
        batch = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
        frames = self.model._get_feat_extract_output_lengths(torch.tensor([len(w) for w in waves]))
        return [c[: int(n)] for c, n in zip(self.model.feature_extractor(batch).transpose(1, 2), frames)]


def length_groups(lengths: list[int], max_padding: float) -> list[list[int]]:
    """Indices into `lengths` in groups, longest first, each padded to its longest adding at most `max_padding` of
    its real length."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group = groups[-1] if groups else []
        real = sum(lengths[j] for j in group) + lengths[i]
        if group and lengths[group[0]] * (len(group) + 1) <= (1 + max_padding) * real:
            group.append(i)
        else:
            groups.append([i])
    return groups


AUDIO_ENCODERS = {cls.kind: cls for cls in (WhisperEncoder, WavLMEncoder)}
