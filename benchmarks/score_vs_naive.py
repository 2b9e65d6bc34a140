"""CLIP scoring: the pipeline's scorer vs a naive CLIPProcessor + CLIPModel loop over every pair.

Same images (ingest-resized JPEGs, shorter side 256), same captions (k candidates per image drawn
from shared class descriptions, as the pair stage makes them), same model: the ViT-B/32 architecture
from CLIPConfig defaults with random weights and a locally trained tokenizer (no download). The naive
loop runs processor + full model on every (image, caption) pair in batches; ours embeds each image
once, each distinct caption once, with its own preprocessing, and picks the best of k.

Also reported: ours with one caption per image (k=1, no caption reuse), the score difference between
ours and the naive loop, and bf16 vs fp32 score parity of our scorer (mean and max absolute
difference). With --gpu, measures ViT-B/32 image throughput on CUDA in fp16 instead.

Usage: python benchmarks/score_vs_naive.py [--images 64] [--k 4] [--batch 32] [--gpu]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

CLASSES = ["tomato early blight", "corn common rust", "healthy wheat", "holstein cow", "merino sheep",
           "atlantic salmon", "rainbow trout", "banana leaf nitrogen deficiency"]
FORMS = ["a photo of {c}.", "a close-up photo of {c} in the field.", "an image showing {c}, seen from the side.",
         "a blurry photo of {c}.", "a high resolution photo of {c} taken outdoors in daylight."]


def build_b32(out: Path) -> Path:
    """ViT-B/32 from CLIPConfig defaults, random weights, local tokenizer, default CLIP image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from pipeline.tiny_models import build_tokenizer

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, extra_text=[f.format(c=c) for c in CLASSES for f in FORMS])
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), bos_token_id=3, eos_token_id=4, pad_token_id=0))
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor().save_pretrained(out)
    return out


def make_data(n: int, k: int) -> tuple[list[bytes], list[list[str]]]:
    from pipeline.images import process_image
    from pipeline.synthetic import draw_image

    images, cands = [], []
    for i in range(n):
        ci = i % len(CLASSES)
        images.append(process_image(draw_image(CLASSES[ci], ci, "crops", i, 0, 400), 256).jpeg)
        cands.append([FORMS[(i + j) % len(FORMS)].format(c=CLASSES[ci]) for j in range(k)])
    return images, cands


def naive(model_dir: Path, images: list[bytes], cands: list[list[str]], batch: int
          ) -> tuple[float, float, np.ndarray]:
    """Processor + model forward on every (image, caption) pair; returns (seconds, CPU seconds, scores per pair)."""
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    proc = CLIPProcessor.from_pretrained(model_dir)
    model = CLIPModel.from_pretrained(model_dir).eval()
    pairs = [(i, c) for i, cs in enumerate(cands) for c in cs]
    out = np.zeros(len(pairs), np.float32)
    c0, t0 = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(pairs), batch):
            chunk = pairs[s:s + batch]
            ims = [Image.open(io.BytesIO(images[i])).convert("RGB") for i, _ in chunk]
            inputs = proc(text=[c for _, c in chunk], images=ims, return_tensors="pt", padding=True)
            o = model(**inputs)
            ie = o.image_embeds / o.image_embeds.norm(dim=-1, keepdim=True)
            te = o.text_embeds / o.text_embeds.norm(dim=-1, keepdim=True)
            out[s:s + len(chunk)] = (ie * te).sum(-1).numpy()
    return time.perf_counter() - t0, time.process_time() - c0, out


def ours(enc, images: list[bytes], cands: list[list[str]]) -> tuple[float, float, np.ndarray, np.ndarray]:
    """The stage's scoring path; returns (seconds, CPU seconds, best score per image, all candidate scores)."""
    from pipeline.score.stage import score_pairs

    enc._text_cache.clear()
    c0, t0 = time.process_time(), time.perf_counter()
    img, errors = enc.encode_images(images)
    assert all(e is None for e in errors), errors
    texts = list(dict.fromkeys(t for c in cands for t in c))
    temb = dict(zip(texts, enc.encode_texts(texts)))
    best, _ = score_pairs(img, cands, temb, True)
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    every = np.array([temb[c] @ img[i] for i, cs in enumerate(cands) for c in cs], np.float32)
    return dt, cpu, best, every


