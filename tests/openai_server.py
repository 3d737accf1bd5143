"""A real HTTP server on 127.0.0.1 speaking the OpenAI chat-completions protocol, for tests.

It records every request (body and Authorization header) and answers like a judge: it prefers the longer
of "Response A"/"Response B". Markers in the prompt script failures: MALFORMED-ALWAYS (non-JSON content),
MALFORMED-ONCE (non-JSON the first time), SLOW (sleeps past the client's timeout); the very first request
of a server gets an HTTP 500.
"""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CRITERIA = ["diagnostic_reasoning", "clinical_knowledge", "management_quality", "reasoning_chain", "overall"]


class JudgeServer:
    def __init__(self, slow_seconds: float = 3.0):
        self.requests: list[dict] = []
        self.seen: set[str] = set()
        self.slow_seconds = slow_seconds
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    first_ever = not server.requests
                    server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                if first_ever:
                    return self._send(500, {"error": {"message": "transient", "type": "server_error"}})
                prompt = body["messages"][-1]["content"]
                if "SLOW" in prompt:
                    time.sleep(server.slow_seconds)
                content = server.judge(prompt)
                self._send(200, {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": 40,
                                           "total_tokens": len(prompt) // 4 + 40}})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def judge(self, prompt: str) -> str:
        if "MALFORMED-ALWAYS" in prompt:
            return "I think A is better."
        if "MALFORMED-ONCE" in prompt:
            with self.lock:
                key = prompt
                if key not in self.seen:
                    self.seen.add(key)
                    return '{"verdict": "A", "scores": '
        a = re.search(r"Response A:\n(.*?)\n\nResponse B:", prompt, re.S).group(1)
        b = re.search(r"Response B:\n(.*?)\n\nScore each", prompt, re.S).group(1)
        verdict = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"
        score = {"A": 4 if verdict == "A" else 2, "B": 4 if verdict == "B" else 2}
        return json.dumps({"verdict": verdict, "scores": {s: {c: score[s] for c in CRITERIA} for s in "AB"},
                           "rationale": "Longer answers reason more here."})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
