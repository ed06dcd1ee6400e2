"""The flatness meter: how the loss of LoRA adapters changes under the paper's noise and along random directions.

    python -m flatlora_diffusion.flatness --base toy:sd --adapters lora=runs/lora flat=runs/flat \\
        --data flatlora_diffusion/data/toy_dreambench/images/redblue_ball --out runs/flatness

    report = measure_flatness(FlatnessConfig(base="toy:sd", adapters={"lora": "runs/lora"}, data=..., out=...))
    report["adapters"]["lora"]["expected"]["0.1"]["sharpness"]

Per adapter, on one fixed held-out set (the same for every adapter):

* ``loss``: the plain loss L(W') of the adapter (``expected["0"]`` is exactly this value);
* ``expected[r]``: E_ε L(W' + ε) under the Flat-LoRA noise at radius r (σ_i = r·‖W'_i‖/√n on the
  adapter's target layers, the trainer's own noise code), mean ± standard error over ``draws``
  draws, and the sharpness E L(r) − L(0);
* ``directions``: L(W' + α·d) along filter-normalised random directions d (Li et al. 2018) at
  each α; every adapter gets the same directions;
* ``paired``: the sharpness difference to the first adapter, draw by draw (both saw the same
  standard-normal noise when their target layers agree): mean ± paired standard error.

The adapters' kind (SD/SDXL diffusion or peft LLM) is told from their folders; see
:mod:`flatlora_diffusion.flatness.diffusion` and :mod:`flatlora_diffusion.flatness.llm` for the
held-out sets and losses, :mod:`flatlora_diffusion.flatness.meter` for the measurements.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flatlora_diffusion.flatness.config import FlatnessConfig, FlatnessError
from flatlora_diffusion.flatness.meter import direction_curves, expected_losses, paired_sharpness

FORMAT_VERSION = 1
DIFFUSION_WEIGHTS = "pytorch_lora_weights.safetensors"


def adapter_kind(folder: str | Path) -> str | None:
    """``"diffusion"`` (a DreamBooth trainer folder), ``"llm"`` (a peft folder or an LLM run), or None."""
    from flatlora_diffusion.flatness.llm import CONFIG_NAME, adapter_folder

    folder = Path(folder)
    if (folder / DIFFUSION_WEIGHTS).is_file():
        return "diffusion"
    if (adapter_folder(folder) / CONFIG_NAME).is_file():
        return "llm"
    return None


def detect_kind(config: FlatnessConfig) -> str:
    """The kind of every adapter (they must agree); errors name each folder that is not an adapter."""
    errors, kinds = [], {}
    for name, folder in config.adapters.items():
        kind = adapter_kind(folder)
        if not Path(folder).is_dir():
            errors.append(f"`--adapters` {name}: folder `{folder}` does not exist.")
        elif kind is None:
            errors.append(f"`--adapters` {name}: `{folder}` is not an adapter folder (no `{DIFFUSION_WEIGHTS}`, "
                          "no peft `adapter_config.json`); pass a trainer `--output_dir` or an LLM run folder.")
        else:
            kinds[name] = kind
    if len(set(kinds.values())) > 1:
        listed = ", ".join(f"{name}: {kind}" for name, kind in kinds.items())
        errors.append(f"`--adapters` mixes diffusion and LLM adapters ({listed}); measure each kind with its own base.")
    if errors:
        raise FlatnessError(errors)
    return next(iter(kinds.values()))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def open_world(config: FlatnessConfig):
    """The loaded base with every adapter and the held-out set; every input problem raised first."""
    from flatlora_diffusion.flatness.diffusion import DiffusionWorld
    from flatlora_diffusion.flatness.llm import LLMWorld

    worlds = {"diffusion": DiffusionWorld, "llm": LLMWorld}
    try:
        device = resolve_device(config.device)
    except RuntimeError as err:
        raise FlatnessError([f"`--device` {config.device!r}: {err}"]) from err
    if config.dtype == "float16" and device.type == "cpu":
        raise FlatnessError(["`--dtype float16` needs a CUDA GPU; use float32 or bfloat16 on the CPU."])
    return worlds[detect_kind(config)](config, device, getattr(torch, config.dtype))


def check_targets(world, adapters) -> None:
    """Every adapter wraps at least one layer, and only linears (the noise is defined row by row of a matrix)."""
    from torch import nn

    errors = []
    for name, folder in adapters.items():
        layers = world.activate(name)
        other = [key for key, layer in layers.items() if not isinstance(layer.get_base_layer(), nn.Linear)]
        if not layers:
            errors.append(f"`--adapters` {name}: adapter `{folder}` wraps no layer of `--base`.")
        elif other:
            errors.append(f"`--adapters` {name}: adapter `{folder}` also adapts layers that are not linear "
                          f"({', '.join(f'`{k}`' for k in other[:3])}{' ...' if len(other) > 3 else ''}); the "
                          "Flat-LoRA noise and the directions are defined for linear layers only.")
    if errors:
        world.close()
        raise FlatnessError(errors)


def measure_flatness(config: FlatnessConfig, *, progress: bool = True) -> dict:
    """Measure every adapter of ``config``; write the outputs when ``config.out`` is set; return the report.

    The report (also ``OUT/flatness.json``)::

        {"format_version": 1, "kind": "diffusion" | "llm", "settings": {...}, "data": {...},
         "adapters": {NAME: {"path", "target_layers", "perturbed_weights", "seconds",
                             "loss": L(0),
                             "expected": {"0.05": {"radius", "mean", "sem", "sharpness", "draws": [...]}, ...},
                             "directions": {"alphas": [...], "losses": [[...] per direction], "mean": [...]},
                             "paired": {"reference": FIRST_ADAPTER, "same_noise": bool,
                                        "sharpness": {"0.05": {"radius", "delta_sharpness", "sem"}, ...} | None}}},
         "seconds": ..., "environment": {...}}
    """
    from eval.environment import environment

    start = time.perf_counter()
    world = open_world(config)
    check_targets(world, config.adapters)
    noisy_radii = [r for r in config.radii if r > 0]
    alphas = config.alphas
    per_adapter = 1 + len(noisy_radii) * config.draws + config.directions * (len(alphas) - 1)
    bar = tqdm(total=per_adapter * len(config.adapters), desc="flatness", unit="pass", disable=not progress)
    results, layer_names = {}, {}
    try:
        for name, folder in config.adapters.items():
            began = time.perf_counter()
            bar.set_postfix(adapter=name)
            layers = world.activate(name)
            layer_names[name] = list(layers)
            clean = world.loss()
            bar.update()
            expected = expected_losses(world.loss, layers, list(config.radii), config.draws, seed=config.seed,
                                       sampler=config.sampler, clean=clean, tick=bar.update)
            curves = direction_curves(world.loss, layers, name, alphas, config.directions, seed=config.seed,
                                      clean=clean, tick=bar.update)
            results[name] = {"path": str(Path(folder).resolve()), "target_layers": len(layers),
                             "perturbed_weights": sum(layer.get_base_layer().weight.numel() for layer in layers.values()),
                             "loss": clean, "expected": expected, "directions": curves,
                             "seconds": time.perf_counter() - began}
    finally:
        bar.close()
        world.close()
    reference = next(iter(results))
    for name, result in results.items():  # paired against the first adapter, when the noise was the same
        same = layer_names[name] == layer_names[reference]
        result["paired"] = {"reference": reference, "same_noise": same,
                            "sharpness": paired_sharpness(result, results[reference]) if same else None}
    report = {"format_version": FORMAT_VERSION, "kind": world.kind, "base": config.base,
              "settings": config.to_dict() | {"alphas": alphas}, "data": world.describe(), "adapters": results,
              "seconds": time.perf_counter() - start,
              "environment": environment() | {"device": str(world.device), "dtype": config.dtype}}
    if config.out is not None:
        from flatlora_diffusion.flatness.report import write_outputs

        write_outputs(report, config.out)
    return report


__all__ = ["FlatnessConfig", "FlatnessError", "measure_flatness"]
