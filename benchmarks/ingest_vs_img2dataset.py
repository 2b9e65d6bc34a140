"""Ingest + resize + webdataset write of local JPEGs: this pipeline vs img2dataset, same files, same processes.

Both tools get the same photo-like JPEGs (1024-2048 px), 2 processes, shorter side -> 256 px, JPEG
quality 92, webdataset output. Prints img/s of both and the ratio; last line is the JSON summary.

    python benchmarks/ingest_vs_img2dataset.py [--n 1000] [--processes 2] [--images DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _make_one(args: tuple[Path, int]) -> None:
    path, i = args
    rng = np.random.default_rng(i)
    w = int(rng.integers(1024, 2049))
    h = int(w * rng.choice([0.75, 0.667, 1.0, 1.333]))
    # Photo-like: smooth structure at two scales + mild sensor noise, saved as a camera would (q=90):
    # 0.2-0.6 MB per image, like 2-4 MP phone photos (pure noise would be 3x larger than any photo).
    coarse = rng.integers(0, 255, (h // 96 + 2, w // 96 + 2, 3), dtype=np.uint8)
    fine = rng.integers(0, 255, (h // 12 + 2, w // 12 + 2, 3), dtype=np.uint8)
    im = Image.blend(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC),
                     Image.fromarray(fine).resize((w, h), Image.Resampling.BICUBIC), 0.3)
    arr = np.asarray(im.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16)
    arr = arr + rng.normal(0, 2.5, (h, w, 3)).astype(np.int16)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)


def make_images(folder: Path, n: int, processes: int) -> list[Path]:
    cls = folder / "photos"
    cls.mkdir(parents=True, exist_ok=True)
    paths = [cls / f"img{i:05d}.jpg" for i in range(n)]
    todo = [(p, i) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        with ProcessPoolExecutor(processes) as ex:
            list(ex.map(_make_one, todo, chunksize=8))
    return paths


def run_ours(folder: Path, out: Path, processes: int) -> float:
    from pipeline import describe, ingest, pair
    from pipeline import write as writer
    from pipeline.recipe import parse_recipe
    from pipeline.store import RunStore

    r = parse_recipe({"name": "bench", "image_size": 256, "sources": [
        {"name": "photos", "kind": "imagefolder", "domain": "crops", "path": str(folder)}],
        "ingest": {"part_size": 100, "processes": processes, "jpeg_quality": 92},
        "score": {"enabled": False}, "mix": {"enabled": False}, "write": {"samples_per_shard": 10000,
                                                                         "formats": ["webdataset"]}})
    store = RunStore(out)
    t0 = time.perf_counter()
    parts = ingest.plan(r, store)
    with ProcessPoolExecutor(processes) as ex:
        list(ex.map(ingest.run_part, [r] * len(parts), [store] * len(parts), parts))
    describe.run(r, store, describe.collect_classes(r, store))
    for s, p in ingest.ingested_parts(store, r, "train"):
        pair.run_part(r, store, s, p)
    writer.write_all(r, store)
    return time.perf_counter() - t0


def run_img2dataset(paths: list[Path], out: Path, processes: int) -> float:
    from img2dataset import download

    out.parent.mkdir(parents=True, exist_ok=True)
    url_list = out.parent / "urls.txt"
    url_list.write_text("\n".join(f"file://{p}" for p in paths) + "\n")
    t0 = time.perf_counter()
    download(url_list=str(url_list), output_folder=str(out), processes_count=processes, thread_count=16,
             image_size=256, resize_mode="keep_ratio", encode_quality=92, output_format="webdataset",
             input_format="txt", number_sample_per_shard=10000, enable_wandb=False, compute_hash=None)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "alive-bench-photos-v2")
    args = ap.parse_args()
    paths = make_images(args.images, args.n, args.processes)
    work = Path(tempfile.mkdtemp(prefix="alive-bench-"))
    try:
        # Warm the page cache for both tools alike.
        for p in paths:
            p.read_bytes()
        t_base = run_img2dataset(paths, work / "i2d" / "out", args.processes)
        t_ours = run_ours(args.images, work / "ours", args.processes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours, base = args.n / t_ours, args.n / t_base
    print(f"img2dataset: {base:.1f} img/s ({t_base:.1f} s)   ours: {ours:.1f} img/s ({t_ours:.1f} s)")
    print(json.dumps({"benchmark": "ingest_vs_img2dataset", "ours": round(ours, 2), "baseline": round(base, 2),
                      "unit": "img/s", "speedup": round(ours / base, 3), "images": args.n,
                      "processes": args.processes, "seconds": round(t_ours, 2)}))


if __name__ == "__main__":
    main()
