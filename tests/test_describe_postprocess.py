"""Post-processing on realistic LLM outputs: every kept sentence is clean, every drop has its reason."""

from __future__ import annotations

import pytest

from pipeline.describe.postprocess import (
    PostProcessor,
    TokenCounter,
    mention_pattern,
    split_sentences,
    strip_quotes,
)

# Outputs in the styles instruction-tuned models really answer CuPL questions with.
CHATTY = """Sure! Here is a description of a tomato leaf with early blight:

1. **Early blight** appears as dark brown spots with concentric rings on the older tomato leaves.
2. The spots are often surrounded by a yellow halo.
3. Early blight can reduce tomato yield by up to 50%.

I hope this helps! Let me know if you need anything else."""

QUOTED = '"A Holstein cow has a black-and-white patched coat, a long straight back and a large udder." ' \
         "Holsteins are renowned for their high milk production."

BULLETS = """- Nile tilapia have a deep, laterally compressed body with silvery-grey scales.
- The Nile tilapia shows faint vertical bars on its flanks, e.g. six to eight dark bands.
* The Nile tilapia's tail fin has regular dark stripes and its dorsal fin is long and spiny, and the fish"""

CAPTION = "Caption: “A close-up of a rusty-red Angus calf standing in straw.”"

MARKDOWN = """## Description
Angus cattle are solid black, polled and muscular.
Angus cattle originated in Scotland in the 19th century.
Angus cattle are solid black, polled and muscular."""


def _rows(pp, cls, gens):
    return [(q, i, d.text, d.kept, d.reject_reason) for q, i, d in pp.process_class(cls, gens)]


def test_chatty_numbered_answer_is_stripped_and_filtered():
    rows = _rows(PostProcessor(), "tomato early blight", [("q", 0, CHATTY, "stop")])
    kept = [r for r in rows if r[3]]
    assert [r[2] for r in kept] == [
        "Early blight appears as dark brown spots with concentric rings on the older tomato leaves."]
    reasons = {r[2]: r[4] for r in rows if not r[3]}
    assert reasons["The spots are often surrounded by a yellow halo."] == "no_class_mention"
    assert reasons["Early blight can reduce tomato yield by up to 50%."] == "non_visual: yield"
    assert reasons["I hope this helps!"] == "meta_text"
    assert reasons["Let me know if you need anything else."] == "meta_text"
    assert not any("Sure" in r[2] or "**" in r[2] or r[2].startswith(("1.", "2.")) for r in rows)


def test_quotes_removed_and_non_visual_claim_dropped():
    rows = _rows(PostProcessor(), "holstein", [("q", 3, QUOTED, "stop")])
    assert rows[0] == ("q", 3, "A Holstein cow has a black-and-white patched coat, a long straight back and a "
                       "large udder.", True, None)
    assert rows[1][3:] == (False, "non_visual: renowned")  # plural "Holsteins" still counts as a mention


def test_bullets_abbreviations_and_truncated_tail():
    rows = _rows(PostProcessor(), "nile tilapia", [("q", 0, BULLETS, "length")])
    kept = [r[2] for r in rows if r[3]]
    assert kept == ["Nile tilapia have a deep, laterally compressed body with silvery-grey scales. The Nile tilapia "
                    "shows faint vertical bars on its flanks, e.g. six to eight dark bands."]
    assert [r[4] for r in rows if not r[3]] == ["truncated"]


def test_caption_label_and_curly_quotes():
    rows = _rows(PostProcessor(), "angus", [("q", 0, CAPTION, "stop")])
    assert rows == [("q", 0, "A close-up of a rusty-red Angus calf standing in straw.", True, None)]


def test_markdown_history_and_duplicates_within_class():
    rows = _rows(PostProcessor(), "angus cattle", [("a", 0, MARKDOWN, "stop"),
                                                     ("b", 1, "Angus cattle are solid black, polled and muscular!", "stop")])
    assert [r[2] for r in rows if r[3]] == ["Angus cattle are solid black, polled and muscular."]
    reasons = sorted(r[4] for r in rows if not r[3])
    assert reasons == ["duplicate", "duplicate", "non_visual: originated", "too_short"]  # "Description." too


