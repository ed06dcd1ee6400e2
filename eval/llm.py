"""Causal LMs for the LLM evals: loading (base + optional peft adapter), batched greedy and sampled generation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from eval.config import DTYPES, LLMConfig, resolve_device
from eval.errors import EvalError
from flatlora_diffusion.quiet import benign_warnings


def load_causal_lm(config: LLMConfig):
    """(model, tokenizer) in eval mode; the tokenizer pads on the left, as batched generation needs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from flatlora_diffusion.model_ids import ModelIdError, resolve_model_id

    try:
        model_path = resolve_model_id(config.model, "--model")  # `toy:llama` -> its shipped folder
    except ModelIdError as err:
        raise EvalError(str(err)) from err
    try:
        model_config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise EvalError(
            f"Could not load `--model` `{config.model}`: {str(err).strip().splitlines()[0]}\n"
            f"Pass a local folder, or download the model once (`hf download {config.model}`) and run with "
            "`HF_HUB_OFFLINE=1`."
        ) from err
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[config.dtype])
    except ValueError as err:
        raise EvalError(
            f"`--model` `{config.model}` is a `{model_config.model_type}` model, not a causal language model; "
            "pass a decoder LM such as a Llama checkpoint."
        ) from err
    if config.adapter is not None:
        from peft import PeftModel

        if not (Path(config.adapter) / "adapter_config.json").is_file():
            raise EvalError(f"`--adapter` `{config.adapter}` has no `adapter_config.json`; pass a peft adapter folder.")
        with benign_warnings():
            model = PeftModel.from_pretrained(model, config.adapter)
    model.to(resolve_device(config.device)).eval().requires_grad_(False)
    # A tokenizer saved with the adapter wins: it carries the chat template the adapter was trained with.
    has_own = config.adapter is not None and (Path(config.adapter) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(config.adapter if has_own else model_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def format_prompt(tokenizer, prompt: str, chat: bool) -> str:
    """`prompt` as is, or as a single user turn through the tokenizer's chat template."""
    if not chat:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise EvalError("`--chat_template` is set but the tokenizer has no chat template; drop the flag.")
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def truncate_at(text: str, stop: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    chat: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Greedy continuations of `prompts` (in order), batched with left padding and cut at `stop`.

    Prompts are batched longest first, so each batch holds similar lengths (less padding) and an
    out-of-memory error shows up on the first batch.
    """
    return [texts[0] for texts in _generate(model, tokenizer, prompts, {"do_sample": False}, 1, batch_size=batch_size,
                                            max_new_tokens=max_new_tokens, stop=stop, chat=chat, desc=desc)]


def sample_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    num_samples: int,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    stop: Sequence[str] = (),
    chat: bool = False,
    desc: str = "sampling",
) -> list[list[str]]:
    """`num_samples` sampled continuations per prompt (temperature / nucleus sampling), cut at `stop`.

    Batches as `greedy_generate`; the draws of a batch come from the global RNG seeded with
    ``seed`` and the batch's first prompt index, so a run is reproducible on the same machine.
    """
    options = {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return _generate(model, tokenizer, prompts, options, num_samples, batch_size=batch_size,
                     max_new_tokens=max_new_tokens, stop=stop, chat=chat, desc=desc, seed=seed)


@torch.inference_mode()
def _generate(model, tokenizer, prompts: Sequence[str], options: dict, num_samples: int, *, batch_size: int,
              max_new_tokens: int, stop: Sequence[str], chat: bool, desc: str, seed: int = 0) -> list[list[str]]:
    """`num_samples` continuations per prompt with the generation ``options``, in prompt order."""
    from transformers import GenerationConfig

    texts = [format_prompt(tokenizer, p, chat) for p in prompts]
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else tokenizer.eos_token_id
    generation = GenerationConfig(max_new_tokens=max_new_tokens, num_beams=1, num_return_sequences=num_samples,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=eos,
                                  stop_strings=list(stop) or None, **options)  # `truncate_at` makes stops exact
    device = next(model.parameters()).device
    outputs: dict[int, list[str]] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=None):
        indices = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in indices], return_tensors="pt", padding=True,
                          add_special_tokens=not chat).to(device)  # chat templates insert their own BOS
        torch.manual_seed(seed * 1_000_003 + start)  # sampling only; greedy decoding draws nothing
        tokens = model.generate(**batch, generation_config=generation, tokenizer=tokenizer)
        new = tokens[:, batch["input_ids"].shape[1]:]  # (B·n, new tokens): left padding aligns the prompts' ends
        decoded = tokenizer.batch_decode(new, skip_special_tokens=True)
        for k, i in enumerate(indices):  # generate() returns each prompt's samples consecutively
            outputs[i] = [truncate_at(text, stop) for text in decoded[k * num_samples:(k + 1) * num_samples]]
    return [outputs[i] for i in range(len(texts))]
