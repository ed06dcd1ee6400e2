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
  σ of a draw comes from the LoRA weights at its first forward; :meth:`FlatLoraPerturber.state_dict`
  carries it (O(m) per layer) into checkpoints, so a resume inside an interval is exact.
* **DoRA.** The noise perturbs the direction that DoRA's magnitude scales, with and without
  ``lora_dropout`` (see :func:`_dora_noise_scale`).
* **Cheap.** Only O(out_features) state per layer (the cached ``‖W_i‖²`` and ``σ_i``); per draw, the
  keys and row signs of all layers come from one generator in one call each. Small models (all
  perturbed layers together at most `KEEP_PERTURBED_BYTES` in fp32, e.g. the toy and tiny ones)
  instead keep each layer's ``W + ε`` for the whole draw: forward is then a plain linear and
  backward needs no rebuild, which removes the fixed per-layer cost that dominates small layers;
  the layers of one weight shape get σ and ``W + ε`` in batched ops, reading their noise as one
  view of the pool. Merged row
  norms are computed without materialising ``B·A``:
  ``‖W_i + sB_iA‖² = ‖W_i‖² + 2s·(W Aᵀ)_i·B_i + s²·B_i (A Aᵀ) B_iᵀ``, on the layer's first
  forward of a draw, right before ``W`` is read anyway.

Noise samplers (``FlatLoraConfig.sampler``):

* ``"gaussian"``: fresh i.i.d. N(0, 1) per layer and draw, regenerated from its seed in backward:
  exact and independent across layers, as in the paper. Cheap on CUDA; on CPU Gaussian sampling
  costs more than the layer's matmul.
* ``"pooled"``: fast on CPU, at the price of weak dependence across layers. Each draw samples
  ``pool_size`` fresh N(0, 1) values ``P`` (twice the largest layer; for small models, enough for
  a pool of all their weights) and mixes them, in groups of 16, by up to 8 orthogonal matrices
  into a pool of up to 9 blocks (each block is jointly i.i.d. N(0, 1); the same group in two
  blocks is correlated by at most 1/4). Layers take contiguous windows of the pool, laid end to
  end in a random order, with a random sign per row: within a layer the noise is exactly i.i.d.
  N(0, 1); a pool value is shared by ``reuse`` layers only once the pool is used up (SD1.5: 3.2
  instead of the 28 of a plain pool; small models: never). Building ``W + σ⊙Z`` is one fused
  ``addcmul`` pass, with no Gaussian sampling in the hot path.
* ``"auto"`` (default): ``gaussian`` where the perturbed layers are on CUDA, ``pooled`` elsewhere.

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
# Keep every layer's `W + ε` for the draw (plain linears, no rebuild in backward) when all perturbed
# weights together take at most this much in fp32; larger models rebuild it in a shared workspace.
KEEP_PERTURBED_BYTES = 64 * 2**20
# The pooled sampler draws enough fresh samples for a pool that holds every layer once (no value shared
# between layers) when that pool takes at most this much in fp32; larger models reuse a smaller pool.
ONE_LAP_POOL_BYTES = 64 * 2**20


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
    and the LoRA weights at the start of the draw: resuming a run needs the step and, with
    ``interval`` > 1, the perturber's :meth:`FlatLoraPerturber.state_dict` (O(m) per layer).
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
        default="auto",
        metadata={"help": "`auto` (`gaussian` on CUDA, `pooled` elsewhere), `gaussian` (exact i.i.d. noise, "
                          "independent across layers) or `pooled` (fast on CPU: exact i.i.d. within a layer, "
                          "weakly dependent across layers)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the noise generators (the global RNG is never used)."})
    noise_per_rank: bool = field(
        default=True,
        metadata={"help": "Data-parallel ranks draw different noise (more Monte-Carlo samples per step)."},
    )
    pool_size: int | None = field(
        default=None,
        metadata={"help": "`pooled` sampler: fresh N(0,1) samples per draw (mixed into up to 9 times as many "
                          "pool values); default twice the largest layer, or for small models (a pool of all "
                          "their weights within 64 MB) enough for every layer once."},
    )

    def __post_init__(self) -> None:
        errors = []
        if not isinstance(self.rho, (int, float)) or not math.isfinite(self.rho) or not 0 <= self.rho <= 1:
            errors.append(f"`rho` must be a number in [0, 1] (the paper uses 0.05-0.10), got {self.rho!r}.")
        if self.schedule not in SCHEDULES:
            errors.append(f"`schedule` must be one of {sorted(SCHEDULES)}, got {self.schedule!r}.")
        if self.sampler not in SAMPLER_CHOICES:
            errors.append(f"`sampler` must be one of {list(SAMPLER_CHOICES)}, got {self.sampler!r}.")
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


