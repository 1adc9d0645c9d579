"""What every reader yields: raw samples with provenance, and the records it could not use."""

import hashlib
import re
from dataclasses import dataclass, field

UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def sample_key(source_id: str) -> str:
    """A WebDataset key from a source id: stable, no dots or slashes (webdataset splits names at the first
    dot); ids that had to be changed get a short hash so two ids never collide."""
    safe = UNSAFE.sub("_", str(source_id))
    if safe == str(source_id) and safe:
        return safe
    return f"{safe[:80]}-{hashlib.sha1(str(source_id).encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def is_sample_id(value) -> bool:
    """A record's "id" as a sample may be named by: a non-empty string or an integer. null, "", true, a list or an
    object would key it as "None", "-<hash>", "True" or their Python text: a real id's key, or none."""
    return isinstance(value, (str, int)) and not isinstance(value, bool) and value != ""


@dataclass
class RawSample:
    key: str
    modality: str  # image | audio | series
    sources: list[str]  # the raw files (paths or URIs), one per modality item; empty for inline series windows
    meta: dict  # json-able: turns, text, targets, provenance; travels into the cache next to the features
    series: dict = field(default_factory=dict)  # series windows: {"lookback": values, "target": values} (arrays)


@dataclass
class Reject:
    source: str  # the file (and line or record) the problem is in
    reason: str
    key: str | None = None
    stage: str = "read"

    def to_dict(self) -> dict:
        return {"key": self.key, "source": self.source, "stage": self.stage, "reason": self.reason}


def unique(samples: list[RawSample], rejects: list[Reject]) -> list[RawSample]:
    """Drops (and rejects) every sample whose key was already taken: a key names exactly one sample."""
    seen, kept = set(), []
    for s in samples:
        if s.key in seen:
            # the record (file:line) that repeats the id: its media may be shared by records of other ids
            where = s.meta.get("source") or (s.sources[0] if s.sources else "?")
            rejects.append(Reject(where, "duplicate sample id", s.key))
            continue
        seen.add(s.key)
        kept.append(s)
    return kept
