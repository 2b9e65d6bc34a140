"""LLM backends of the describe stage: ``openai`` (any OpenAI-compatible server, vLLM in production)
and ``transformers`` (in-process generation with a small local model).

Both share one flow (:class:`LLMBackend.describe`): expand every class into its prompt set's
questions, look each sample up in the request cache, generate only what is missing, then
post-process per class into DESCRIPTIONS rows. A sample whose request kept failing becomes a row
with ``kept=False`` and ``reject_reason="request_failed: ..."``; the rest of the run goes on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import email.utils
import hashlib
import json
import logging
import os
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx
import pyarrow as pa

from .. import layout
from ..recipe import DescribeConfig
from ..stats import StageStats
from ..store import RunStore
from ..tables import DESCRIPTIONS
from .classes import ClassInfo
from .cache import RequestCache, request_key
from .postprocess import NON_VISUAL_TERMS, PostProcessor, TokenCounter
from .prompts import Prompt, PromptSet, load_prompt_sets

log = logging.getLogger(__name__)

POSTPROCESS_VERSION = "pp1"  # bump when post-processing changes what is kept
_RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})
_N_REJECTED = re.compile(r"(\bn\b|'n'|\"n\"|num_return_sequences|multiple (choices|completions))", re.I)


class DescribeError(RuntimeError):
    """The describe stage cannot run at all (server unreachable, model not served, bad config)."""


class RequestFailed(Exception):
    """A request that failed for good (retries spent or a non-retryable answer)."""


class NRejected(Exception):
    """The server refused n > 1 in one request."""


@dataclass
class WorkItem:
    """One question about one class: the samples it needs and their cache keys."""

    cls: ClassInfo
    pset: PromptSet
    prompt: Prompt
    keys: list[str]
    missing: list[int] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.cls.domain}/{self.cls.class_name}/{self.prompt.question_id}"


@dataclass
class Results:
    """Generated samples and failures, keyed by (work item index, sample index)."""

    samples: dict[tuple[int, int], tuple[Optional[str], Optional[str]]] = field(default_factory=dict)
    failures: dict[tuple[int, int], str] = field(default_factory=dict)
    counters: Counter = field(default_factory=Counter)
    class_rows: dict[ClassInfo, list[tuple]] = field(default_factory=dict)  # post-processed early


class _Warner:
    """Rate-limited warnings: the first few, then one every ``every``."""

    def __init__(self, first: int = 5, every: int = 100):
        self.n, self.first, self.every = 0, first, every

    def __call__(self, msg: str, *args: Any) -> None:
        self.n += 1
        if self.n <= self.first or self.n % self.every == 0:
            log.warning(msg + (" (%d so far)" % self.n if self.n > self.first else ""), *args)


def _run_coro(coro):
    """asyncio.run, also from code already inside a running event loop (then on a helper thread)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()


def _derive_seed(base: Optional[int], label: str, index: int) -> Optional[int]:
    if base is None:
        return None
    h = hashlib.blake2b(f"{base}\x00{label}\x00{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") & 0x7FFFFFFF


