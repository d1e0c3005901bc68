"""Full vs S2 vs SF attention: the paper's comparison as one command (docs/method.md §4).

Trains one LoRA+ adapter per attention method on one budget, evaluates the untrained base (position
interpolation only) and every adapter with full attention on the same held-out documents, and reports
perplexity, passkey accuracy, training time, memory and the improvement ratio
``(ppl_base - ppl_m) / (ppl_base - ppl_full)``. Writes compare.md, compare.json and compare.png.
"""

from __future__ import annotations

from sinklora.train.configs import CompareConfig

CONFIG = CompareConfig


def main(cfg: CompareConfig) -> int:
    from sinklora.train.compare import run

    run(cfg)
    return 0
