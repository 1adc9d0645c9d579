"""Speech recognition sets: a JSONL manifest ({"audio", "text", "language"?, "id"?} per line, audio paths
relative to the manifest; without an id, the audio's path less its extension names the sample), LibriSpeech-style
folders (`<speaker>/<chapter>/*.trans.txt` beside the audio) or Aishell-1 (one transcript for a folder of .wav)."""

import codecs
import posixpath

from .. import storage
from .llava import parse_records, text_lines
from .sample import RawSample, Reject, is_sample_id, sample_key, unique

PROMPTS = {"en": "Transcribe the English speech.", "zh": "Transcribe the Mandarin speech."}
DEFAULT_PROMPT = "Transcribe the speech."


def asr_sample(key_id: str, audio: str, text: str, language: str | None, where: str) -> RawSample:
    prompt = PROMPTS.get(language or "", DEFAULT_PROMPT)
    turns = [{"role": "user", "text": f"<audio>\n{prompt}"}, {"role": "assistant", "text": text}]
    meta = {"id": key_id, "turns": turns, "text": text, "language": language, "source": where}
    return RawSample(sample_key(key_id), "audio", [audio], meta)


def read_asr_manifest(uri: str, audio_root: str | None = None,
                      allow_outside_root: bool = False) -> tuple[list[RawSample], list[Reject]]:
    root = audio_root or storage.parent(uri)
    records, rejects = parse_records(uri)
    samples = []
    for where, r in records:
        if not isinstance(r, dict) or not isinstance(r.get("audio"), str) or not isinstance(r.get("text"), str):
            rejects.append(Reject(where, "a line must be an object with string 'audio' and 'text'"))
            continue
        given_id = r.get("id")
        # the path, not the file's name: spk1/001.wav and spk2/001.wav are two samples
        key_id = posixpath.splitext(posixpath.normpath(r["audio"]))[0] if given_id in (None, "") else str(given_id)
        if given_id not in (None, "") and not is_sample_id(given_id):
            rejects.append(Reject(where, f"'id' must be a non-empty string or an integer, got {given_id!r:.80}"))
            continue
        if not isinstance(r.get("language"), str | None):
            rejects.append(Reject(where, f"'language' must be a string, got {r['language']!r:.40}", sample_key(key_id)))
            continue
        try:
            audio = storage.media_path(root, r["audio"], allow_outside_root)
        except ValueError as e:
            rejects.append(Reject(where, str(e), sample_key(key_id)))
            continue
        samples.append(asr_sample(key_id, audio, r["text"], r.get("language"), where))
    return unique(samples, rejects), rejects


def read_librispeech(root: str, audio_suffix: str = ".flac",
                     allow_outside_root: bool = False) -> tuple[list[RawSample], list[Reject]]:
    """Each transcript line `<utterance> <text>` names its audio beside the transcript; like every media path, it
    must stay inside the dataset's folder (`storage.media_path`)."""
    samples, rejects = [], []
    for transcript in storage.walk(root, ".trans.txt"):
        uri = storage.join(root, transcript)
        for where, line in text_lines(uri, rejects):
            utterance, text = (line.split(maxsplit=1) + ["", ""])[:2]  # spaces or tabs, leading ones too
            if not text.strip():
                rejects.append(Reject(where, "a transcript line must be '<utterance id> <words>'",
                                      sample_key(utterance) if utterance else None))
                continue
            relative = posixpath.join(posixpath.dirname(transcript), utterance + audio_suffix)
            try:
                audio = storage.media_path(root, relative, allow_outside_root)
            except ValueError as e:
                rejects.append(Reject(where, str(e), sample_key(utterance)))
                continue
            samples.append(asr_sample(utterance, audio, text.strip(), "en", where))
    return unique(samples, rejects), rejects


def first_word(line: bytes) -> str:
    """A transcript line's utterance id, as `read_aishell` reads it from a decoded line (a byte-order mark dropped)."""
    return line.removeprefix(codecs.BOM_UTF8).strip().partition(b" ")[0].decode("ascii", "replace")


def read_aishell(transcript: str, audio_root: str,
                 allow_outside_root: bool = False) -> tuple[list[RawSample], list[Reject]]:
    """Aishell-1 as it ships (`data_aishell`): one transcript for every split (transcript/aishell_transcript_v0.8.txt,
    `<utterance> <word> <word> ...` a line) and a split's audio as `<speaker>/<utterance>.wav` under its folder
    (wav/train, wav/dev or wav/test, its per-speaker archives unpacked). The split's .wav files are the samples, their
    words joined without the spaces (Mandarin is scored by characters); a file the transcript has no words for is
    rejected, named (Aishell-1 holds a few hundred)."""
    rejects, texts, bad_lines, conflicting = [], {}, [], {}
    for where, line in text_lines(transcript, bad_lines):
        utterance, words = (line.split(maxsplit=1) + ["", ""])[:2]
        text = "".join(words.split())
        if utterance in texts and texts[utterance][1] != text:  # which line is right is anyone's guess
            conflicting.setdefault(utterance, [texts[utterance][0]]).append(where)
        texts.setdefault(utterance, (where, text))
    # a line that is not UTF-8 counts in the split whose audio it transcribes, named by its first word (ASCII)
    lines = storage.read_bytes(transcript).splitlines() if bad_lines else []
    unreadable = {first_word(lines[int(r.source.rsplit(":", 1)[1]) - 1]): r for r in bad_lines}
    samples = []
    for relative in storage.walk(audio_root, ".wav"):
        utterance = posixpath.splitext(posixpath.basename(relative))[0]
        where, text = texts.get(utterance, (storage.join(audio_root, relative), ""))
        if utterance in unreadable:
            rejects.append(Reject(unreadable[utterance].source, unreadable[utterance].reason, sample_key(utterance)))
            continue
        if not text:
            rejects.append(Reject(where, f"no transcribed words for it in {transcript}", sample_key(utterance)))
            continue
        if utterance in conflicting:
            rejects.append(Reject(where, f"transcript lines {', '.join(conflicting[utterance])} give it different "
                                         "words", sample_key(utterance)))
            continue
        try:
            audio = storage.media_path(audio_root, relative, allow_outside_root)
        except ValueError as e:
            rejects.append(Reject(where, str(e), sample_key(utterance)))
            continue
        samples.append(asr_sample(utterance, audio, text, "zh", where))
    return unique(samples, rejects), rejects
