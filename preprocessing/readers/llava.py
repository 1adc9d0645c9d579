"""LLaVA-style instruction data: a JSON list or JSONL of
    {"id", "image": "rel/path.png" | [paths] (optional), "conversations": [{"from": "human"|"gpt", "value"}]}
Image paths resolve against `image_root` (local or s3://) and must stay inside it (`storage.media_path`)."""

import json

from .. import storage
from .sample import RawSample, Reject, sample_key, unique

ROLE_OF = {"human": "user", "gpt": "assistant"}


def parse_records(uri: str) -> tuple[list, list[Reject]]:
    """(records with their position, rejects): JSONL lines that fail to parse are rejected one by one."""
    text = storage.read_bytes(uri).decode("utf-8")
    if uri.endswith(".jsonl"):
        records, rejects = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"{uri}:{n}", json.loads(line)))
            except json.JSONDecodeError as e:
                rejects.append(Reject(f"{uri}:{n}", f"invalid JSON: {e.msg}"))
        return records, rejects
    data = json.loads(text)
    if not isinstance(data, list):
        raise ValueError(f"{uri}: expected a JSON list of samples, got {type(data).__name__}")
    return [(f"{uri}[{i}]", r) for i, r in enumerate(data)], []


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


def read_llava(uri: str, image_root: str | None = None,
               allow_outside_root: bool = False) -> tuple[list[RawSample], list[Reject]]:
    root = image_root or storage.parent(uri)
    records, rejects = parse_records(uri)
    samples = []
    for where, record in records:
        try:
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError("a sample must be an object with an 'id'")
            images = record.get("image", [])
            images = [images] if isinstance(images, str) else images
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                raise ValueError("'image' must be a path or a list of paths")
            turns = to_turns(record.get("conversations"), "<image>")
            placeholders = sum(t["text"].count("<image>") for t in turns)
            if placeholders != len(images):
                raise ValueError(f"{placeholders} <image> placeholders for {len(images)} images")
            sources = [storage.media_path(root, p, allow_outside_root) for p in images]
        except ValueError as e:
            rejects.append(Reject(where, str(e), sample_key(record["id"]) if isinstance(record, dict) and "id" in record else None))
            continue
        samples.append(RawSample(sample_key(record["id"]), "image", sources,
                                 {"id": str(record["id"]), "turns": turns, "source": where}))
    return unique(samples, rejects), rejects
