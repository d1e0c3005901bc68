"""Command modules: each exposes ``CONFIG`` (a typed config dataclass) and ``main(cfg) -> int``; no torch at import."""
