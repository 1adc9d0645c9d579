"""Feature-cache economics on the demo's real encoder (DINOv2 ViT-S/14 at 112 px, 256 digit images):

- encode throughput with 1 vs 2 encoder actors (Ray Data, one local Ray instance, each run from scratch);
- a job's new items encoded in the driver vs by Ray Data (2 actors), by their number: where
  `run.in_process_max_items` should stand;
- a second run of the same config (the cache hit) vs the first;
- one training step (batch 16, the demo's tiny RWKV-7, phase II) fed from the cache vs encoding the same
  images on the fly (PNG decode + DINOv2 forward in the step);
- reuse through the feature store: prompt wording or 1 % of the answers changed, 10 % new images,
  5 questions per image vs as many distinct images, and a start on an unchanged 10,000-sample set in a local S3
  (moto) counting the media bytes it reads.

    python benchmarks/encode.py [--out benchmarks/out]
"""

import argparse
import dataclasses
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # run as a script: import the project's packages, not this folder's files
os.chdir(ROOT)

import torch  # noqa: E402

from benchmarks.report import cpu_line, write_report  # noqa: E402

DATA, ENCODER = Path("runs/demo/data"), Path("runs/demo/encoders/dinov2-small")


def prepare():
    from pipelines.demo_backbone import pretrained_backbone
    from preprocessing.demo_data import BUILDERS, missing_datasets
    from preprocessing.encoders.convert import export_encoder

    if "digits" in missing_datasets(DATA):  # the demo's digits, as `make demo` builds them
        BUILDERS["digits"](DATA / "digits")
    if not (ENCODER / "config.json").is_file():
        export_encoder("dinov2-small", ENCODER)
    return pretrained_backbone(Path("runs/demo/backbone"))


def encode_config(root, actors: int, path=DATA / "digits" / "train.json", allow_outside: bool = False, **run):
    from pipelines.config import from_dict
    from pipelines.encode import EncodeConfig

    return from_dict(EncodeConfig, {
        "dataset": {"format": "llava", "path": str(path), "allow_media_outside_root": allow_outside},
        "encoder": {"kind": "dinov2", "model_dir": str(ENCODER), "image_size": 112},
        "cache": {"root": str(root), "shard_size": 32}, "run": {"actors": actors, "batch_size": 16, **run}})


def step_times(model, batches, steps: int) -> float:
    optimizer = torch.optim.AdamW(model.trainable_parameters().values(), lr=1e-4)
    times = []
    for i in range(steps + 1):  # the first step warms up and is not counted
        started = time.perf_counter()
        batch = batches(i)
        out = model(batch.input_ids, batch.features, attention_mask=batch.attention_mask, labels=batch.labels,
                    return_logits=False)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - started)
    return sum(times[1:]) / steps


def training_steps(cache_uri: str, backbone_dir: Path, steps: int, batch_size: int = 16) -> dict:
    import io
    import json

    import numpy as np
    from PIL import Image

    from modrwkv import RWKV7
    from modrwkv.batching import Collator
    from modrwkv.multimodal import ModRWKV, ModRWKVConfig, ProjectorConfig
    from modrwkv.tokenizer import WorldTokenizer
    from preprocessing.cache.entry import FeatureCache
    from preprocessing.encoders import build_encoder

    backbone = RWKV7.from_pretrained(backbone_dir)
    config = ModRWKVConfig(backbone.config, {"image": ProjectorConfig(384, backbone.config.n_embd, 3, 2, 2)})
    model = ModRWKV(config, backbone)
    model.set_phase(2)
    collate = Collator(WorldTokenizer(), config, 256)
    samples = list(FeatureCache(cache_uri).iter_samples(shuffle=False))
    records = {r["id"]: r for r in json.loads((DATA / "digits" / "train.json").read_text())}
    encoder = build_encoder("dinov2", ENCODER, image_size=112)

    def cached(i):
        return collate(samples[i * batch_size : (i + 1) * batch_size])

    def on_the_fly(i):
        chunk = samples[i * batch_size : (i + 1) * batch_size]
        files = [DATA / "digits" / records[s.meta["id"]]["image"] for s in chunk]
        images = [np.asarray(Image.open(io.BytesIO(f.read_bytes())).convert("RGB")) for f in files]
        with torch.no_grad():
            features = encoder.encode(images, [s.key for s in chunk])
        return collate([dataclasses.replace(s, items=[f.numpy()]) for s, f in zip(chunk, features)])

    return {"cached_s": step_times(model, cached, steps), "on_the_fly_s": step_times(model, on_the_fly, steps)}


