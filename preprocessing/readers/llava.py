"""LLaVA-style instruction data: a JSON list or JSONL of
    {"id", "image": "rel/path.png" | [paths] (optional), "conversations": [{"from": "human"|"gpt", "value"}],
     "answers": [str, ...] (optional: a VQAv2-style test question's annotators' answers, scored by their rule),
     "options": [str, ...] (optional: a multiple-choice question's options, A first (ScienceQA, MMBench); the first
                gpt turn, the answer scored, then names the right option's letter: "B", "B." or "(B)", or closing
                it, as LLaVA's ScienceQA conversions write it: "The answer is B.")}
Image paths resolve against `image_root` (local or s3://) and must stay inside it (`storage.media_path`)."""

import hashlib
import json
import re
from collections import Counter, defaultdict
from collections.abc import Iterator
from string import ascii_uppercase

from .. import storage
from .sample import RawSample, Reject, is_sample_id, sample_key, unique

ROLE_OF = {"human": "user", "gpt": "assistant"}


def text_lines(uri: str, rejects: list[Reject]) -> Iterator[tuple[str, str]]:
    """(where, line) of each non-blank line of a text file, each line decoded on its own: one that is not UTF-8 is
    rejected naming its file and line, and the others are read."""
    for n, raw in enumerate(storage.read_bytes(uri).splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark (Windows editors) is no text
        except UnicodeDecodeError as e:
            reason = f"not UTF-8 text: byte {raw[e.start]:#04x} at offset {e.start} of the line ({e.reason})"
            rejects.append(Reject(f"{uri}:{n}", reason))
            continue
        if line.strip():
            yield f"{uri}:{n}", line


class RepeatedKeys(dict):
    """A JSON object that names a key twice or more, of which `json` keeps the last value without a word."""

    repeated: list[str]


def repeated_keys(value) -> list[str]:
    """The keys some object within `value` names more than once."""
    if isinstance(value, dict):
        return [*getattr(value, "repeated", []), *(k for v in value.values() for k in repeated_keys(v))]
    return [k for v in value for k in repeated_keys(v)] if isinstance(value, list) else []


def parse_records(uri: str) -> tuple[list, list[Reject]]:
    """(records with their position, rejects): JSONL lines that fail to decode or parse, records holding text
    that is not Unicode (a lone surrogate escape such as "\\ud800", which no UTF-8 file can hold) and records naming
    a key twice (two "from"s in a turn: which one the writer meant is unknown) are rejected one by one; a JSON file
    that does not parse is an error naming it."""
    rejects, repeats = [], []

    def object_of(pairs: list[tuple]) -> dict:
        obj = dict(pairs)
        if len(obj) < len(pairs):
            obj = RepeatedKeys(obj)
            obj.repeated = sorted(k for k, n in Counter(k for k, _ in pairs).items() if n > 1)
            repeats.append(obj)
        return obj

    if uri.endswith(".jsonl"):
        records, escapes = [], False
        for where, line in text_lines(uri, rejects):
            try:
                records.append((where, json.loads(line, object_pairs_hook=object_of)))
            except json.JSONDecodeError as e:
                rejects.append(Reject(where, f"invalid JSON: {e.msg}"))
            except (ValueError, RecursionError) as e:  # an integer of over 4,300 digits; nesting past the stack
                rejects.append(Reject(where, f"invalid JSON: {str(e)[:200]}"))
            escapes = escapes or bool(SURROGATE_ESCAPE.search(line))
    else:
        try:
            text = storage.read_bytes(uri).decode("utf-8-sig")  # a byte-order mark (Windows editors) is no text
            data = json.loads(text, object_pairs_hook=object_of)
        except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, a giant integer, nesting past the stack
            raise ValueError(f"{uri}: not a readable JSON file: {str(e)[:200]}") from None
        if not isinstance(data, list):
            raise ValueError(f"{uri}: expected a JSON list of samples, got {type(data).__name__}")
        records, escapes = [(f"{uri}[{i}]", r) for i, r in enumerate(data)], bool(SURROGATE_ESCAPE.search(text))
    if not escapes and not repeats:  # nothing in the file to look for record by record
        return records, rejects
    kept = []
    for where, record in records:
        if repeated := repeats and repeated_keys(record):
            rejects.append(Reject(where, f"names the key {repeated[0]!r} twice in one object (JSON would keep the last "
                                         "value without a word)"))
            continue
        try:
            if escapes:
                json.dumps(record, ensure_ascii=False).encode("utf-8")
            kept.append((where, record))
        except UnicodeEncodeError as e:
            rejects.append(Reject(where, f"holds text that is not Unicode: a lone surrogate {e.object[e.start]!a}"))
    return kept, rejects


SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def to_turns(conversations, placeholder: str) -> list[dict]:
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("'conversations' must be a non-empty list")
    turns = []
    for i, c in enumerate(conversations):
        if not isinstance(c, dict) or c.get("from") not in ROLE_OF or not isinstance(c.get("value"), str):
            raise ValueError(f"conversations[{i}] must be {{'from': 'human'|'gpt', 'value': str}}, got {c!r:.80}")
        role = ROLE_OF[c["from"]]
        if role == "assistant" and placeholder in c["value"]:
            raise ValueError(f"conversations[{i}]: {placeholder} in a gpt turn")
        turns.append({"role": role, "text": c["value"]})
    if turns[0]["role"] != "user" or any(a["role"] == b["role"] for a, b in zip(turns, turns[1:])):
        raise ValueError("turns must alternate human, gpt, human, ...")
    return turns


def answer_letter(answer: str, n_options: int) -> str | None:
    """The right option's letter a multiple-choice record's answer gives: the letter alone ("B", "B.", "B)",
    "(B)"), or closing the answer as LLaVA's ScienceQA conversions write it ("The answer is B.", after a lecture
    or not); None for anything else."""
    letters = ascii_uppercase[:n_options]
    found = (re.fullmatch(rf"\(([{letters}])\)|([{letters}])[.)]?", answer.strip())
             or re.search(rf"(?:^|\s)(?i:the answer is):?\s*\(?([{letters}])\)?\.?$", answer.strip()))
    return next(letter for letter in found.groups() if letter) if found else None


def check_options(options, answer: str) -> None:
    """A multiple-choice record's options (2 to 26 non-empty strings) and its answer, naming the right option's
    letter (`answer_letter`)."""
    if not (isinstance(options, list) and 2 <= len(options) <= len(ascii_uppercase)
            and all(isinstance(o, str) and o.strip() for o in options)):
        raise ValueError(f"'options' must be a list of 2 to {len(ascii_uppercase)} non-empty strings (a "
                         "multiple-choice question's options, A first)")
    if answer_letter(answer, len(options)) is None:
        last = ascii_uppercase[len(options) - 1]
        raise ValueError(f"the answer {answer.strip()[:40]!r} names none of the options' letters A-{last} (a "
                         "multiple-choice record answers with its right option's letter: 'B', '(B)' or 'The answer "
                         "is B.')")


def read_llava(uri: str, image_root: str | None = None,
               allow_outside_root: bool = False) -> tuple[list[RawSample], list[Reject]]:
    root = image_root or storage.parent(uri)
    records, rejects = parse_records(uri)
    samples, contents = [], []
    for where, record in records:
        try:
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError("a sample must be an object with an 'id'")
            if not is_sample_id(record["id"]):
                raise ValueError(f"'id' must be a non-empty string or an integer, got {record['id']!r:.80}")
            images = record.get("image")
            images = [] if images is None else images  # null, as a table exported to JSON writes "no image"
            images = [images] if isinstance(images, str) else images
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                raise ValueError("'image' must be a path or a list of paths")
            turns = to_turns(record.get("conversations"), "<image>")
            placeholders = sum(t["text"].count("<image>") for t in turns)
            if placeholders != len(images):
                raise ValueError(f"{placeholders} <image> placeholders for {len(images)} images")
            sources = [storage.media_path(root, p, allow_outside_root) for p in images]
            answers = record.get("answers")
            if answers is not None and not (isinstance(answers, list) and answers
                                            and all(isinstance(a, str) for a in answers)):
                raise ValueError("'answers' must be a non-empty list of strings (the annotators' answers)")
            options = record.get("options")
            if options is not None:
                check_options(options, next((t["text"] for t in turns if t["role"] == "assistant"), ""))
        except ValueError as e:
            keyed = isinstance(record, dict) and is_sample_id(record.get("id"))
            rejects.append(Reject(where, str(e), sample_key(record["id"]) if keyed else None))
            continue
        samples.append(RawSample(sample_key(record["id"]), "image", sources,
                                 {"id": str(record["id"]), "turns": turns, "source": where,
                                  **({"answers": answers} if answers else {}),
                                  **({"options": options} if options is not None else {})}))
        contents.append([images, turns])
    return unique(distinct_keys(samples, contents), rejects), rejects


def distinct_keys(samples: list[RawSample], contents: list) -> list[RawSample]:
    """LLaVA's instruction sets name each conversation by its image's id (llava_instruct_150k's ~158K conversations
    are about ~80K COCO images), so an id that names samples of different content gets their content's hash in their
    keys: each is kept, and only a record repeated whole is a duplicate (`unique`). Only ids given more than once
    are hashed."""
    by_key = defaultdict(list)
    for s, content in zip(samples, contents):
        by_key[s.key].append((s, content))
    for group in (g for g in by_key.values() if len(g) > 1):
        hashes = [hashlib.sha1(json.dumps(content).encode()).hexdigest()[:8] for _, content in group]
        if len(set(hashes)) > 1:
            for (s, _), content_hash in zip(group, hashes):
                s.key = sample_key(f"{s.key}-{content_hash}")
    return samples
