"""LLM adapters (peft, e.g. `flatlora_diffusion.llm` runs): the held-out text loss of a causal LM.

The rows of the `--data` JSONL file are rendered and masked by the recipe's own data code
(`flatlora_diffusion.llm.data`: the template, the response-only labels, the length filter), in file
order; the first `--samples` usable rows are the held-out set. The loss is the model's own causal-LM
cross-entropy (what the `Trainer` minimises), averaged over every response token of the set.
"""

from __future__ import annotations

from pathlib import Path

import torch

from flatlora_diffusion.flatness.config import FlatnessConfig, FlatnessError
from flatlora_diffusion.flatness.diffusion import same_base
from flatlora_diffusion.flatness.meter import target_layers

CONFIG_NAME = "adapter_config.json"


def adapter_folder(folder: str | Path) -> Path:
    """The peft folder of an LLM adapter: the folder itself, or a run folder's `adapter/`."""
    folder = Path(folder)
    return folder / "adapter" if not (folder / CONFIG_NAME).is_file() and (folder / "adapter" / CONFIG_NAME).is_file() \
        else folder


class LLMWorld:
    """The held-out rows and the loss of one causal LM with every adapter loaded (see the module docstring)."""

    kind = "llm"

    def __init__(self, config: FlatnessConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.config, self.device, self.dtype = config, device, dtype
        self.folders = {name: adapter_folder(folder) for name, folder in config.adapters.items()}
        self._load()

    def _load(self) -> None:
        from peft import PeftModel

        from flatlora_diffusion.llm.config import LLMError
        from flatlora_diffusion.llm.train import check_adapter, load_base_model

        cfg, errors = self.config, []
        data = Path(cfg.data)
        if data.suffix.lower() not in (".jsonl", ".json", ".parquet") or not data.is_file():
            errors.append(f"`--data` `{data}` is not a .jsonl/.json/.parquet file of `question`/`answer` rows "
                          "(LLM adapters are measured on held-out text).")
        try:
            base = load_base_model(cfg.base, str(self.dtype).removeprefix("torch."))
        except LLMError as err:
            raise FlatnessError([*errors, str(err).replace("`model.name_or_path`", "`--base`")]) from err
        for name, folder in self.folders.items():
            try:  # the layers first; a base of the same shapes but another name is named after
                recorded = check_adapter(base, folder, f"`--base` `{cfg.base}`").get("base_model_name_or_path")
            except LLMError as err:
                errors.append(f"`--adapters` {name}: {str(err).replace('`--adapter`', 'adapter')}")
                continue
            if same_base(recorded, cfg.base, cfg.base) is False:
                errors.append(f"`--adapters` {name}: adapter `{folder}` was trained on `{recorded}`, not `--base` "
                              f"`{cfg.base}`; pass the base it was trained on.")
        if not errors:
            try:
                self.rows = self._rows()
            except LLMError as err:
                errors.append(str(err))
        if errors:
            raise FlatnessError(errors)
        names = list(self.folders)
        model = PeftModel.from_pretrained(base, str(self.folders[names[0]]), adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(str(self.folders[name]), adapter_name=name)
        self.model = model.to(self.device).eval()

    def _rows(self) -> list[dict]:
        from transformers import AutoTokenizer

        from flatlora_diffusion.llm.config import DataSettings
        from flatlora_diffusion.llm.data import load_rows, prepare

        cfg = self.config
        tokenizer = AutoTokenizer.from_pretrained(cfg.base)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.pad_token_id = tokenizer.pad_token_id
        settings = DataSettings(train=cfg.data, template=cfg.template, max_length=cfg.max_length)
        encoded = prepare(load_rows(cfg.data, "--data", settings, "train"), cfg.data, "--data", settings, tokenizer,
                          shuffle=False)
        if not len(encoded):
            raise FlatnessError([f"`--data` `{cfg.data}` has no row within `--max_length` {cfg.max_length}."])
        return [encoded[i] for i in range(min(cfg.samples, len(encoded)))]

    def describe(self) -> dict:
        tokens = sum(sum(label != -100 for label in row["labels"][1:]) for row in self.rows)
        return {"kind": self.kind, "examples": len(self.rows), "target_tokens": int(tokens),
                "template": self.config.template,
                "loss": "token-mean causal-LM cross-entropy over the response tokens of the rows"}

    def activate(self, name: str) -> dict:
        self.model.set_adapter(name)
        self.layers = target_layers({"model": self.model}, name)
        return self.layers

    def loss(self) -> float:
        from flatlora_diffusion.llm.data import IGNORE_INDEX, Collator

        collate = Collator(self.pad_token_id)
        total, count = torch.zeros((), dtype=torch.float64), 0
        with torch.no_grad():
            for start in range(0, len(self.rows), self.config.batch_size):
                batch = {k: v.to(self.device) for k, v in collate(self.rows[start:start + self.config.batch_size]).items()}
                tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
                out = self.model(**batch)  # the mean over the batch's response tokens
                total += out.loss.double().cpu() * tokens
                count += tokens
        return (total / count).item()

    def close(self) -> None:
        """Remove the adapters from the base model."""
        if getattr(self, "model", None) is not None:
            self.model.unload()
