"""LoRA fine-tuning of the generator's LLM on examples from `finetune.data`, validated through the real pipeline.

The loop, top to bottom: tokenise each example as prompt ids + answer ids + EOS (exactly the ids the served model
reads and then emits) with the loss on the answer only; group examples of similar length into batches; AdamW
with warm-up and linear decay, gradient accumulation; every `eval_every` optimiser steps score the validation
requests with the model being trained, through `Recommender.score_prepared` (the serving code), and keep the best
adapter; stop early after `patience` evaluations without improvement. Checkpoints (adapter, optimiser, schedule,
curve) make a killed run resumable where it stopped. Runs unchanged on CPU and GPU; bf16 where the device computes
it natively.

Why the loss is computed only at answer positions: the head is 576 x 49k for SmolLM2, and a 1,200-token ranking
prompt has ~75 answer tokens, so projecting only those rows saves ~90% of the head's time and memory.
A sequence whose prompt fills all of `max_length` has no answer tokens: it is dropped before training, and the
loss of a batch without any answer token is 0 with no gradient, never NaN.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from finetune.data import Example, answer_token_ids
from finetune.fusion import DEFAULT_GRID, MIN_GAIN_SE, ScoredCase, fit_llm_weight, metrics
from generator.backends.base import TokenizerInfo, check_single_token_labels
from generator.recommender import Prepared, Recommender
from retrieval.persist import atomic_directory, recover_directory

IGNORE = -100  # label of a position that carries no loss (prompt, padding)


class TrainConfig(BaseModel):
    """LoRA and optimisation settings; every field has a default that ran on the 2-core CPU box."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rank: int = Field(default=8, ge=1, description="LoRA rank r.")
    alpha: int = Field(default=16, ge=1, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str = Field(
        default="all-linear",
        description="'all-linear' (every linear layer but the output head) or comma-separated module names, "
        "e.g. 'q_proj,v_proj' (LlamaRec's choice).",
    )
    lr: float = Field(default=3e-4, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled weight decay.")
    epochs: float = Field(default=1.0, gt=0, description="Passes over the training examples (may be fractional).")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimiser steps.")
    warmup_steps: int = Field(default=5, ge=0, description="Linear warm-up steps, then linear decay to 0.")
    max_length: int = Field(default=1536, ge=16, description="Tokens per sequence; longer ones are cut at the end.")
    # One sequence per forward pass on a CPU: measured on the 2-core box (1 thread, 1,070-token sequences,
    # forward + backward), one row took 4.3 s, a batch of 2 took 6.6 s per row, and any attention mask (padding)
    # moves SDPA off its fused causal kernel: 6.3 s per row even when the mask is all ones. Raise it on a GPU.
    batch_size: int = Field(default=1, ge=1, description="Sequences per forward pass (1 is fastest on a CPU).")
    grad_accum: int = Field(default=8, ge=1, description="Forward passes per optimiser step.")
    dtype: Literal["auto", "bfloat16", "float32"] = Field(
        default="auto", description="Base weights: 'auto' = bf16 where the device computes it natively, else fp32."
    )
    device: str = Field(default="auto", description="'cpu', 'cuda' or 'auto'.")
    num_threads: int | None = Field(default=1, ge=1, description="torch CPU threads (1 on a shared box).")
    eval_every: int = Field(default=25, ge=1, description="Optimiser steps between validations.")
    eval_batch: int = Field(default=8, ge=1, description="Validation requests per scoring pass.")
    patience: int = Field(default=3, ge=1, description="Validations without a better NDCG@10 before stopping.")
    select_by: Literal["llm", "fused"] = Field(
        default="llm",
        description="Which validation NDCG@10 picks the best checkpoint (and drives early stopping): 'llm' = the "
        "tuned model alone; 'fused' = what serving ranks by, the blend with the weight fitted at that checkpoint "
        "(ties: the better model alone), the untuned weights included: training that never beats them exports "
        "them.",
    )
    checkpoint_every: int = Field(default=25, ge=1, description="Optimiser steps between resumable checkpoints.")
    seed: int = Field(default=0, description="Seeds LoRA init, dropout and batch order.")
    fusion_grid: tuple[float, ...] = Field(default=DEFAULT_GRID, description="LLM weights tried when fitting fusion.")
    fusion_min_gain_se: float = Field(
        default=MIN_GAIN_SE,
        ge=0,
        description="A fitted LLM weight is kept only if its validation gain over retrieval order is at least this "
        "many standard errors (paired per user); else the weight is 0.",
    )
    progress: bool = Field(default=True, description="Show a tqdm bar with loss and ETA.")

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, v: str) -> str:
        names = [m.strip() for m in v.split(",") if m.strip()]
        if not names:
            raise ValueError("target_modules is empty; use 'all-linear' or names such as 'q_proj,v_proj'")
        return ",".join(names)

    def peft_targets(self) -> str | list[str]:
        return "all-linear" if self.target_modules == "all-linear" else self.target_modules.split(",")


# --- tokenisation and the answer-only mask -----------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt positions; the answer ids (and EOS) elsewhere
    kind: str
    choices: tuple[int, ...] = ()  # a label example: the label ids its one answer token is normalised over

    @property
    def answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def encode(tokenizer: Any, example: Example, max_length: int) -> Encoded:
    """prompt ids + answer ids + EOS, cut to `max_length`; labels mask the prompt.

    The ids are those serving sees: the prompt string tokenised alone (as `Backend.generate` does), then the
    answer tokens the decoder emits (`answer_token_ids`), then the EOS it forces. The answer is tokenised
    separately because a generated token can never merge with the prompt's last token.

    A "label" example is the scoring prompt and one label token, no EOS: score mode reads that token's
    log-probability and stops. A prompt that fills `max_length` leaves no room for it: it is dropped, like the rest.
    """
    prompt = tokenizer.encode(example.prompt, add_special_tokens=False)
    if example.kind == "label":
        if example.answer not in example.choices:
            raise ValueError(f"label example: the answer {example.answer!r} is not among its choices {example.choices}")
        # the serving check of label ids (one token each), on the tokenizer without special tokens, as prompts are
        encode_plain = functools.partial(tokenizer.encode, add_special_tokens=False)
        plain = cast(TokenizerInfo, SimpleNamespace(encode=encode_plain))
        choices = tuple(check_single_token_labels(plain, example.choices))
        answer_id = choices[example.choices.index(example.answer)]
        if len(prompt) >= max_length:
            return Encoded(prompt[:max_length], [IGNORE] * max_length, example.kind, choices)
        return Encoded(prompt + [answer_id], [IGNORE] * len(prompt) + [answer_id], example.kind, choices)
    answer = [*answer_token_ids(lambda t: tokenizer.encode(t, add_special_tokens=False), example.answer)]
    answer.append(tokenizer.eos_token_id)
    ids = (prompt + answer)[:max_length]
    labels = ([IGNORE] * len(prompt) + answer)[:max_length]
    return Encoded(ids, labels, example.kind)


def masked_lm_loss(logits: Any, targets: Any) -> tuple[Any, int]:
    """Mean cross-entropy over the positions whose target is not IGNORE, and their count.

    `logits[i]` predicts `targets[i]` (already shifted). With no target at all the loss is ``logits.sum() * 0``:
    zero, still attached to the graph (backward works), never the NaN of a mean over nothing.
    """
    import torch

    keep = targets != IGNORE
    n = int(keep.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    loss = torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="mean")
    return loss, n


def _answer_loss(model: Any, input_ids: Any, attention_mask: Any, labels: Any, allowed: Any = None) -> tuple[Any, int]:
    """Loss on answer tokens, projecting only the positions that predict one through the output head.

    `allowed` (rows x vocabulary, bool; None = all): the tokens each row's answer is normalised over. A label
    example allows only its request's labels, so its cross-entropy is the listwise softmax over the candidates
    (LlamaRec's loss), the same normalisation score mode applies to the label log-probabilities.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = base.get_decoder() if hasattr(base, "get_decoder") else None
    head = base.get_output_embeddings()
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]  # position t predicts token t + 1
    if body is None or head is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        if allowed is not None:
            logits = logits.masked_fill(~allowed[:, None, :], float("-inf"))
        return masked_lm_loss(logits, targets)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    keep = targets != IGNORE
    if not bool(keep.any()):
        return hidden.sum() * 0.0, 0
    logits = head(hidden[keep])
    if allowed is not None:
        rows = keep.nonzero()[:, 0]
        logits = logits.masked_fill(~allowed[rows], float("-inf"))
    return masked_lm_loss(logits, targets[keep])


def _allowed(rows: Sequence[Encoded], vocab: int, device: Any) -> Any:
    """The rows x vocabulary mask of `_answer_loss` (None when no row is a label example)."""
    import torch

    if not any(r.choices for r in rows):
        return None
    allowed = torch.ones((len(rows), vocab), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r.choices:
            allowed[i] = False
            allowed[i, list(r.choices)] = True
    return allowed.to(device)


def _collate(rows: Sequence[Encoded], pad_id: int, device: Any) -> tuple[Any, Any | None, Any]:
    """Right-padded tensors: positions 0..n-1 hold the real tokens, as in serving (which left-pads but counts
    positions from the first real token). The mask is None when no row is padded: SDPA then takes its fused
    causal kernel, ~2x faster on a CPU than with a mask, even an all-ones one."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r.input_ids)
        ids[i, :n] = torch.tensor(r.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(r.labels)
    padded = any(len(r.input_ids) < width for r in rows)
    return ids.to(device), mask.to(device) if padded else None, labels.to(device)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar-length examples: sort within shuffled windows of 32 batches, then shuffle the
    batches. A 1,200-token ranking example next to a 250-token reason example would waste 80% of a row."""
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 32
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches


# --- validation through the pipeline -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ValidationSet:
    """Validation requests prepared once (retrieval and prompts do not change while the model trains)."""

    prepared: list[Prepared]
    targets: list[int | None]  # the target's index among each request's candidates, None when not retrieved


def prepare_validation(recommender: Recommender, cases: Sequence[Any]) -> ValidationSet:
    """Each validation case (`eval.splits.Case`) prepared as served; the target located among its candidates."""
    from retrieval.types import RetrievalRequest

    prepared, targets = [], []
    for case in cases:
        p = recommender.prepare(RetrievalRequest(history=case.history))
        ids = [c.item_id for c in p.candidates]
        prepared.append(p)
        targets.append(ids.index(case.target) if case.target in ids else None)
    return ValidationSet(prepared, targets)


def score_validation(recommender: Recommender, valid: ValidationSet, batch: int) -> list[ScoredCase]:
    """Score every validation request with the recommender's current model, in batches."""
    out: list[ScoredCase] = []
    for start in range(0, len(valid.prepared), batch):
        chunk = valid.prepared[start : start + batch]
        for p, s, t in zip(chunk, recommender.score_prepared(chunk), valid.targets[start : start + batch], strict=True):
            out.append(ScoredCase(llm=np.asarray(s), retrieval=p.retrieval_rel, target=t))
    return out


def evaluate(recommender: Recommender, valid: ValidationSet, cfg: TrainConfig) -> dict[str, Any]:
    """Retrieval order, the LLM alone, and the fitted blend on the validation requests (NDCG/Recall@10, CIs)."""
    scored = score_validation(recommender, valid, cfg.eval_batch)
    w, curve = fit_llm_weight(scored, cfg.fusion_grid, min_gain_se=cfg.fusion_min_gain_se)
    return {
        "retrieval": metrics(scored, 0.0),
        "llm": metrics(scored, 1.0),
        "fused": metrics(scored, w),
        "llm_weight": w,
        "ndcg_by_weight": curve,
        "cases": len(scored),
        "retrieved": sum(c.target is not None for c in scored),
    }


# --- the loop ----------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    model: Any
    best_eval: dict[str, Any]
    untuned_eval: dict[str, Any]
    curve: list[dict[str, Any]]
    steps: int
    seconds: float
    stats: dict[str, Any]


def load_trainable(base_path: str, cfg: TrainConfig, adapter: Path | None = None) -> tuple[Any, Any]:
    """(PEFT model with fresh or resumed LoRA weights, tokenizer) on the configured device and dtype."""
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from generator.model import resolve_dtype

    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    device = "cpu" if device == "auto" else device
    if device == "cuda":
        dtype = torch.bfloat16 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    else:
        dtype = getattr(torch, resolve_dtype(cfg.dtype))
    tok = AutoTokenizer.from_pretrained(base_path)
    base: Any = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    base = base.to(device)
    torch.manual_seed(cfg.seed)
    if adapter is not None:
        model = PeftModel.from_pretrained(base, str(adapter), is_trainable=True)
    else:
        lora = LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.peft_targets(),
            task_type="CAUSAL_LM",
            bias="none",
        )
        model = get_peft_model(base, lora)
    return model, tok


def train(
    recommender: Recommender,
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    valid: ValidationSet,
    cfg: TrainConfig,
    checkpoint_dir: Path,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train `model` (a PEFT model whose base `recommender.backend` serves) and return it with its best weights.

    `recommender.backend` must wrap this same model (`TransformersBackend.from_loaded`), so validation scores
    are the serving code's scores of the weights being trained.
    """
    import torch
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from tqdm import tqdm

    t0 = time.perf_counter()
    if cfg.num_threads is not None and str(next(model.parameters()).device) == "cpu":
        torch.set_num_threads(cfg.num_threads)
    encoded = [encode(tokenizer, ex, cfg.max_length) for ex in examples]
    empty = sum(1 for e in encoded if e.answer_tokens == 0)
    cut = sum(1 for e, ex in zip(encoded, examples, strict=True) if len(e.input_ids) == cfg.max_length)
    encoded = [e for e in encoded if e.answer_tokens > 0]
    if not encoded:
        raise ValueError(
            f"no training example has an answer token within max_length={cfg.max_length}. Fix: raise --max-length."
        )
    stats = {
        "examples": len(encoded),
        "dropped_prompt_fills_sequence": empty,
        "cut_at_max_length": cut,
        "tokens": sum(len(e.input_ids) for e in encoded),
        "answer_tokens": sum(e.answer_tokens for e in encoded),
    }
    log(
        f"{len(encoded)} examples, {stats['tokens']} tokens ({stats['answer_tokens']} answer tokens); "
        f"{empty} dropped (prompt fills max_length), {cut} cut at max_length"
    )
    device = next(model.parameters()).device
    base_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    vocab = int(base_model.get_output_embeddings().weight.shape[0])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    lengths = [len(e.input_ids) for e in encoded]
    batches_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum)
    total = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)

    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        return max(0.0, (total - step) / max(1, total - cfg.warmup_steps))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, lr_at)
    step = 0
    curve: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    best_state: dict[str, Any] | None = None
    bad = 0
    state_file = checkpoint_dir / "state.json"
    if resume:
        recover_directory(checkpoint_dir)  # a run killed mid-save: finish or undo that checkpoint's swap
    if resume and state_file.is_file():
        state = json.loads(state_file.read_text())
        set_peft_model_state_dict(model, torch.load(checkpoint_dir / "adapter.pt", map_location=device))
        optim.load_state_dict(torch.load(checkpoint_dir / "optimizer.pt", map_location=device))
        sched.load_state_dict(torch.load(checkpoint_dir / "scheduler.pt"))
        step, curve, best, bad = state["step"], state["curve"], state["best"], state["bad"]
        if (checkpoint_dir / "best.pt").is_file():
            best_state = torch.load(checkpoint_dir / "best.pt", map_location=device)
        log(f"resumed at step {step} of {total} from {checkpoint_dir}")
    elif resume:
        log(f"no checkpoint in {checkpoint_dir}; starting from scratch")

    def validate() -> dict[str, Any]:
        model.eval()
        result = evaluate(recommender, valid, cfg)
        model.train()
        return result

    if not curve:  # the untuned model through the same pipeline: the baseline the curve starts from
        first = validate()
        curve.append({"step": 0, "loss": None, **_point(first)})
        log(f"step 0 (untuned): {_summary(first)}")
        if cfg.select_by == "fused":
            # What serving ranks by is the judge, so the untuned weights (LoRA's B starts at 0: the base model
            # exactly) are a candidate too: training that never beats them exports them, with their fitted blend.
            best = {**first, "step": 0}
            best_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    untuned = {**curve[0]}

    def save_checkpoint() -> None:
        # swapped in whole (retrieval.persist.atomic_directory): a kill mid-save keeps the previous checkpoint
        with atomic_directory(checkpoint_dir) as tmp:
            torch.save(get_peft_model_state_dict(model), tmp / "adapter.pt")
            torch.save(optim.state_dict(), tmp / "optimizer.pt")
            torch.save(sched.state_dict(), tmp / "scheduler.pt")
            if best_state is not None:
                torch.save(best_state, tmp / "best.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "curve": curve, "best": best, "bad": bad}))

    model.train()
    bar = tqdm(total=total, initial=step, desc="finetune", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    losses: list[float] = []
    stopped = False
    while step < total and not stopped:
        epoch = step // steps_per_epoch
        order = length_grouped_batches(lengths, cfg.batch_size, cfg.seed + epoch)
        first_batch = (step % steps_per_epoch) * cfg.grad_accum  # resume inside an epoch where it stopped
        for g in range(first_batch, steps_per_epoch * cfg.grad_accum, cfg.grad_accum):
            group = order[g : g + cfg.grad_accum]
            n_answer = sum(encoded[i].answer_tokens for b in group for i in b)
            step_loss = 0.0
            for b in group:
                rows = [encoded[i] for i in b]
                ids, mask, labels = _collate(rows, pad, device)
                loss, n = _answer_loss(model, ids, mask, labels, _allowed(rows, vocab, device))
                # token-weighted over the accumulation group: every answer token counts the same
                (loss * (n / max(n_answer, 1))).backward()
                step_loss += float(loss.detach()) * n / max(n_answer, 1)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            losses.append(step_loss)
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
            if step % cfg.eval_every == 0 or step == total:
                result = validate()
                curve.append(
                    {"step": step, "loss": round(float(np.mean(losses[-cfg.eval_every :])), 4), **_point(result)}
                )
                # select_by="llm" keeps the best TRAINED weights (the untuned model alone is the baseline it must
                # beat, not a candidate); "fused" started from the untuned weights above
                result = {**result, "step": step}
                if best is None or _selection_key(result, cfg) > _selection_key(best, cfg):
                    best, bad = result, 0
                    best_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
                else:
                    bad += 1
                bar.write(f"step {step}: loss {curve[-1]['loss']}; {_summary(result)}")
                if bad >= cfg.patience:
                    bar.write(f"early stop: {bad} validations without a better {cfg.select_by} NDCG@10")
                    stopped = True
            if step % cfg.checkpoint_every == 0 or stopped or step == total:
                save_checkpoint()
            if stopped or step >= total:
                break
    bar.close()
    if best_state is not None:
        set_peft_model_state_dict(model, best_state)
    model.eval()
    if best is None:  # no validation after training (e.g. resumed at the end): evaluate the final weights
        best = {**evaluate(recommender, valid, cfg), "step": step}
    return TrainResult(model, best, untuned, curve, step, time.perf_counter() - t0, stats)


def _selection_key(result: dict[str, Any], cfg: TrainConfig) -> tuple[float, ...]:
    llm = float(result["llm"]["ndcg@10"][0])
    if cfg.select_by == "llm":
        return (llm,)
    # on a tie in what serving ranks by, trained weights beat the untuned ones (step 0: they also learned the
    # answer format and the reasons), then the better model alone
    return (float(result["fused"]["ndcg@10"][0]), float(result.get("step") != 0), llm)


def _point(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "retrieval_ndcg@10": result["retrieval"]["ndcg@10"][0],
        "llm_ndcg@10": result["llm"]["ndcg@10"][0],
        "fused_ndcg@10": result["fused"]["ndcg@10"][0],
        "llm_recall@10": result["llm"]["recall@10"][0],
        "llm_weight": result["llm_weight"],
    }


def _summary(result: dict[str, Any]) -> str:
    return (
        f"valid NDCG@10 retrieval {result['retrieval']['ndcg@10'][0]:.4f}, LLM {result['llm']['ndcg@10'][0]:.4f}, "
        f"fused {result['fused']['ndcg@10'][0]:.4f} (w={result['llm_weight']:g}; {result['cases']} cases)"
    )
