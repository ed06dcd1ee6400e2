"""Flat-LoRA: train LoRA adapters under random, filter-wise noise on the frozen base weights.

For every peft LoRA-wrapped linear layer and every *optimiser* step, the forward and backward
passes see ``W + ε`` instead of ``W``, with

    ε_ij ~ N(0, σ_i²),   σ_i = f(t) · ρ · ‖(W + s·B·A)_i‖₂ / √n

(row ``i`` of the merged weight, ``s`` the LoRA scaling, ``n`` = in_features, ``f`` the schedule).
This estimates the expected loss ``E_ε L(W + s·B·A + ε)`` of Li et al., "Flat-LoRA" (ICML 2025).

How this implementation differs from the paper's reference code:

* **Exact.** ``W`` is never written. The perturbed weight is built into a reused workspace inside
  the layer's forward, and rebuilt bit-for-bit in backward (and in gradient-checkpoint recomputation)
  from the same noise, so the frozen base stays bit-identical in fp32, fp16 and bf16.
* **Reproducible.** All noise comes from dedicated generators seeded from
  (seed, draw, layer index, rank); the global RNG is never touched.
* **Follows optimiser steps.** The caller says which optimiser step is running
  (:meth:`FlatLoraPerturber.set_step`); every micro-batch of that step shares one noise sample.
* **Cheap.** Only O(out_features) state per layer (the cached ``‖W_i‖²`` and ``σ_i``). Merged row
  norms are computed without materialising ``B·A``:
  ``‖W_i + sB_iA‖² = ‖W_i‖² + 2s·(W Aᵀ)_i·B_i + s²·B_i (A Aᵀ) B_iᵀ``, on the layer's first
  forward of a draw, right before ``W`` is read anyway.

Noise samplers (``FlatLoraConfig.sampler``):

* ``"pooled"`` (default): each draw fills one pool of fresh N(0, 1) samples, twice the size of the
  largest perturbed layer. A layer takes a contiguous window of the pool at a random offset
  (rows are disjoint slices, hence independent N(0, 1)), and every row gets a random sign. The
  per-element marginal is exactly Gaussian; a new pool per draw makes steps independent; layers
  within a draw read differently shifted windows with independent row signs, so their noise is
  uncorrelated element-wise. Building ``W + σ⊙Z`` is one fused ``addcmul`` pass.
* ``"gaussian"``: the paper's sampling: fresh i.i.d. N(0, 1) per layer and draw, regenerated from
  its seed in backward. Exact but slower on CPU (Gaussian sampling costs more than the matmul).

Data-parallel ranks draw *different* noise by default (``noise_per_rank=True``): every rank then
contributes an independent Monte-Carlo sample of the expected loss, for free. The LoRA weights are
synchronised, so ``σ`` is the same on every rank. Set ``noise_per_rank=False`` to draw the same
noise everywhere (the reference code's behaviour when seeded identically).

This module imports only torch and peft; integrations for accelerate loops and the transformers
``Trainer`` live in :mod:`flatlora_diffusion.integrations`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer
from torch import nn

_MASK64 = (1 << 64) - 1


def cosine_schedule(step: int, total_steps: int) -> float:
    """The paper's cosine-increasing ramp ½(1 − cos(π·t/T)), clamped to 1 after ``total_steps``."""
    return 0.5 * (1.0 - math.cos(math.pi * min(step / total_steps, 1.0)))


def linear_schedule(step: int, total_steps: int) -> float:
    """A linear ramp t/T from 0 to 1, clamped to 1 after ``total_steps``."""
    return min(step / total_steps, 1.0)


def constant_schedule(step: int, total_steps: int) -> float:
    """Full strength from the first step."""
    return 1.0


SCHEDULES: dict[str, Callable[[int, int], float]] = {
    "cosine": cosine_schedule,
    "linear": linear_schedule,
    "constant": constant_schedule,
}


