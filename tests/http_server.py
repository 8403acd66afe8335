"""A local HTTP server (127.0.0.1 only) for the download tests: serves files with Range support and
misbehaves on request (cuts, stalls, error statuses, web pages, ignored ranges)."""

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERVER_LIFETIME = 120  # seconds: the server stops by itself after this, whatever a test does


class Server:
    """Serves `files` over HTTP with Range support, and misbehaves on request."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.pages: dict[str, bytes] = {}  # path -> an HTML page sent with status 200 (a quota page)
        self.requests: list[tuple[str, str | None]] = []
        self.cut_first_after: int | None = None  # close the first transfer after this many bytes
        self.cut_every_after: int | None = None  # close every transfer after this many bytes
        self.stall_after: int | None = None  # go silent at this byte of the file, until closed
        self.stall_every_after: int | None = None  # go silent after this many bytes of every response, until closed
        self.status: int | None = None  # answer every request with this error status
        self.ignore_range = False
        self.delay = 0.0  # seconds per 4 KiB block
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                wanted = self.headers.get("Range")
                server.requests.append((self.path, wanted))
                if server.status:
                    self.send_error(server.status)
                    return
                if self.path in server.pages:
                    page = server.pages[self.path]
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if wanted and not server.ignore_range:
                    start = int(wanted.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/gzip")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if server.cut_first_after is not None:
                    payload, server.cut_first_after = payload[:server.cut_first_after], None
                if server.cut_every_after is not None:
                    payload = payload[:server.cut_every_after]
                for i in range(0, len(payload), 4096):
                    if (server.stall_after is not None and start + i >= server.stall_after) or \
                            (server.stall_every_after is not None and i >= server.stall_every_after):
                        server.closing.wait(SERVER_LIFETIME)
                        return
                    if server.delay:
                        time.sleep(server.delay)
                    try:
                        self.wfile.write(payload[i:i + 4096])
                        self.wfile.flush()
                    except (BrokenPipeError, ConnectionResetError):
                        return
                self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()
        self.timer = threading.Timer(SERVER_LIFETIME, self.stop)
        self.timer.daemon = True
        self.timer.start()

    def stop(self):
        self.closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.timer.cancel()