class LLMBackend:
    """Shared flow of the LLM backends; subclasses implement :meth:`generate`."""

    name = "llm"

    def __init__(self, cfg: DescribeConfig, store: RunStore):
        if not cfg.model:
            raise DescribeError(
                f"describe.model is required for backend {self.name!r}: "
                + ("the model name the server was started with (`vllm serve <model>`; GET /v1/models lists it)"
                   if self.name == "openai" else "a hub id or a local model folder")
            )
        self.cfg = cfg
        self.store = store
        self.prompt_sets = load_prompt_sets(cfg)
        self.count_tokens = TokenCounter(cfg.clip_tokenizer)
        self._postprocs: dict[str, PostProcessor] = {}
        self._sampling_cache: dict[str, str] = {}
        for domain, ps in self.prompt_sets.items():
            terms = list(cfg.non_visual_terms) if cfg.non_visual_terms is not None else \
                list(NON_VISUAL_TERMS) + list(ps.spec.non_visual_terms)
            self._postprocs[domain] = PostProcessor(terms, self.count_tokens, cfg.max_text_tokens,
                                               cfg.require_class_mention)

    # ----- identity -----
    def sampling(self, pset: PromptSet) -> dict[str, Any]:
        """The sampling parameters this backend actually uses for a prompt set (recorded and cache-keyed)."""
        return pset.sampling

    def sampling_key(self, pset: PromptSet) -> dict[str, Any]:
        """Everything besides the messages that changes an answer (n excluded: a transport detail)."""
        s = {k: v for k, v in self.sampling(pset).items() if k != "n"}
        return {**s, "api": self.cfg.api, "extra_body": self.cfg.extra_body}

    def version(self) -> str:
        shas = ",".join(f"{d}={p.sha}" for d, p in sorted(self.prompt_sets.items()))
        return f"{self.name}:{self.cfg.model}:{shas}:{POSTPROCESS_VERSION}:{self.count_tokens.kind}"

    # ----- the flow -----
    def plan(self, classes: list[ClassInfo]) -> list[WorkItem]:
        items = []
        for c in classes:
            pset = self.prompt_sets.get(c.domain) or self.prompt_sets["general"]
            skey = self.sampling_key(pset)
            for p in pset.prompts_for(c.class_name, c.context):
                content = p.prompt if self.cfg.api == "completions" else list(p.messages)
                keys = [request_key(self.cfg.model, content, skey, i) for i in range(pset.sampling["n"])]
                items.append(WorkItem(c, pset, p, keys))
        return items

    def describe(self, classes: list[ClassInfo], stats: StageStats) -> pa.Table:
        items = self.plan(classes)
        cache_path = self.store.path(layout.DESCRIBE_CACHE) if self.cfg.cache else None
        cache = RequestCache(cache_path)
        res = Results()
        try:
            all_keys = [k for it in items for k in it.keys]
            found = cache.get_many(all_keys)
            for ii, it in enumerate(items):
                for si, k in enumerate(it.keys):
                    if k in found:
                        res.samples[(ii, si)] = found[k]
                    else:
                        it.missing.append(si)
            todo = [ii for ii, it in enumerate(items) if it.missing]
            stats.add("classes", len(classes))
            stats.add("samples", len(all_keys))
            stats.add("cache_hits", len(found))
            stats.gauge("cache_hit_rate", round(len(found) / len(all_keys), 4) if all_keys else 0.0)
            log.info("describe[%s]: %d classes, %d questions, %d samples (%d cached, %d to generate)",
                     self.name, len(classes), len(items), len(all_keys), len(found), len(all_keys) - len(found))
            t0 = time.perf_counter()
            if todo:
                self.generate(items, todo, cache, res)
            gen_s = time.perf_counter() - t0
        finally:
            cache.close()
        for k, v in res.counters.items():
            stats.add(k, v)
        stats.counters["generation_seconds"] = round(gen_s, 3)
        stats.gauge("tokens_per_s", round(res.counters["tokens_out"] / gen_s, 1) if gen_s > 0 else 0.0)
        return self.rows(items, res)

    def class_rows(self, items: list[WorkItem], idxs: list[int], res: Results) -> list[tuple]:
        """Post-processed rows of one class (its work items ``idxs``), as DESCRIPTIONS tuples."""
        c = items[idxs[0]].cls
        gens, failed = [], []
        for ii in idxs:
            it = items[ii]
            for si in range(len(it.keys)):
                if (ii, si) in res.samples:
                    text, finish = res.samples[(ii, si)]
                    gens.append((it.prompt.question_id, si, text, finish))
                else:
                    failed.append((it, si, res.failures.get((ii, si), "request_failed: no answer")))
        qid_item = {items[ii].prompt.question_id: items[ii] for ii in idxs}
        post = self._postprocs.get(c.domain) or self._postprocs["general"]
        out = []

        def row(it: WorkItem, qid: str, si: int, text: Optional[str], kept: bool, reason: Optional[str]) -> tuple:
            return (it.cls.domain, it.cls.class_name, qid, si, text, self.name, self.cfg.model, it.pset.sha,
                    self._sampling_json(it.pset), kept, reason)

        for qid, si, d in post.process_class(c.class_name, gens):
            out.append(row(qid_item[qid], qid, si, d.text, d.kept, d.reject_reason))
        for it, si, reason in failed:
            out.append(row(it, it.prompt.question_id, si, None, False, reason))
        return out

    def rows(self, items: list[WorkItem], res: Results) -> pa.Table:
        """The DESCRIPTIONS table, class by class; classes post-processed during generation are reused."""
        by_class: dict[ClassInfo, list[int]] = defaultdict(list)
        for ii, it in enumerate(items):
            by_class[it.cls].append(ii)
        out: list[tuple] = []
        for c in sorted(by_class):
            done = res.class_rows.pop(c, None)
            out.extend(done if done is not None else self.class_rows(items, by_class[c], res))
        names = [f.name for f in DESCRIPTIONS]
        cols = list(zip(*out)) if out else [[] for _ in names]
        return pa.table({n: list(v) for n, v in zip(names, cols)}, schema=DESCRIPTIONS)

    def _sampling_json(self, pset: PromptSet) -> str:
        cached = self._sampling_cache.get(pset.sha)
        if cached is not None:
            return cached
        extra = {"extra_body": self.cfg.extra_body} if self.cfg.extra_body else {}
        self._sampling_cache[pset.sha] = out = json.dumps({**self.sampling(pset), "api": self.cfg.api, **extra},
                                                          sort_keys=True)
        return out

    def generate(self, items: list[WorkItem], todo: list[int], cache: RequestCache, res: Results) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# openai: async client for any OpenAI-compatible server
