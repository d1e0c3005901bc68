"""Serve a small chat page over HTTP (loopback by default), streaming tokens with server-sent events."""

from __future__ import annotations

from dataclasses import dataclass

from sinklora.config import option
from sinklora.settings import SessionOptions

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig(SessionOptions):
    host: str = option("127.0.0.1", "address to listen on; loopback by default (others need allow_remote=true)")
    port: int = option(8000, "TCP port; 0 picks a free one")
    allow_remote: bool = option(False, "allow a non-loopback host (the page has no authentication)")
    max_requests: int = option(0, "stop after this many HTTP requests (0 = run until Ctrl-C); for scripts/tests")

    def validate(self) -> list[str]:
        errors = super().validate()
        if self.host not in _LOOPBACK and not self.allow_remote:
            errors.append(f"host={self.host!r}: not a loopback address; the chat page has no authentication, "
                          "so set allow_remote=true to expose it, or keep host=127.0.0.1")
        if not 0 <= self.port <= 65535:
            errors.append(f"port={self.port}: must be in 0..65535 (0 = any free port)")
        if self.max_requests < 0:
            errors.append(f"max_requests={self.max_requests}: must be >= 0 (0 = no limit)")
        return errors


CONFIG = ServeConfig


def main(cfg: ServeConfig) -> int:
    from sinklora.serve.server import make_server
    from sinklora.serve.session import ChatSession

    session = ChatSession.load(cfg)
    title = f"{cfg.model} · cache {cfg.cache}" + (f" budget {cfg.budget}" if cfg.budget else "")
    server = make_server(session, cfg.host, cfg.port, title)
    host, port = server.server_address[:2]
    print(f"sinklora serve: http://{host}:{port}/  (Ctrl-C stops)", flush=True)
    try:
        if cfg.max_requests:
            for _ in range(cfg.max_requests):
                server.handle_request()
        else:
            server.serve_forever()
    finally:
        server.server_close()
    return 0
