"""A protocol stand-in for ``vllm serve <model>``: a real HTTP server on 127.0.0.1 that speaks the OpenAI
chat-completions protocol and answers with deterministic rules instead of a model. It lets the judge and the
data enrichment run end to end (and be tested) on a machine without a GPU; a real user runs
``vllm serve Qwen/Qwen3-32B`` (or points ``base_url`` at any OpenAI-compatible API) instead.

    python -m tools.openai_stub_server --port 8011 [--delay 0.05] [--request-log requests.jsonl]

The task is read from ``response_format.json_schema.name``:

* ``judgement``: prefers the longer of "Response A"/"Response B" (scores 4 vs 2).
* ``classify``: keeps a document with at least two distinct medical terms and 20 words; else drops it.
* ``expand``: restates the abstract's sentences as three paragraphs plus a fixed caveat paragraph.
* ``arxiv``: subfield by keywords; edits that delete residual LaTeX (macros, ``$``, ``<ref>``,
  ``< g r a p h i c s >``, ``§``) and the space left before punctuation by dropped citations.

Markers in a prompt script failures, for tests: ``MALFORMED-ALWAYS`` (never JSON), ``MALFORMED-ONCE`` (cut-off
JSON the first time), ``OFF-SCHEMA`` (valid JSON that breaks the schema), ``SLOW`` (sleeps ``slow_seconds``).
With ``fail_first`` the very first request gets an HTTP 500. Every request is kept in ``requests`` as it arrives (with its
Authorization header, in memory only) and, with ``request_log``, appended to a JSONL file (task, a hash of
the document, HTTP status; no headers) that survives a ``kill -9``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CRITERIA = ["diagnostic_reasoning", "clinical_knowledge", "management_quality", "reasoning_chain", "overall"]
MEDICAL = re.compile(r"\b(patients?|clinical|disease|neuro\w*|brain|cortex|cortical|seizures?|stroke|epilep\w*|therapy|"
                     r"trials?|diagnos\w*|symptoms?|neurons?|treatment|hospital|medic\w*|dementia|parkinson\w*|sclerosis|"
                     r"migraine|cognitive|mri|fmri|eeg|hippocamp\w*|thalamus|outcomes?|participants)\b", re.I)
SUBFIELDS = [("neuroimaging", r"\b(fmri|mri|eeg|meg|imaging)\b"),
             ("computational neuroscience", r"\b(firing rate|rate model|network|dynamics|model)\b"),
             ("clinical neurology", r"\b(patients?|clinical|trial)\b")]
RESIDUE = re.compile(r"\\[A-Za-z]+\*?(?:\[[^\]]*\])?(?:\{[^{}]*\})*|<ref>|< g r a p h i c s >|§ ?|\$| +[.,;:]")


def _document(prompt: str) -> str:
    found = re.search(r"<document>\n(.*)\n</document>", prompt, re.S)
    return found.group(1) if found else ""


def judge(prompt: str) -> dict:
    a = re.search(r"Response A:\n(.*?)\n\nResponse B:", prompt, re.S).group(1)
    b = re.search(r"Response B:\n(.*?)\n\nScore each", prompt, re.S).group(1)
    verdict = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"
    score = {"A": 4 if verdict == "A" else 2, "B": 4 if verdict == "B" else 2}
    return {"verdict": verdict, "scores": {s: {c: score[s] for c in CRITERIA} for s in "AB"},
            "rationale": "Longer answers reason more here."}


def classify(doc: str) -> dict:
    terms = sorted({m.lower() for m in MEDICAL.findall(doc)})
    words = len(doc.split())
    keep = len(terms) >= 2 and words >= 20
    reason = (f"medical terms: {', '.join(terms[:3])}" if keep else
              "too short to teach anything" if words < 20 else "no medical content")
    return {"relevance": min(5, 1 + len(terms)), "quality": 4 if words >= 20 else 1,
            "decision": "keep" if keep else "drop", "reason": reason}


def expand(doc: str) -> dict:
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", doc) if s]
    third = max(1, len(sentences) // 3)
    groups = [sentences[:third], sentences[third:2 * third] or sentences[-1:], sentences[2 * third:] or sentences[-1:]]
    leads = ["The question behind this study, in plain words:", "How the study was done and what it measured:",
             "What it found and what that means for patients:"]
    paragraphs = [f"{lead} {' '.join(g)}" for lead, g in zip(leads, groups)]
    paragraphs.append("A caveat for the reader: an abstract compresses a whole study into a few sentences, so the "
                      "numbers above deserve a look at the full paper before they change practice.")
    return {"paragraphs": paragraphs}


def arxiv(doc: str) -> dict:
    subfield = next((name for name, pattern in SUBFIELDS if re.search(pattern, doc, re.I)), "other")
    edits, seen = [], set()
    for m in RESIDUE.finditer(doc):
        find = m.group(0)
        if find not in seen:
            seen.add(find)
            inner = re.findall(r"\{([^{}]*)\}", find)
            if find.strip() in (".", ",", ";", ":"):
                replace = find.strip()  # the space a dropped citation left before punctuation
            elif inner and not re.match(r"\\(\w*ref|\w*cite\w*|label|includegraphics)\b", find):
                replace = inner[-1]  # a formatting macro: keep its text
            else:
                replace = ""
            edits.append({"find": find, "replace": replace})
    return {"subfield": subfield, "edits": edits[:50]}


ANSWERS = {"judgement": lambda prompt: judge(prompt), "classify": lambda prompt: classify(_document(prompt)),
           "expand": lambda prompt: expand(_document(prompt)), "arxiv": lambda prompt: arxiv(_document(prompt))}
OFF_SCHEMA = {"judgement": {"verdict": "C"}, "classify": {"decision": "maybe"}, "expand": {"paragraphs": "one"},
              "arxiv": {"subfield": 3}}


class StubServer:
    """Serves until :meth:`close`, on a background thread; ``port=0`` picks a free port (see ``url``)."""

    def __init__(self, port: int = 0, slow_seconds: float = 3.0, fail_first: bool = False, delay: float = 0.0,
                 request_log: str | Path | None = None):
        self.requests: list[dict] = []
        self.received = 0
        self.seen: set[str] = set()
        self.slow_seconds, self.fail_first, self.delay = slow_seconds, fail_first, delay
        self.log = open(request_log, "a") if request_log else None
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet: the request log is the record
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                record = {"path": self.path, "body": body, "auth": self.headers.get("Authorization"), "status": None}
                with server.lock:  # kept on arrival: a SLOW request still being answered belongs to the run that sent it
                    first_ever, server.received = server.received == 0, server.received + 1
                    server.requests.append(record)
                code, payload = server.respond(body, first_ever)
                with server.lock:
                    record["status"] = code
                    if server.log:
                        prompt = body["messages"][-1]["content"]
                        server.log.write(json.dumps({"task": _task(body), "status": code,
                                                     "doc_sha256": hashlib.sha256(_document(prompt).encode()).hexdigest()}) + "\n")
                        server.log.flush()
                data = json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def respond(self, body: dict, first_ever: bool) -> tuple[int, dict]:
        if self.fail_first and first_ever:
            return 500, {"error": {"message": "transient", "type": "server_error"}}
        task, prompt = _task(body), body["messages"][-1]["content"]
        if task not in ANSWERS:
            return 400, {"error": {"message": f"unknown response_format schema {task!r}", "type": "invalid_request_error"}}
        time.sleep(self.delay + (self.slow_seconds if "SLOW" in prompt else 0.0))
        content = json.dumps(ANSWERS[task](prompt))
        if "MALFORMED-ALWAYS" in prompt:
            content = "I would rather answer in prose."
        elif "OFF-SCHEMA" in prompt:
            content = json.dumps(OFF_SCHEMA[task])
        elif "MALFORMED-ONCE" in prompt:
            with self.lock:
                if prompt not in self.seen:
                    self.seen.add(prompt)
                    content = content[: len(content) // 2]
        return 200, {"id": "stub", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
                     "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(content) // 4,
                               "total_tokens": len(prompt) // 4 + len(content) // 4}}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.log:
            self.log.close()


def _task(body: dict) -> str | None:
    return (body.get("response_format") or {}).get("json_schema", {}).get("name")


def spawn(*args: str, port: int = 0, **popen) -> tuple[subprocess.Popen, str]:
    """Start the server in a process of its own and return it once it listens, with its URL. ``port=0``: the
    OS picks a free one as the server binds it (a port picked beforehand can be taken in between)."""
    proc = subprocess.Popen([sys.executable, "-m", "tools.openai_stub_server", "--port", str(port), *args],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, text=True, **popen)
    line = proc.stdout.readline()  # printed once it listens
    if " on http" not in line:
        proc.kill()
        raise RuntimeError(f"the stub server did not start: {line.strip() or proc.wait()}")
    return proc, line.rsplit(" on ", 1)[1].strip()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8011, help="0: a free port (the printed URL names it)")
    p.add_argument("--delay", type=float, default=0.0, help="seconds to wait before every answer")
    p.add_argument("--slow-seconds", type=float, default=3.0, help="extra wait for prompts containing SLOW")
    p.add_argument("--fail-first", action="store_true", help="answer the first request with HTTP 500")
    p.add_argument("--request-log", help="append one JSON line per request (task, document hash, status)")
    args = p.parse_args(argv)
    server = StubServer(args.port, args.slow_seconds, args.fail_first, args.delay, args.request_log)
    print(f"stub OpenAI chat-completions server (rules, not a model) on {server.url}", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.close()


if __name__ == "__main__":
    main()
