"""A real HTTP file server on 127.0.0.1 for download tests: Range support, cut-offs and 404s, and on demand
bodies without Content-Length, Hugging Face style redirects with X-Linked-* headers, and slow sending."""
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Files(BaseHTTPRequestHandler):
    files: dict = {}          # path -> bytes
    cut_after: dict = {}      # path -> bytes sent before the connection is dropped (once)
    requests: list = []       # (path, Range header) seen
    no_length: set = set()    # paths sent without Content-Length: the body ends when the connection closes
    headers_for: dict = {}    # path -> extra response headers, e.g. X-Linked-ETag / X-Linked-Size
    redirects: dict = {}      # path -> target path, answered with a 302 (as Hugging Face's resolve -> CDN)
    delay: float = 0.0        # seconds slept per 64 KiB sent, so that two downloads overlap

    @classmethod
    def reset(cls, files: dict) -> None:
        cls.files, cls.cut_after, cls.requests = dict(files), {}, []
        cls.no_length, cls.headers_for, cls.redirects, cls.delay = set(), {}, {}, 0.0

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.requests.append((self.path, self.headers.get("Range")))
        if self.path in self.redirects:
            self.send_response(302)
            self.send_header("Location", self.redirects[self.path])
            self._extra_headers()
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        chunk = body[start:]
        if self.path not in self.no_length:
            self.send_header("Content-Length", str(len(chunk)))
        self._extra_headers()
        self.end_headers()
        cut = self.cut_after.pop(self.path, None)
        if cut is not None:
            chunk = chunk[:cut]
            self.close_connection = True
        try:
            for i in range(0, len(chunk), 1 << 16):
                self.wfile.write(chunk[i:i + (1 << 16)])
                if self.delay:
                    self.wfile.flush()
                    time.sleep(self.delay)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client went away (a killed download)
            pass

    def do_HEAD(self):
        """Size look-ups before a download (the starter packs ask for Content-Length)."""
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self._extra_headers()
        self.end_headers()

    def _extra_headers(self):
        for k, v in self.headers_for.get(self.path, {}).items():
            self.send_header(k, v)


def serve():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
