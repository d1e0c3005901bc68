"""Passkey retrieval over prompt lengths x key depths (LongLoRA's format, greedy decoding; docs/method.md §5).
Writes results.json, a heatmap (passkey.png) and config.yaml."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sinklora.config import option
from sinklora.settings import EvalModelOptions


@dataclass
class PasskeyConfig(EvalModelOptions):
    output_dir: str = option("outputs/eval/passkey", "folder for results.json, passkey.png and config.yaml")
    lengths: list[int] = option(help="target prompt lengths in tokens (each prompt is <= its target)",
                                factory=lambda: [2048, 4096, 8192, 16384])
    depths: list[float] = option(help="key positions: fraction of the filler before the key",
                                 factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    trials: int = option(2, "trials per (length, depth); LongLoRA uses 10 per length")
    seed: int = option(0, "seed of the keys")
    extra_new_tokens: int = option(4, "tokens generated beyond the key's length")

    def validate(self) -> list[str]:
        errors = super().validate()
        if not self.lengths or any(n < 64 for n in self.lengths):
            errors.append(f"lengths={self.lengths}: give lengths >= 64 tokens, e.g. lengths=2048,4096")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            errors.append(f"depths={self.depths}: give depths between 0.0 and 1.0, e.g. depths=0,0.5,1")
        if self.trials < 1:
            errors.append(f"trials={self.trials}: must be >= 1")
        if self.extra_new_tokens < 0:
            errors.append(f"extra_new_tokens={self.extra_new_tokens}: must be >= 0")
        return errors


CONFIG = PasskeyConfig


def main(cfg: PasskeyConfig) -> int:
    import time

    from sinklora.config import save_config
    from sinklora.eval import plots
    from sinklora.eval.passkey import run_passkey
    from sinklora.eval.results import run_metadata, write_results

    out = Path(cfg.output_dir)
    model, tokenizer = cfg.load()
    t0 = time.perf_counter()
    result = run_passkey(model, tokenizer, cfg.lengths, cfg.depths, cfg.trials, cfg.seed,
                         extra_new_tokens=cfg.extra_new_tokens)
    payload = {
        "kind": "passkey",
        "label": cfg.label,
        "metadata": run_metadata(model=cfg.model, adapter=cfg.adapter, pattern="full", lengths=cfg.lengths,
                                 seeds=[cfg.seed], loaded_model=model, cache="full",
                                 wall_seconds=round(time.perf_counter() - t0, 2)),
        **result,
    }
    save_config(cfg, out / "config.yaml")
    write_results(payload, out / "results.json")
    plots.plot_passkey_heatmap(payload, out / "passkey.png")
    print("length  " + " ".join(f"{d:>6.2f}" for d in cfg.depths) + "    mean")
    for length, row, mean in zip(cfg.lengths, result["accuracy"], result["accuracy_by_length"]):
        print(f"{length:<7} " + " ".join(f"{a:>6.2f}" for a in row) + f"  {mean:>6.2f}")
    print(f"results: {out / 'results.json'}")
    return 0
