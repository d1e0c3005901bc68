"""Extend a model's context window: position interpolation + LoRA+ + SF-Attn on long documents.

The recipe (docs/method.md §1): linear RoPE interpolation to ``target_len``, LoRA on q/k/v/o with
trainable embeddings and norms, sparse training attention (``sf`` by default), continued pretraining
on long documents packed into rows of ``train_len`` tokens. Before and after training, the model is
evaluated with full attention on held-out documents (perplexity) and passkey retrieval at
``eval.length``; the results table, ``results.json`` and ``loss.png`` land in ``output_dir``.

``preset=auto`` picks a budget the machine can afford: ``gpu`` (8k -> 32k, 200 steps at 32k tokens)
on a CUDA device, ``cpu-smoke`` (a smoke-scale run in minutes: short rows, a few steps) otherwise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from sinklora import atomic, runtime
from sinklora.config import ConfigError, to_dict
from sinklora.data.corpora import load_documents
from sinklora.data.packing import pack_documents, tokenize_documents
from sinklora.eval.passkey import run_passkey
from sinklora.eval.perplexity import evaluate_perplexity
from sinklora.hf import sequence_parallel
from sinklora.hf.attention import use_attention
from sinklora.hf.sequence_parallel import training_attention
from sinklora.models.rope import current_factor, original_length
from sinklora.train.configs import PRESETS, EvalSettings, ExtendConfig
from sinklora.train.recipe import build_model, evaluating, make_trainer, prepare_output_dir, train_and_save

logger = logging.getLogger(__name__)


def resolve_preset(cfg: ExtendConfig) -> dict:
    """Fill every budget value the user left unset from the preset; return the effective budget."""
    name = cfg.preset if cfg.preset != "auto" else ("gpu" if torch.cuda.is_available() else "cpu-smoke")
    p = dict(PRESETS[name], preset=name)
    cfg.target_len = cfg.target_len or p["target_len"]
    if cfg.train_len is None:
        cfg.train_len = min(p["train_len"], cfg.target_len)
    for key, default_key in (("max_steps", "max_steps"), ("learning_rate", "learning_rate"),
                             ("warmup_steps", "warmup_steps"), ("save_steps", "save_steps")):
        if getattr(cfg.train, key) is None:
            setattr(cfg.train, key, p[default_key])
    e = cfg.eval
    e.length = e.length or p["eval_length"]
    e.docs = e.docs or p["eval_docs"]
    e.passkey_trials = e.passkey_trials or p["passkey_trials"]
    e.passkey_depths = e.passkey_depths or p["passkey_depths"]
    e.loss_rows = p["loss_rows"] if e.loss_rows is None else e.loss_rows
    e.corpus = e.corpus or cfg.data
    return p


def check_budget(cfg: ExtendConfig) -> list[str]:
    errors = []
    if cfg.train_len > cfg.target_len:
        errors.append(f"train_len={cfg.train_len} > target_len={cfg.target_len}: training rows cannot be "
                      "longer than the extended context")
    errors += cfg.attention.check_length(cfg.train_len)
    if cfg.train.sequence_parallel > 1:
        from sinklora.models.loading import load_config

        errors += sequence_parallel.problems(cfg.train.sequence_parallel, load_config(cfg.model), cfg.train_len)
    return errors


def training_rows(cfg: ExtendConfig, tokenizer, needed_rows: int) -> torch.Tensor:
    """Training documents (never the held-out works), tokenised once (cached), packed into rows."""
    docs = load_documents(cfg.data, "train", on_error=cfg.on_error)
    if not docs:
        raise ValueError(f"data={cfg.data!r}: no training documents found")
    token_lists = tokenize_documents(docs, tokenizer)
    rows = pack_documents(token_lists, cfg.train_len, tokenizer.eos_token_id)
    total = sum(len(t) for t in token_lists)
    logger.info("training data: %d documents, %d tokens -> %d rows of %d tokens (%d rows needed; %s)",
                len(docs), total, len(rows), cfg.train_len, needed_rows,
                "each row seen once" if len(rows) >= needed_rows else f"{needed_rows / len(rows):.1f} epochs")
    return rows


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def eval_documents(e: EvalSettings, tokenizer, on_error: str = "fail") -> tuple[list[str], list[list[int]]]:
    """``(names, token lists)`` of the held-out documents with at least ``e.length`` tokens (``e.docs`` of them)."""
    docs = load_documents(e.corpus, "heldout", on_error=on_error)
    token_lists = tokenize_documents(docs, tokenizer)
    keep = [i for i, ids in enumerate(token_lists) if len(ids) >= e.length][: e.docs]
    if not keep:
        longest = max((len(t) for t in token_lists), default=0)
        raise ValueError(f"eval.corpus={e.corpus!r}: no held-out document has eval.length={e.length} tokens "
                         f"(the longest has {longest}); lower eval.length or choose another corpus")
    return [docs[i].name for i in keep], [token_lists[i] for i in keep]


def fixed_rows(rows: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` training rows drawn once with ``seed``: the rows whose loss is compared before and after."""
    pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:n]
    return rows[pick.sort().values]