# ---------------------------------------------------------------------------------------------


def retry_after_seconds(value: Optional[str]) -> Optional[float]:
    """Seconds asked by a Retry-After header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIBackend(LLMBackend):
    """Client for ``vllm serve`` (or any OpenAI-compatible server) with bounded concurrency,
    retries with exponential backoff + jitter (Retry-After honoured), n>1 per request with a
    fallback to one request per sample, and extra_body pass-through."""

    name = "openai"

    def __init__(self, cfg: DescribeConfig, store: RunStore):
        super().__init__(cfg, store)
        self._n_ok = cfg.use_n
        self._rng = random.Random()
        self._warn = _Warner()

    # ----- requests -----
    def sampling(self, pset: PromptSet) -> dict[str, Any]:
        """The prompt set's sampling; the seed only when it is sent (``describe.send_seed``)."""
        return pset.sampling if self.cfg.send_seed else {**pset.sampling, "seed": None}

    def payload(self, it: WorkItem, n: int, seed: Optional[int]) -> dict[str, Any]:
        """The JSON body of one request.

        Every sampling parameter is sent, the vLLM ones (top_k, min_p, repetition_penalty) included:
        vLLM fills the unsent ones from the model's generation_config, so the captions would not be
        sampled the way the recipe (and the recorded ``sampling``) says.
        """
        s = it.pset.sampling
        body: dict[str, Any] = {"model": self.cfg.model, "n": n, "temperature": s["temperature"],
                                "top_p": s["top_p"], "top_k": s["top_k"], "min_p": s["min_p"],
                                "repetition_penalty": s["repetition_penalty"], "max_tokens": s["max_tokens"]}
        if self.cfg.api == "chat":
            body["messages"] = list(it.prompt.messages)
        else:
            body["prompt"] = it.prompt.prompt
        if s["stop"]:
            body["stop"] = s["stop"]
        if seed is not None:
            body["seed"] = seed
        body.update(self.cfg.extra_body)  # extra_body: merged into the JSON like the openai client does
        return body

    def _parse(self, data: Any) -> tuple[list[tuple[Optional[str], Optional[str]]], dict[str, int]]:
        """(text, finish_reason) per choice in index order, plus usage; ValueError when malformed."""
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
            raise ValueError("no choices in the response")
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0) if isinstance(c, dict) else 0)
        out = []
        for c in choices:
            if not isinstance(c, dict):
                raise ValueError("a choice is not an object")
            if self.cfg.api == "chat":
                msg = c.get("message")
                if not isinstance(msg, dict):
                    raise ValueError("a choice has no message")
                text = msg.get("content")
            else:
                text = c.get("text")
            if text is not None and not isinstance(text, str):
                raise ValueError("a choice's content is not text")
            out.append((text, c.get("finish_reason")))
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return out, {"in": int(usage.get("prompt_tokens") or 0), "out": int(usage.get("completion_tokens") or 0),
                     "has": int(bool(usage))}

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        base = min(self.cfg.backoff_max, self.cfg.backoff_base * (2 ** attempt))
        delay = base / 2 + self._rng.uniform(0, base / 2)  # "equal jitter": spreads retries, keeps a floor
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    async def _post(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, path: str, body: dict[str, Any],
                    label: str, c: Counter):
        """POST with retries; returns the parsed choices and usage, raises RequestFailed/NRejected."""
        err = "unknown"
        for attempt in range(self.cfg.max_retries + 1):
            retry_after = None
            async with sem:
                c["requests"] += 1
                try:
                    async with asyncio.timeout(self.cfg.timeout):
                        r = await client.post(path, json=body)
                        data = r.json() if r.status_code == 200 else None
                except (TimeoutError, httpx.TimeoutException):
                    err, r = "timeout", None
                    c["errors_timeout"] += 1
                except httpx.TransportError as e:
                    err, r = f"connection error ({type(e).__name__})", None
                    c["errors_connection"] += 1
                except ValueError:  # JSON decode error of a 200 reply
                    err, r = "malformed JSON", None
                    c["errors_malformed"] += 1
            if r is not None:
                if r.status_code == 200:
                    try:
                        return self._parse(data)
                    except ValueError as e:
                        err = f"malformed response ({e})"
                        c["errors_malformed"] += 1
                elif r.status_code in _RETRY_STATUS or r.status_code >= 500:
                    err = f"HTTP {r.status_code}"
                    c[f"errors_http_{r.status_code}"] += 1
                    retry_after = retry_after_seconds(r.headers.get("retry-after"))
                else:
                    text = r.text[:300]
                    if r.status_code in (400, 422) and body.get("n", 1) > 1 and _N_REJECTED.search(text):
                        raise NRejected(text)
                    c[f"errors_http_{r.status_code}"] += 1
                    raise RequestFailed(f"HTTP {r.status_code}: {' '.join(text.split())[:200]}")
            if attempt == self.cfg.max_retries:
                break
            delay = self._backoff(attempt, retry_after)
            c["retries"] += 1
            self._warn("describe: %s failed (%s), retry %d/%d in %.1fs", label, err, attempt + 1,
                       self.cfg.max_retries, delay)
            await asyncio.sleep(delay)
        raise RequestFailed(f"{err} after {self.cfg.max_retries + 1} attempts")

    async def _fetch(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, ii: int, it: WorkItem,
                     cache: RequestCache, res: Results) -> None:
        path = "chat/completions" if self.cfg.api == "chat" else "completions"
        c = res.counters
        remaining = list(it.missing)
        while remaining:
            n = len(remaining) if self._n_ok else 1
            seed = _derive_seed(self.sampling(it.pset)["seed"], it.label, remaining[0])
            body = self.payload(it, n, seed)
            try:
                choices, usage = await self._post(client, sem, path, body, it.label, c)
            except NRejected as e:
                if self._n_ok:
                    self._n_ok = False
                    c["n_fallback"] = 1
                    log.warning("describe: the server refused n=%d in one request (%s); asking one sample per "
                                "request from now on", n, " ".join(e.args[0].split())[:120])
                continue
            except RequestFailed as e:
                reason = f"request_failed: {e}"
                c["failed_requests"] += 1
                self._warn("describe: %s gave up: %s", it.label, e)
                for si in remaining:
                    res.failures[(ii, si)] = reason
                return
            got = choices[:len(remaining)]
            c["requests_ok"] += 1
            c["tokens_in"] += usage["in"]
            c["tokens_out"] += usage["out"]
            c["usage_missing"] += 1 - usage["has"]
            c["samples_generated"] += len(got)
            rows = []
            for (text, finish), si in zip(got, remaining):
                res.samples[(ii, si)] = (text, finish)
                rows.append((it.keys[si], text, finish, {"model": self.cfg.model, "seed": seed}))
            cache.put_many(rows)  # committed now: a killed run never asks for these again
            remaining = remaining[len(got):]

    async def _check_model(self, client: httpx.AsyncClient) -> None:
        """Fail early and clearly when the server is unreachable or does not serve the model."""
        err = None
        for attempt in range(min(self.cfg.max_retries, 3) + 1):
            try:
                r = await client.get("models", timeout=self.cfg.timeout)
            except httpx.HTTPError as e:
                err = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    try:
                        served = [m.get("id") for m in r.json().get("data", [])]
                    except (ValueError, AttributeError):
                        log.warning("describe: %smodels returned no model list; not checking the model name",
                                    client.base_url)
                        return
                    if self.cfg.model not in served:
                        raise DescribeError(f"describe.model {self.cfg.model!r} is not served by "
                                            f"{self.cfg.base_url} (it serves {served}); fix describe.model")
                    return
                if r.status_code in (401, 403):
                    raise DescribeError(f"{self.cfg.base_url} refused the API key (HTTP {r.status_code}); set "
                                        f"${self.cfg.api_key_env} to the key the server was started with")
                if r.status_code not in _RETRY_STATUS and r.status_code < 500:
                    log.warning("describe: GET %smodels answered HTTP %d; not checking the model name",
                                client.base_url, r.status_code)
                    return
                err = f"HTTP {r.status_code}"
            await asyncio.sleep(self._backoff(attempt, None))
        raise DescribeError(f"cannot reach the LLM server at {self.cfg.base_url} ({err}); start it "
                            f"(docker compose -f docker/vllm.compose.yaml up) or fix describe.base_url")

    async def _agenerate(self, items: list[WorkItem], todo: list[int], cache: RequestCache, res: Results) -> None:
        key = os.environ.get(self.cfg.api_key_env)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        if not key:
            log.info("describe: $%s is not set; sending no API key", self.cfg.api_key_env)
        limits = httpx.Limits(max_connections=self.cfg.concurrency, max_keepalive_connections=self.cfg.concurrency)
        base = self.cfg.base_url.rstrip("/") + "/"
        async with httpx.AsyncClient(base_url=base, headers=headers, limits=limits,
                                     timeout=httpx.Timeout(self.cfg.timeout)) as client:
            await self._check_model(client)
            sem = asyncio.Semaphore(self.cfg.concurrency)
            by_class: dict[ClassInfo, list[int]] = defaultdict(list)
            for ii, it in enumerate(items):
                by_class[it.cls].append(ii)
            pending = Counter(items[ii].cls for ii in todo)

            loop = asyncio.get_running_loop()

            async def fetch(ii: int) -> None:
                await self._fetch(client, sem, ii, items[ii], cache, res)
                c = items[ii].cls
                pending[c] -= 1
                if pending[c] == 0:
                    # Post-process a finished class while other requests are in flight, on a worker thread:
                    # in the loop it would stall sending and receiving for tens of ms per class.
                    res.class_rows[c] = await loop.run_in_executor(pool, self.class_rows, items, by_class[c], res)

            with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="describe-post") as pool:
                await asyncio.gather(*(fetch(ii) for ii in todo))

    def generate(self, items: list[WorkItem], todo: list[int], cache: RequestCache, res: Results) -> None:
        log.info("describe[openai]: %s model=%s concurrency=%d", self.cfg.base_url, self.cfg.model,
                 self.cfg.concurrency)
        _run_coro(self._agenerate(items, todo, cache, res))


