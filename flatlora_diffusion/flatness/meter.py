"""The measurements, for any model whose loss is a function of its LoRA-wrapped linears.

The weight space measured is the adapter's *target layers* (the LoRA-wrapped linears, in the UNet,
text encoders or LLM alike): their full m×n matrices at the merged weights ``W' = W + s·B·A``, not
the LoRA factors; norms, biases, embeddings and layers the adapter does not wrap stay fixed.

* :func:`paper_noise`: the trainer's Flat-LoRA noise, ``ε_ij ~ N(0, σ_i²)``, ``σ_i = r·‖W'_i‖/√n``:
  the core's :class:`~flatlora_diffusion.flat_lora.FlatLoraPerturber` at ``rho = r`` with a constant
  schedule, draw ``k`` selected with ``set_step(k)``. The same seed gives every radius and every
  adapter with the same target layers the same standard-normal draws (only σ differs), so curves
  and adapters are compared on common random numbers.
* :func:`direction` / :func:`shifted`: Li et al. (2018) filter-normalised random directions: per
  target layer ``d ~ N(0, 1)`` of W's shape, each row rescaled to ``‖W'_i‖``; the loss is read at
  ``W' + α·d``. A direction is seeded by (seed, direction index, layer name) only, so every adapter
  gets the same one on the layers it shares with another.

Nothing here writes a weight: both perturbations live in the base layers' forward and are removed on exit.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

from flatlora_diffusion.flat_lora import FlatLoraConfig, FlatLoraPerturber, mix_seed
from flatlora_diffusion.stats import mean_sem


def _mean_sem(values: list[float]) -> tuple[float, float]:
    """The mean and its standard error (0 for a single value: L(0) is exact)."""
    estimate = mean_sem(values)
    return estimate.mean, (0.0 if estimate.n < 2 else estimate.sem)


def target_layers(models: Mapping[str, nn.Module], adapter: str) -> dict[str, LoraLayer]:
    """The LoRA layers that hold ``adapter``, by ``component.module`` name (peft's wrapper prefix dropped)."""
    layers = {}
    for component, model in models.items():
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer) and adapter in module.lora_A:
                layers[f"{component}.{name.removeprefix('base_model.model.')}"] = module
    return layers


@contextmanager
def paper_noise(layers: Mapping[str, LoraLayer], radius: float, *, seed: int, sampler: str = "gaussian",
                ) -> Iterator[FlatLoraPerturber]:
    """The trainer's noise at strength ``radius`` on ``layers``; call ``set_step(k)`` for draw ``k``.

    The perturber acts while its base layers are in training mode: only they are switched, so
    dropout elsewhere stays off. ``radius = 0`` installs nothing (the loss is the plain loss).
    """
    holder = nn.ModuleDict({name.replace(".", ":"): layer for name, layer in layers.items()})
    perturber = FlatLoraPerturber(holder, FlatLoraConfig(rho=radius, schedule="constant", sampler=sampler, seed=seed))
    bases = [base for _, _, base in perturber.layers]
    modes = [base.training for base in bases]
    for base in bases:
        base.train()
    try:
        yield perturber
    finally:
        perturber.remove()
        for base, mode in zip(bases, modes, strict=True):
            base.train(mode)


def merged_row_norms(layer: LoraLayer, adapter: str) -> torch.Tensor:
    """‖W'_i‖ = ‖(W + s·B·A)_i‖ for every output row, shape (m,), fp32."""
    weight = layer.get_base_layer().weight
    with torch.no_grad():
        return (weight.float() + layer.get_delta_weight(adapter).float()).norm(dim=1)


