"""Post-processing of raw generations into caption-ready sentences, each decision with its reason.

Per generation: strip chat preambles ("Sure, here is..."), list numbering, bullets, markdown and
quotes; split into sentences; drop meta text, sentences that name neither the class nor its head
noun, and non-visual claims (a configurable list); normalise whitespace; dedupe within the class;
join what is left into one description that fits CLIP's 77-token context, cutting at a sentence
boundary. Every dropped sentence becomes its own row with ``kept=False`` and a ``reject_reason``
("<reason>" or "<reason>: <detail>"; the part before ':' is the stats key).
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

log = logging.getLogger(__name__)

# Claims a photo cannot show. Matched case-insensitively at word boundaries (plural/-ed/-ing too).
NON_VISUAL_TERMS: tuple[str, ...] = (
    # taste, smell, sound, touch
    "taste", "tasty", "flavour", "flavor", "delicious", "savory", "savoury", "smell", "aroma", "odour",
    "odor", "fragrant", "fragrance", "scent", "sound", "noise", "soft to the touch",
    # food use and nutrition
    "nutritious", "nutrition", "nutritional", "vitamin", "protein", "calorie", "edible", "cook", "recipe",
    "cuisine", "eaten", "healthy to eat", "dish",
    # production and economics
    "milk yield", "milk production", "produces milk", "meat quality", "marbling", "yield", "productivity",
    "profitable", "profit", "price", "expensive", "cheap", "costly", "cost", "market value", "economic",
    "economically", "commercial value", "sold",
    # history and origin
    "history", "historically", "originated", "origin", "native to", "domesticated", "bred for",
    "developed in", "introduced", "century", "ancient", "known for", "renowned", "famous", "popular",
    "prized", "valued for",
    # behaviour and traits a still photo cannot show
    "temperament", "docile", "friendly", "gentle", "intelligent", "personality", "lifespan",
    "life expectancy", "hardy", "hardiness", "resistant to", "tolerant of", "thrives", "adaptable",
    "endangered", "conservation",
)

_META = re.compile(
    r"\b(as an ai|language model|i cannot|i can't|i can not|i'm sorry|i am sorry|i am unable|i'm unable|"
    r"let me know|hope this helps|here is|here are|here's|feel free)\b",
    re.I,
)
_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|absolutely|okay|ok|great)\b[!,.:]*\s*)?"
    r"(?:here(?:'s| is| are)\b[^:\n]*:\s*)?",
    re.I,
)
_LABEL = re.compile(r"^\s*(?:answer|caption|description|image description|response)\s*:\s*", re.I)
_BULLET = re.compile(r"^\s*(?:\(?\d{1,2}[.):]|\(?[a-hA-H]\)|[-*•·–—>]+|#+)\s+")
_MARKDOWN = re.compile(r"(\*\*|__|`+)")
_QUOTES = "\"'“”‘’«»„`"
_WS = re.compile(r"\s+")
_ABBREV = frozenset({"e.g", "i.e", "etc", "approx", "vs", "var", "spp", "sp", "cv", "subsp", "st", "dr", "no",
                     "mr", "mrs", "ca", "cm", "mm", "in", "ft", "fig"})
_SPLIT = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(\[]?[A-Z0-9])")
_TERMINAL = (".", "!", "?")


def normalise_ws(text: str) -> str:
    return _WS.sub(" ", text).strip()


def strip_quotes(s: str) -> str:
    s = s.strip()
    while len(s) >= 2 and s[0] in _QUOTES and s[-1] in _QUOTES:
        s = s[1:-1].strip()
    if s.count('"') == 1:  # a stray opening or closing quote left by the split
        s = s.replace('"', "").strip()
    if s and s[0] in "“‘«„" and not any(c in s for c in "”’»"):
        s = s[1:].strip()
    if s and s[-1] in "”’»" and not any(c in s for c in "“‘«„"):
        s = s[:-1].strip()
    return s


def split_sentences(text: str) -> list[str]:
    """Split into sentences: lines first (lists come one item a line), then at . ! ? before a capital."""
    out: list[str] = []
    for line in text.replace("\r", "\n").split("\n"):
        line = _MARKDOWN.sub("", line)
        line = _BULLET.sub("", line)
        line = _LABEL.sub("", line)
        line = normalise_ws(line)
        if not line:
            continue
        start = 0
        for m in _SPLIT.finditer(line):
            before = line[start:m.start()].rstrip(_QUOTES + ")]")
            last_word = before.rsplit(" ", 1)[-1].rstrip(".").lower()
            if last_word in _ABBREV or re.fullmatch(r"[a-z]", last_word or "-"):
                continue  # "e.g. Brown", "var. Alba", initials
            out.append(line[start:m.start()].strip())
            start = m.end()
        out.append(line[start:].strip())
    return [s for s in out if s]


def _word_forms(word: str) -> str:
    """Regex alternation for a noun and its simple plural/singular forms."""
    w = re.escape(word)
    forms = {w, w + "s", w + "es"}
    if word.endswith("y") and len(word) > 2:
        forms.add(re.escape(word[:-1]) + "ies")
    if word.endswith("s") and len(word) > 3:
        forms.add(re.escape(word[:-1]))
    if word.endswith("es") and len(word) > 4:
        forms.add(re.escape(word[:-2]))
    return "|".join(sorted(forms, key=len, reverse=True))


def mention_pattern(class_name: str) -> re.Pattern:
    """Regex matching the class name (flexible spaces/hyphens) or its head noun (last word)."""
    name = class_name.lower()
    aliases = re.findall(r"\(([^)]*)\)", name)  # "corn (maize) common rust": maize counts too
    base = re.sub(r"\([^)]*\)", " ", name)
    alts: list[str] = []
    for phrase in [base, *aliases]:
        words = re.findall(r"[a-z0-9]+", phrase)
        if not words:
            continue
        head = words[-1]
        full = r"[\s\-_]*".join(re.escape(w) for w in words[:-1])
        alts.append((full + r"[\s\-_]*" if full else "") + f"(?:{_word_forms(head)})")
        alts.append(f"(?:{_word_forms(head)})")
    if not alts:
        alts.append(re.escape(name.strip()) or r"\S")
    return re.compile(r"(?<![a-z0-9])(?:" + "|".join(alts) + r")(?![a-z0-9])", re.I)


def non_visual_pattern(terms: Iterable[str]) -> Optional[re.Pattern]:
    terms = sorted({t.strip().lower() for t in terms if t and t.strip()}, key=len, reverse=True)
    if not terms:
        return None
    alts = "|".join(r"[\s\-]+".join(re.escape(w) for w in t.split()) for t in terms)
    return re.compile(r"(?<![a-z0-9])(" + alts + r")(?:s|es|d|ed|ing)?(?![a-z0-9])", re.I)


def _from_json(text: str) -> str:
    """Structured outputs (extra_body structured_outputs / response_format) arrive as JSON: keep its strings,
    one per line, so a list of descriptions splits like a bulleted answer."""
    t = text.strip()
    if not t or t[0] not in "[{":
        return text
    try:
        data = json.loads(t)
    except ValueError:
        return text
    out: list[str] = []

    def walk(x) -> None:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(data)
    return "\n".join(out)


def _dedupe_key(s: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", s.lower()))


class TokenCounter:
    """Counts text tokens the way the CLIP text tower will (start and end tokens included).

    Loads ``name`` with ``local_files_only`` (a folder or a cached hub id). When that fails (no
    network, nothing cached) it falls back to a conservative estimate: one token per punctuation mark
    or digit, one per word of up to 7 letters and one per 4 letters of longer words, plus two for the
    start/end tokens. CLIP's BPE gives most English words a single token, so the estimate errs long
    and never lets a text past the model's context.
    """

    def __init__(self, name: Optional[str]):
        self.name = name
        self._tok = None
        self.kind = "estimate"
        if name and _tokenizer_available(name):
            try:
                from transformers import AutoTokenizer

                self._tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
                self.kind = f"tokenizer:{name}"
            except Exception as e:  # noqa: BLE001 - any load failure means: estimate instead
                log.info("describe: CLIP tokenizer %r failed to load (%s); bounding texts with a "
                         "conservative word/char estimate instead", name, type(e).__name__)
        elif name:
            log.info("describe: CLIP tokenizer %r is not available offline; bounding texts with a "
                     "conservative word/char estimate instead", name)

    @staticmethod
    def estimate(text: str) -> int:
        n = 2
        for piece in re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]", text):
            if piece.isalpha():
                n += 1 if len(piece) <= 7 else math.ceil(len(piece) / 4)
            else:
                n += 1
        return n

    def __call__(self, text: str) -> int:
        if self._tok is None:
            return self.estimate(text)
        return len(self._tok(text, add_special_tokens=True, truncation=False)["input_ids"])


def _tokenizer_available(name: str) -> bool:
    """A local folder, or a hub id whose tokenizer files are in the local cache (no network, no transformers
    import: that import alone costs seconds)."""
    p = Path(name).expanduser()
    if p.is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json"):
        try:
            hit = try_to_load_from_cache(name, f)
        except Exception:  # noqa: BLE001 - an id that is not a valid repo name is simply not cached
            return False
        if isinstance(hit, str):
            return True
    return False


@dataclass
class Decision:
    """One output row of a generation: the kept description or one dropped sentence."""

    text: str
    kept: bool
    reject_reason: Optional[str] = None


class PostProcessor:
    """Turns the generations of one class into kept descriptions and dropped sentences with reasons.

    Args:
        non_visual_terms: claims to drop (matched at word boundaries, simple inflections included).
        count_tokens: text -> CLIP token count (start/end included).
        max_tokens: CLIP's context length (77).
        require_class_mention: drop sentences naming neither the class nor its head noun.
        min_words: sentences shorter than this are fragments.
    """

    def __init__(self, non_visual_terms: Sequence[str] = NON_VISUAL_TERMS,
                 count_tokens: Callable[[str], int] = TokenCounter.estimate, max_tokens: int = 77,
                 require_class_mention: bool = True, min_words: int = 3):
        self.non_visual = non_visual_pattern(non_visual_terms)
        self.count_tokens = count_tokens
        self.max_tokens = max_tokens
        self.require_class_mention = require_class_mention
        self.min_words = min_words

    def clean(self, text: str, finish_reason: Optional[str] = None) -> tuple[list[str], list[Decision]]:
        """Sentences of one generation after stripping, plus the fragments dropped on the way."""
        text = _from_json(text or "")
        text = _PREAMBLE.sub("", text, count=1)
        sentences = [strip_quotes(s) for s in split_sentences(text)]
        sentences = [s for s in sentences if s]
        dropped: list[Decision] = []
        if sentences and finish_reason == "length" and not sentences[-1].endswith(_TERMINAL):
            dropped.append(Decision(sentences.pop(), False, "truncated"))
        return sentences, dropped

    def judge(self, sentence: str, mention: re.Pattern) -> Optional[str]:
        """Reject reason for one sentence, or None to keep it."""
        if _META.search(sentence):
            return "meta_text"
        if len(sentence.split()) < self.min_words:
            return "too_short"
        if self.non_visual is not None:
            m = self.non_visual.search(sentence)
            if m:
                return f"non_visual: {m.group(1).lower()}"
        if self.require_class_mention and not mention.search(sentence):
            return "no_class_mention"
        return None

    def process_class(self, class_name: str,
                      generations: Iterable[tuple[str, int, Optional[str], Optional[str]]]
                      ) -> list[tuple[str, int, Decision]]:
        """Process every generation of one class.

        Args:
            class_name: the class the sentences must be about.
            generations: (question_id, sample_index, text, finish_reason) in a stable order.

        Returns:
            (question_id, sample_index, decision) rows: per generation at most one kept description
            (its kept sentences joined within the token budget) and one row per dropped sentence.
        """
        mention = mention_pattern(class_name)
        seen: set[str] = set()
        out: list[tuple[str, int, Decision]] = []
        for qid, idx, text, finish in generations:
            if not text or not text.strip():
                out.append((qid, idx, Decision("", False, "empty_generation")))
                continue
            sentences, dropped = self.clean(text, finish)
            rows = [(qid, idx, d) for d in dropped]
            keep: list[str] = []
            for s in sentences:
                s = normalise_ws(s)
                if not s.endswith(_TERMINAL):
                    s += "."
                s = s[0].upper() + s[1:]
                reason = self.judge(s, mention)
                if reason is None:
                    key = _dedupe_key(s)
                    if key in seen:
                        reason = "duplicate"
                    else:
                        seen.add(key)
                if reason is None:
                    keep.append(s)
                else:
                    rows.append((qid, idx, Decision(s, False, reason)))
            joined: list[str] = []
            cut = False
            for s in keep:  # cut at the first sentence that no longer fits: the rest goes too
                if not cut and self.count_tokens(" ".join(joined + [s])) <= self.max_tokens:
                    joined.append(s)
                else:
                    cut = True
                    rows.append((qid, idx, Decision(s, False, "over_token_limit")))
            if joined:
                rows.insert(0, (qid, idx, Decision(" ".join(joined), True, None)))
            elif not rows:
                rows.append((qid, idx, Decision(normalise_ws(text), False, "no_sentence")))
            out.extend(rows)
        return out
