"""A local OpenAI-compatible chat-completions endpoint for the tests (no network): scripted replies, recorded
requests."""

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar


class Endpoint(BaseHTTPRequestHandler):
    """Answers each POST with the next scripted reply: a string (the assistant's content), or a dict with
    ``status`` and ``error`` (an HTTP error), ``sleep`` (seconds before answering) and/or ``content``. Usage: one
    completion token per word."""

    script: ClassVar[list] = []
    requests: ClassVar[list] = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
        step = type(self).script.pop(0) if type(self).script else {"status": 500, "error": "script exhausted"}
        step = {"content": step} if isinstance(step, str) else step
        time.sleep(step.get("sleep", 0))
        if "status" in step:
            payload = json.dumps({"error": {"message": step["error"]}}).encode()
            self.send_response(step["status"])
        else:
            words = len(step["content"].split())
            usage = {"prompt_tokens": 7, "completion_tokens": words, "total_tokens": 7 + words}
            message = {"role": "assistant", "content": step["content"]}
            payload = json.dumps({"choices": [{"message": message}], "usage": usage}).encode()
            self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client gave up waiting
            self.wfile.write(payload)

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def serve() -> Iterator[tuple[str, type[Endpoint]]]:
    """Run an ``Endpoint`` with an empty script on a free local port: yields (base URL, the handler class)."""
    Endpoint.script, Endpoint.requests = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Endpoint)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", Endpoint
    finally:
        server.shutdown()
        server.server_close()