@dataclass
class FlatLoraConfig:
    """Settings of the Flat-LoRA weight perturbation.

    The noise is a pure function of these settings, the optimiser step, the layer index, the rank
    and the current weights: resuming a run only needs the step.
    """

    rho: float = field(
        default=0.05,
        metadata={"help": "Relative noise strength ρ. 0 disables Flat-LoRA (plain LoRA, nothing installed). "
                          "Paper: 0.05 for LLMs, 0.10 for SDXL DreamBooth, 0.15 for CLIP."},
    )
    schedule: str = field(
        default="cosine",
        metadata={"help": "Ramp f(t) of the noise over optimiser steps: `cosine` (paper), `linear` or `constant`."},
    )
    total_steps: int | None = field(
        default=None,
        metadata={"help": "Optimiser steps over which the ramp goes from 0 to 1 (the run's max steps). "
                          "Required by `cosine` and `linear`."},
    )
    interval: int = field(
        default=1,
        metadata={"help": "Draw new noise every `interval` optimiser steps; it is kept in between."},
    )
    sampler: str = field(
        default="pooled",
        metadata={"help": "`pooled` (fast, exact Gaussian marginals) or `gaussian` (paper's i.i.d. sampling)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the noise generators (the global RNG is never used)."})
    noise_per_rank: bool = field(
        default=True,
        metadata={"help": "Data-parallel ranks draw different noise (more Monte-Carlo samples per step)."},
    )
    pool_size: int | None = field(
        default=None,
        metadata={"help": "`pooled` sampler: N(0,1) samples per draw; default twice the largest layer."},
    )

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.rho, (int, float)) or not math.isfinite(self.rho) or not 0 <= self.rho <= 1:
            errors.append(f"`rho` must be a number in [0, 1] (the paper uses 0.05-0.10), got {self.rho!r}.")
        if self.schedule not in SCHEDULES:
            errors.append(f"`schedule` must be one of {sorted(SCHEDULES)}, got {self.schedule!r}.")
        if self.sampler not in SAMPLERS:
            errors.append(f"`sampler` must be one of {sorted(SAMPLERS)}, got {self.sampler!r}.")
        if not isinstance(self.interval, int) or self.interval < 1:
            errors.append(f"`interval` must be an integer >= 1, got {self.interval!r}.")
        if self.total_steps is not None and (not isinstance(self.total_steps, int) or self.total_steps < 1):
            errors.append(f"`total_steps` must be an integer >= 1 or None, got {self.total_steps!r}.")
        if self.pool_size is not None and (not isinstance(self.pool_size, int) or self.pool_size < 1):
            errors.append(f"`pool_size` must be a positive integer or None, got {self.pool_size!r}.")
        if errors:
            raise ValueError("Invalid FlatLoraConfig:\n  " + "\n  ".join(errors))

    def to_dict(self) -> dict:
        """Plain dict of the settings (for logs, checkpoints and adapter metadata)."""
        return asdict(self)


def mix_seed(*keys: int) -> int:
    """Hash integers into one 63-bit generator seed (splitmix64 chain; no collisions in practice)."""
    state = 0x9E3779B97F4A7C15
    for key in keys:
        state = (state ^ (key & _MASK64)) & _MASK64
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        state = z ^ (z >> 31)
    return state & ((1 << 63) - 1)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