def rows_loss(model, rows: torch.Tensor, pattern) -> float:
    """Mean next-token loss over ``rows`` (equal lengths) with the training attention ``pattern``."""
    device = next(model.parameters()).device
    with evaluating(model), use_attention(model, pattern), torch.no_grad():
        losses = [float(model(input_ids=r[None].to(device), labels=r[None].to(device), use_cache=False).loss)
                  for r in rows]
    return sum(losses) / len(losses)


def evaluate(model, tokenizer, e: EvalSettings, label: str, data: tuple | None = None) -> dict:
    """Held-out perplexity and passkey accuracy at ``e.length``, full attention; ``data`` from
    :func:`eval_documents` (read here when not given)."""
    names, token_lists = data or eval_documents(e, tokenizer)
    with evaluating(model, use_cache=True):
        logger.info("evaluating %s: perplexity on %d held-out documents, passkey at %d tokens", label, len(names),
                    e.length)
        ppl = evaluate_perplexity(model, token_lists, [e.length], max_tokens=e.length)
        passkey = run_passkey(model, tokenizer, [e.length], e.passkey_depths, trials=e.passkey_trials, seed=e.seed)
    row = ppl["by_length"][0]
    return {"label": label, "length": e.length, "ppl": row["ppl"], "ppl_tokens": row["tokens"],
            "ppl_docs": names, "passkey_accuracy": float(passkey["accuracy_by_length"][0]),
            "passkey_trials": e.passkey_trials * len(e.passkey_depths), "passkey_prompt_tokens": passkey["prompt_tokens"]}


def results_table(summary: dict, before: dict | None, after: dict | None, budget: dict, cfg: ExtendConfig) -> str:
    lines = [f"## sinklora train: {cfg.model}, {budget['original_len']} -> {cfg.target_len} tokens "
             f"(RoPE x{budget['factor']:g}), attention {cfg.attention.pattern}, preset {budget['preset']}"]
    if budget["preset"] == "cpu-smoke":
        lines.append(f"(smoke-scale run: {summary['steps']} steps of {cfg.train_len}-token rows on CPU; it checks the "
                     "pipeline end to end, it is not a real context extension; run on a GPU for preset=gpu)")
    lines += ["", "| | before (position interpolation only) | after training |", "|---|---|---|"]
    if before and after:
        lines.append(f"| perplexity @ {before['length']} tokens (held out) | {before['ppl']:.3f} "
                     f"| {after['ppl']:.3f} |")
        lines.append(f"| passkey @ {before['length']} tokens | {before['passkey_accuracy']:.0%} of {before['passkey_trials']} "
                     f"| {after['passkey_accuracy']:.0%} of {after['passkey_trials']} |")
        if before.get("fixed_rows") and after.get("fixed_rows_loss") is not None:
            lines.append(f"| training loss on {before['fixed_rows']} fixed training rows ({cfg.attention.pattern} "
                         f"attention) | {before['fixed_rows_loss']:.3f} | {after['fixed_rows_loss']:.3f} |")
    loss = (f"{summary['first_loss']:.3f} -> {summary['last_loss']:.3f} (min {summary['min_loss']:.3f})"
            if summary.get("first_loss") is not None else "n/a")
    lines += [f"| training loss per step (first -> last) | {loss} | |",
              f"| steps / time / tokens per s | {summary['steps']} / {summary['train_seconds']} s / {summary['tokens_per_s']} | |"]
    return "\n".join(lines + ([""] + reading_notes(before, budget, cfg) if before and after else []))


