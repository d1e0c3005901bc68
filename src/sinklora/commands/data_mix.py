"""Mix instruction sources by ratio into one shuffled JSONL (default: the paper's LongAlpaca-plus
shares), with a token-length report (table + histogram)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from sinklora.config import option
from sinklora.defaults import DEFAULT_MODEL, LONGALPACA_PLUS


@dataclasses.dataclass
class MixConfig:
    sources: dict[str, float] = option(help="{instruction file or hf:NAME: ratio}; default: the paper's LongAlpaca-plus",
                           factory=lambda: dict(LONGALPACA_PLUS))
    total: int = option(28000, "records in the mixture")
    out: str = option("runs/data/mix.jsonl", "output JSONL; the report goes next to it (.png, .txt)")
    overwrite: bool = option(False, "replace an existing out (and its report)")
    seed: int = option(0, "shuffle and sampling seed")
    allow_replacement: bool = option(False, "repeat records of a source that is smaller than its share")
    on_error: Literal["fail", "skip"] = option("fail", "invalid records: 'fail' or 'skip' (counted)")
    tokenizer: str = option(DEFAULT_MODEL, "tokenizer for the length report (model alias or path)")

    def validate(self) -> list[str]:
        from sinklora.data.mix import mixture_counts

        errors = []
        if self.total < 1:
            errors.append(f"total={self.total}: must be >= 1")
        if not isinstance(self.sources, dict):
            return errors + [f"sources={self.sources!r}: expected a mapping {{path: ratio}}"]
        try:
            mixture_counts(self.sources, max(self.total, 0))
        except (ValueError, TypeError) as e:
            errors.append(str(e))
        missing = [k for k in self.sources if not k.startswith("hf:") and not Path(k).exists()]
        if missing:
            errors.append(f"sources: {', '.join(map(repr, missing))} not found; give existing JSON/JSONL "
                          "files (e.g. from `sinklora data tasks`) as {path: ratio}")
        out = Path(self.out).expanduser()
        written = [out, out.with_suffix(".txt"), out.with_suffix(".png")]
        clash = [k for k in self.sources if not k.startswith("hf:") and Path(k).exists()
                 and any(Path(k).resolve() == w.resolve() for w in written)]
        if clash:
            errors.append(f"out={self.out!r} would overwrite the source {clash[0]!r} (the mix or its report); "
                          "write the mixture to another file")
        elif out.exists() and not self.overwrite:
            errors.append(f"out={self.out!r} already exists; choose a new file or set overwrite=true")
        return errors


CONFIG = MixConfig


def main(cfg: MixConfig) -> int:
    from sinklora import atomic
    from sinklora.data.mix import length_report, mix_sources, record_tokens, write_jsonl
    from sinklora.models.loading import load_tokenizer

    # everything that can fail runs before anything is written
    try:
        tokenizer = load_tokenizer(cfg.tokenizer)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer={cfg.tokenizer!r}: cannot load a tokenizer ({str(e).splitlines()[0]}); give "
                         "a model alias, a local model folder or a hub id") from None
    records = mix_sources(cfg.sources, cfg.total, cfg.seed, cfg.allow_replacement, cfg.on_error)
    lengths = record_tokens(records, tokenizer)
    out = Path(cfg.out)
    write_jsonl(records, out)
    table = length_report(records, lengths, out.with_suffix(".png"))
    atomic.write_text(out.with_suffix(".txt"), table + "\n")
    print(table)
    print(f"{len(records)} records -> {out} (histogram {out.with_suffix('.png')})")
    return 0
