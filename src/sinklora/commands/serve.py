"""Serve an OpenAI-compatible API and a chat page (loopback by default), with a KV-cache policy per request.

Clients: any OpenAI client (``base_url=http://127.0.0.1:8000/v1``); sinklora's cache settings ride in
the request body (``extra_body={"cache": "h2o", "budget": 0.2}``). The page is at ``/``.
"""

from __future__ import annotations

from dataclasses import dataclass

from sinklora.settings import ServerOptions, SessionOptions


@dataclass
class ServeConfig(ServerOptions, SessionOptions):
    """Model, default cache policy and decoding (``SessionOptions``), and where and how to listen."""

    def validate(self) -> list[str]:
        errors = SessionOptions.validate(self) + ServerOptions.validate(self)
        if self.context is not None:
            errors.append(f"context={self.context!r}: the server is stateless, as OpenAI's API; send the document "
                          "in the request's messages (`sinklora chat context=FILE` reads one)")
        return errors


CONFIG = ServeConfig


def main(cfg: ServeConfig) -> int:
    try:
        from sinklora.serve.server import (
            Service,
            bind,
            make_app,
            url_of,
            uvicorn_server,
        )
    except ImportError as e:
        raise ValueError(f"sinklora serve needs the `serve` extra ({e}): pip install -e '.[serve]'") from None

    sock = bind(cfg.host, cfg.port)  # before the model loads: a bad address fails at once
    model, tokenizer = cfg.load()
    app = make_app(Service(model, tokenizer, cfg, cfg, model_id=cfg.model))
    url = url_of(sock)
    print(f"sinklora serve: {url}/  (OpenAI API: {url}/v1{', API key required' if cfg.key() else ''}; "
          "Ctrl-C stops)", flush=True)
    try:
        uvicorn_server(app, cfg.max_requests).run(sockets=[sock])
    finally:
        sock.close()
    return 0