def llava(out: Path, records: list[dict]) -> Path:
    import json

    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records))
    return out


def asked(records: list[dict], questions: int, wording: str = "Question", answers=lambda r, q: f"answer {q}"):
    return [{**r, "id": f"{r['id']}-q{q}", "conversations": [
        {"from": "human", "value": f"<image>\n{wording} {q} about this digit?"},
        {"from": "gpt", "value": answers(r, q)}]} for r in records for q in range(questions)]


def digit_pool(work: Path) -> list[dict]:
    """Every sklearn digit image but the test ones, under work/pool: LLaVA records with absolute image paths."""
    import json

    from preprocessing.demo_data import build_digits

    build_digits(work / "pool", 1797 - 100, 100)
    pool = json.loads((work / "pool" / "train.json").read_text())
    return [{**r, "image": str((work / "pool" / r["image"]).absolute())} for r in pool]


def reuse_rows(work: Path, pool: list[dict]) -> list[dict]:
    """Each case against its own first encode, in one run; `encoded` counts encoder items."""
    from pipelines.encode import run_encode

    config = lambda path, root: encode_config(root, 2, path, allow_outside=True)  # noqa: E731

    def run(name, records, root="store"):
        result = run_encode(config(llava(work / f"{name}.json", records), work / root))
        return {"case": name, "samples": result.manifest["counts"]["written"], "seconds": result.seconds,
                "encoded": result.items["encoded"], "media_files_read": result.fingerprinted_files,
                "encoded_in": result.encoded_in}

    base = pool[:256]
    rows = [run("256 images, 1 question each (first encode)", asked(base, 1)),
            run("prompt wording changed", asked(base, 1, "Query")),
            run("1 % of the answers changed",
                asked(base, 1, answers=lambda r, q: "?" if r in base[:3] else f"answer {q}")),
            run("10 % new images added", asked(pool[:282], 1))]
    rows += [run("64 images x 5 questions (320 samples)", asked(pool[300:364], 5), "five"),
             run("320 distinct images x 1 question", asked(pool[400:720], 1), "distinct")]
    return rows


def driver_or_ray_rows(work: Path, pool: list[dict], sizes=(64, 128, 256)) -> list[dict]:
    """Each size's images (new to its own store) encoded in the driver, then by Ray Data with 2 actors."""
    from pipelines.encode import run_encode

    rows = []
    for n in sizes:
        path = llava(work / f"new{n}.json", asked(pool[:n], 1))
        for where, limit in (("driver", n), ("ray", 0)):
            result = run_encode(encode_config(work / f"{where}{n}", 2, path, True, in_process_max_items=limit))
            rows.append({"case": f"{n} new images, {where}", "items": result.items["encoded"],
                         "encoded_in": result.encoded_in, "seconds": result.seconds})
    return rows


def s3_start_rows(work: Path) -> list[dict]:
    """A 10,000-sample set in a local S3 (the first 1,667 of the 1,697 images with 6 questions each, the last with
    4: `asked` goes image by image, and the first 10,000 questions are kept): its first encode, then the start of a
    training job on it unchanged (`resolve_caches`), counting the media bytes that start reads."""
    import json

    from infra.s3_server import s3_client, start_s3
    from pipelines.caches import resolve_caches
    from pipelines.encode import run_encode
    from preprocessing import storage

    server = start_s3(work / "s3")
    try:
        os.environ.update(server.env())
        s3 = s3_client(server.endpoint_url)
        s3.create_bucket(Bucket="bench")
        pool = json.loads((work / "pool" / "train.json").read_text())
        for r in pool:
            s3.upload_file(str(work / "pool" / r["image"]), "bench", f"digits/{Path(r['image']).name}")
            r["image"] = Path(r["image"]).name
        records = asked(pool, 6)[:10_000]
        s3.put_object(Bucket="bench", Key="digits/train.json", Body=json.dumps(records).encode())
        path = work / "s3.yaml"
        cfg = encode_config("s3://bench/cache", 2, "s3://bench/digits/train.json")
        first = run_encode(cfg)
        import yaml

        from pipelines.config import to_dict

        path.write_text(yaml.safe_dump(to_dict(cfg)))
        read, original = [], storage.read_bytes
        storage.read_bytes = lambda uri: read.append(uri) or original(uri)
        started = time.perf_counter()
        try:
            resolve_caches([str(path)])
        finally:
            storage.read_bytes = original
        media = [u for u in read if u.endswith(".png")]
        return [{"case": "10,000 samples in S3, first encode", "samples": first.manifest["counts"]["written"],
                 "seconds": first.seconds, "encoded": first.items["encoded"],
                 "media_files_read": first.fingerprinted_files,  # measured: the images its samples name
                 "encoded_in": first.encoded_in},
                {"case": "train start on it, unchanged (S3)", "samples": first.manifest["counts"]["written"],
                 "seconds": time.perf_counter() - started, "encoded": 0, "media_files_read": len(media)}]
    finally:
        server.stop()


