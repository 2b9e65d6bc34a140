"""Tiny, untrained models built locally (no download): for the offline demo, tests and benchmarks.

Everything they produce is meaningless as a measure of quality; they exist so the real loading code
(``from_pretrained`` on a folder) runs end to end without a network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional

from .assets import asset_dir

TINY_CLIP_NAME = "tiny-random-clip"


def _corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the prompt files plus a little general English."""
    lines: list[str] = []
    prompts = asset_dir("prompts")
    if prompts.is_dir():
        for f in sorted(prompts.glob("*.yaml")):
            lines += [ln.strip() for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
    lines += [
        "a photo of a leaf with brown spots and yellow halos",
        "a cow with black and white patches standing in a green field",
        "a silver fish with red fins and a forked tail on ice",
        "a healthy green tomato plant in a greenhouse",
        "the image shows a close up of a diseased corn leaf with rust pustules",
        "a photo of a car a dog a cat a house a tree a person a bird the sky",
    ]
    return lines


def build_tokenizer(out_dir: Path, extra_text: Optional[Iterable[str]] = None, vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on local text, saved as a transformers fast tokenizer.

    Special ids: <pad>=0, <unk>=1, <|startoftext|>=3, <|endoftext|>=4. The end token is not id 2 on
    purpose: transformers' CLIP pools the text at the first end token unless eos_token_id == 2.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<mask>", "<|startoftext|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = _corpus() + [t.lower() for t in (extra_text or [])]
    tok.train_from_iterator([t.lower() for t in text], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 3), ("<|endoftext|>", 4)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<pad>",
        unk_token="<unk>", model_max_length=77, do_lower_case=True,
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_clip(out_dir: str | Path, seed: int = 0, image_size: int = 64, patch_size: int = 8,
                    hidden: int = 64, layers: int = 2, extra_text: Optional[Iterable[str]] = None,
                    projection_dim: int = 64) -> Path:
    """Save a randomly initialised CLIP + tokenizer + image processor to ``out_dir`` (idempotent)."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, extra_text)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                         bos_token_id=3, eos_token_id=4, pad_token_id=0, projection_dim=projection_dim),
        vision_config=dict(hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                           num_attention_heads=4, image_size=image_size, patch_size=patch_size,
                           projection_dim=projection_dim),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg)
    model.save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(out)
    (out / "MODEL_CARD.md").write_text(
        f"# {TINY_CLIP_NAME}\n\nRandomly initialised CLIP (ViT {image_size}px/{patch_size}, width {hidden}, "
        f"{layers} layers) with a byte-level BPE tokenizer trained on the project's prompt files. Untrained: "
        "scores from it carry no meaning. Built locally for the offline demo and tests.\n"
    )
    (out / "alive_tiny.json").write_text(json.dumps({"kind": "tiny-random-clip", "seed": seed}) + "\n")
    return out
