"""Whole `alive build` vs the whole `img2dataset` CLI: local photos -> 256 px webdataset shards.

Same work on both sides: the same photo-like JPEGs (1-4 MP), the same processes (2), shorter side
-> 256 px (img2dataset ``keep_ratio``, never upscaling), JPEG quality 92, webdataset shards with
jpg/txt/json per sample, and at least 4 shards per process on both sides (img2dataset's unit of work
is the shard: with one shard one process would do everything). Ours is `alive build` on an
imagefolder recipe with template captions, no scoring, no mixing, webdataset output only;
img2dataset gets the same files as ``file://`` URLs with the same caption per image, run as its docs
show (``img2dataset --url_list ... --output_format webdataset``). Both are whole processes started
fresh each round (start-up included, as a user pays it), after one untimed warm-up run each.

Also measured: the fixed cost (both tools on 4 images) and, from ours' summary.json, the task-seconds
of each stage, so per-image cost and where the time goes are visible.

    python benchmarks/ingest_vs_img2dataset.py [--n 1000] [--processes 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, finish, load1, load_range, paired_rounds, run_cmd, stats  # noqa: E402

BIN = Path(sys.executable).parent
ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
CAPTION = "a photo of a plant."


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
    cls = folder / "plant"
    cls.mkdir(parents=True, exist_ok=True)
    paths = [cls / f"img{i:05d}.jpg" for i in range(n)]
    todo = [(p, i) for i, p in enumerate(paths) if not p.exists()]
    if todo:
        with ProcessPoolExecutor(processes) as ex:
            list(ex.map(_make_one, todo, chunksize=8))
    return paths


class Ours:
    """`alive build` of an imagefolder recipe into a fresh run folder."""

    def __init__(self, images: Path, work: Path, n: int, processes: int, shards_per_process: int):
        per = max(1, -(-n // (processes * shards_per_process)))
        self.recipe = work / "recipe.yaml"
        self.recipe.write_text(
            "name: bench\nimage_size: 256\n"
            f"sources:\n  - {{name: photos, kind: imagefolder, domain: crops, path: {images}}}\n"
            f"ingest: {{part_size: {per}, processes: {processes}, jpeg_quality: 92}}\n"
            "describe: {backend: template}\nscore: {enabled: false}\nmix: {enabled: false}\n"
            f"write: {{samples_per_shard: {per}, formats: [webdataset]}}\n")
        self.out, self.n, self.k = work / "ours", n, 0

    def __call__(self) -> dict:
        out = self.out / f"run{self.k}"
        self.k += 1
        res = run_cmd([str(BIN / "alive"), "build", "-r", str(self.recipe), "-o", str(out), "--no-progress"], ENV)
        summary = json.loads((out / "summary.json").read_text())
        wds = out / "shards" / "wds"
        samples = sum(json.loads((wds / "sizes.json").read_text()).values())
        assert samples == self.n, (samples, self.n)
        stage_s = {k: round(v["seconds"], 3) for k, v in summary["stages"].items()}
        shutil.rmtree(out, ignore_errors=True)
        return {"peak_rss_mb": res["peak_rss_mb"], "cpu_seconds": res["cpu_seconds"], "samples": samples,
                "shards": len(list(wds.glob("*.tar"))) if wds.exists() else summary["shards"]["n_shards"],
                "stage_task_seconds": stage_s}


class Img2dataset:
    """The img2dataset CLI on a CSV of file:// URLs with captions."""

    def __init__(self, paths: list[Path], work: Path, processes: int, shards_per_process: int, threads: int):
        self.urls = work / "urls.csv"
        self.urls.write_text("url,caption\n" + "".join(f"file://{p},{CAPTION}\n" for p in paths))
        self.per = max(1, -(-len(paths) // (processes * shards_per_process)))
        self.processes, self.threads, self.n, self.k = processes, threads, len(paths), 0
        self.out = work / "i2d"

    def __call__(self) -> dict:
        out = self.out / f"run{self.k}"
        self.k += 1
        cmd = [str(BIN / "img2dataset"), "--url_list", str(self.urls), "--input_format", "csv",
               "--url_col", "url", "--caption_col", "caption", "--output_folder", str(out),
               "--output_format", "webdataset", "--processes_count", str(self.processes),
               "--thread_count", str(self.threads), "--image_size", "256", "--resize_mode", "keep_ratio",
               "--resize_only_if_bigger", "True", "--encode_quality", "92",
               "--number_sample_per_shard", str(self.per), "--enable_wandb", "False"]
        res = run_cmd(cmd, {**ENV, "WANDB_MODE": "disabled"})
        st = [json.loads(p.read_text()) for p in out.glob("*_stats.json")]
        ok = sum(s["successes"] for s in st)
        assert ok == self.n, (ok, self.n, res["output"][-2000:])
        shutil.rmtree(out, ignore_errors=True)
        return {"peak_rss_mb": res["peak_rss_mb"], "cpu_seconds": res["cpu_seconds"], "samples": ok,
                "shards": len(st)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--shards-per-process", type=int, default=4)
    ap.add_argument("--threads", type=int, default=16, help="img2dataset --thread_count")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--fixed-n", type=int, default=4, help="images of the fixed-cost runs")
    ap.add_argument("--fixed-rounds", type=int, default=3, help="paired rounds of the fixed-cost runs (0: skip)")
    ap.add_argument("--images", type=Path, default=Path(tempfile.gettempdir()) / "alive-bench-photos-v3")
    ap.add_argument("--results", type=Path, default=None)
    ap.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up runs (smoke tests)")
    args = ap.parse_args()
    paths = make_images(args.images, args.n, args.processes)
    work = Path(tempfile.mkdtemp(prefix="alive-bench-ingest-"))
    log = lambda r, rec: print(  # noqa: E731
        f"round {r}: ours {rec['ours']['seconds']:.2f}s  img2dataset {rec['img2dataset']['seconds']:.2f}s  "
        f"load {rec['ours']['load_before']}..{rec['img2dataset']['load_after']}", flush=True)
    try:
        for p in paths:  # page cache warm for both tools alike
            p.read_bytes()
        (work / "full").mkdir(exist_ok=True)
        ours = Ours(args.images, work / "full", args.n, args.processes, args.shards_per_process)
        base = Img2dataset(paths, work / "full", args.processes, args.shards_per_process, args.threads)
        if not args.no_warmup:
            ours(), base()  # warm-up: imports and bytecode, page cache of both installs
        rounds = paired_rounds(args.rounds, {"ours": ours, "img2dataset": base}, log)
        fixed_rounds: list = []
        if args.fixed_rounds:
            small = args.images.parent / (args.images.name + "-fixed")
            small_paths = make_images(small, args.fixed_n, args.processes)
            (work / "fixed").mkdir()
            fo = Ours(small, work / "fixed", args.fixed_n, args.processes, 1)
            fb = Img2dataset(small_paths, work / "fixed", args.processes, 1, args.threads)
            fixed_rounds = paired_rounds(args.fixed_rounds, {"ours": fo, "img2dataset": fb})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    n = args.n
    ratio = [r["img2dataset"]["seconds"] / r["ours"]["seconds"] for r in rounds]
    s_ours = stats([r["ours"]["seconds"] for r in rounds], higher_is_better=False)
    s_base = stats([r["img2dataset"]["seconds"] for r in rounds], higher_is_better=False)
    sp = stats(ratio)
    summary = {"ours": round(n / s_ours["median"], 2), "baseline": round(n / s_base["median"], 2), "unit": "img/s",
               "speedup": round(sp["median"], 3), "speedup_mean": round(sp["mean"], 3),
               "speedup_worst": round(sp["worst"], 3), "rounds": args.rounds,
               "seconds": {"ours": s_ours, "img2dataset": s_base}, "images": n, "processes": args.processes,
               "shards_per_process": args.shards_per_process,
               "peak_rss_mb": {"ours": max(r["ours"]["peak_rss_mb"] for r in rounds),
                               "img2dataset": max(r["img2dataset"]["peak_rss_mb"] for r in rounds)},
               "load": load_range(rounds, ("ours", "img2dataset"))}
    stage = {k: statistics.median(r["ours"]["stage_task_seconds"][k] for r in rounds)
             for k in rounds[0]["ours"]["stage_task_seconds"]}
    summary["ours_stage_task_seconds"] = stage
    if fixed_rounds:
        fo = statistics.median(r["ours"]["seconds"] for r in fixed_rounds)
        fb = statistics.median(r["img2dataset"]["seconds"] for r in fixed_rounds)
        per_o = (s_ours["median"] - fo) / (n - args.fixed_n) * 1000
        per_b = (s_base["median"] - fb) / (n - args.fixed_n) * 1000
        summary["fixed_cost_s"] = {"ours": fo, "img2dataset": fb}
        summary["per_image_ms"] = {"ours": per_o, "img2dataset": per_b}
        summary["speedup_per_image"] = round(per_b / per_o, 3) if per_o > 0 else None
    summary["target"] = {"speedup": 2.0, "speedup_per_image": 3.0, "fixed_cost_below_baseline": True}
    summary["met"] = bool(sp["median"] >= 2.0)
    print(f"ours {summary['ours']} img/s, img2dataset {summary['baseline']} img/s: {sp['median']:.2f}x "
          f"(mean {sp['mean']:.2f}x, worst {sp['worst']:.2f}x); stage task-seconds {stage}; load {load1()}")
    finish("ingest_vs_img2dataset", summary, rounds, vars(args),
           ["img2dataset", "pillow", "opencv-python", "opencv-python-headless", "simplejpeg", "prefect", "pyarrow"],
           args.results, {"fixed_cost_rounds": fixed_rounds})


if __name__ == "__main__":
    main()
