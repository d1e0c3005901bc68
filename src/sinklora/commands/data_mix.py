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
        return errors


CONFIG = MixConfig


def main(cfg: MixConfig) -> int:
    import json

    from sinklora.data.mix import length_report, mix_sources, record_tokens
    from sinklora.models.loading import load_tokenizer

    records = mix_sources(cfg.sources, cfg.total, cfg.seed, cfg.allow_replacement, cfg.on_error)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    table = length_report(records, record_tokens(records, load_tokenizer(cfg.tokenizer)), out.with_suffix(".png"))
    out.with_suffix(".txt").write_text(table + "\n")
    print(table)
    print(f"{len(records)} records -> {out} (histogram {out.with_suffix('.png')})")
    return 0