def main():
    import ray

    from infra.local_ray import init_ray
    from pipelines.encode import run_encode

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/out")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    backbone = prepare()
    work = Path(args.out) / "encode-work"
    shutil.rmtree(work, ignore_errors=True)
    init_ray(local={"num_cpus": 3}, include_dashboard=False, log_to_driver=False)
    rows = []
    for actors in (1, 2):
        first = run_encode(encode_config(work / f"actors{actors}", actors, in_process_max_items=0))
        n = first.manifest["counts"]["written"]
        rows.append({"case": f"encode, {actors} actor(s)", "samples": n, "seconds": first.seconds,
                     "samples_per_s": n / first.seconds})
    again = run_encode(encode_config(work / "actors2", 2, in_process_max_items=0))
    rows.append({"case": "same config again (cache hit)", "samples": n, "seconds": again.seconds,
                 "samples_per_s": n / again.seconds})
    pool = digit_pool(work)
    reuse = reuse_rows(work, pool)
    paths = driver_or_ray_rows(work, pool)
    reuse += s3_start_rows(work)
    ray.shutdown()
    steps = training_steps(first.uri, backbone, args.steps)
    torch_threads = torch.get_num_threads()
    lines = ["| case | samples | seconds | samples/s |", "|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['samples']} | {r['seconds']:.1f} | {r['samples_per_s']:.1f} |" for r in rows]
    lines += ["", f"2 actors vs 1: {rows[1]['samples_per_s'] / rows[0]['samples_per_s']:.2f}x; "
              f"cache hit vs first encode: {rows[1]['seconds'] / again.seconds:.0f}x faster", "",
              "| training step (batch 16, phase II) | seconds | vs cached |", "|---|---|---|",
              f"| features from the cache | {steps['cached_s']:.3f} | 1.00x |",
              f"| encoding on the fly | {steps['on_the_fly_s']:.3f} | "
              f"{steps['on_the_fly_s'] / steps['cached_s']:.2f}x |"]
    lines += ["", "| reuse through the feature store | samples | seconds | encoder items | media files read | "
              "encoded in |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['samples']} | {r['seconds']:.2f} | {r['encoded']} | {r['media_files_read']} | "
              f"{r.get('encoded_in') or '-'} |" for r in reuse]
    lines += ["", "| new items (Ray up) | in the driver, s | Ray Data, 2 actors, s |", "|---|---|---|"]
    lines += [f"| {d['items']} | {d['seconds']:.2f} | {r['seconds']:.2f} |" for d, r in zip(paths[::2], paths[1::2])]
    base, five, distinct = reuse[0], reuse[4], reuse[5]
    lines += ["", f"prompt edit / 1 % answers vs first encode: {reuse[1]['seconds'] / base['seconds']:.3f}x / "
              f"{reuse[2]['seconds'] / base['seconds']:.3f}x of its time (target <= 0.05); 5 questions per image vs "
              f"distinct images: {five['seconds'] / distinct['seconds']:.2f}x the time (target <= 0.3)"]
    machine = (f"{cpu_line()}, torch {torch.__version__} "
               f"({torch_threads} threads in-process; 1 per Ray actor)")
    write_report(args.out, "encode", machine, rows + [{"case": "training step", **steps}] + reuse + paths, lines)


if __name__ == "__main__":
    main()