def reading_notes(before: dict, budget: dict, cfg: ExtendConfig) -> list[str]:
    """How to read the table: the evaluation length, the passkey count, which loss compares."""
    length, original, e = before["length"], budget["original_len"], cfg.eval
    where = (f"{length - original} tokens past the model's {original}-token pretraining context, where positions "
             "need the extension" if length > original else f"inside the model's {original}-token pretraining context")
    smoke = ", the smoke preset keeps CPU evaluation to minutes" if budget["preset"] == "cpu-smoke" else ""
    notes = [f"- Evaluation at {length} tokens: {where} (the extension targets {cfg.target_len}; "
             f"eval.length sets it{smoke})."]
    prompts = before["passkey_trials"]
    notes.append(f"- Passkey: {prompts} prompt(s) ({e.passkey_trials} per depth at depths {e.passkey_depths}). "
                 + ("With one prompt the cell is a yes/no check, not an accuracy: '0% of 1' means that one key was "
                    "not retrieved. " if prompts == 1 else "")
                 + "Raise eval.passkey_trials / eval.passkey_depths for an accuracy.")
    notes.append("- The per-step training loss is on a new row at each step, so first -> last does not compare; "
                 + (f"the fixed-row loss is on the same {before.get('fixed_rows')} rows before and after."
                    if before.get("fixed_rows")
                    else "set eval.loss_rows for a loss that does."))
    return notes


def _before(cfg: ExtendConfig, out: Path, model, tokenizer, eval_data: tuple, loss_rows, pattern) -> dict:
    """The untrained model's evaluation, saved in ``before.json`` and reused when a resumed run (whose
    model is still the untrained one at this point) evaluates with the same settings."""
    path, settings = out / "before.json", to_dict(cfg.eval)
    if path.is_file() and (saved := json.loads(path.read_text())).get("eval") == settings:
        return saved["before"]
    before = evaluate(model, tokenizer, cfg.eval, "before", eval_data)
    if loss_rows is not None:
        before.update(fixed_rows=len(loss_rows), fixed_rows_loss=rows_loss(model, loss_rows, pattern))
    atomic.write_text(path, json.dumps({"eval": settings, "before": before}, indent=1))
    return before


def run(cfg: ExtendConfig, callbacks: list | None = None) -> dict:
    """Library entry point (``sinklora train`` calls it); ``callbacks`` go to the HF Trainer."""
    from transformers import set_seed

    from sinklora.models.loading import load_tokenizer

    budget = resolve_preset(cfg)
    errors = check_budget(cfg)
    if errors:
        raise ConfigError(errors)
    # every data source is read and checked before the output folder is touched
    tokenizer = load_tokenizer(cfg.model)
    tc, world = cfg.train, runtime.world_size()
    rows = training_rows(cfg, tokenizer, tc.max_steps * tc.batch_size * tc.grad_accum * world)
    do_eval = cfg.eval.enabled and world == 1
    if cfg.eval.enabled and not do_eval:
        logger.info("distributed run: skipping the built-in evaluation (run `sinklora eval ppl` afterwards)")
    eval_data = eval_documents(cfg.eval, tokenizer, cfg.on_error) if do_eval else None
    loss_rows = fixed_rows(rows, cfg.eval.loss_rows, tc.seed) if do_eval and cfg.eval.loss_rows else None
    resume_from = prepare_output_dir(cfg)
    out = Path(cfg.output_dir)
    set_seed(tc.seed)  # LoRA's random init must be reproducible too (resume, comparisons)
    model, tokenizer = build_model(cfg.model, cfg.target_len, original_len=cfg.original_len,
                                   rope_rounding=cfg.rope_rounding, lora=cfg.lora, precision=tc.precision)
    budget.update(factor=current_factor(model.config), original_len=original_length(model.config))
    pattern = cfg.attention.build()
    before = _before(cfg, out, model, tokenizer, eval_data, loss_rows, pattern) if do_eval else None
    trainer = make_trainer(model, tokenizer, _Rows(rows), tc, out, tokens_per_row=cfg.train_len, callbacks=callbacks,
                           base_model=cfg.model)
    with training_attention(model, pattern, tc.sequence_parallel):
        summary = train_and_save(trainer, out, resume_from, base_model=cfg.model)
    after = None
    if do_eval:
        after = evaluate(model, tokenizer, cfg.eval, "after", eval_data)
        if loss_rows is not None:
            after["fixed_rows_loss"] = rows_loss(model, loss_rows, pattern)
    result = {"config": to_dict(cfg), "budget": budget, "train": summary, "before": before, "after": after}
    if trainer.is_world_process_zero():
        atomic.write_text(out / "results.json", json.dumps(result, indent=1, default=str))
        table = results_table(summary, before, after, budget, cfg)
        atomic.write_text(out / "results.md", table + "\n")
        print("\n" + table + f"\n\nadapter, results.json, results.md and loss.png are in {out}/")
    return result