def gpu_throughput(model_dir: Path, batch: int, seconds: float = 20.0) -> dict:
    """ViT-B/32 image tower on CUDA in fp16: preprocessed batches, images/s (model time only and end to end)."""
    import torch

    from pipeline.score.encoder import Encoder

    enc = Encoder(str(model_dir), device="cuda", dtype="fp16", batch_size=batch)
    images, _ = make_data(batch, 1)
    px = enc.transform(images).to("cuda", torch.float16)
    with torch.inference_mode():
        for _ in range(3):
            enc.model.get_image_features(pixel_values=px)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            enc.model.get_image_features(pixel_values=px)
            n += batch
        torch.cuda.synchronize()
        model_ips = n / (time.perf_counter() - t0)
    many = images * 8
    t0 = time.perf_counter()
    enc.encode_images(many, workers=8)
    e2e = len(many) / (time.perf_counter() - t0)
    return {"benchmark": "score_gpu_images", "ours": round(model_ips, 1), "baseline": 5000.0, "unit": "images/s",
            "speedup": round(model_ips / 5000.0, 3), "end_to_end_images_per_s": round(e2e, 1),
            "batch": batch, "device": torch.cuda.get_device_name()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="caption candidates per image")
    ap.add_argument("--batch", type=int, default=32, help="pairs (naive) / images (ours) per forward pass")
    ap.add_argument("--parity-images", type=int, default=16, help="images of the bf16 vs fp32 parity check")
    ap.add_argument("--model-dir", type=Path, default=None, help="reuse a built model folder")
    ap.add_argument("--gpu", action="store_true", help="measure CUDA fp16 images/s instead")
    args = ap.parse_args()
    import torch

    from pipeline.score.encoder import Encoder, cpu_has_fast_bf16, resolve_device_dtype

    tmp = Path(tempfile.mkdtemp(prefix="score-bench-"))
    model_dir = build_b32(args.model_dir or tmp / "clip-b32-random")
    if args.gpu:
        print(json.dumps(gpu_throughput(model_dir, 512)))
        return
    images, cands = make_data(args.images, args.k)
    n_pairs = sum(len(c) for c in cands)
    _, dtype = resolve_device_dtype("cpu", "auto")

    enc = Encoder(str(model_dir), device="cpu", dtype=dtype, batch_size=args.batch)
    ours(enc, images[:4], cands[:4])  # warm-up
    t_ours, c_ours, best, every = ours(enc, images, cands)
    t_k1, _, _, _ = ours(enc, images, [c[:1] for c in cands])
    t_naive, c_naive, naive_scores = naive(model_dir, images, cands, args.batch)

    # Parity: our fp32 scores vs the naive loop, and bf16 vs fp32 of our scorer.
    enc32 = enc if dtype == "fp32" else Encoder(str(model_dir), device="cpu", dtype="fp32", batch_size=args.batch)
    every32 = ours(enc32, images, cands)[3] if enc32 is not enc else every
    encbf = Encoder(str(model_dir), device="cpu", dtype="bf16", batch_size=args.batch)
    sub = slice(0, args.parity_images)
    e32 = ours(enc32, images[sub], cands[sub])[3]
    ebf = ours(encbf, images[sub], cands[sub])[3]
    bf_diff = np.abs(ebf - e32)

    ours_ps, naive_ps, k1_ps = n_pairs / t_ours, n_pairs / t_naive, args.images / t_k1
    print(f"{args.images} images x {args.k} captions = {n_pairs} pairs, ViT-B/32 (random weights), "
          f"{torch.get_num_threads()} threads, ours dtype {dtype} (CPU fast bf16: {cpu_has_fast_bf16()})")
    print(f"naive CLIPProcessor+CLIPModel loop: {t_naive:.1f} s, {naive_ps:.1f} pairs/s")
    print(f"ours (best of {args.k}): {t_ours:.1f} s, {ours_ps:.1f} pairs/s ({ours_ps / naive_ps:.2f}x)")
    print(f"ours (1 caption per image): {t_k1:.1f} s, {k1_ps:.1f} pairs/s ({k1_ps / naive_ps:.2f}x)")
    print(f"CPU seconds (all threads; robust to other load on the machine): naive {c_naive:.1f}, ours {c_ours:.1f} "
          f"({c_naive / c_ours:.2f}x)")
    print(f"ours fp32 vs naive scores: max abs diff {np.abs(every32 - naive_scores).max():.2e}")
    print(f"bf16 vs fp32 scores ({len(e32)} pairs): mean abs {bf_diff.mean():.2e}, max abs {bf_diff.max():.2e}")
    print(json.dumps({
        "benchmark": "score_vs_naive", "ours": round(ours_ps, 2), "baseline": round(naive_ps, 2), "unit": "pairs/s",
        "speedup": round(ours_ps / naive_ps, 2), "images": args.images, "k": args.k, "pairs": n_pairs,
        "dtype": dtype, "ours_k1_pairs_per_s": round(k1_ps, 2), "speedup_k1": round(k1_ps / naive_ps, 2),
        "ours_vs_naive_max_abs": float(np.abs(every32 - naive_scores).max()),
        "bf16_vs_fp32_mean_abs": float(bf_diff.mean()), "bf16_vs_fp32_max_abs": float(bf_diff.max()),
        "cpu_seconds_ours": round(c_ours, 2), "cpu_seconds_naive": round(c_naive, 2),
        "speedup_cpu_time": round(c_naive / c_ours, 2), "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
