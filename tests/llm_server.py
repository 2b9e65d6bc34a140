"""A real OpenAI-compatible HTTP server on 127.0.0.1 for the describe tests and benchmark.

It speaks the subset of the API that ``vllm serve`` offers and the describe stage uses:
``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions`` with ``n``, ``seed``,
``stop``, ``max_tokens`` and ``usage``. Two generators:

* ``tiny``: a tiny GPT-2 built locally from a config (random weights, local BPE tokenizer), run
  batched on a worker thread the way vLLM batches concurrent requests;
* ``scripted``: realistic canned descriptions (with the preambles, numbering, non-visual claims and
  off-topic sentences real models produce), deterministic per prompt + seed + choice.

Faults can be queued (applied to the next completion requests) or bound to prompts containing a
substring: ``500``, ``429`` (with Retry-After), ``slow`` (answers after ``slow_seconds``),
``malformed`` (truncated JSON), ``empty`` (empty content), ``reset`` (TCP reset), ``400``.
Counters: requests, answered, max in-flight, a log of every completion request.

Run standalone (used by the benchmark): ``python tests/llm_server.py --mode tiny --model-dir DIR``;
it prints one JSON line with the port, then serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import queue
import random
import re
import socket
import struct
import sys
import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any, Optional

from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY_LM_NAME = "tiny-lm"


def build_tiny_lm(out_dir: str | Path, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a randomly initialised tiny GPT-2 + the project's local BPE tokenizer (idempotent)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pipeline.tiny_models import build_tokenizer

    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, vocab_size=1024)
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=512, n_embd=hidden, n_layer=layers, n_head=2,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(out)
    return out


# ------------------------------------------------------------------------------------------------
# generators
# ------------------------------------------------------------------------------------------------

_COLOURS = ["brown", "yellow", "dark green", "pale green", "black", "white", "reddish", "grey", "silver",
            "orange", "tan", "purple", "olive", "cream", "golden"]
_PARTS = ["leaves", "edges", "surface", "body", "back", "flanks", "fins", "veins", "stem", "head", "tail",
          "coat", "underside", "tips", "skin"]
_PATTERNS = ["concentric rings", "small round spots", "irregular patches", "thin stripes", "a mottled pattern",
             "a powdery coating", "dark speckles", "a glossy sheen", "wavy margins", "vertical bars",
             "a yellow halo", "fine hairs", "sunken lesions", "raised pustules", "a smooth texture"]
_SHAPES = ["an oval", "an elongated", "a rounded", "a slender", "a compact", "a broad", "a tapered",
           "a flattened", "a stocky", "an angular"]


def _a(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


class Scripted:
    """Canned but varied descriptions that mention the class, with the junk real models add."""

    def __init__(self, classes: Optional[list[str]] = None, junk: bool = True, salt: str = ""):
        self.classes = sorted(classes or [], key=len, reverse=True)
        self.junk = junk
        self.salt = salt  # another model name: other sentences for the same prompts

    def subject(self, prompt: str) -> str:
        low = prompt.lower()
        for c in self.classes:
            if c.lower() in low:
                return c
        m = re.search(r"(?:of|what|identify|does) (?:an?|the) ([a-z][a-z \-()]+?)(?: looks?| in a| with|[.:?])", low)
        return m.group(1) if m else "subject"

    def sample(self, prompt: str, seed: Any, index: int, max_tokens: int) -> tuple[str, str]:
        rng = random.Random(hashlib.sha256(f"{self.salt}{prompt}|{seed}|{index}".encode()).digest())
        c = self.subject(prompt)
        cap = c[0].upper() + c[1:]
        sents = [
            f"{_a(c)} has {rng.choice(_COLOURS)} {rng.choice(_PARTS)} with {rng.choice(_PATTERNS)}.",
            f"The {c} shows {rng.choice(_PATTERNS)} on its {rng.choice(_PARTS)}, which look {rng.choice(_COLOURS)}.",
            f"In a photo, {_a(c)} has {rng.choice(_SHAPES)} outline and {rng.choice(_COLOURS)} {rng.choice(_PARTS)}.",
        ]
        rng.shuffle(sents)
        body = [s[0].upper() + s[1:] for s in sents[: rng.randint(1, 2)]]
        if self.junk:
            roll = rng.random()
            if roll < 0.15:
                body.append(f"{cap} is renowned for its flavour and high market price.")
            elif roll < 0.30:
                body.append("The background of the picture is slightly blurry.")
            elif roll < 0.40:
                body = [f"{i + 1}. {s}" for i, s in enumerate(body)]
            if rng.random() < 0.2:
                body.insert(0, f"Sure! Here is a description of {_a(c)}:\n")
        text = " ".join(body)
        words = text.split()
        if len(words) > max_tokens:  # the token budget ran out mid-sentence
            return " ".join(words[:max_tokens]), "length"
        return text, "stop"


class TinyLM:
    """Batched sampling with the tiny GPT-2 on one worker thread (continuous-batching in spirit)."""

    def __init__(self, model_dir: Path, max_batch: int = 32, threads: int = 1, batch_wait: float = 0.02):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.tok.padding_side = "left"
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.max_batch = max_batch
        self.batch_wait = batch_wait  # a batch closes after this long without a new request (or when full)
        self.batch_sizes: list[int] = []
        self.q: "queue.Queue[tuple]" = queue.Queue()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="tiny-lm")
        self.thread.start()

    def submit(self, loop: asyncio.AbstractEventLoop, prompt: str, n: int, params: dict) -> asyncio.Future:
        fut = loop.create_future()
        self.q.put((loop, fut, prompt, n, params))
        return fut

    def _loop(self) -> None:
        while True:
            jobs = [self.q.get()]
            while len(jobs) < self.max_batch:
                try:
                    jobs.append(self.q.get(timeout=self.batch_wait))
                except queue.Empty:
                    break
            self.batch_sizes.append(len(jobs))
            groups: dict[tuple, list] = {}
            for j in jobs:
                p = j[4]
                groups.setdefault((p["temperature"], p["top_p"]), []).append(j)
            for (temp, top_p), js in groups.items():
                try:
                    outs = self._generate(js, temp, top_p)
                except Exception as e:  # noqa: BLE001 - surface as a 500 to the client
                    for loop, fut, *_ in js:
                        loop.call_soon_threadsafe(_set_exc, fut, e)
                    continue
                for (loop, fut, *_), out in zip(js, outs):
                    loop.call_soon_threadsafe(_set_result, fut, out)

    def _generate(self, jobs: list, temp: float, top_p: float) -> list[tuple[int, list[tuple[str, str, int]]]]:
        """(prompt tokens, [(text, finish_reason, completion tokens)] per choice) per job.

        Only this thread touches the tokenizer: a fast tokenizer's padding state is not thread-safe.
        """
        torch = self.torch
        prompts, reps = [], []
        for _, _, prompt, n, _ in jobs:
            prompts += [prompt] * n
            reps.append(n)
        max_new = max(j[4]["max_tokens"] for j in jobs)
        seed = jobs[0][4].get("seed")
        torch.manual_seed(seed if seed is not None else 0)
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        kw = dict(max_new_tokens=max_new, pad_token_id=self.tok.pad_token_id, eos_token_id=self.tok.eos_token_id)
        if temp > 0:
            kw.update(do_sample=True, temperature=temp, top_p=top_p)
        with torch.inference_mode():
            out = self.model.generate(**enc, **kw)[:, enc["input_ids"].shape[1]:].tolist()
        prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
        res, row = [], 0
        for (_, _, _, n, params), _n in zip(jobs, reps):
            choices = []
            for ids in out[row:row + n]:
                ids = ids[: params["max_tokens"]]
                finish = "length"
                if self.tok.eos_token_id in ids:
                    ids, finish = ids[: ids.index(self.tok.eos_token_id)], "stop"
                text = self.tok.decode(ids, skip_special_tokens=True)
                for st in params.get("stop") or []:
                    k = text.find(st)
                    if k >= 0:
                        text, finish = text[:k], "stop"
                        ids = self.tok(text, add_special_tokens=False)["input_ids"]
                choices.append((text, finish, len(ids)))
            res.append((int(prompt_lens[row]), choices))
            row += n
        return res


def _set_result(fut: asyncio.Future, v: Any) -> None:
    if not fut.done():
        fut.set_result(v)


def _set_exc(fut: asyncio.Future, e: BaseException) -> None:
    if not fut.done():
        fut.set_exception(e)


# ------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------


class LLMServer:
    """OpenAI-compatible server on a background thread (or the main one with :meth:`serve_forever`).

    Args:
        mode: "scripted" or "tiny".
        model_dir: folder of the tiny LM (mode "tiny"; built there when missing).
        model_name: the id /v1/models lists.
        classes: class names the scripted generator recognises in prompts.
        api_key: when set, requests must send ``Authorization: Bearer <api_key>``.
        reject_n: answer 400 to any request with n > 1 (like servers that lack n).
        delay: seconds every completion takes (scripted mode), so requests overlap.
        retry_after: the Retry-After value sent with injected 429s.
        slow_seconds: how long an injected "slow" answer takes.
    """

    def __init__(self, mode: str = "scripted", model_dir: Optional[Path] = None, model_name: str = TINY_LM_NAME,
                 classes: Optional[list[str]] = None, api_key: Optional[str] = None, reject_n: bool = False,
                 delay: float = 0.0, retry_after: str = "1", slow_seconds: float = 3.0, junk: bool = True,
                 max_batch: int = 32, threads: int = 1):
        self.mode = mode
        self.model_name = model_name
        self.api_key = api_key
        self.reject_n = reject_n
        self.delay = delay
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.scripted = Scripted(classes, junk=junk, salt="" if model_name == TINY_LM_NAME else f"{model_name}|")
        self.lm = TinyLM(build_tiny_lm(model_dir), max_batch, threads) if mode == "tiny" else None
        self.faults: deque[str] = deque()
        self.fail_when: dict[str, str] = {}
        self.hold_after: Optional[int] = None
        # counters (written on the server loop, read from tests)
        self.requests = 0
        self.answered = 0
        self.admitted = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.tokens_out = 0
        self.log: list[dict[str, Any]] = []
        self.faults_served: Counter = Counter()
        self.auth_headers: list[Optional[str]] = []
        self.port: Optional[int] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Optional[web.AppRunner] = None
        self._release: Optional[asyncio.Event] = None
        self._ready = threading.Event()

    # ----- control from tests -----
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def inject(self, *faults: str) -> None:
        """Queue faults for the next completion requests, one each, in order."""
        self.faults.extend(faults)

    def release(self) -> None:
        """Lift ``hold_after`` and wake held requests (those whose client is gone are not answered)."""
        self.hold_after = None
        if self._loop and self._release:
            self._loop.call_soon_threadsafe(self._release.set)

    def reset_counters(self) -> None:
        self.requests = self.answered = self.admitted = self.max_in_flight = self.tokens_out = 0
        self.log = []
        self.faults_served = Counter()
        self.auth_headers = []

    # ----- lifecycle -----
    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        return app

    async def _start(self, port: int = 0) -> None:
        self._release = asyncio.Event()
        self._runner = web.AppRunner(self._app(), access_log=None, handler_cancellation=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, backlog=1024)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> "LLMServer":
        def main() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            self._ready.set()
            self._loop.run_forever()
            self._loop.run_until_complete(self._runner.cleanup())
            self._loop.close()

        self._thread = threading.Thread(target=main, daemon=True, name="llm-server")
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("test LLM server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None:
            self.release()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def __enter__(self) -> "LLMServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def serve_forever(self, port: int = 0) -> None:
        async def main() -> None:
            await self._start(port)
            print(json.dumps({"port": self.port, "base_url": self.base_url, "model": self.model_name}), flush=True)
            await asyncio.Event().wait()

        asyncio.run(main())

    # ----- handlers -----
    async def _models(self, request: web.Request) -> web.Response:
        if not self._authorised(request):
            return _error(401, "invalid API key")
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "owned_by": "alive-tests", "max_model_len": 512}]})

    async def _stats(self, request: web.Request) -> web.Response:
        """Counters for a benchmark driving the server from another process (not part of the OpenAI API)."""
        return web.json_response({"requests": self.requests, "answered": self.answered,
                                  "max_in_flight": self.max_in_flight, "tokens_out": self.tokens_out,
                                  "batch_sizes": list(self.lm.batch_sizes) if self.lm else []})

    def _authorised(self, request: web.Request) -> bool:
        return self.api_key is None or request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        entry: dict[str, Any] = {"t_start": time.monotonic(), "chat": chat, "status": None}
        self.log.append(entry)
        try:
            return await self._handle(request, chat, entry)
        finally:
            self.in_flight -= 1
            entry["t_end"] = time.monotonic()

    async def _handle(self, request: web.Request, chat: bool, entry: dict[str, Any]) -> web.StreamResponse:
        self.auth_headers.append(request.headers.get("Authorization"))
        if not self._authorised(request):
            entry["status"] = 401
            return _error(401, "invalid API key")
        try:
            body = await request.json()
        except ValueError:
            entry["status"] = 400
            return _error(400, "body is not JSON")
        if body.get("model") != self.model_name:
            entry["status"] = 404
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        prompt = _render(body.get("messages")) if chat else body.get("prompt")
        if not isinstance(prompt, str):
            entry["status"] = 400
            return _error(400, "messages or prompt missing")
        n = int(body.get("n") or 1)
        entry.update(n=n, seed=body.get("seed"), extra={k: v for k, v in body.items() if k not in _KNOWN},
                     digest=hashlib.sha256(json.dumps([prompt, body.get("seed"), n]).encode()).hexdigest()[:16],
                     prompt=prompt)
        fault = next((f for s, f in self.fail_when.items() if s in prompt), None)
        if fault is None and self.faults:
            fault = self.faults.popleft()
        if fault:
            self.faults_served[fault] += 1
            entry["fault"] = fault
            resp = await self._fault(request, fault)
            if resp is not None:
                entry["status"] = resp.status
                return resp
        if self.reject_n and n > 1:
            entry["status"] = 400
            return _error(400, "n > 1 is not supported by this server; the 'n' parameter must be 1", param="n")
        if self.hold_after is not None and self.admitted >= self.hold_after:
            await self._release.wait()
            if request.transport is None or request.transport.is_closing():
                entry["status"] = "abandoned"
                return web.Response(status=499)
        self.admitted += 1
        max_tokens = int(body.get("max_tokens") or 16)
        params = {"temperature": float(body.get("temperature", 1.0)), "top_p": float(body.get("top_p", 1.0)),
                  "max_tokens": max_tokens, "stop": body.get("stop"), "seed": body.get("seed")}
        if self.lm is not None:
            prompt_tokens, outs = await self.lm.submit(asyncio.get_running_loop(), prompt, n, params)
        else:
            if self.delay:
                await asyncio.sleep(self.delay)
            outs = []
            for i in range(n):
                text, finish = self.scripted.sample(prompt, body.get("seed"), i, max_tokens)
                outs.append((text, finish, len(text.split())))
            prompt_tokens = len(prompt.split())
        if fault == "empty":
            outs = [("", "stop", 0) for _ in outs]
        completion_tokens = sum(o[2] for o in outs)
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f,
                        "logprobs": None} for i, (t, f, _) in enumerate(outs)]
        else:
            choices = [{"index": i, "text": t, "finish_reason": f, "logprobs": None} for i, (t, f, _) in enumerate(outs)]
        self.answered += 1
        self.tokens_out += completion_tokens
        entry["status"] = 200
        return web.json_response({
            "id": f"cmpl-{self.requests}", "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()), "model": self.model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        })

    async def _fault(self, request: web.Request, fault: str) -> Optional[web.StreamResponse]:
        if fault == "500":
            return _error(500, "internal server error (injected)")
        if fault == "503":
            return _error(503, "service unavailable (injected)")
        if fault == "429":
            return _error(429, "rate limited (injected)", headers={"Retry-After": self.retry_after})
        if fault == "400":
            return _error(400, "bad request (injected)")
        if fault == "slow":
            await asyncio.sleep(self.slow_seconds)
            return None
        if fault == "malformed":
            return web.Response(status=200, text='{"id": "x", "choices": [{"index": 0, "message": {"content": "A',
                                content_type="application/json")
        if fault == "reset":
            sock = request.transport.get_extra_info("socket") if request.transport else None
            if sock is not None:  # SO_LINGER 0: close() sends RST, the client sees "connection reset"
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=499)
        if fault == "empty":
            return None
        raise ValueError(f"unknown fault {fault!r}")


_KNOWN = {"model", "messages", "prompt", "n", "temperature", "top_p", "max_tokens", "stop", "seed"}


def _render(messages: Any) -> Optional[str]:
    if not isinstance(messages, list):
        return None
    parts = [f"{m.get('role')}: {m.get('content')}" for m in messages if isinstance(m, dict)]
    return "\n\n".join(parts) + "\n\nassistant:"


def _error(status: int, message: str, headers: Optional[dict] = None, param: Optional[str] = None) -> web.Response:
    return web.json_response({"object": "error", "message": message, "type": "BadRequestError" if status == 400
                              else "ServerError", "param": param, "code": status}, status=status, headers=headers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=["scripted", "tiny"], default="tiny")
    ap.add_argument("--model-dir", type=Path, default=None)
    ap.add_argument("--model-name", default=TINY_LM_NAME)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.mode == "tiny" and args.model_dir is None:
        ap.error("--model-dir is required with --mode tiny")
    LLMServer(args.mode, args.model_dir, args.model_name, delay=args.delay, max_batch=args.max_batch,
              threads=args.threads).serve_forever(args.port)


if __name__ == "__main__":
    main()
