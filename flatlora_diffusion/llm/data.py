"""Training data for the LLM recipe: load, check, render with a prompt template, tokenise, mask, select.

Sources (through `datasets`): a hub dataset (``meta-math/MetaMathQA``) or a local ``.json``
(an array or JSON lines), ``.jsonl`` or ``.parquet`` file with the same fields.

Prompt templates (`TEMPLATES`); the loss is computed on the response tokens only, every prompt
token has label -100:

* ``metamath`` — fields ``query``, ``response`` (MetaMathQA)::

      Question: {query}
      Answer: {response}</s>

  The prompt is exactly the zero-shot prompt of ``python -m eval gsm8k``, so the fine-tuned model is
  scored the way it was trained. MetaMathQA responses end with ``The answer is: N``, which the
  GSM8K evaluator reads.
* ``gsm8k`` — fields ``question``, ``answer`` (GSM8K, and the synthetic set of
  `flatlora_diffusion.llm.synthetic`): the same layout; calculator annotations ``<<48/2=24>>``
  are removed, as the evaluator removes them from its few-shot examples.
* ``metamath_reference``, ``gsm8k_reference`` — the same fields in the Flat-LoRA reference's layout,
  ``Q: {query}\nA: {response}</s>``: the prompt of ``python -m eval gsm8k --protocol reference``.
* ``code_feedback`` — field ``messages``: a list of ``{"role": "user"|"assistant"|"system",
  "content": ...}`` (m-a-p/Code-Feedback, any OpenAI-style chat data), or fields ``query``,
  ``answer`` (m-a-p/CodeFeedback-Filtered-Instruction, the paper's source: the answer is cut after
  its first code block, and rows without one are skipped, as in the reference code). Rendered
  with the tokenizer's chat template; every assistant turn is learned. Evaluate with
  ``python -m eval humaneval --chat_template``.
* ``wizardlm`` — field ``conversations``: ShareGPT-style ``{"from": "human"|"gpt", "value": ...}``
  turns, or fields ``instruction``, ``output`` (WizardLM evol-instruct); converted to messages and
  rendered like ``code_feedback``.

A tokenizer without a chat template (base Llama-2) gets `DEFAULT_CHAT_TEMPLATE`; the recipe saves
the tokenizer with the adapter, so evaluation applies the same template.

Selection: rows failing the template's field checks stop the run with the file and line; then
``type_filter`` (a substring of the ``type`` field), a seeded shuffle, the ``max_length`` filter,
and the first ``num_train`` rows for training and the next ``num_eval`` for the evaluation loss.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flatlora_diffusion.llm.config import DataSettings, LLMError

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
IGNORE_INDEX = -100  # label of tokens that do not count in the loss
_CALCULATOR = re.compile(r"<<[^>]*>>")
# Literal text inside {{ }}: transformers renders with trim_blocks, which drops a newline after a tag.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Assistant:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}"
)


class DataError(LLMError):
    """Bad training data: the message names the file (or dataset), the line or row, and the fix."""


# ---------------------------------------------------------------------------------------------
# Templates: a row → (text, character spans to learn); or an error message naming the field


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: list[tuple[int, int | None]]  # character ranges (end None: to the end) of `text` whose tokens are learned
    add_special_tokens: bool  # let the tokenizer add BOS (plain templates); chat templates write their own
    append_eos: bool


def _text_field(row: dict, name: str) -> str | None:
    value = row.get(name)
    return value if isinstance(value, str) and value.strip() else None


def _missing(names: list[str]) -> str:
    return "lacks " + ", ".join(f"`{n}`" for n in names) + " (or it is empty / not text)"


PROJECT_PROMPT = "Question: {}\nAnswer: "  # `python -m eval gsm8k` prompts with this, less the last space
REFERENCE_PROMPT = "Q: {}\nA: "  # the Flat-LoRA reference's layout: `python -m eval gsm8k --protocol reference`


def _question_answer(prompt_field: str, answer_field: str, clean: Callable[[str], str] = str.strip,
                     layout: str = PROJECT_PROMPT):
    def render(row: dict, tokenizer) -> Rendered | str:
        missing = [n for n in (prompt_field, answer_field) if _text_field(row, n) is None]
        if missing:
            return _missing(missing)
        text = layout.format(row[prompt_field].strip())
        # Learned from the space on: a tokenizer that joins it to the answer's first word learns that word too.
        return Rendered(text + clean(row[answer_field]), [(len(text.rstrip(" ")), None)], True, True)

    return render


def _render_chat(messages: list[dict], tokenizer) -> Rendered | str:
    """The chat-template text of `messages`, learning every assistant turn (found by incremental rendering)."""
    if not any(m["role"] == "assistant" for m in messages):
        return "has no assistant turn to learn"
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise DataError("The tokenizer's chat template does not render conversations prefix by prefix, so "
                            "assistant turns cannot be located; use a tokenizer with a standard chat template.")
        spans.append((len(before), len(upto)))
    return Rendered(full, spans, False, False)


def _code_feedback(row: dict, tokenizer) -> Rendered | str | None:
    messages = row.get("messages")
    if messages is None and _text_field(row, "query") and isinstance(row.get("answer"), str):
        # CodeFeedback-Filtered-Instruction rows, as the paper's reference code uses them: the answer up
        # to the end of its first code block; answers without a code block are skipped.
        parts = row["answer"].split("```")
        if len(parts) < 3:
            return None
        return _render_chat([{"role": "user", "content": row["query"]},
                             {"role": "assistant", "content": "```".join(parts[:2]) + "```"}], tokenizer)
    if not isinstance(messages, list) or not messages:
        return "lacks `messages` (or `query` and `answer`)"
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            return f"`messages[{i}]` must be {{\"role\": \"user\"|\"assistant\"|\"system\", \"content\": text}}"
    return _render_chat([{"role": m["role"], "content": m["content"]} for m in messages], tokenizer)


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def _wizardlm(row: dict, tokenizer) -> Rendered | str:
    turns = row.get("conversations")
    if isinstance(turns, list) and turns:
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in _SHAREGPT_ROLES \
                    or not isinstance(turn.get("value"), str):
                return f"`conversations[{i}]` must be {{\"from\": \"human\"|\"gpt\", \"value\": text}}"
            messages.append({"role": _SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
        return _render_chat(messages, tokenizer)
    missing = [n for n in ("instruction", "output") if _text_field(row, n) is None]
    if missing:
        return "lacks `conversations` and " + _missing(missing)[6:]
    return _render_chat([{"role": "user", "content": row["instruction"]},
                         {"role": "assistant", "content": row["output"]}], tokenizer)


# A template returns the rendered row, an error message (the row does not fit), or None (skip the row).
TEMPLATES: dict[str, Callable[[dict, object], Rendered | str | None]] = {
    "metamath": _question_answer("query", "response"),
    "gsm8k": _question_answer("question", "answer", lambda s: _CALCULATOR.sub("", s).strip()),
    "metamath_reference": _question_answer("query", "response", layout=REFERENCE_PROMPT),
    "gsm8k_reference": _question_answer("question", "answer", lambda s: _CALCULATOR.sub("", s).strip(),
                                        layout=REFERENCE_PROMPT),
    "code_feedback": _code_feedback,
    "wizardlm": _wizardlm,
}
CHAT_TEMPLATES = ("code_feedback", "wizardlm")  # need the tokenizer's chat template


def tokenize(examples: list[Rendered], tokenizer) -> list[dict]:
    """input_ids and labels (IGNORE_INDEX outside the learned spans) of rendered examples, in one batched call."""
    out = [None] * len(examples)
    for special in (True, False):  # one tokenizer call per BOS policy (a template uses one)
        picked = [i for i, r in enumerate(examples) if r.add_special_tokens is special]
        if not picked:
            continue
        enc = tokenizer([examples[i].text for i in picked], add_special_tokens=special, return_offsets_mapping=True)
        for i, ids, offsets in zip(picked, enc["input_ids"], enc["offset_mapping"], strict=True):
            spans, ids = examples[i].spans, list(ids)
            # A token is learned when it starts inside a span; tokens the tokenizer adds (BOS) have empty offsets.
            labels = [token if end > start and any(s <= start and (e is None or start < e) for s, e in spans)
                      else IGNORE_INDEX for token, (start, end) in zip(ids, offsets, strict=True)]
            if examples[i].append_eos:
                ids.append(tokenizer.eos_token_id)
                labels.append(tokenizer.eos_token_id)
            out[i] = {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
    return out


# ---------------------------------------------------------------------------------------------
# Loading and locating rows


def _source(path_or_name: str) -> tuple[str, Path | None]:
    """(`datasets` builder or the hub name, local path or None)."""
    path = Path(path_or_name).expanduser()
    if path.suffix.lower() in LOCAL_BUILDERS:
        return LOCAL_BUILDERS[path.suffix.lower()], path
    return path_or_name, None


def _first_bad_json_line(path: Path) -> str | None:
    """'line N is not valid JSON: ...' for the first broken line of a JSON-lines file, or None."""
    with path.open(encoding="utf-8") as handle:
        first = handle.read(1)
        if first == "[":  # a JSON array: one document
            handle.seek(0)
            try:
                json.load(handle)
            except json.JSONDecodeError as err:
                return f"is not valid JSON (line {err.lineno}: {err.msg})"
            return None
        handle.seek(0)
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as err:
                    return f"line {number} is not valid JSON ({err.msg})"
    return None


def load_rows(name: str, flag: str, settings: DataSettings, split: str):
    """A `datasets.Dataset` of raw rows from a hub dataset or a local file; errors name `flag` and the fix."""
    from datasets import load_dataset

    builder, path = _source(name)
    if path is not None:
        if not path.is_file():
            raise DataError(f"`{flag}` file `{path}` does not exist.")
        try:
            return load_dataset(builder, data_files=str(path), split="train", cache_dir=settings.cache_dir)
        except Exception as err:  # pyarrow / datasets raise many types for malformed files
            bad = _first_bad_json_line(path) if builder == "json" else None
            raise DataError(f"`{flag}` file `{path}` {bad or 'cannot be read: ' + str(err).splitlines()[0]}.") from err
    if Path(name).expanduser().exists():
        raise DataError(f"`{flag}` `{name}` is a local path but not a .json, .jsonl or .parquet file.")
    try:
        return load_dataset(name, settings.config_name, split=split, cache_dir=settings.cache_dir)
    except Exception as err:  # offline, unknown name, missing split, ...
        raise DataError(
            f"Could not load the hub dataset `{name}` (`{flag}`, split `{split}`): "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}\n"
            "Check the name and split, or export it once to JSONL/Parquet and pass the file."
        ) from err


def row_location(name: str, index: int) -> str:
    """Where row `index` (0-based) of source `name` is: 'line N' of a JSON-lines file, 'row N' otherwise."""
    builder, path = _source(name)
    if path is not None and builder == "json":
        with path.open(encoding="utf-8") as handle:
            if handle.read(1) != "[":
                handle.seek(0)
                seen = -1
                for number, line in enumerate(handle, start=1):
                    seen += bool(line.strip())
                    if seen == index:
                        return f"`{path}` line {number}"
        return f"`{path}` record {index + 1}"
    return f"`{path or name}` row {index + 1}"


# ---------------------------------------------------------------------------------------------
# The pipeline


def _encode_batch(batch: dict, indices: list[int], *, template: str, tokenizer, type_filter: str | None) -> dict:
    """Render every row (errors are collected, not raised), then tokenise the kept ones in one call."""
    rows = [{k: batch[k][offset] for k in batch} for offset in range(len(indices))]
    rendered = [TEMPLATES[template](row, tokenizer) for row in rows]
    errors = [r if isinstance(r, str) else "" for r in rendered]
    keep = [isinstance(r, Rendered) and (type_filter is None or type_filter in str(row.get("type") or ""))
            for r, row in zip(rendered, rows, strict=True)]
    encoded = iter(tokenize([r for r, k in zip(rendered, keep, strict=True) if k], tokenizer))
    empty = {"input_ids": [], "attention_mask": [], "labels": []}
    columns = [next(encoded) if k else empty for k in keep]
    return {**{name: [c[name] for c in columns] for name in empty},
            "error": errors, "keep": keep, "row": list(indices)}


def prepare(raw, name: str, flag: str, settings: DataSettings, tokenizer, *, shuffle: bool):
    """Tokenised, masked, filtered and shuffled rows of one source (a `datasets.Dataset`)."""
    if settings.type_filter is not None and "type" not in raw.column_names:
        raise DataError(f"`data.type_filter` is set but `{flag}` `{name}` has no `type` field; "
                        "drop `--data.type_filter` or use MetaMathQA-style data.")
    encoded = raw.map(
        _encode_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
        num_proc=settings.num_proc, desc=f"tokenising {Path(name).name}",
        fn_kwargs={"template": settings.template, "tokenizer": tokenizer, "type_filter": settings.type_filter},
    )
    bad = encoded.filter(lambda e: e != "", input_columns="error")
    if len(bad):
        shown = [f"{row_location(name, r['row'])} {r['error']}." for r in bad.select(range(min(5, len(bad))))]
        more = f"\n  ... and {len(bad) - 5} more rows." if len(bad) > 5 else ""
        raise DataError(f"`{flag}` does not fit the `{settings.template}` template "
                        f"(`data.template`):\n  " + "\n  ".join(shown) + more)
    max_length = settings.max_length
    encoded = encoded.filter(lambda keep, ids, labels: keep and 0 < len(ids) <= max_length
                             and any(label != IGNORE_INDEX for label in labels),
                             input_columns=["keep", "input_ids", "labels"])
    if shuffle:
        encoded = encoded.shuffle(seed=settings.shuffle_seed)
    return encoded.select_columns(["input_ids", "attention_mask", "labels"])


def build_datasets(settings: DataSettings, tokenizer):
    """(train, eval or None): the recipe's datasets. The first `num_train` shuffled rows train the model."""
    raw = load_rows(settings.train, "data.train", settings, settings.split)
    train = prepare(raw, settings.train, "data.train", settings, tokenizer, shuffle=True)
    wanted = (settings.num_train or len(train)) + settings.num_eval
    if settings.num_train is not None and len(train) < wanted or not len(train):
        raise DataError(f"`data.train` `{settings.train}` has {len(train)} usable examples after the filters "
                        f"(`data.type_filter`, `data.max_length` {settings.max_length}), fewer than "
                        f"`data.num_train` + `data.num_eval` = {wanted}; lower them or raise `data.max_length`.")
    n_train = settings.num_train or len(train) - settings.num_eval
    if n_train < 1:
        raise DataError(f"`data.num_eval` ({settings.num_eval}) leaves no training examples of the "
                        f"{len(train)} usable ones; lower it.")
    evaluation = None
    if settings.eval is not None:
        raw_eval = load_rows(settings.eval, "data.eval", settings, settings.eval_split)
        evaluation = prepare(raw_eval, settings.eval, "data.eval", settings, tokenizer, shuffle=False)
        if not len(evaluation):
            raise DataError(f"`data.eval` `{settings.eval}` has no example within `data.max_length`.")
    elif settings.num_eval:
        evaluation = train.select(range(n_train, n_train + settings.num_eval))
    return train.select(range(n_train)), evaluation


class Collator:
    """Right-pads a batch: input_ids with the pad token, labels with IGNORE_INDEX, attention mask with 0."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8) -> None:
        self.pad_token_id = pad_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            length = -(-length // self.multiple) * self.multiple
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = length - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append(list(f["attention_mask"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        return {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}  # (B, T) each
