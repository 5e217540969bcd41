"""A tiny real service for the supervisor's tests: an HTTP server on a port, with knobs.

    python tests/supervisor/svc.py --port N [--status 200] [--body ok] [--status-file F]
        [--starts FILE] [--exit-after S] [--delay-listen S] [--spam N] [--detach] [--pidfile F]
        [--require-port P]

--status-file: the status code is read from this file on every request (tests flip it).
--starts: a line is appended to FILE each time the process starts (tests count restarts).
--exit-after: exit with code 3 after S seconds (a flapping service).
--delay-listen: sleep before listening (a slow start).
--spam: print N bytes to stdout at start (log capture and rotation).
--detach: start a copy in its own session and return at once (a restart command).
--require-port: at start, connect to 127.0.0.1:P first and exit with code 4 if nothing answers (an app
    that crashes when its database is not up yet).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--status", type=int, default=200)
    p.add_argument("--body", default='{"status": "ok"}')
    p.add_argument("--status-file")
    p.add_argument("--starts")
    p.add_argument("--exit-after", type=float)
    p.add_argument("--delay-listen", type=float, default=0.0)
    p.add_argument("--spam", type=int, default=0)
    p.add_argument("--detach", action="store_true")
    p.add_argument("--pidfile")
    p.add_argument("--require-port", type=int)
    ns = p.parse_args()
    if ns.detach:
        argv = [a for a in sys.argv if a != "--detach"]
        subprocess.Popen([sys.executable, *argv], start_new_session=True, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return
    if ns.starts:
        with open(ns.starts, "a") as fh:
            fh.write(f"{os.getpid()} {time.time()}\n")
    if ns.require_port:
        try:
            socket.create_connection(("127.0.0.1", ns.require_port), timeout=2).close()
        except OSError as exc:
            print(f"port {ns.require_port} is not up: {exc}", flush=True)
            sys.exit(4)
    if ns.pidfile:
        with open(ns.pidfile, "w") as fh:
            fh.write(f"{os.getpid()}\n")
    if ns.spam:
        line = "x" * 99 + "\n"
        sys.stdout.write(line * (ns.spam // 100))
        sys.stdout.flush()
    if ns.exit_after is not None:
        threading.Timer(ns.exit_after, lambda: os._exit(3)).start()
    time.sleep(ns.delay_listen)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            status = ns.status
            if ns.status_file:
                try:
                    status = int(open(ns.status_file).read().strip() or status)
                except (OSError, ValueError):
                    pass
            body = ns.body.encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", ns.port), Handler)
    print(f"listening on {ns.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
