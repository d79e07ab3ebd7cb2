"""The judge: chat completions from any OpenAI-compatible endpoint (OpenAI, vLLM, `transformers serve`, llama.cpp).

``Judge.complete_all`` sends a batch of chat requests with at most ``concurrency`` in flight, each answered from the
disk cache when it is there (``ranklens.autointerp.cache``) and otherwise sent with temperature 0 and the seed
(deterministic where the server allows it), retried on connection errors, timeouts, 429 and 5xx with exponential
backoff. Every answer is cached as soon as it arrives, so a run that stops (a killed server, Ctrl+C) resumes where it
was when rerun. A failure the user can fix (nothing listening, a refused key, an unknown model) stops the batch with
one line naming the endpoint and what to do. The `openai` client does the HTTP; its own retries are off so that
each attempt is counted here (``Usage.requests``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ranklens.autointerp.cache import DiskCache
from ranklens.autointerp.config import JudgeConfig
from ranklens.errors import RanklensError

NO_KEY = "no-key"  # sent when the key variable is unset: local servers ignore it, remote ones answer 401


@dataclass
class Usage:
    """Token and request accounting of one run (new requests; answers from the cache are counted apart)."""

    requests: int = 0  # HTTP attempts, retries included
    answered: int = 0  # requests that got an answer
    cached: int = 0  # answers taken from the cache
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0  # what the cached answers had cost
    cached_completion_tokens: int = 0
    cost: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _one_line(text: str, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


class Judge:
    def __init__(self, cfg: JudgeConfig, cache_dir: str | Path) -> None:
        if not cfg.base_url or not cfg.model:
            raise RanklensError("no judge configured: give --base-url (an OpenAI-compatible endpoint, e.g. "
                                "http://127.0.0.1:8000/v1) and --model (the judge's model name there)")
        import openai  # lazy: `ranklens --help` stays fast

        self.cfg = cfg
        self.name = f"{cfg.model} @ {cfg.base_url}"
        key = os.environ.get(cfg.api_key_env)
        self.key_note = f"${cfg.api_key_env}" + ("" if key else " (unset)")
        self.client = openai.OpenAI(base_url=cfg.base_url, api_key=key or NO_KEY, max_retries=0,
                                    timeout=cfg.timeout)
        self.cache = DiskCache(cache_dir)
        self.usage = Usage()
        self._lock = threading.Lock()
        self._stop = threading.Event()

    # ----------------------------------------------------------------- one request

    def request(self, messages: Sequence[dict[str, str]], max_tokens: int) -> dict[str, Any]:
        """The request body (the cache key): deterministic settings always, the seed unless turned off."""
        body: dict[str, Any] = {"model": self.cfg.model, "messages": [dict(m) for m in messages],
                                "max_tokens": int(max_tokens), "temperature": 0.0}
        if self.cfg.send_seed:
            body["seed"] = self.cfg.seed
        return body

    def _count(self, **deltas: float) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self.usage, k, getattr(self.usage, k) + v)

    def _send(self, body: dict[str, Any]) -> dict[str, Any]:
        import openai

        retryable = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
        attempt = 0
        while True:
            if self._stop.is_set():
                raise _Cancelled()
            self._count(requests=1)
            try:
                resp = self.client.chat.completions.create(**body)
            except openai.AuthenticationError as err:
                raise RanklensError(f"the judge at {self.cfg.base_url} refused the key from {self.key_note} (HTTP "
                                    f"{err.status_code}); set {self.cfg.api_key_env} to a valid key") from None
            except openai.PermissionDeniedError as err:
                raise RanklensError(f"the judge at {self.cfg.base_url} refused access with the key from "
                                    f"{self.key_note} (HTTP 403: {_one_line(err.message)})") from None
            except openai.NotFoundError as err:
                raise RanklensError(f"the judge at {self.cfg.base_url} has no model {self.cfg.model!r} or no chat "
                                    f"endpoint (HTTP 404: {_one_line(err.message)})") from None
            except retryable as err:
                if attempt >= self.cfg.max_retries:
                    raise RanklensError(self._unreachable(err, attempt + 1)) from None
                delay = self.cfg.retry_base_seconds * 2 ** attempt
                attempt += 1
                if self._stop.wait(delay):
                    raise _Cancelled() from None
                continue
            except openai.APIStatusError as err:
                raise RanklensError(f"the judge at {self.cfg.base_url} rejected a request (HTTP {err.status_code}: "
                                    f"{_one_line(err.message)})") from None
            choice = resp.choices[0] if resp.choices else None
            usage = resp.usage
            return {"content": (choice.message.content if choice is not None else None) or "",
                    "finish_reason": choice.finish_reason if choice is not None else None,
                    "model": resp.model,
                    "prompt_tokens": int(usage.prompt_tokens) if usage else 0,
                    "completion_tokens": int(usage.completion_tokens) if usage else 0}

    def _unreachable(self, err: Exception, tries: int) -> str:
        import openai

        what = ("timed out" if isinstance(err, openai.APITimeoutError) else
                "is unreachable" if isinstance(err, openai.APIConnectionError) else
                f"kept failing (HTTP {getattr(err, 'status_code', '?')})")
        cause = err.__cause__ or err
        return (f"the judge at {self.cfg.base_url} {what} after {tries} tries ({_one_line(cause, 120)}); is the "
                f"server running? Answers so far are cached: rerun the same command to resume")

    def complete(self, messages: Sequence[dict[str, str]], max_tokens: int) -> str:
        """One chat completion's text: from the cache, or sent and then cached."""
        body = self.request(messages, max_tokens)
        hit = self.cache.get(body)
        if hit is not None:
            self._count(cached=1, cached_prompt_tokens=hit["prompt_tokens"],
                        cached_completion_tokens=hit["completion_tokens"])
            return hit["content"]
        answer = self._send(body)
        self.cache.put(body, answer)
        p, c = answer["prompt_tokens"], answer["completion_tokens"]
        self._count(answered=1, prompt_tokens=p, completion_tokens=c,
                    cost=(p * self.cfg.price_input + c * self.cfg.price_output) / 1e6)
        return answer["content"]

    # ----------------------------------------------------------------- many requests

    def complete_all(self, jobs: Sequence[tuple[Sequence[dict[str, str]], int]]) -> list[str]:
        """The answers to ``jobs`` ((messages, max_tokens) each), in order, ``concurrency`` at a time. The first
        error stops the batch (requests not yet sent are dropped) and is raised; answers already in are cached."""
        if not jobs:
            return []
        self._stop.clear()
        out: list[str | None] = [None] * len(jobs)
        with ThreadPoolExecutor(max_workers=min(self.cfg.concurrency, len(jobs))) as pool:
            futures = {pool.submit(self.complete, m, t): i for i, (m, t) in enumerate(jobs)}
            try:
                done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # Ctrl+C: send nothing more (the pool would otherwise drain every job first)
                self._stop.set()
                for f in futures:
                    f.cancel()
                raise
            errors = [f.exception() for f in done if f.exception() is not None]
            if errors:
                self._stop.set()
                for f in pending:
                    f.cancel()
                wait(pending)
                first = next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
                raise first
            for f, i in futures.items():
                out[i] = f.result()
        return [o or "" for o in out]


class _Cancelled(Exception):
    """A request dropped because another one of its batch failed."""
