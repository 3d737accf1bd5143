"""Structured-JSON chat calls to an LLM, shared by the data enrichment (``preprocessing/enrich_data.py``) and
the reasoning judge (``evaluation/eval_reasoning_judge.py``): a prompt goes in, a JSON object validated
against a JSON schema comes out.

* Malformed output (not JSON, or JSON off the schema) is asked again, up to ``retries`` attempts, then settled
  as a failure that keeps the raw text.
* Every settled answer is appended to a JSONL cache under a key the caller derives from what determines the
  answer (task, prompt version, model, input hash: :func:`cache_key`), so a rerun or a resumed run repeats no
  finished call. Request failures (timeouts, HTTP errors after the client's own retries) are not cached: a
  later run tries them again.
* A server that cannot be reached (or refuses the key or the model) stops the batch with
  :class:`LLMUnavailable` once the requests in flight have settled and been cached.
* Usage: calls, cache hits, malformed answers, failed requests, prompt and completion tokens of this run's calls;
  each cache entry keeps the calls and tokens it took (every attempt), so the usage also says what the cached
  answers used cost when they were made (``cached_calls``, ``cached_prompt_tokens``, ``cached_completion_tokens``;
  entries from before token counts were stored count in ``cached_without_usage``): the total over a killed and
  resumed run.

Backends: any OpenAI-compatible HTTP server through the ``openai`` client (``vllm serve``, the OpenAI API),
up to ``concurrency`` requests in flight, transport errors and 5xx retried by the client with exponential
backoff; or vLLM's offline engine (``vllm.LLM``: each round of requests is one batched ``chat`` call with
JSON-schema guided decoding), imported only when chosen (the ``gpu`` extra). The API key is read from the
environment variable the config names, when the client is built, and is never stored in a config, an
output or a log line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

log = logging.getLogger("neurocpt.llm")
BACKENDS = ("openai", "vllm")


class LLMError(Exception):
    """A problem with the LLM setup or server that no retry of one request fixes."""


class LLMUnavailable(LLMError):
    """The server is unreachable, or refuses the key or the model: stop, rerun later (answers so far are cached)."""


@dataclass
class LLMConfig:
    model: str
    backend: str = "openai"
    base_url: str | None = None  # openai backend; None: the OpenAI API
    api_key_env: str = "OPENAI_API_KEY"  # the variable's name; its value never leaves the process environment
    concurrency: int = 8  # requests in flight (openai backend)
    timeout: float = 120.0  # seconds per HTTP attempt
    retries: int = 3  # attempts for malformed output; also the client's transport retries (backoff) per attempt
    temperature: float = 0.0
    max_tokens: int = 2048
    # passed to the model's chat template; None: {enable_thinking: false} under vLLM (Qwen3-style templates
    # otherwise think first, while the JSON is asked for from the first token), nothing over HTTP (the OpenAI
    # API refuses unknown fields; set it for a Qwen3 model behind vllm serve)
    chat_template_kwargs: dict | None = None
    tensor_parallel: int = 1  # vllm backend
    gpu_memory_utilization: float = 0.9  # vllm backend
    max_model_len: int | None = None  # vllm backend

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"llm.backend {self.backend!r} is not one of {BACKENDS}")
        if not self.model:
            raise ValueError("llm.model is required")
        for name in ("concurrency", "retries", "max_tokens", "tensor_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"llm.{name} must be at least 1")
        if self.timeout <= 0:
            raise ValueError("llm.timeout must be positive")

    def api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if not key:
            raise LLMError(f"set the API key in the environment variable {self.api_key_env} "
                           "(any value, e.g. EMPTY, for a local server without authentication)")
        return key


def cache_key(*parts) -> str:
    """The cache key of a request: a hash of everything that determines its answer."""
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Request:
    key: str  # cache key (:func:`cache_key`)
    prompt: str
    schema: dict  # JSON schema of the answer
    name: str  # the schema's name as sent to the server (the task)
    ref: str = ""  # what it is about (a document or question id), for log lines
    meta: dict = field(default_factory=dict)  # stored with the cache entry, for inspection


@dataclass
class Result:
    output: dict | None  # the validated answer, or None on failure
    error: str | None = None
    raw: str | None = None  # the model's text when it was malformed
    cached: bool = False


@dataclass
class Completion:
    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


# ------------------------------------------------------------------------------------------------ cache


class JsonlCache:
    """Append-only JSONL of settled answers; the last line for a key wins. A line cut short by a kill is
    skipped on load, and the next append starts on a fresh line."""

    def __init__(self, path: str | Path, also_read: Iterable[Path] = ()):
        self.path = Path(path)
        self.entries: dict[str, dict] = {}
        for p in [*also_read, self.path]:
            if p.is_file():
                self._load(p)
        self._fresh_line = False  # True when the file ends inside a line (its writer was killed mid-line)
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                self._fresh_line = f.read(1) != b"\n"

    @classmethod
    def directory(cls, folder: str | Path) -> "JsonlCache":
        """A cache shared by many processes: each appends to its own file (host and pid in the name, so no
        two writers share one, on one machine or many) and reads every file in the folder."""
        import socket

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return cls(folder / f"{socket.gethostname()}-{os.getpid()}.jsonl", sorted(folder.glob("*.jsonl")))

    def _load(self, path: Path) -> None:
        with open(path) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a killed writer
                self.entries[entry["key"]] = entry

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, entry: dict) -> None:
        self.entries[entry["key"]] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(("\n" if self._fresh_line else "") + json.dumps(entry) + "\n")
        self._fresh_line = False

    def __len__(self) -> int:
        return len(self.entries)


# --------------------------------------------------------------------------------------------- backends


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions server through the ``openai`` client, ``concurrency`` requests
    in flight. The schema goes as ``response_format`` (``json_schema``), which ``vllm serve`` turns into
    guided decoding."""

    def __init__(self, config: LLMConfig):
        from openai import OpenAI

        self.config = config
        self.client = OpenAI(api_key=config.api_key(), base_url=config.base_url, timeout=config.timeout,
                             max_retries=config.retries)
        self.down = threading.Event()  # set by the first sign of an unreachable server: skip what is queued

    def _one(self, request: Request) -> Completion | Exception:
        import openai

        where = self.config.base_url or "the OpenAI API"
        if self.down.is_set():
            return LLMUnavailable(f"{where} is unavailable")
        extra = {"chat_template_kwargs": self.config.chat_template_kwargs} if self.config.chat_template_kwargs else None
        try:
            response = self.client.chat.completions.create(
                model=self.config.model, temperature=self.config.temperature, max_completion_tokens=self.config.max_tokens,
                messages=[{"role": "user", "content": request.prompt}], extra_body=extra,
                response_format={"type": "json_schema", "json_schema": {"name": request.name, "schema": request.schema, "strict": True}},
            )
        except openai.APITimeoutError as err:
            return err  # this request was too slow (after the client's retries); others may be fine
        except (openai.APIConnectionError, openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as err:
            self.down.set()
            if isinstance(err, openai.APIStatusError):  # status and type only: error bodies can quote part of the key
                why = (f"HTTP {err.status_code} {type(err).__name__}; check the model name {self.config.model!r} and the key "
                       f"in ${self.config.api_key_env}")
            else:
                why = f"cannot connect ({type(err).__name__}); is the server running?"
            return LLMUnavailable(f"LLM server {where}: {why}")
        except openai.APIError as err:
            return err  # e.g. HTTP 500 after the client's retries, 400 for an over-long prompt: this request failed
        usage = response.usage
        return Completion(response.choices[0].message.content or "", usage.prompt_tokens if usage else 0,
                          usage.completion_tokens if usage else 0)

    def complete(self, requests: list[Request]) -> Iterator[tuple[int, Completion | Exception]]:
        """(index, completion or exception) for every request, as they finish."""
        with ThreadPoolExecutor(self.config.concurrency, thread_name_prefix="llm") as pool:
            futures = {pool.submit(self._one, r): i for i, r in enumerate(requests)}
            for future in as_completed(futures):
                yield futures[future], future.result()


class VLLMBackend:
    """vLLM's offline engine on this machine's GPUs: each round of requests is one batched ``LLM.chat`` call,
    every request with JSON-schema structured output (vLLM 0.33's API). Needs the ``gpu`` extra; the tests
    here run it against a stand-in for ``vllm`` (no GPU)."""

    def __init__(self, config: LLMConfig):
        try:
            from vllm import LLM
        except ImportError as err:
            raise LLMError("llm.backend vllm needs vLLM: pip install -e '.[gpu]' on a GPU machine") from err
        self.config = config
        self.llm = LLM(model=config.model, tensor_parallel_size=config.tensor_parallel, seed=0,
                       gpu_memory_utilization=config.gpu_memory_utilization, max_model_len=config.max_model_len)

    def _sampling(self, schema: dict):
        from vllm.sampling_params import SamplingParams, StructuredOutputsParams

        return SamplingParams(temperature=self.config.temperature, max_tokens=self.config.max_tokens,
                              structured_outputs=StructuredOutputsParams(json=schema))

    def complete(self, requests: list[Request]) -> Iterator[tuple[int, Completion | Exception]]:
        kwargs = self.config.chat_template_kwargs
        outputs = self.llm.chat([[{"role": "user", "content": r.prompt}] for r in requests],
                                [self._sampling(r.schema) for r in requests], use_tqdm=False,
                                chat_template_kwargs={"enable_thinking": False} if kwargs is None else kwargs)
        for i, out in enumerate(outputs):
            yield i, Completion(out.outputs[0].text, len(out.prompt_token_ids or ()), len(out.outputs[0].token_ids))


def make_backend(config: LLMConfig):
    return {"openai": OpenAIBackend, "vllm": VLLMBackend}[config.backend](config)


# ------------------------------------------------------------------------------------------ the caller


class StructuredLLM:
    """Requests in, validated JSON (or a recorded failure) out, through the cache and one backend.
    ``what`` names the answers in messages ("judge": "malformed judge output after 2 attempt(s)")."""

    def __init__(self, config: LLMConfig, cache: JsonlCache | None, what: str = "model", backend=None):
        self.config, self.cache, self.what = config, cache, what
        self.backend = backend or make_backend(config)
        self.usage = {"calls": 0, "cached": 0, "malformed": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0,
                      "cached_calls": 0, "cached_prompt_tokens": 0, "cached_completion_tokens": 0, "cached_without_usage": 0}

    def prompt_key(self, prompt: str, schema: dict) -> str:
        """The cache key of everything sent for ``prompt``: model, sampling settings, chat template arguments, schema
        and the prompt itself, so that any change to what the model sees asks it again."""
        c = self.config
        return cache_key("prompt", c.model, c.temperature, c.max_tokens, c.chat_template_kwargs, schema, prompt)

    def call(self, request: Request) -> Result:
        return self.run([request])[0]

    def run(self, requests: list[Request]) -> list[Result]:
        """One result per request, in order. Raises :class:`LLMUnavailable` (after caching what finished)."""
        results: list[Result | None] = [None] * len(requests)
        pending = []
        for i, request in enumerate(requests):
            hit = self.cache.get(request.key) if self.cache else None
            if hit is None:
                pending.append(i)
            else:
                self._count_cached(hit)
                results[i] = Result(hit["output"], hit["error"], hit.get("raw"), cached=True)
        spent = {i: {"calls": 0, "prompt_tokens": 0, "completion_tokens": 0} for i in pending}  # over all attempts
        for attempt in range(1, self.config.retries + 1):
            if not pending:
                break
            retry, unavailable = [], None
            for j, outcome in self.backend.complete([requests[i] for i in pending]):
                i = pending[j]
                if isinstance(outcome, LLMUnavailable):
                    unavailable = unavailable or outcome
                    continue
                result = self._settle(requests[i], outcome, attempt, spent[i])
                if result is None:
                    retry.append(i)
                else:
                    results[i] = result
            if unavailable:
                raise unavailable
            pending = sorted(retry)
        return results  # type: ignore[return-value]

    def _count_cached(self, hit: dict) -> None:
        """Usage of a cached answer: what its calls cost when they were made (a resumed run's total includes them)."""
        self.usage["cached"] += 1
        if "usage" not in hit:
            self.usage["cached_without_usage"] += 1
            return
        for k, v in hit["usage"].items():
            self.usage["cached_" + k] += v

    def _settle(self, request: Request, outcome: Completion | Exception, attempt: int, spent: dict) -> Result | None:
        """The result of one attempt, or None to ask again. ``spent``: the request's calls and tokens so far, this
        attempt's added, stored with the settled result."""
        import jsonschema

        if isinstance(outcome, Exception):
            self.usage["failed"] += 1
            status = getattr(outcome, "status_code", None)
            return Result(None, f"request failed: {type(outcome).__name__}" + (f" (HTTP {status})" if status else ""))
        for k, v in (("calls", 1), ("prompt_tokens", outcome.prompt_tokens), ("completion_tokens", outcome.completion_tokens)):
            self.usage[k] += v
            spent[k] += v
        try:
            output = json.loads(outcome.text)
            jsonschema.validate(output, request.schema)
        except (json.JSONDecodeError, jsonschema.ValidationError) as err:
            self.usage["malformed"] += 1
            log.warning("%s: malformed %s output (attempt %d/%d)", request.ref, self.what, attempt, self.config.retries)
            if attempt < self.config.retries:
                return None
            reason = err.message if isinstance(err, jsonschema.ValidationError) else str(err)
            error = f"malformed {self.what} output after {attempt} attempt(s): {reason[:120]}; raw: {outcome.text[:300]}"
            return self._store(request, Result(None, error, outcome.text), spent)  # settled: a rerun asks no more
        return self._store(request, Result(output), spent)

    def _store(self, request: Request, result: Result, spent: dict) -> Result:
        if self.cache is not None:
            self.cache.put({"key": request.key, **request.meta, "output": result.output, "error": result.error,
                            "raw": result.raw, "usage": spent})
        return result