class _Workspace:
    """One reusable buffer per (device, dtype) for the transient ``W + ε``.

    Layers run one after another (forward, backward and checkpoint recomputation alike), so one
    buffer the size of the largest layer serves them all: no allocation per layer and pass, and the
    buffer stays in cache instead of streaming fresh pages through memory.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        numel = shape[0] * shape[1]
        buffer = self._buffers.get((device, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[(device, dtype)] = torch.empty(numel, device=device, dtype=dtype)
        return buffer[:numel].view(shape)


class PooledSampler:
    """Noise as shifted windows of one fresh N(0, 1) pool per draw, with a random sign per row."""

    def __init__(self, pool_size: int) -> None:
        self.pool_size = pool_size
        self._pools: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._workspace = _Workspace()

    def begin_draw(self, seed: int, devices: set[torch.device]) -> None:
        """Fill a fresh pool on each device the perturbed layers live on."""
        self._pools.clear()
        for device in devices:
            pool = torch.randn(self.pool_size, generator=_generator(seed, device), device=device)
            self._pools[(device, torch.float32)] = pool

    def layer_key(self, gen: torch.Generator, numel: int) -> int:
        """The window offset of one layer, drawn from the layer's generator."""
        return int(torch.randint(0, self.pool_size - numel + 1, (1,), generator=gen))

    def _pool(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        if key not in self._pools:
            self._pools[key] = self._pools[(device, torch.float32)].to(dtype)
        return self._pools[key]

    def perturbed_weight(self, weight: torch.Tensor, sigma: torch.Tensor, key: int, dtype: torch.dtype) -> torch.Tensor:
        """``W + σ ⊙ Z`` in ``dtype``, in one pass into the shared workspace; ``W`` is only read."""
        m, n = weight.shape
        noise = self._pool(weight.device, dtype)[key : key + m * n].view(m, n)  # (m, n) view, no copy
        out = self._workspace.get(weight.shape, weight.device, dtype)
        return torch.addcmul(weight.to(dtype), sigma.to(dtype).unsqueeze(1), noise, out=out)

    def row_sq_norms(self, key: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """``‖Z_i‖²`` of every row of a layer's noise, shape (m,): one pass over its window."""
        m, n = shape
        return self._pools[(device, torch.float32)][key : key + m * n].view(m, n).square().sum(1)


class GaussianSampler:
    """The paper's sampling: i.i.d. N(0, 1) per layer and draw, regenerated from its seed."""

    def __init__(self) -> None:
        self._workspace = _Workspace()

    def begin_draw(self, seed: int, devices: set[torch.device]) -> None:
        """Nothing to prepare: every layer draws from its own seed."""

    def layer_key(self, gen: torch.Generator, numel: int) -> int:
        """The seed of the layer's noise, drawn from the layer's generator."""
        return int(torch.randint(0, 2**62, (1,), generator=gen))

    def perturbed_weight(self, weight: torch.Tensor, sigma: torch.Tensor, key: int, dtype: torch.dtype) -> torch.Tensor:
        """``W + σ ⊙ Z`` in ``dtype``, in the shared workspace; ``Z`` is regenerated from ``key``."""
        out = self._workspace.get(weight.shape, weight.device, dtype)
        torch.randn(weight.shape, generator=_generator(key, weight.device), out=out)
        return out.mul_(sigma.to(dtype).unsqueeze(1)).add_(weight)

    def row_sq_norms(self, key: int, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """The *expected* ``‖Z_i‖²`` (= n): regenerating the noise to log it would cost a third draw."""
        m, n = shape
        return torch.full((m,), float(n), device=device)


SAMPLERS = {"pooled": PooledSampler, "gaussian": GaussianSampler}


@dataclass
class _LayerNoise:
    """The current draw of one layer: the sampler's key, a random sign per row, and the row scales.

    ``sigma`` (signs folded in) and ``merged_row_sq`` are filled on the layer's first forward of
    the draw, when W is being read anyway, and then reused by backward and later micro-batches.
    """

    key: int
    signs: torch.Tensor  # (m,) ±1, fp32
    sigma: torch.Tensor | None = None  # (m,) fp32
    merged_row_sq: torch.Tensor | None = None  # (m,) fp32, ‖W'_i‖², for logging ‖ε‖/‖W'‖


class _NoisyLinear(torch.autograd.Function):
    """``y = x (W + ε)ᵀ + b`` without storing ``W + ε``: it is rebuilt in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, sampler, noise: _LayerNoise):
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        perturbed = sampler.perturbed_weight(weight, noise.sigma, noise.key, dtype)
        ctx.save_for_backward(weight)
        ctx.sampler, ctx.noise, ctx.compute_dtype, ctx.x_dtype = sampler, noise, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x.to(dtype), perturbed, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            perturbed = ctx.sampler.perturbed_weight(weight, ctx.noise.sigma, ctx.noise.key, ctx.compute_dtype)
            grad_x = (grad_out.to(ctx.compute_dtype) @ perturbed).to(ctx.x_dtype)  # (..., m) @ (m, n)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None, None


def _check_perturbable(name: str, layer: LoraLayer) -> nn.Linear:
    """The base ``nn.Linear`` of a LoRA layer, or a clear error if Flat-LoRA cannot perturb it."""
    base = layer.get_base_layer()
    fix = "Remove it from the LoRA target modules, or train it with `rho=0`."
    if type(base).forward is not nn.Linear.forward or not isinstance(base, nn.Linear):
        raise TypeError(
            f"Flat-LoRA perturbs plain linear layers only; `{name}` wraps a {type(base).__name__} "
            f"(convolutions, embeddings and quantized layers are not supported). {fix}"
        )
    if base.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"Flat-LoRA cannot perturb `{name}`: its weight dtype is {base.weight.dtype}. {fix}")
    if base.weight.requires_grad:
        raise ValueError(
            f"`{name}.weight` requires grad: Flat-LoRA perturbs frozen base weights only. "
            "Freeze the base model (peft does this in `get_peft_model`)."
        )
    if "forward" in base.__dict__:
        raise ValueError(f"`{name}` already has a Flat-LoRA perturber (or another forward override); "
                         "call `remove()` on the old perturber first.")
    if layer.merged:
        raise ValueError(f"`{name}` has its adapter merged into the base weight; unmerge it before training.")
    return base


class FlatLoraPerturber:
    """Installs Flat-LoRA noise on every peft LoRA linear layer of ``model``.

    Call :meth:`set_step` with the optimiser step before the forward of each micro-batch (it is
    idempotent within a step); the noise applies while the layers are in training mode.
    ``rho = 0`` installs nothing. Use :meth:`remove` (or a ``with`` block) to uninstall.
    """

    def __init__(self, model: nn.Module, config: FlatLoraConfig, rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.step: int | None = None
        self.factor = 0.0  # f(t)·ρ of the current draw
        self._relative_perturbation: float | None = None  # cached ‖ε‖/‖W'‖ of the current draw
        self._draw: int | None = None
        self._noise: list[_LayerNoise | None] = []
        self.layers: list[tuple[str, LoraLayer, nn.Linear]] = []
        if config.rho == 0:
            return
        if config.schedule != "constant" and config.total_steps is None:
            raise ValueError(f"FlatLoraConfig(schedule={config.schedule!r}) needs `total_steps` (the run's max steps).")
        self.layers = [(name, mod, _check_perturbable(name, mod)) for name, mod in model.named_modules()
                       if isinstance(mod, LoraLayer)]
        if not self.layers:
            raise ValueError("Flat-LoRA found no peft LoRA layers in the model: add LoRA adapters "
                             "(`get_peft_model` or `model.add_adapter`) before creating the perturber.")
        largest = max(base.weight.numel() for _, _, base in self.layers)
        self.sampler = (PooledSampler(config.pool_size or 2 * largest) if config.sampler == "pooled"
                        else GaussianSampler())
        if config.sampler == "pooled" and self.sampler.pool_size < largest:
            raise ValueError(f"`pool_size`={config.pool_size} is smaller than the largest perturbed layer ({largest}).")
        with torch.no_grad():  # ‖W_i‖² once: W is frozen.
            self._weight_sq = [base.weight.float().square().sum(1) for _, _, base in self.layers]
        self._noise = [None] * len(self.layers)
        for index, (_, _, base) in enumerate(self.layers):
            base.forward = self._make_forward(base, index)

    def _make_forward(self, base: nn.Linear, index: int):
        def forward(x: torch.Tensor) -> torch.Tensor:
            noise = self._noise[index]
            if noise is None or not base.training:
                return F.linear(x, base.weight, base.bias)
            if noise.sigma is None:
                self._resolve_sigma(index)
            return _NoisyLinear.apply(x, base.weight, base.bias, self.sampler, noise)

        return forward

    def set_step(self, step: int) -> None:
        """Make optimiser step ``step`` (0-based) current, drawing new noise when its interval starts."""
        self.step = step
        if not self.layers:
            return
        draw = step // self.config.interval
        if draw == self._draw:
            return
        self._draw = draw
        cfg = self.config
        self.factor = cfg.rho * SCHEDULES[cfg.schedule](draw * cfg.interval, cfg.total_steps or 1)
        self._relative_perturbation = None
        if self.factor == 0:
            self._noise = [None] * len(self.layers)
            return
        rank = self.rank if cfg.noise_per_rank else 0
        self.sampler.begin_draw(mix_seed(cfg.seed, draw, rank, -1), {b.weight.device for _, _, b in self.layers})
        for index, (_, _, base) in enumerate(self.layers):
            gen = _generator(mix_seed(cfg.seed, draw, rank, index), torch.device("cpu"))
            signs = torch.randint(0, 2, (base.out_features,), generator=gen).float().mul_(2).sub_(1)
            key = self.sampler.layer_key(gen, base.weight.numel())
            self._noise[index] = _LayerNoise(key, signs.to(base.weight.device))

    def _resolve_sigma(self, index: int) -> None:
        """σ_i of layer ``index`` from the current LoRA weights (those of the draw's first forward)."""
        _, lora, base = self.layers[index]
        noise = self._noise[index]
        device_type = base.weight.device.type
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            row_norm_sq = self._merged_row_norm_sq(lora, base.weight, self._weight_sq[index])
            noise.merged_row_sq = row_norm_sq
            noise.sigma = (self.factor / math.sqrt(base.in_features)) * row_norm_sq.sqrt() * noise.signs

    @staticmethod
    def _merged_row_norm_sq(lora: LoraLayer, weight: torch.Tensor, weight_sq: torch.Tensor) -> torch.Tensor:
        """‖(W + Σ_a s_a B_a A_a)_i‖² for every row i, without forming any m×n product."""
        active = [a for a in lora.active_adapters if a in lora.lora_A]
        if not active:
            return weight_sq
        a_cat = torch.cat([lora.lora_A[a].weight for a in active]).float()  # (R, n)
        b_cat = torch.cat([lora.lora_B[a].weight * lora.scaling[a] for a in active], dim=1).float()  # (m, R)
        wa = (weight @ a_cat.to(weight.dtype).T).float()  # (m, R): one read of W
        cross = 2 * (wa * b_cat).sum(1)
        lora_sq = ((b_cat @ (a_cat @ a_cat.T)) * b_cat).sum(1)
        return (weight_sq + cross + lora_sq).clamp_min(0)

    @property
    def relative_perturbation(self) -> float:
        """Mean over layers of ‖ε‖/‖W'‖ for the current draw (0 when no noise is active).

        Computed on first access per draw, so a run that does not log it does not pay for it.
        """
        if self._relative_perturbation is None:
            ratios = []
            with torch.no_grad():
                for index, ((_, _, base), noise) in enumerate(zip(self.layers, self._noise, strict=True)):
                    if noise is None:
                        continue
                    if noise.sigma is None:  # a layer the forward has not reached yet
                        self._resolve_sigma(index)
                    z_sq = self.sampler.row_sq_norms(noise.key, base.weight.shape, noise.sigma.device)
                    noise_sq = (noise.sigma.square() * z_sq).sum()
                    ratios.append((noise_sq / noise.merged_row_sq.sum().clamp_min(1e-30)).sqrt().item())
            self._relative_perturbation = sum(ratios) / len(ratios) if ratios else 0.0
        return self._relative_perturbation

    def stats(self) -> dict[str, float]:
        """Values to log: the current f(t)·ρ and the mean relative perturbation ‖ε‖/‖W'‖."""
        return {"flat_lora/rho_t": self.factor, "flat_lora/rel_perturbation": self.relative_perturbation}

    def remove(self) -> None:
        """Uninstall: the base layers get their plain forward back."""
        for _, _, base in self.layers:
            base.__dict__.pop("forward", None)
        self.layers, self._noise = [], []

    def __enter__(self) -> FlatLoraPerturber:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