def runs_of_equal(keys: list) -> list[list[int]]:
    """Indices of equal keys, in order of first appearance: the layer runs of :class:`PooledSampler`
    (the perturber's key is a layer's weight shape, dtype and device)."""
    runs: dict = {}
    for index, key in enumerate(keys):
        runs.setdefault(key, []).append(index)
    return list(runs.values())


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
        self._views: dict[tuple[torch.device, torch.dtype, torch.Size], torch.Tensor] = {}

    def get(self, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        view = self._views.get((device, dtype, shape))
        if view is not None:
            return view
        numel = shape[0] * shape[1]
        buffer = self._buffers.get((device, dtype))
        if buffer is None or buffer.numel() < numel:
            buffer = self._buffers[(device, dtype)] = torch.empty(numel, device=device, dtype=dtype)
            self._views = {k: v for k, v in self._views.items() if k[:2] != (device, dtype)}  # views of the old one
        view = self._views[(device, dtype, shape)] = buffer[:numel].view(shape)
        return view


# The pooled sampler's mixing matrices (16×16, orthogonal): the identity and D_k·H/4, H the Sylvester
# Hadamard matrix and D_k = diag(±1) from a Kerdock set (bit u of a mask flips sign u). Every product
# M_aᵀ·M_b of two different ones has all entries ±1/4 (the masks' pairwise products are bent
# functions), so an element of one block is correlated by at most 1/4 with any element of another.
_GROUP = 16
_KERDOCK_MASKS = (0, 854, 1379, 1594, 4472, 4637, 5198, 5924)


def mixing_matrices() -> torch.Tensor:
    """The pooled sampler's block transforms, shape (9, 16, 16): the identity, then the D_k·H/4."""
    hadamard = torch.tensor([[(-1.0) ** bin(i & j).count("1") for j in range(_GROUP)] for i in range(_GROUP)])
    signs = torch.tensor([[1.0 - 2.0 * ((mask >> u) & 1) for u in range(_GROUP)] for mask in _KERDOCK_MASKS])
    return torch.cat([torch.eye(_GROUP)[None], signs[:, :, None] * hadamard[None] / 4])


class PooledSampler:
    """Noise as windows of a pool built per draw from fresh N(0, 1) samples (see the module docstring).

    The pool has ``blocks`` blocks of ``fresh`` values: block 0 is the fresh samples ``P``, block k
    is ``P`` mixed in groups of 16 by the k-th orthogonal matrix of :func:`mixing_matrices`. Each
    block is jointly i.i.d. N(0, 1); the same group of two blocks is correlated by at most 1/4.
    Layers are laid end to end per draw in a random order, so a pool value is reused only once
    the pool is used up (``reuse`` = perturbed weights per pool value, about 1/blocks of before).
    Small models (a pool of all their weights within `ONE_LAP_POOL_BYTES`) get enough fresh samples
    for one lap: no value is shared between layers. There, ``runs`` (lists of layers, e.g. those of
    one shape) are laid in a random order with the layers of a run one after another, so that a run's
    noise is one view of the pool (:meth:`noise_pieces`). Where the pool is reused, layers are
    shuffled one by one instead: runs of equal sizes would repeat their offsets lap after lap,
    making whole layers copies of each other.
    A window spans at most ``fresh - 16`` values, so it never holds two mixes of the same group:
    within a layer the noise is exactly i.i.d. N(0, 1).
    """

    def __init__(self, sizes: list[int], pool_size: int | None = None,
                 runs: list[list[int]] | None = None) -> None:
        largest, total = max(sizes), sum(sizes)
        blocks = len(_KERDOCK_MASKS) + 1
        fresh = pool_size or 2 * largest
        if pool_size is None and total * 4 <= ONE_LAP_POOL_BYTES:
            fresh = max(fresh, -(-total // blocks))
        self.fresh = -(-fresh // _GROUP) * _GROUP
        if self.fresh < largest + _GROUP:
            raise ValueError(f"`pool_size`={pool_size} is too small: the pooled sampler needs at least the "
                             f"largest perturbed layer plus {_GROUP} ({largest + _GROUP}).")
        self.sizes = sizes
        if runs is not None and sorted(i for run in runs for i in run) != list(range(len(sizes))):
            raise ValueError("`runs` must hold every layer index exactly once.")
        # Enough blocks to hold every layer once (a lap wastes less than one layer at its end), at most 9.
        self.blocks = min(blocks, -(-(total + largest) // self.fresh))
        self.pool_size = self.fresh * self.blocks
        one_lap = total <= self.pool_size
        self.runs = runs if runs is not None and one_lap else [[index] for index in range(len(sizes))]
        self.reuse = total / self.pool_size
        self._mix = mixing_matrices()[1 : self.blocks]
        self._pools: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._workspace = _Workspace()

    def begin_draw(self, gen: torch.Generator, seed: int, devices: set[torch.device]) -> list[int]:
        """Fill the pool on each device; returns each layer's window offset (layers packed end to end)."""
        pools = {device: self._pools.get((device, torch.float32)) for device in devices}
        self._pools.clear()  # casts to other dtypes are redone from the new values
        for device, pool in pools.items():
            if pool is None:
                pool = torch.empty(self.pool_size, device=device)
            fresh = torch.randn(self.fresh, generator=_generator(seed, device), device=device, out=pool[: self.fresh])
            if self.blocks > 1:  # block k = P mixed by M_k, group by group: one batched matmul into the pool
                groups = fresh.view(1, -1, _GROUP).expand(self.blocks - 1, -1, -1)
                torch.bmm(groups, self._mix.to(device), out=pool[self.fresh :].view(self.blocks - 1, -1, _GROUP))
            self._pools[(device, torch.float32)] = pool
        offsets = [0] * len(self.sizes)
        cursor = 0
        for run in torch.randperm(len(self.runs), generator=gen).tolist():
            for index in self.runs[run]:
                if cursor + self.sizes[index] > self.pool_size:
                    cursor = 0  # the pool is used up: the next lap reuses it
                offsets[index] = cursor
                cursor += self.sizes[index]
        return offsets

    def _pool(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The draw's pool on ``device`` in ``dtype`` (cast once per draw)."""
        pool = self._pools.get((device, dtype))
        if pool is None:
            pool = self._pools[(device, dtype)] = self._pools[(device, torch.float32)].to(dtype)
        return pool

    def noise(self, key: int, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The layer's N(0, 1) noise ``Z``: an (m, n) view of the pool, no copy."""
        return self._pool(device, dtype)[key : key + shape[0] * shape[1]].view(shape)

    def noise_pieces(self, keys: list[int], shape: torch.Size, device: torch.device,
                     dtype: torch.dtype) -> list[tuple[slice, torch.Tensor]]:
        """The noise of several layers of one shape as ``(layers, (k, m, n) view of the pool)`` pieces,
        no copy: layers whose windows follow each other in the pool share one piece."""
        pool = self._pool(device, dtype)
        size = shape[0] * shape[1]
        pieces, start = [], 0
        for stop in range(1, len(keys) + 1):
            if stop == len(keys) or keys[stop] != keys[stop - 1] + size:
                pieces.append((slice(start, stop), pool[keys[start] : keys[start] + (stop - start) * size]
                               .view(stop - start, *shape)))
                start = stop
        return pieces

    def perturbed_weight(self, weight: torch.Tensor, noise: _LayerNoise, dtype: torch.dtype,
                         keep: bool = False) -> torch.Tensor:
        """``W + σ ⊙ Z`` in ``dtype``, in one pass into the shared workspace (``keep``: a tensor of its
        own); ``W`` is only read."""
        z = noise.cache.get(("z", dtype))  # the layer's window, a view made once per draw
        if z is None:
            z = noise.cache[("z", dtype)] = self.noise(noise.key, weight.shape, weight.device, dtype)
        out = None if keep else self._workspace.get(weight.shape, weight.device, dtype)
        return torch.addcmul(weight if weight.dtype == dtype else weight.to(dtype), noise.sigma_as(dtype), z, out=out)


class GaussianSampler:
    """Exact, independent sampling: fresh i.i.d. N(0, 1) per layer and draw, regenerated from its seed."""

    def __init__(self, sizes: list[int], pool_size: int | None = None,
                 runs: list[list[int]] | None = None) -> None:
        self.sizes = sizes
        self.reuse = 0.0
        self._workspace = _Workspace()
        self._generators: dict[torch.device, torch.Generator] = {}

    def begin_draw(self, gen: torch.Generator, seed: int, devices: set[torch.device]) -> list[int]:
        """Each layer's noise seed (nothing else to prepare)."""
        return torch.randint(0, 2**62, (len(self.sizes),), generator=gen).tolist()

    def noise(self, key: int, shape: torch.Size, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The layer's N(0, 1) noise ``Z``, regenerated from ``key``."""
        return torch.randn(shape, generator=self._generator(key, device), device=device, dtype=dtype)

    def noise_pieces(self, keys: list[int], shape: torch.Size, device: torch.device,
                     dtype: torch.dtype) -> list[tuple[slice, torch.Tensor]]:
        """The noise of several layers of one shape, (G, m, n), each regenerated from its key: one piece."""
        return [(slice(0, len(keys)), torch.stack([self.noise(key, shape, device, dtype) for key in keys]))]

    def perturbed_weight(self, weight: torch.Tensor, noise: _LayerNoise, dtype: torch.dtype,
                         keep: bool = False) -> torch.Tensor:
        """``W + σ ⊙ Z`` in ``dtype``, in the shared workspace (``keep``: a tensor of its own); ``Z`` is
        regenerated from the layer's key."""
        out = torch.empty(weight.shape, device=weight.device, dtype=dtype) if keep else \
            self._workspace.get(weight.shape, weight.device, dtype)
        torch.randn(weight.shape, generator=self._generator(noise.key, weight.device), out=out)
        return out.mul_(noise.sigma_as(dtype)).add_(weight)

    def _generator(self, key: int, device: torch.device) -> torch.Generator:
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        return gen.manual_seed(key)


SAMPLERS = {"pooled": PooledSampler, "gaussian": GaussianSampler}
SAMPLER_CHOICES = ("auto", *SAMPLERS)


def resolve_sampler(name: str, devices: set[torch.device]) -> str:
    """``auto``: the exact ``gaussian`` sampler where it is cheap (CUDA, whose generator is fast), else ``pooled``."""
    if name != "auto":
        return name
    return "gaussian" if devices and all(d.type == "cuda" for d in devices) else "pooled"


@dataclass
class _LayerNoise:
    """The current draw of one layer: the sampler's key, the per-row scale, and σ once resolved.

    σ (signs folded in) and the merged row norms are made on the layer's first forward of the draw,
    when W is being read anyway, and then reused by backward and later micro-batches: by the layer
    itself (``sigma``, ``merged_row_sq``), or for all layers of its group at once (``batch``, where
    this layer is ``slot``).
    """

    key: int
    scales: torch.Tensor  # (Σm, 1) fp32 ±f(t)·ρ/√n of every row of every layer: random signs times the factor
    rows: slice  # this layer's rows of `scales`
    sigma: torch.Tensor | None = None  # (m, 1) fp32, the signed σ_i (DoRA: times `dora_scale`)
    merged_row_sq: torch.Tensor | None = None  # (m, 1) fp32, ‖W'_i‖²
    dora_scale: torch.Tensor | None = None  # (m, 1) fp32, see `_dora_noise_scale`
    batch: _GroupDraw | None = None
    slot: int = 0
    cache: dict = field(default_factory=dict)  # per compute dtype: σ cast, the sampler's noise view, W + ε

    @property
    def row_scale(self) -> torch.Tensor:
        """(m, 1) ±f(t)·ρ/√n of this layer's rows."""
        return self.scales[self.rows]

    @property
    def resolved(self) -> bool:
        """Whether σ of this draw is made."""
        return self.sigma is not None or self.batch is not None

    def row_sq(self) -> torch.Tensor:
        """(m, 1) ‖W'_i‖² of the draw (once resolved)."""
        return self.merged_row_sq if self.batch is None else self.batch.row_sq[self.slot]

    def sigma_as(self, dtype: torch.dtype) -> torch.Tensor:
        """σ as an (m, 1) column in ``dtype`` (cast once per draw)."""
        col = self.cache.get(dtype)
        if col is None:
            sigma = self.sigma if self.batch is None else self.batch.sigma[self.slot]
            col = self.cache[dtype] = sigma if sigma.dtype == dtype else sigma.to(dtype)
        return col

    def kept_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The kept ``W + ε`` in ``dtype``, if made."""
        if self.batch is not None and self.batch.kept.dtype == dtype:
            return self.batch.layers[self.slot]
        return self.cache.get(("w", dtype))


@dataclass
class _GroupDraw:
    """σ and ``W + ε`` of every layer of a group for one draw, made by batched ops (layer k is slot k)."""

    row_sq: torch.Tensor  # (G, m, 1) fp32, ‖W'_i‖²
    sigma: torch.Tensor  # (G, m, 1) fp32, signed σ_i
    kept: torch.Tensor  # (G, m, n), W + ε in the compute dtype
    layers: tuple[torch.Tensor, ...] = field(init=False)  # the (m, n) W + ε of each member, views of `kept`

    def __post_init__(self) -> None:
        self.layers = self.kept.unbind()


@dataclass
class _LayerGroup:
    """Perturbed layers of one weight shape, dtype and device, and their frozen weights stacked (G, m, n)."""

    members: list[int]
    loras: list[LoraLayer]
    rows: slice  # the members' rows in the draw's concatenated row scales
    weights: torch.Tensor
    weight_sq: torch.Tensor  # (G, m, 1) fp32, ‖W_i‖² of each member
    _adapters: list | None = None  # the members' active adapters when `_factors` was made
    _factors: tuple | None = None

    def lora_factors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]] | None:
        """The members' LoRA ``A`` and ``B`` parameters and adapter names, where each member has one
        active adapter, none DoRA, all of one rank; else None (the layers then take the per-layer path).
        Looked up again only when the active adapters change: an adapter deleted and added again under
        the same name while training needs a new perturber."""
        adapters = [lora.active_adapter for lora in self.loras]  # a name, or a list of names
        if adapters != self._adapters:
            self._adapters = [names if isinstance(names, str) else list(names) for names in adapters]
            actives = [[a for a in lora.active_adapters if a in lora.lora_A] for lora in self.loras]
            if any(len(a) != 1 or lora.use_dora.get(a[0], False) for a, lora in zip(actives, self.loras, strict=True)) \
                    or len({lora.r[a[0]] for a, lora in zip(actives, self.loras, strict=True)}) != 1:
                self._factors = None
            else:
                names = [a[0] for a in actives]
                self._factors = ([lora.lora_A[n].weight for lora, n in zip(self.loras, names, strict=True)],
                                 [lora.lora_B[n].weight for lora, n in zip(self.loras, names, strict=True)], names)
        return self._factors


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear on ``x`` computes in: autocast's where it is on, else ``x``'s."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def _noisy_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, sampler,
                  noise: _LayerNoise, keep: bool = False) -> tuple[torch.Tensor, torch.dtype]:
    """``x (W + ε)ᵀ + b`` in the compute dtype (autocast's, else x's), and that dtype.

    ``keep``: ``W + ε`` is made once per draw and kept in the layer's noise cache (then autograd's own
    linear backward uses it); otherwise it is built in the sampler's shared workspace."""
    dtype = _compute_dtype(x)
    if keep:
        perturbed = noise.kept_weight(dtype)
        if perturbed is None:
            perturbed = noise.cache[("w", dtype)] = sampler.perturbed_weight(weight, noise, dtype, keep=True)
    else:
        perturbed = sampler.perturbed_weight(weight, noise, dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    return F.linear(x if x.dtype == dtype else x.to(dtype), perturbed, bias), dtype


class _NoisyLinear(torch.autograd.Function):
    """``y = x (W + ε)ᵀ + b`` without storing ``W + ε``: it is rebuilt in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, sampler, noise: _LayerNoise):
        out, dtype = _noisy_linear(x, weight, bias, sampler, noise)
        ctx.save_for_backward(weight)
        ctx.sampler, ctx.noise, ctx.compute_dtype, ctx.x_dtype = sampler, noise, dtype, x.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            dtype = ctx.compute_dtype
            perturbed = ctx.sampler.perturbed_weight(weight, ctx.noise, dtype)
            grad_x = (grad_out if grad_out.dtype == dtype else grad_out.to(dtype)) @ perturbed  # (..., m) @ (m, n)
            if grad_x.dtype != ctx.x_dtype:
                grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None, None


def _dora_noise_scale(lora: LoraLayer, merged_row_sq: torch.Tensor) -> torch.Tensor | None:
    """DoRA's ``magnitude / ‖W + sBA‖`` per row, where the noise must carry it itself; else None.

    Flat-LoRA on DoRA perturbs the direction: the layer computes ``m ⊙ (W + ε + sBA) / ‖W + sBA‖``.
    Without dropout peft rescales the base layer's (noisy) output by ``m / ‖W + sBA‖`` itself;
    with ``lora_dropout`` > 0 it recomputes the base term from the clean weight and keeps the base
    output unscaled, so the noise gets the factor here. Same semantics with and without dropout.
    """
    dora = [a for a in lora.active_adapters if a in lora.lora_A and lora.use_dora.get(a, False)]
    if not dora or isinstance(lora.lora_dropout[dora[0]], nn.Identity):
        return None
    magnitude = lora.lora_magnitude_vector[dora[0]].weight.float().unsqueeze(1)  # (m, 1)
    return magnitude / merged_row_sq.sqrt().clamp_min(1e-30)


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
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) > 1 and any(layer.use_dora.get(a, False) for a in active):
        raise ValueError(f"`{name}` has several active adapters, one of them DoRA: Flat-LoRA defines DoRA's noise "
                         "for a single active adapter. Activate one adapter while training.")
    if layer.merged:
        raise ValueError(f"`{name}` has its adapter merged into the base weight; unmerge it before training.")
    return base


class FlatLoraPerturber:
    """Installs Flat-LoRA noise on every peft LoRA linear layer of ``model``.

    Call :meth:`set_step` with the optimiser step before the forward of each micro-batch (it is
    idempotent within a step); the noise applies while the layers are in training mode.
    ``rho = 0`` installs nothing. Use :meth:`remove` (or a ``with`` block) to uninstall.
    Save :meth:`state_dict` with a checkpoint and :meth:`load_state_dict` it on resume: with
    ``interval`` > 1 a resumed step inside an interval needs the σ of the draw it continues.
    """

    def __init__(self, model: nn.Module, config: FlatLoraConfig, rank: int = 0) -> None:
        self.config = config
        self.rank = rank
        self.step: int | None = None
        self.factor = 0.0  # f(t)·ρ of the current draw
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
        bases = [base for _, _, base in self.layers]
        self._devices = {base.weight.device for base in bases}
        self.sampler_name = resolve_sampler(config.sampler, self._devices)
        # Layers of one weight shape, dtype and device: laid next to each other in the noise pool, and
        # (kept W + ε) handled together, σ and W + ε as batched ops per draw.
        runs = runs_of_equal([(base.weight.shape, base.weight.dtype, base.weight.device) for base in bases])
        self.sampler = SAMPLERS[self.sampler_name]([base.weight.numel() for base in bases], config.pool_size, runs)
        # 1/√n for every row of every layer, concatenated (a group's rows next to each other): the draw's
        # row scales are one vector op, and a group's are one view of them.
        order = [index for members in runs for index in members]
        self._row_slices: list[slice] = [slice(0)] * len(bases)
        start = 0
        for index in order:
            self._row_slices[index] = slice(start, start + bases[index].out_features)
            start += bases[index].out_features
        self._inv_sqrt_n = torch.cat([torch.full((bases[i].out_features, 1), 1 / math.sqrt(bases[i].in_features))
                                      for i in order])
        self._layer_devices = [base.weight.device for base in bases]
        with torch.no_grad():  # ‖W_i‖² once, (m, 1): W is frozen.
            self._weight_sq = [base.weight.float().square().sum(1, keepdim=True) for base in bases]
        self.keep_perturbed = sum(base.weight.numel() for base in bases) * 4 <= KEEP_PERTURBED_BYTES
        self._group_of: dict[int, _LayerGroup] = {}
        if self.keep_perturbed:
            for members in runs:
                if len(members) > 1:
                    group = _LayerGroup(members, [self.layers[i][1] for i in members],
                                        slice(self._row_slices[members[0]].start, self._row_slices[members[-1]].stop),
                                        torch.stack([bases[i].weight for i in members]),
                                        torch.stack([self._weight_sq[i] for i in members]))
                    self._group_of |= dict.fromkeys(members, group)
        self._noise = [None] * len(self.layers)
        self.attach()

    def attach(self) -> None:
        """Install the noisy forward on every layer (the constructor does; again after :meth:`detach`)."""
        taken = [name for name, _, base in self.layers if "forward" in base.__dict__]
        if taken:
            raise ValueError(f"`{taken[0]}` already has a Flat-LoRA perturber (or another forward override); "
                             "detach or remove the other perturber first.")
        for index, (_, _, base) in enumerate(self.layers):
            base.forward = self._make_forward(base, index)

    def detach(self) -> None:
        """Give the layers their plain forward back, keeping the noise state (pool, σ, step), so that
        :meth:`attach` continues where it stopped."""
        for _, _, base in self.layers:
            base.__dict__.pop("forward", None)

    def _make_forward(self, base: nn.Linear, index: int):
        def forward(x: torch.Tensor) -> torch.Tensor:
            noise = self._noise[index]
            if noise is None or not base.training:
                return F.linear(x, base.weight, base.bias)
            if not noise.resolved:
                group = self._group_of.get(index)
                if group is None or not self._resolve_group(group, x):
                    self._resolve_sigma(index)
            bias = base.bias
            if self.keep_perturbed or not torch.is_grad_enabled() or \
                    not (x.requires_grad or (bias is not None and bias.requires_grad)):
                # W + ε kept for the draw, or no graph to build: autograd's own linear (if any) suffices
                return _noisy_linear(x, base.weight, bias, self.sampler, noise, keep=self.keep_perturbed)[0]
            return _NoisyLinear.apply(x, base.weight, bias, self.sampler, noise)

        return forward

    def set_step(self, step: int) -> None:
        """Make optimiser step ``step`` (0-based) current, drawing new noise when its interval starts."""
        self.step = step
        if self.layers and step // self.config.interval != self._draw:
            self._begin_draw(step // self.config.interval)

    def _begin_draw(self, draw: int) -> None:
        """Keys, row signs and the pool of draw ``draw``: all a function of (seed, draw, rank), batched."""
        cfg = self.config
        self._draw = draw
        self.factor = cfg.rho * SCHEDULES[cfg.schedule](draw * cfg.interval, cfg.total_steps or 1)
        if self.factor == 0:
            self._noise = [None] * len(self.layers)
            return
        rank = self.rank if cfg.noise_per_rank else 0
        gen = _generator(mix_seed(cfg.seed, draw, rank), torch.device("cpu"))
        keys = self.sampler.begin_draw(gen, mix_seed(cfg.seed, draw, rank, -1), self._devices)
        signs = torch.randint(0, 2, self._inv_sqrt_n.shape, generator=gen).float().mul_(2).sub_(1)
        row_scale = signs.mul_(self._inv_sqrt_n).mul_(self.factor)  # (Σm, 1) ±f(t)·ρ/√n
        if len(self._devices) == 1:
            scales = row_scale.to(next(iter(self._devices)))
            self._noise = [_LayerNoise(key, scales, rows) for key, rows in zip(keys, self._row_slices, strict=True)]
        else:
            on_device = {device: row_scale.to(device) for device in self._devices}
            self._noise = [_LayerNoise(key, on_device[device], rows) for key, rows, device in
                           zip(keys, self._row_slices, self._layer_devices, strict=True)]

    def _resolve_sigma(self, index: int) -> None:
        """σ_i of layer ``index`` from the current LoRA weights (those of the draw's first forward)."""
        _, lora, base = self.layers[index]
        with torch.no_grad(), torch.autocast(base.weight.device.type, enabled=False):
            row_sq = self._merged_row_norm_sq(lora, base.weight, self._weight_sq[index])
            self._set_sigma(self._noise[index], row_sq, _dora_noise_scale(lora, row_sq))

    def _resolve_group(self, group: _LayerGroup, x: torch.Tensor) -> bool:
        """σ and the kept ``W + ε`` of every layer of ``group`` in batched ops (same results as one
        layer at a time, up to the rounding of batched matmuls); False where a layer needs the
        per-layer path (several active adapters, DoRA, a σ already restored from a checkpoint)."""
        noises = [self._noise[i] for i in group.members]
        factors = group.lora_factors()
        if factors is None or any(n.resolved for n in noises):
            return False
        a_params, b_params, adapters = factors
        weights = group.weights
        with torch.no_grad(), torch.autocast(weights.device.type, enabled=False):
            a, b = torch.stack(a_params).float(), torch.stack(b_params).float()
            scale = torch.tensor([lora.scaling[name] for lora, name in zip(group.loras, adapters, strict=True)],
                                 device=weights.device).view(-1, 1, 1)
            wa = torch.bmm(weights, a.to(weights.dtype).transpose(1, 2)).float()  # (G, m, R)
            both = torch.baddbmm(wa, b, torch.bmm(a, a.transpose(1, 2)) * scale, beta=2)  # 2·WAᵀ + s·B·AAᵀ
            row_sq = group.weight_sq.add((both * b).sum(2, keepdim=True) * scale).clamp_min_(0)  # (G, m, 1)
            sigma = row_sq.sqrt().mul_(noises[0].scales[group.rows].view(row_sq.shape))
            dtype = _compute_dtype(x)
            weights_c, sigma_c = weights.to(dtype), sigma.to(dtype)
            kept = torch.empty(weights.shape, dtype=dtype, device=weights.device)  # (G, m, n): W + σ ⊙ Z
            for part, z in self.sampler.noise_pieces([n.key for n in noises], weights.shape[1:], weights.device,
                                                     dtype):
                torch.addcmul(weights_c[part], sigma_c[part], z, out=kept[part])
            batch = _GroupDraw(row_sq, sigma, kept)
            for slot, noise in enumerate(noises):
                noise.batch, noise.slot = batch, slot
        return True

    @staticmethod
    def _set_sigma(noise: _LayerNoise, row_sq: torch.Tensor, dora_scale: torch.Tensor | None) -> None:
        noise.merged_row_sq, noise.dora_scale, noise.batch = row_sq, dora_scale, None
        sigma = row_sq.sqrt().mul_(noise.row_scale)
        noise.sigma = sigma if dora_scale is None else sigma.mul_(dora_scale)
        noise.cache.clear()

    @staticmethod
    def _merged_row_norm_sq(lora: LoraLayer, weight: torch.Tensor, weight_sq: torch.Tensor) -> torch.Tensor:
        """‖(W + Σ_a s_a B_a A_a)_i‖² for every row i, without forming any m×n product."""
        active = [a for a in lora.active_adapters if a in lora.lora_A]
        if not active:
            return weight_sq
        if len(active) == 1:  # the common case: no concatenation, the scaling folded into addmm/add
            scale = lora.scaling[active[0]]
            a_cat, b_cat = lora.lora_A[active[0]].weight.float(), lora.lora_B[active[0]].weight.float()
        else:
            scale = 1.0
            a_cat = torch.cat([lora.lora_A[a].weight for a in active]).float()  # (R, n)
            b_cat = torch.cat([lora.lora_B[a].weight * lora.scaling[a] for a in active], dim=1).float()  # (m, R)
        wa = (weight @ a_cat.to(weight.dtype).T).float()  # (m, R): one read of W
        # ‖W_i + sB_iA‖² = ‖W_i‖² + s·((2·WAᵀ + s·B·AAᵀ) ⊙ B)_i summed over R
        both = torch.addmm(wa, b_cat, a_cat @ a_cat.T, beta=2, alpha=scale)
        return weight_sq.add((both * b_cat).sum(1, keepdim=True), alpha=scale).clamp_min_(0)  # (m, 1)

    def stats(self) -> dict[str, float]:
        """Values to log: the current f(t)·ρ, which is also the expected ‖ε‖/‖W'‖ of every layer.

        (E‖ε_i‖² = σ_i²·n = (f(t)·ρ)²·‖W'_i‖² by the choice of σ; measuring the realized ratio
        would cost a pass over every layer's noise, which this logger does not pay each step.)
        """
        return {"flat_lora/rho_t": self.factor}

    def state_dict(self) -> dict:
        """The current draw and, per layer, the O(m) inputs of its σ (the LoRA weights of the draw's start).

        Rank-independent: every rank can load the state saved by one.
        """
        resolved = [noise is not None and noise.resolved for noise in self._noise]
        return {"draw": self._draw,
                "merged_row_sq": [n.row_sq().cpu() if r else None for n, r in zip(self._noise, resolved, strict=True)],
                "dora_scale": [n.dora_scale.cpu() if r and n.dora_scale is not None else None
                               for n, r in zip(self._noise, resolved, strict=True)]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s draw, so that the next :meth:`set_step` of it reuses its σ."""
        if not self.layers or state["draw"] is None:
            return
        if len(state["merged_row_sq"]) != len(self.layers):
            raise ValueError(f"The Flat-LoRA state has {len(state['merged_row_sq'])} layers, this model "
                             f"{len(self.layers)}: resume with the same LoRA target modules.")
        self._begin_draw(state["draw"])
        for noise, row_sq, dora, (_, _, base) in zip(self._noise, state["merged_row_sq"], state["dora_scale"],
                                                     self.layers, strict=True):
            if noise is not None and row_sq is not None:
                device = base.weight.device
                self._set_sigma(noise, row_sq.to(device), None if dora is None else dora.to(device))

    def remove(self) -> None:
        """Uninstall for good: the base layers get their plain forward back and the state is dropped."""
        self.detach()
        self.layers, self._noise = [], []

    def __enter__(self) -> FlatLoraPerturber:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