def direction(layers: Mapping[str, LoraLayer], adapter: str, index: int, seed: int) -> dict[str, torch.Tensor]:
    """Direction ``index``: per layer, N(0, 1) noise from (seed, index, layer name), rows rescaled to ‖W'_i‖.

    Drawn on the CPU (the same on every device), returned in each weight's dtype and device.
    """
    out = {}
    for name, layer in layers.items():
        weight = layer.get_base_layer().weight
        gen = torch.Generator().manual_seed(mix_seed(seed, index, zlib.crc32(name.encode())))
        d = torch.randn(weight.shape, generator=gen)  # (m, n)
        d *= (merged_row_norms(layer, adapter).cpu() / d.norm(dim=1).clamp_min(1e-30))[:, None]
        out[name] = d.to(device=weight.device, dtype=weight.dtype)
    return out


@contextmanager
def shifted(layers: Mapping[str, LoraLayer], steps: Mapping[str, torch.Tensor], alpha: float) -> Iterator[None]:
    """The base layers compute with ``W + α·d`` (d from :func:`direction`); ``W`` itself is never written."""
    bases = [layers[name].get_base_layer() for name in steps]
    for base, d in zip(bases, steps.values(), strict=True):
        if "forward" in base.__dict__:
            raise RuntimeError("A base layer already has a forward override (a Flat-LoRA perturber?).")
        base.forward = _shifted_forward(base, d, alpha)
    try:
        yield
    finally:
        for base in bases:
            base.__dict__.pop("forward", None)


def _shifted_forward(base: nn.Linear, d: torch.Tensor, alpha: float) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, torch.add(base.weight, d, alpha=alpha), base.bias)

    return forward


def paired_sharpness(result: dict, reference: dict) -> dict[str, dict]:
    """Per radius: the mean and standard error of the per-draw difference of sharpness against ``reference``.

    Draw k of both adapters used the same standard-normal noise (same seed and target layers), so
    the difference cancels most of the draw-to-draw spread: a paired estimate, far tighter than the
    two sems.
    """
    out = {}
    for key, entry in result["expected"].items():
        ours = [v - result["loss"] for v in entry["draws"]]
        theirs = [v - reference["loss"] for v in reference["expected"][key]["draws"]]
        mean, sem = _mean_sem([a - b for a, b in zip(ours, theirs, strict=True)])
        out[key] = {"radius": entry["radius"], "delta_sharpness": mean, "sem": sem}
    return out


def expected_losses(loss: Callable[[], float], layers: Mapping[str, LoraLayer], radii: list[float], draws: int, *,
                    seed: int, sampler: str, clean: float, tick: Callable[[], None] = lambda: None) -> dict[str, dict]:
    """E_ε L(W' + ε) at each radius over ``draws`` draws: mean, sem, sharpness (mean − L(0)), the draws."""
    out = {}
    for radius in radii:
        if radius == 0:
            values = [clean]  # no noise: the plain loss, exactly
        else:
            values = []
            with paper_noise(layers, radius, seed=seed, sampler=sampler) as perturber:
                for k in range(draws):
                    perturber.set_step(k)
                    values.append(loss())
                    tick()
        mean, sem = _mean_sem(values)
        out[f"{radius:g}"] = {"radius": radius, "mean": mean, "sem": sem, "sharpness": mean - clean,
                              "draws": values}
    return out


def direction_curves(loss: Callable[[], float], layers: Mapping[str, LoraLayer], adapter: str, alphas: list[float],
                     count: int, *, seed: int, clean: float, tick: Callable[[], None] = lambda: None) -> dict:
    """Loss along ``count`` filter-normalised directions at each α (α = 0 is L(0), not recomputed)."""
    losses = []
    for index in range(count):
        steps = direction(layers, adapter, index, seed)
        curve = []
        for alpha in alphas:
            if alpha == 0:
                curve.append(clean)
                continue
            with shifted(layers, steps, alpha):
                curve.append(loss())
            tick()
        losses.append(curve)
        del steps
    mean = [math.fsum(column) / len(column) for column in zip(*losses, strict=True)] if losses else []
    return {"alphas": list(alphas), "losses": losses, "mean": mean}
