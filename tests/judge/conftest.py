"""Fixtures for the judge tests: a stand-in labeler and a fake OpenAI-compatible server on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import threading
import time

import numpy as np
import pytest

from rrg3d.text.labels import CTRATE_LABELS

_WORDS = {"Cardiomegaly": "cardiomegaly", "Pleural effusion": "effusion", "Lung nodule": "nodule",
          "Emphysema": "emphysema"}


class StubLabeler:
    """Keyword labeler (no negation) with exact, hand-checkable output."""

    labels = CTRATE_LABELS
    name = "stub"

    def predict(self, texts):
        out = np.zeros((len(texts), len(CTRATE_LABELS)), dtype=np.int8)
        for i, text in enumerate(texts):
            for label, word in _WORDS.items():
                out[i, CTRATE_LABELS.index(label)] = word in (text or "").lower()
        return out


@pytest.fixture()
def stub_labeler():
    return StubLabeler()


class FakeServer:
    """Answers POST /v1/chat/completions from a script: a list of (status, body or callable, delay) per request.

    When the script is used up the last entry repeats. Records every request (headers and JSON body); counts the
    largest number of requests in flight at once. At most ``limit`` requests are served (then 503), so a bug can
    never make a test spin.
    """

    def __init__(self, script, limit=50):
        self.script = list(script)
        self.requests = []
        self.limit = limit
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    index = len(server.requests)
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                counted = True
                try:
                    if index >= server.limit:
                        status, payload, delay = 503, "request limit reached", 0
                    else:
                        status, payload, delay = server.script[min(index, len(server.script) - 1)]
                    if callable(payload):
                        payload = payload(body)
                    time.sleep(delay)
                    data = payload if isinstance(payload, bytes) else (
                        payload.encode() if isinstance(payload, str) else json.dumps(payload).encode())
                    # no longer in flight once the answer starts: the client may send its next request as soon as
                    # it has read this one, before this thread would get to the finally below (a flaky count)
                    with server.lock:
                        server.in_flight -= 1
                        counted = False
                    try:
                        self.send_response(status)
                        self.send_header("Content-Type", "application/json")
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        self.wfile.write(data)
                    except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
                        pass
                finally:
                    if counted:
                        with server.lock:
                            server.in_flight -= 1

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _completion(content):
    return {"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                         "content": content}}]}


@pytest.fixture()
def completion():
    """``completion(text)`` → an OpenAI chat-completion body answering ``text``."""
    return _completion


@pytest.fixture()
def fake_server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # loopback must never go through a proxy
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    servers = []

    def start(script, limit=50):
        server = FakeServer(script, limit)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
