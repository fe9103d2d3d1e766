"""A stand-in OpenAI-compatible engine server for gateway tests (standard library only).

GET /health, GET /v1/models; POST /v1/chat/completions and /v1/completions answer
``--tokens`` tokens ("tok0 tok1 …"), streamed as SSE when asked, with ``--token-delay``
seconds between tokens; POST /crash exits with code 3 at once. ``--pid-file`` gets
the pid, ``--log`` one line per request.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="fake")
    ap.add_argument("--tokens", type=int, default=5)
    ap.add_argument("--token-delay", type=float, default=0.0)
    args, _unknown = ap.parse_known_args()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _json(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._json(200, {"status": "ok"})
            elif self.path == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": args.model}]})
            else:
                self._json(404, {"error": {"message": "not found"}})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path == "/crash":
                os._exit(3)
            chat = self.path == "/v1/chat/completions"
            if self.path not in ("/v1/chat/completions", "/v1/completions"):
                self._json(404, {"error": {"message": "not found"}})
                return
            n = int(body.get("max_tokens") or args.tokens)
            n = min(n, args.tokens)
            words = [f"tok{i} " for i in range(n)]
            usage = {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3}
            if not body.get("stream"):
                time.sleep(args.token_delay * n)
                text = "".join(words)
                choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                           "finish_reason": "length"} if chat else
                          {"index": 0, "text": text, "finish_reason": "length"})
                self._json(200, {"id": "x", "object": "chat.completion" if chat else
                                 "text_completion", "created": 0, "model": body.get("model"),
                                 "choices": [choice], "usage": usage})
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()

            def send(data: str) -> None:
                raw = f"data: {data}\n\n".encode()
                self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
                self.wfile.flush()

            try:
                for w in words:
                    time.sleep(args.token_delay)
                    choice = ({"index": 0, "delta": {"content": w}, "finish_reason": None}
                              if chat else {"index": 0, "text": w, "finish_reason": None})
                    send(json.dumps({"id": "x", "object": "chat.completion.chunk" if chat
                                     else "text_completion", "created": 0,
                                     "model": body.get("model"), "choices": [choice]}))
                send("[DONE]")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, *a: object) -> None:
            pass

    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
