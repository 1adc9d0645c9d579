"""One WebDataset shard as bytes: a tar of `<key>.<name>.npy` arrays and one `<key>.json` per sample.

Members are written in sample order with fixed metadata (mtime 0, uid 0), so the same samples always give
the same bytes: a resumed encode produces exactly the shards an uninterrupted one would. Reading never
unpickles: arrays go through np.load(allow_pickle=False)."""

import io
import json
import tarfile

import numpy as np


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def pack_shard(samples: list[dict]) -> bytes:
    """samples: {"key", "arrays": {name: ndarray}, "meta": dict}, written in the given order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            members = [(f"{name}.npy", npy_bytes(a)) for name, a in sorted(sample["arrays"].items())]
            members.append(("json", json.dumps(sample["meta"], sort_keys=True, ensure_ascii=False).encode()))
            for suffix, data in members:
                info = tarfile.TarInfo(f"{sample['key']}.{suffix}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def unpack_shard(data: bytes, name: str = "shard") -> list[dict]:
    """The samples of a shard, in order: {"key", "arrays", "meta"}."""
    samples: dict[str, dict] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, suffix = member.name.partition(".")
            payload = tar.extractfile(member).read()
            sample = samples.setdefault(key, {"key": key, "arrays": {}, "meta": None})
            if suffix == "json":
                sample["meta"] = json.loads(payload)
            elif suffix.endswith(".npy"):
                sample["arrays"][suffix[: -len(".npy")]] = np.load(io.BytesIO(payload), allow_pickle=False)
            else:
                raise ValueError(f"{name}: member {member.name!r} is neither .npy nor .json")
    for key, sample in samples.items():
        if sample["meta"] is None:
            raise ValueError(f"{name}: sample {key!r} has no .json member")
    return list(samples.values())
