"""Dataset readers: each returns (samples, rejects) — RawSample descriptors with provenance (nothing decoded
yet) and the records it could not use, with the reason."""

from .asr import read_aishell, read_asr_manifest, read_librispeech
from .llava import read_llava
from .sample import RawSample, Reject, sample_key
from .series import read_series

__all__ = ["RawSample", "Reject", "read_aishell", "read_asr_manifest", "read_librispeech", "read_llava", "read_series",
           "sample_key"]
