"""Pretraining the toy Llama (`toy:llama`) on the synthetic arithmetic language, seeded and resumable:

    python -m flatlora_diffusion.llm pretrain OUT_DIR [--minutes 40] [--seed 0] [--device cpu|cuda]
    python -m flatlora_diffusion.llm ship OUT_DIR        # copy OUT_DIR/llama + MANIFEST.json into the package

Full-parameter next-token training of a `LlamaForCausalLM` (the factory's architecture and
byte-level tokenizer, `flatlora_diffusion.tiny`, widened to `ARCHITECTURE`: 0.85 M parameters,
3.4 MB of fp32 safetensors) on documents of `flatlora_diffusion.llm.language` (equations and
stories, never the GSM8K layout). AdamW, warm-up then cosine decay, gradient clipping at 1.

The step count is a fixed function of ``--minutes`` (`STEPS_PER_MINUTE`, one CPU thread), so the
same command trains the same model anywhere. Every batch is drawn from an RNG seeded by
(seed, step), and the full state (weights, optimiser, step, loss history) is checkpointed
atomically every two minutes, so a killed run resumed with the same command ends with the same
weights as an uninterrupted one. The result, in ``OUT_DIR``:

    llama/         LlamaForCausalLM + tokenizer (AutoModelForCausalLM.from_pretrained)   -> toy:llama
    MANIFEST.json  the command, settings, time, final loss, equation accuracy, sha256 of every file
    state/         run.json and the checkpoint (not shipped)
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flatlora_diffusion.files import (
    atomic_dir,
    atomic_open,
    checksums,
    other_run_message,
    recorded_run,
    write_text,
)
from flatlora_diffusion.llm.config import LLMError
from flatlora_diffusion.llm.language import MAX_OPERAND, document
from flatlora_diffusion.schedules import warmup_cosine

# The factory's Llama (GQA, untied head, byte tokens), widened so that it can learn arithmetic.
ARCHITECTURE = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2, "max_position_embeddings": 512}
STEPS_PER_MINUTE = 75  # ~0.8 s a step measured on one thread of a busy 2-core box; fixes the step count
CHECKPOINT_SECONDS = 120
PROBE = 300  # held-out equations whose greedy answer is checked at the end


class PretrainError(LLMError):
    """The output folder or the settings do not allow the run; the message says what to do."""


@dataclass(frozen=True)
class PretrainSettings:
    """What determines the weights (the device and the folder do not, up to float rounding)."""

    minutes: float = 40.0
    """Budget on one CPU thread; fixes the step count (`STEPS_PER_MINUTE` per minute)."""
    seed: int = 0
    """Seeds the initialisation and every batch."""
    batch_size: int = 24
    """Documents per step."""
    length: int = 256
    """Tokens per document (bytes; the GSM8K demo's prompts and answers are under 230)."""
    learning_rate: float = 3e-3
    """Peak AdamW learning rate (3% linear warm-up, cosine decay to 10%)."""

    @property
    def steps(self) -> int:
        return max(2, round(self.minutes * STEPS_PER_MINUTE))

    def check(self) -> None:
        errors = [f"`{name}` must be positive, got {getattr(self, name)}." for name in
                  ("minutes", "batch_size", "length", "learning_rate") if not getattr(self, name) > 0]
        if self.length > ARCHITECTURE["max_position_embeddings"]:
            errors.append(f"`length` must be at most {ARCHITECTURE['max_position_embeddings']}, got {self.length}.")
        if errors:
            raise PretrainError(" ".join(errors))


def batch(tokenizer, settings: PretrainSettings, step: int) -> torch.Tensor:
    """The token ids of step `step`: (batch_size, length), BOS first, the same for the same (seed, step)."""
    rng = random.Random(settings.seed * 1_000_003 + step)
    texts = [document(rng, settings.length) for _ in range(settings.batch_size)]
    ids = tokenizer(texts, truncation=True, max_length=settings.length, return_tensors="pt").input_ids
    return ids  # every document has >= length bytes, so no padding


def build_model(tokenizer, seed: int):
    """A freshly initialised `LlamaForCausalLM` of `ARCHITECTURE` sized to `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, **ARCHITECTURE)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def _check_folder(out: Path, settings: PretrainSettings, resume: bool, overwrite: bool) -> PretrainSettings:
    recorded = recorded_run(out, resume=resume, overwrite=overwrite, error=PretrainError)
    if recorded is None:
        return settings
    previous = PretrainSettings(**recorded)
    if previous == settings or resume:
        return previous
    raise PretrainError(other_run_message(out, asdict(previous), asdict(settings)))


def train(model, tokenizer, settings: PretrainSettings, state_file: Path, device: torch.device,
          until: int | None = None) -> dict:
    """Train `model` to step `until` (default: `settings.steps`) of the schedule, resuming from `state_file`.

    Returns the loss history and the training time.
    """
    model.to(device).train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=settings.learning_rate, betas=(0.9, 0.95))
    start, history, running, seconds = 0, [], [], 0.0  # running: the losses since the last history entry
    if state_file.is_file():
        state = torch.load(state_file, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history, seconds = state["step"], state["history"], state["seconds"]
        running = state.get("running", [])
    total = settings.steps
    stop = total if until is None else until
    if start > stop:
        raise PretrainError(f"`--until` {stop}: the run in `{state_file.parent.parent}` is already at step {start}; "
                            f"pass `--until` {start} or more (at most {total}).")
    last_save = began = time.monotonic()
    bar = tqdm(total=total, initial=start, desc="pretrain toy:llama", unit="step", dynamic_ncols=True)
    for step in range(start, stop):
        for group in optimizer.param_groups:
            group["lr"] = settings.learning_rate * warmup_cosine(step, total)
        ids = batch(tokenizer, settings, step).to(device)
        loss = model(input_ids=ids, labels=ids).loss  # next-token cross-entropy over every position
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = loss.detach()
        if not math.isfinite(float(loss)):
            raise PretrainError(f"The loss became {float(loss)} at step {step}; the last checkpoint is intact. "
                                "Lower `learning_rate` and start again with `--overwrite`.")
        running.append(float(loss))
        if (step + 1) % 50 == 0 or step + 1 in (stop, total):
            history.append({"step": step + 1, "loss": round(sum(running) / len(running), 5)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            running = []
        bar.update(1)
        if step + 1 == stop or time.monotonic() - last_save > CHECKPOINT_SECONDS:
            elapsed = seconds + time.monotonic() - began
            with atomic_open(state_file, "wb") as handle:
                torch.save({"step": step + 1, "history": history, "running": running, "seconds": elapsed,
                            "model": model.state_dict(), "optimizer": optimizer.state_dict()}, handle)
            last_save = time.monotonic()
    bar.close()
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    return {"history": state["history"], "seconds": round(state["seconds"], 1)}


def equation_accuracy(model, tokenizer, n: int = PROBE, seed: int = 10_007) -> float:
    """Greedy accuracy on `n` held-out equations ``a op b =`` (operands up to `MAX_OPERAND`)."""
    from eval.llm import greedy_generate

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, MAX_OPERAND), rng.randint(0, MAX_OPERAND)
        op = rng.choice("+-*")
        a, b = (max(a, b), min(a, b)) if op == "-" else (a, b)
        rows.append((f"{a} {op} {b} =", str(eval(f"{a}{op}{b}"))))  # noqa: S307 - digits and one operator
    tokenizer.padding_side = "left"
    generations = greedy_generate(model.eval(), tokenizer, [p for p, _ in rows], batch_size=100, max_new_tokens=5,
                                  stop=("\n", ","), desc="equations")
    return sum(g.strip() == answer for g, (_, answer) in zip(generations, rows, strict=True)) / n


def pretrain(out_dir: str | Path, settings: PretrainSettings = PretrainSettings(), *, device: str = "cpu",
             resume: bool = False, overwrite: bool = False, threads: int = 1, until: int | None = None) -> Path:
    """Run (or resume) the pretraining into `out_dir`; write `llama/` and `MANIFEST.json`.

    `until` stops at that step of the schedule (the weights there, mid-schedule, are exported); the same
    command without it (or with a later `until`) continues the run.
    """
    import transformers

    from flatlora_diffusion.tiny import _llama_tokenizer

    settings.check()
    if until is not None and not 1 <= until <= settings.steps:
        raise PretrainError(f"`--until` must be a step from 1 to {settings.steps} (the run's length), got {until}.")
    out = Path(out_dir)
    settings = _check_folder(out, settings, resume, overwrite)
    command = " ".join(["python -m flatlora_diffusion.llm pretrain", str(out_dir), f"--minutes {settings.minutes:g}",
                        f"--seed {settings.seed}", *([f"--threads {threads}"] if threads != 1 else []),
                        *([f"--until {until}"] if until is not None else [])])
    write_text(out / "state" / "run.json", json.dumps({"settings": asdict(settings), "command": command}, indent=2) + "\n")
    tokenizer = _llama_tokenizer()
    model = build_model(tokenizer, settings.seed)
    print(f"[pretrain] toy:llama, {sum(p.numel() for p in model.parameters()):,} parameters, {settings.steps} steps",
          file=sys.stderr, flush=True)
    result = train(model, tokenizer, settings, out / "state" / "pretrain.pt", torch.device(device), until)
    model = model.cpu().eval()
    accuracy = equation_accuracy(model, tokenizer)
    with atomic_dir(out / "llama") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    manifest = {"command": command, "settings": asdict(settings), "steps": until or settings.steps,
                "schedule_steps": settings.steps,
                "architecture": ARCHITECTURE, "parameters": sum(p.numel() for p in model.parameters()),
                "seconds": result["seconds"], "threads": threads, "device": device,
                "final_loss": result["history"][-1]["loss"], "equation_accuracy": accuracy,
                "history": result["history"],
                "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
                "sha256": checksums(out, ("llama",))}
    write_text(out / "MANIFEST.json", json.dumps(manifest, indent=2) + "\n")
    print(f"[pretrain] done: loss {manifest['final_loss']:.4f}, equation accuracy {accuracy:.3f}; {out}/llama",
          file=sys.stderr)
    return out