def test_empty_and_whitespace_generations_are_recorded():
    rows = _rows(PostProcessor(), "carp", [("q", 0, "", "stop"), ("q", 1, "   \n ", "stop"), ("q", 2, None, "stop")])
    assert [(r[1], r[3], r[4]) for r in rows] == [(0, False, "empty_generation"), (1, False, "empty_generation"),
                                                  (2, False, "empty_generation")]


def test_fits_clip_context_cutting_at_sentence_boundary():
    s = "The common carp has large bronze scales and two pairs of barbels near its mouth."
    long_gen = " ".join([s, s.replace("large", "big"), s.replace("bronze", "golden"), s.replace("two", "four")])
    counter = TokenCounter(None)
    pp = PostProcessor(count_tokens=counter, max_tokens=40)
    rows = _rows(pp, "common carp", [("q", 0, long_gen, "stop")])
    kept = [r for r in rows if r[3]]
    assert len(kept) == 1 and counter(kept[0][2]) <= 40
    assert kept[0][2].endswith(".") and kept[0][2].count(".") == 2  # whole sentences only
    assert [r[4] for r in rows if not r[3]] == ["over_token_limit", "over_token_limit"]
    # a sentence alone above the limit is never cut mid-sentence: it is dropped
    rows = _rows(PostProcessor(count_tokens=counter, max_tokens=10), "common carp", [("q", 0, s, "stop")])
    assert rows == [("q", 0, s, False, "over_token_limit")]


def test_token_counter_uses_a_local_tokenizer_when_given(tmp_path):
    from pipeline.tiny_models import build_tokenizer

    build_tokenizer(tmp_path / "tok", vocab_size=512)
    counter = TokenCounter(str(tmp_path / "tok"))
    assert counter.kind.startswith("tokenizer:")
    text = "a photo of a leaf with brown spots"
    assert counter(text) == len(counter._tok(text)["input_ids"]) >= 3
    assert TokenCounter("no/such-model-anywhere").kind == "estimate"
    # the estimate errs long: at least one token per word plus start/end
    assert TokenCounter.estimate(text) >= len(text.split()) + 2


def test_configurable_non_visual_terms_and_class_mention_switch():
    gen = [("q", 0, "The koi carp has a sweet taste. The koi carp has orange and white patches.", "stop")]
    rows = _rows(PostProcessor(non_visual_terms=["orange"]), "koi carp", gen)
    assert [r[2] for r in rows if r[3]] == ["The koi carp has a sweet taste."]
    rows = _rows(PostProcessor(require_class_mention=False), "koi carp", [("q", 0, "Orange and white patches cover "
                                                                                 "the body.", "stop")])
    assert rows[0][3] is True


@pytest.mark.parametrize("cls,text,hit", [
    ("corn (maize) common rust", "Maize leaves show rust pustules.", True),
    ("corn (maize) common rust", "Common rust forms on the leaf.", True),
    ("holstein friesian", "A Holstein-Friesian cow grazes.", True),
    ("strawberry", "Strawberries are red with seeds.", True),
    ("tomato early blight", "A tomato leaf is green.", False),
    ("eel", "The steel bucket is grey.", False),
])
def test_mention_pattern(cls, text, hit):
    assert bool(mention_pattern(cls).search(text)) is hit


def test_split_and_strip_helpers():
    assert split_sentences("It is var. Alba from the field. It has spots! Does it? yes") == [
        "It is var. Alba from the field.", "It has spots!", "Does it? yes"]
    assert strip_quotes("'“A carp.”'") == "A carp."


def test_structured_output_json_is_flattened_to_sentences():
    gen = '{"descriptions": ["A koi carp has orange and white patches.", "The koi carp has long barbels."]}'
    rows = _rows(PostProcessor(), "koi carp", [("q", 0, gen, "stop")])
    assert rows == [("q", 0, "A koi carp has orange and white patches. The koi carp has long barbels.", True, None)]
