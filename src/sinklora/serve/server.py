"""Serve a small chat page over HTTP (loopback by default), streaming tokens with server-sent events.

Routes: ``GET /`` the page; ``POST /api/chat`` ``{"message": ...}`` -> ``text/event-stream`` of
``data: {"token": ...}`` events and a last ``data: {"done": true, "stats": {...}}`` (or ``{"error": ...}``);
``POST /api/reset``; ``GET /api/stats``. One conversation per server (a local, single-user tool): a
second message while one is being answered gets HTTP 409.
"""

from __future__ import annotations

import json
import logging
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sinklora.serve.session import ChatSession

logger = logging.getLogger(__name__)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>sinklora chat</title>
<style>
body{font-family:system-ui,sans-serif;max-width:48rem;margin:2rem auto;padding:0 1rem}
#log div{white-space:pre-wrap;margin:.5rem 0;padding:.5rem;border-radius:.4rem}
.user{background:#e8f0fe}.assistant{background:#f1f3f4}.stats{color:#666;font-size:.8rem}
form{display:flex;gap:.5rem}textarea{flex:1;height:4rem}
</style></head><body>
<h3>sinklora chat <small class="stats">__TITLE__</small></h3>
<div id="log"></div>
<form id="f"><textarea id="m" placeholder="Message (Enter sends, Shift+Enter new line)"></textarea>
<button>Send</button><button type="button" id="r">Reset</button></form>
<script>
const log = document.getElementById('log'), box = document.getElementById('m');
function add(cls, text) { const d = document.createElement('div'); d.className = cls; d.textContent = text;
  log.appendChild(d); window.scrollTo(0, document.body.scrollHeight); return d; }
async function send(text) {
  add('user', text); const out = add('assistant', ''); const res = await fetch('/api/chat',
    {method: 'POST', headers: {'Content-Type': 'application/json'}, body: JSON.stringify({message: text})});
  if (!res.ok) { out.textContent = 'error: ' + await res.text(); return; }
  const reader = res.body.getReader(), dec = new TextDecoder(); let buf = '';
  for (;;) { const {done, value} = await reader.read(); if (done) break; buf += dec.decode(value, {stream: true});
    let i; while ((i = buf.indexOf('\\n\\n')) >= 0) { const ev = buf.slice(0, i); buf = buf.slice(i + 2);
      if (!ev.startsWith('data: ')) continue; const msg = JSON.parse(ev.slice(6));
      if (msg.token) out.textContent += msg.token;
      if (msg.error) out.textContent += '\\n[error: ' + msg.error + ']';
      if (msg.done) { const s = msg.stats, c = s.cache, l = s.last_reply;
        add('stats', `${l.new_tokens} tokens, ${l.decode_tokens_per_s} tok/s; cache ${c.policy}: ` +
          `kept ${c.kept_tokens} of ${c.seen_tokens} tokens, ${(c.kv_bytes / 1048576).toFixed(2)} MiB`); } } } }
document.getElementById('f').onsubmit = e => { e.preventDefault(); const t = box.value.trim();
  if (t) { box.value = ''; send(t); } };
box.onkeydown = e => { if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault();
  document.getElementById('f').requestSubmit(); } };
document.getElementById('r').onclick = async () => { await fetch('/api/reset', {method: 'POST'});
  log.innerHTML = ''; };
</script></body></html>
"""


def _handler(session: ChatSession, title: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.debug("%s " + fmt, self.address_string(), *args)

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, obj: Any) -> None:
            self._send(code, json.dumps(obj).encode(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            if self.path in ("/", "/index.html"):
                self._send(200, PAGE.replace("__TITLE__", title).encode(), "text/html; charset=utf-8")
            elif self.path == "/api/stats":
                self._json(200, session.stats())
            else:
                self._json(404, {"error": f"no route {self.path}"})

        def _body(self) -> dict[str, Any]:
            n = int(self.headers.get("Content-Length") or 0)
            data = json.loads(self.rfile.read(n) or b"{}") if n else {}
            return data if isinstance(data, dict) else {}

        def do_POST(self) -> None:  # noqa: N802
            if self.path == "/api/reset":
                self._body()
                with session.lock:
                    session.reset()
                self._json(200, {"ok": True})
            elif self.path == "/api/chat":
                try:
                    message = str(self._body().get("message", "")).strip()
                except (ValueError, UnicodeDecodeError):
                    message = ""
                if not message:
                    self._json(400, {"error": 'body must be JSON {"message": "..."} with a non-empty message'})
                elif not session.lock.acquire(blocking=False):
                    self._json(409, {"error": "busy: another reply is being generated"})
                else:
                    try:
                        self._stream(message)
                    finally:
                        session.lock.release()
            else:
                self._json(404, {"error": f"no route {self.path}"})

        def _event(self, obj: Any) -> None:
            data = f"data: {json.dumps(obj)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")  # one HTTP chunk per event
            self.wfile.flush()

        def _stream(self, message: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            pieces = session.stream(message)
            try:
                for piece in pieces:
                    self._event({"token": piece})
                self._event({"done": True, "stats": session.stats()})
            except (BrokenPipeError, ConnectionResetError):
                logger.info("client went away; generation stopped")
                pieces.close()
                return
            except Exception as e:  # reported to the page; the session stays usable
                logger.exception("generation failed")
                self._event({"error": str(e)})
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler


def make_server(session: ChatSession, host: str = "127.0.0.1", port: int = 0, title: str = "") -> ThreadingHTTPServer:
    """An HTTP server bound to ``host:port`` (``server.server_address`` has the real port); call
    ``serve_forever()`` (and ``shutdown()`` from another thread)."""
    server = ThreadingHTTPServer((host, port), _handler(session, title))
    server.daemon_threads = True
    return server