# ---------------------------------------------------------------------------------------------
# transformers: in-process batched generation
# ---------------------------------------------------------------------------------------------


class TransformersBackend(LLMBackend):
    """In-process generation with a small causal LM (hub id or local folder), batched per sampling."""

    name = "transformers"

    def __init__(self, cfg: DescribeConfig, store: RunStore):
        super().__init__(cfg, store)
        self._tok = None
        self._model = None
        self._device = None

    def _load(self) -> None:
        if self._model is not None:
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = self.cfg.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            tok = AutoTokenizer.from_pretrained(self.cfg.model)
            model = AutoModelForCausalLM.from_pretrained(self.cfg.model)
        except (OSError, ValueError) as e:
            raise DescribeError(f"describe.model {self.cfg.model!r} could not be loaded ({e}); give a local "
                                "folder or a hub id that is cached (HF_HUB_OFFLINE is honoured)") from None
        tok.padding_side = "left"  # decoder-only: pad on the left so generation continues the prompt
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self._tok, self._model, self._device = tok, model.to(dev).eval(), dev

    def render(self, it: WorkItem) -> tuple[str, bool]:
        """Prompt text for the model, and whether it came from a chat template."""
        if self.cfg.api == "completions":
            return it.prompt.prompt, False
        if getattr(self._tok, "chat_template", None):
            return self._tok.apply_chat_template(list(it.prompt.messages), tokenize=False,
                                                 add_generation_prompt=True), True
        text = "\n\n".join(f"{m['role']}: {m['content']}" for m in it.prompt.messages)
        return text + "\n\nassistant:", False

    def generate(self, items: list[WorkItem], todo: list[int], cache: RequestCache, res: Results) -> None:
        import torch

        self._load()
        tok, model = self._tok, self._model
        groups: dict[tuple, list[int]] = defaultdict(list)
        for ii in todo:
            it = items[ii]
            groups[(len(it.missing), json.dumps(self.sampling_key(it.pset), sort_keys=True))].append(ii)
        c = res.counters
        eos = {tok.eos_token_id, tok.pad_token_id} - {None}
        warn = _Warner()
        for (m, _), members in sorted(groups.items()):
            for b in range(0, len(members), self.cfg.batch_size):
                batch = members[b:b + self.cfg.batch_size]
                s = items[batch[0]].pset.sampling
                rendered = [self.render(items[ii]) for ii in batch]
                try:
                    enc = tok([r for r, _ in rendered], return_tensors="pt", padding=True,
                              add_special_tokens=not rendered[0][1]).to(self._device)
                    seed = _derive_seed(s["seed"], items[batch[0]].label, items[batch[0]].missing[0])
                    if seed is not None:
                        torch.manual_seed(seed)
                    kw: dict[str, Any] = dict(max_new_tokens=s["max_tokens"], num_return_sequences=m,
                                              pad_token_id=tok.pad_token_id)
                    # Every parameter explicit: generate() otherwise takes the model's generation_config
                    # (top_k 50 by default), which the recorded sampling would not show.
                    kw["repetition_penalty"] = s["repetition_penalty"]
                    if s["temperature"] > 0:
                        kw.update(do_sample=True, temperature=s["temperature"], top_p=s["top_p"],
                                  top_k=max(s["top_k"], 0), min_p=s["min_p"] or None)
                    else:
                        kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
                    if s["stop"]:
                        kw.update(stop_strings=s["stop"], tokenizer=tok)
                    with torch.inference_mode():
                        out = model.generate(**enc, **kw)
                except Exception as e:  # noqa: BLE001 - one failed batch never kills the run
                    reason = f"generation_failed: {type(e).__name__}: {str(e)[:160]}"
                    warn("describe: batch of %d prompts failed: %s", len(batch), reason)
                    c["failed_requests"] += len(batch)
                    for ii in batch:
                        for si in items[ii].missing:
                            res.failures[(ii, si)] = reason
                    continue
                new = out[:, enc["input_ids"].shape[1]:].tolist()
                c["requests"] += len(batch)
                c["requests_ok"] += len(batch)
                c["tokens_in"] += int(enc["attention_mask"].sum()) * m
                rows = []
                for j, ids in enumerate(new):
                    ii, k = batch[j // m], j % m
                    it = items[ii]
                    si = it.missing[k]
                    n_tok = next((p for p, t in enumerate(ids) if t in eos), None)
                    finish = "stop" if n_tok is not None else "length"
                    ids = ids[:n_tok] if n_tok is not None else ids
                    text = tok.decode(ids, skip_special_tokens=True)
                    for st in s["stop"]:
                        cut = text.find(st)
                        if cut >= 0:
                            text, finish = text[:cut], "stop"
                    c["tokens_out"] += len(ids)
                    c["samples_generated"] += 1
                    res.samples[(ii, si)] = (text, finish)
                    rows.append((it.keys[si], text, finish, {"model": self.cfg.model, "seed": seed}))
                cache.put_many(rows)


LLM_BACKENDS = {"openai": OpenAIBackend, "transformers": TransformersBackend}
