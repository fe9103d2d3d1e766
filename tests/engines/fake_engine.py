"""A stand-in engine server for supervisor tests (standard library only).

Speaks the llama-server surface: GET /health (503 "Loading model" while
loading, then 200), /metrics, /props (build_info), /v1/models; POST /crash
exits with code 3. Behaviour flags make it slow, crashy or stubborn:

    --loading-s S       answer 503 on /health for S seconds after start
    --crash-after S     exit with code 3 S seconds after start
    --ignore-sigterm    ignore SIGTERM (the supervisor must SIGKILL)
    --spawn-child FILE  start a child in the same process group that ignores
                        SIGTERM and writes its pid to FILE
    --starts FILE       append one line per start (counts restarts)
    --no-metrics        /metrics answers 404
    --exit-code N       exit with N at once, before listening
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--model", default="")
    ap.add_argument("--loading-s", type=float, default=0.0)
    ap.add_argument("--crash-after", type=float, default=None)
    ap.add_argument("--ignore-sigterm", action="store_true")
    ap.add_argument("--spawn-child", default=None)
    ap.add_argument("--starts", default=None)
    ap.add_argument("--no-metrics", action="store_true")
    ap.add_argument("--exit-code", type=int, default=None)
    ap.add_argument("--build-info", default="b9999-fake")
    args, _unknown = ap.parse_known_args()

    if args.starts:
        with open(args.starts, "a") as fh:
            fh.write(f"{os.getpid()}\n")
    if args.exit_code is not None:
        print("fake engine: exiting at once as asked", file=sys.stderr)
        sys.exit(args.exit_code)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.spawn_child:
        code = (
            "import os, signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"open({args.spawn_child!r}, 'w').write(str(os.getpid()))\n"
            "time.sleep(3600)\n"
        )
        subprocess.Popen([sys.executable, "-c", code])
    started = time.monotonic()
    if args.crash_after is not None:
        def crash() -> None:
            time.sleep(args.crash_after)
            os._exit(3)

        threading.Thread(target=crash, daemon=True).start()

    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, body: object, ctype: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            loading = time.monotonic() - started < args.loading_s
            if self.path == "/health":
                if loading:
                    self._send(503, {"error": {"code": 503, "message": "Loading model"}})
                else:
                    self._send(200, {"status": "ok"})
            elif self.path == "/metrics":
                if args.no_metrics:
                    self._send(404, {"error": "no metrics"})
                else:
                    self._send(200, b"# TYPE requests counter\nrequests_total 0\n", "text/plain")
            elif self.path == "/props":
                self._send(200, {"build_info": args.build_info, "model_path": args.model})
            elif self.path == "/v1/models":
                self._send(200, {"object": "list", "data": [{"id": "fake"}]})
            else:
                self._send(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path == "/crash":
                self._send(200, {"crashing": True})
                self.wfile.flush()
                os._exit(3)
            self._send(404, {"error": "not found"})

        def log_message(self, *a: object) -> None:
            pass

    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
