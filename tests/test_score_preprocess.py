"""The scorer's own preprocessing against transformers' image processors, and encoder settings."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.images import process_image
from pipeline.score import encoder as enc_mod
from pipeline.score.preprocess import ImageTransform, PreprocessError
from pipeline.synthetic import draw_image


def _jpeg(w: int, h: int, seed: int) -> bytes:
    im = Image.open(io.BytesIO(draw_image("corn rust", seed, "crops", seed, 0, max(w, h)))).resize((w, h))
    out = io.BytesIO()
    im.save(out, format="JPEG", quality=92)
    return out.getvalue()


@pytest.fixture(scope="module")
def ingested() -> list[bytes]:
    """Images as the ingest stage stores them: shorter side 256 (or smaller, never upscaled)."""
    sizes = [(512, 512), (640, 300), (300, 700), (200, 150), (1000, 260)]
    return [process_image(_jpeg(w, h, i), 256).jpeg for i, (w, h) in enumerate(sizes)]


def _processors():
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    return {
        "clip-224": CLIPImageProcessor(),
        "clip-64": CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}),
        "siglip-224": SiglipImageProcessor(),
    }


@pytest.mark.parametrize("name", ["clip-224", "siglip-224"])
def test_matches_image_processor_on_ingested_images(ingested, name):
    """Model input no more than twice smaller than the stored image: no draft decode, same pixels."""
    proc = _processors()[name]
    t = ImageTransform.from_processor(proc)
    mine = t(ingested).numpy()
    ref = proc(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in ingested], return_tensors="np")["pixel_values"]
    assert mine.shape == ref.shape
    np.testing.assert_allclose(mine, ref, atol=1e-4)


@pytest.mark.parametrize("name", ["clip-64", "tiny"])
def test_draft_decode_stays_within_tolerance(ingested, name, tiny_clip_dir):
    """256 px stored, 64 px model input: libjpeg's draft decode (1/2..1/8 scale) is close, not bit-exact."""
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(tiny_clip_dir) if name == "tiny" else _processors()[name]
    mine = ImageTransform.from_processor(proc)(ingested).numpy()
    ref = proc(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in ingested], return_tensors="np")["pixel_values"]
    assert mine.shape == ref.shape
    diff = np.abs(mine - ref)  # normalised units: 0.03 is about 2/255 of pixel value
    assert diff.mean() < 0.03, diff.mean()
    assert np.percentile(diff, 99) < 0.25


def test_draft_mode_on_large_images_stays_close():
    """Large JPEGs decode at reduced scale (draft): not bit-exact, but close to the full decode."""
    proc = _processors()["clip-224"]
    big = [_jpeg(1200, 900, 1), _jpeg(900, 1600, 2)]
    mine = ImageTransform.from_processor(proc)(big).numpy()
    ref = proc(images=[Image.open(io.BytesIO(b)).convert("RGB") for b in big], return_tensors="np")["pixel_values"]
    diff = np.abs(mine - ref)
    assert diff.mean() < 0.03, diff.mean()


def test_resized_size_floors_the_long_side_like_transformers():
    t = ImageTransform(224, None, 3, (224, 224), 1 / 255, (0.5,) * 3, (0.5,) * 3)
    assert t.resized_size(256, 385) == (224, int(224 * 385 / 256))
    assert t.resized_size(385, 256) == (int(224 * 385 / 256), 224)
    assert ImageTransform(None, (64, 48), 2, None, None, None, None).resized_size(300, 100) == (48, 64)


def test_bad_bytes_raise_a_clear_error():
    t = ImageTransform.from_processor(_processors()["clip-64"])
    with pytest.raises(PreprocessError, match="cannot decode"):
        t.load(b"not an image")


def test_encoder_reports_per_image_errors_and_keeps_order(tiny_clip_dir, ingested):
    enc = enc_mod.Encoder(str(tiny_clip_dir), batch_size=2)
    emb, errors = enc.encode_images([ingested[0], b"broken", ingested[1], ingested[0]])
    assert [e is None for e in errors] == [True, False, True, True]
    assert emb.shape == (3, enc.dim)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[0], emb[2], atol=1e-6)  # same image, different batch
    # Text: duplicates encoded once, the same embedding whatever the other texts are.
    a = enc.encode_texts(["a photo of corn rust.", "a photo of corn rust.", "a field photo."])
    assert enc.cache_misses == 2
    b = enc_mod.Encoder(str(tiny_clip_dir)).encode_texts_uncached(["a photo of corn rust.", "another text"])
    assert np.array_equal(a[0], a[1]) and np.array_equal(a[0], b[0])


def test_dtype_auto_follows_cpu_flags(monkeypatch):
    from pipeline import devices

    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "avx512_bf16"})
    assert enc_mod.resolve_device_dtype("cpu", "auto") == ("cpu", "bf16")
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2", "amx_bf16", "amx_tile"})
    assert enc_mod.resolve_device_dtype("cpu", "auto") == ("cpu", "bf16")
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx2"})
    assert enc_mod.resolve_device_dtype("cpu", "auto") == ("cpu", "fp32")
    assert enc_mod.resolve_device_dtype("cuda", "auto") == ("cuda", "fp16")
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        enc_mod.resolve_device_dtype("cpu", "fp16")


def test_bf16_scores_stay_close_to_fp32(tiny_clip_dir, ingested):
    texts = ["a photo of corn rust.", "a close-up photo of a leaf with corn rust.", "a field photo of wheat."]
    out = {}
    for dt in ("fp32", "bf16"):
        e = enc_mod.Encoder(str(tiny_clip_dir), device="cpu", dtype=dt)
        img, _ = e.encode_images(ingested)
        out[dt] = img @ e.encode_texts(texts).T
    assert np.abs(out["bf16"] - out["fp32"]).max() < 0.05
