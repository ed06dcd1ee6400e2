"""Benchmark of the Flat-LoRA core: cost of one denoiser training step against plain LoRA.

    python -m flatlora_diffusion.bench --arch sd15 --resolution 256 --json bench.json
    python -m flatlora_diffusion.bench --arch flux --depth 2 --resolution 256 --json flux.json   # CPU
    python -m flatlora_diffusion.bench --arch flux --device cuda --resolution 1024 --json flux.json  # GPU

Times, interleaved in one process, a training step (forward, backward, AdamW) of a denoiser with
random weights of a real architecture (``sd15``, ``sdxl`` UNets; ``sd3``: the SD3.5 Medium MM-DiT,
``flux``: the FLUX.1-dev transformer) and LoRA on its attention projections (``to_q,to_k,to_v,to_out.0``;
SD3/FLUX also ``add_q_proj,add_k_proj,add_v_proj,to_add_out``) under:

* ``lora``: plain peft LoRA;
* ``flat``: this project's Flat-LoRA with its default sampler (``auto``: ``pooled`` on CPU,
  ``gaussian`` on CUDA);
* ``flat_gaussian``: this project's Flat-LoRA with the exact i.i.d. ``gaussian`` sampler;
* ``reference``: the reference code's scheme: full m×n std matrix, Gaussian noise added to the
  weights in place before the step and regenerated and subtracted after it.

Each step of another variant is paired with an adjacent LoRA step (alternating which comes first);
``ratio`` is the median of the paired flat/lora ratios. Peak resident memory of the training steps
of ``lora`` and ``flat`` is measured each in its own process, and the bf16
check runs Flat-LoRA steps on a bf16 copy of the same UNet and compares every base weight.
Noise is at full strength (constant schedule) from the first step: the worst case. The
transformers are built on the meta device and materialised in the benchmark's dtype on the target
device (no fp32 copy first: FLUX's 12 B parameters would not fit a CPU's memory); ``--depth N``
keeps the first N (FLUX: N double- and 2N single-stream) blocks at the real width, for CPUs. ``ratio`` is
reported against ``target_ratio`` (1.03 here, 1.10 for ``--mode trainer``); ``ops_per_step``
counts torch operator calls and Python calls into the core for one step of each variant.

    python -m flatlora_diffusion.bench --mode trainer --resolution 64 --steps 30 --json trainer.json
    python -m flatlora_diffusion.bench --mode noise --arch sd15    # pooled sampler: reuse, |ε| correlation
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from flatlora_diffusion.dreambooth.models import JOINT_ATTENTION, UNET_ATTENTION
from flatlora_diffusion.files import write_text
from flatlora_diffusion.flat_lora import (
    FlatLoraConfig,
    FlatLoraPerturber,
    PooledSampler,
    mix_seed,
    resolve_sampler,
    runs_of_equal,
)

TARGETS = list(UNET_ATTENTION)  # the trainer's default LoRA targets of each family
DIT_TARGETS = list(JOINT_ATTENTION)
VARIANTS = ("lora", "flat", "flat_gaussian", "reference")
TRAINER_TARGET = 1.10  # whole trainer step, Flat-LoRA over LoRA, at the toy/tiny scale (issue 10)
CORE_TARGET = 1.03  # UNet step of SD1.5 at 256 px on CPU


UNET_CONFIGS = {
    "sd15": {"cross_attention_dim": 768},
    "sdxl": {
        "block_out_channels": (320, 640, 1280), "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048,
        "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    },
}


# The transformers' `config.json` (SD3.5 Medium; FLUX.1-dev), and the text tokens their pipelines feed.
TRANSFORMER_CONFIGS = {
    "sd3": ("SD3Transformer2DModel", {
        "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
        "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096,
        "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 384,
        "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"}),
    "flux": ("FluxTransformer2DModel", {
        "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
        "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
        "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}),
}
TEXT_TOKENS = {"sd3": 77 + 77, "flux": 512}  # SD3: CLIP's 77 + T5's 77 (diffusers' script); FLUX: T5's 512
ARCHS = ("sd15", "sdxl", "sd3", "flux", "tiny")


def targets_of(arch: str) -> list[str]:
    """The LoRA targets of ``arch``'s denoiser."""
    return DIT_TARGETS if arch in TRANSFORMER_CONFIGS else TARGETS


def build_denoiser(arch: str, resolution: int, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   depth: int | None = None):
    """The denoiser of ``arch`` with random weights (seeded), and the inputs its forward needs."""
    if arch in TRANSFORMER_CONFIGS:
        return build_transformer(arch, resolution, dtype, device, depth)
    if depth is not None:
        raise ValueError("`--depth` applies to the transformers (`--arch sd3|flux`).")
    return build_unet(arch, resolution, dtype, device)


def build_transformer(arch: str, resolution: int, dtype: torch.dtype, device: str, depth: int | None = None):
    """SD3/FLUX transformer: built on the meta device, materialised in ``dtype`` on ``device``, N(0, 0.02) weights."""
    import diffusers

    class_name, config = TRANSFORMER_CONFIGS[arch]
    config = dict(config)
    if depth is not None:
        config["num_layers"] = depth
        if arch == "flux":
            config["num_single_layers"] = 2 * depth
        else:
            config["dual_attention_layers"] = tuple(i for i in config["dual_attention_layers"] if i < depth)
    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**config)
    model = model.to(dtype).to_empty(device=device).requires_grad_(False)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=gen)
        for buffer in model.buffers():  # SD3's positional table (FLUX computes RoPE on the fly)
            buffer.normal_(0.0, 0.02, generator=gen)
    like = {"dtype": dtype, "device": device}
    latent = resolution // 8
    text = torch.randn(1, TEXT_TOKENS[arch], config["joint_attention_dim"], **like)
    pooled = torch.randn(1, config["pooled_projection_dim"], **like)
    if arch == "sd3":
        inputs = {"hidden_states": torch.randn(1, 16, latent, latent, **like), "encoder_hidden_states": text,
                  "pooled_projections": pooled, "timestep": torch.tensor([500.0], device=device)}
    else:  # packed 2x2 latents with their position ids, as FluxPipeline
        from diffusers import FluxPipeline

        side = latent // 2
        inputs = {"hidden_states": torch.randn(1, side * side, 64, **like), "encoder_hidden_states": text,
                  "pooled_projections": pooled, "timestep": torch.tensor([0.5], device=device),
                  "img_ids": FluxPipeline._prepare_latent_image_ids(1, side, side, device, dtype),
                  "txt_ids": torch.zeros(TEXT_TOKENS[arch], 3, **like),
                  "guidance": torch.tensor([3.5], device=device)}
    return model, inputs


def build_unet(arch: str, resolution: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A UNet of ``arch`` with random weights (seeded), and the extra inputs its forward needs."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    latent = resolution // 8
    if arch in UNET_CONFIGS:
        unet = UNet2DConditionModel(sample_size=latent, **UNET_CONFIGS[arch])
    elif arch == "tiny":
        from flatlora_diffusion.tiny import build_tiny

        with tempfile.TemporaryDirectory() as tmp:
            path = build_tiny("sd", Path(tmp) / "sd")
            unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    else:
        raise ValueError(f"`--arch` must be one of {', '.join(ARCHS)}; got {arch!r}.")
    unet.to(device=device, dtype=dtype).requires_grad_(False)
    cfg = unet.config
    like = {"dtype": dtype, "device": device}
    inputs = {
        "sample": torch.randn(1, cfg.in_channels, latent, latent, **like),
        "timestep": torch.tensor([500], device=device),
        "encoder_hidden_states": torch.randn(1, 77, cfg.cross_attention_dim, **like),
    }
    if cfg.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, 1280, **like),
            "time_ids": torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], **like),
        }
    return unet, inputs


def add_lora(model, rank: int, targets: list[str] = TARGETS) -> list[torch.nn.Parameter]:
    """LoRA on the attention projections (fp32 parameters); returns the trainable parameters."""
    model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


class ReferencePerturbation:
    """The reference code's scheme, for comparison: noise added to W in place, subtracted after."""

    def __init__(self, unet, rho: float, seed: int = 0) -> None:
        self.layers = [m for m in unet.modules() if isinstance(m, LoraLayer)]
        self.rho, self.seed = rho, seed
        self._stds: list[torch.Tensor] = []

    def _noise(self, index: int, std: torch.Tensor, step: int) -> torch.Tensor:
        gen = torch.Generator(device=std.device).manual_seed(mix_seed(self.seed, step, index))
        return torch.normal(0.0, std, generator=gen)

    @torch.no_grad()
    def add(self, step: int) -> None:
        self._stds = []
        for index, layer in enumerate(self.layers):
            weight = layer.get_base_layer().weight
            merged = weight + layer.get_delta_weight("default")
            std = (self.rho * merged.norm(dim=1, keepdim=True) / weight.shape[1] ** 0.5).repeat(1, weight.shape[1])
            self._stds.append(std)
            weight.add_(self._noise(index, std, step))

    @torch.no_grad()
    def remove(self, step: int) -> None:
        for index, layer in enumerate(self.layers):
            layer.get_base_layer().weight.sub_(self._noise(index, self._stds[index], step))
        self._stds = []


class StepRunner:
    """One denoiser with LoRA, able to run a training step under each variant."""

    def __init__(self, arch: str, resolution: int, rank: int, rho: float, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", depth: int | None = None):
        self.model, self.inputs = build_denoiser(arch, resolution, dtype, device, depth)
        self.device = device
        self.params = add_lora(self.model, rank, targets_of(arch))
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.rho = rho
        self.reference = ReferencePerturbation(self.model, rho)
        self.perturbers: dict[str, FlatLoraPerturber] = {}
        self.step = 0

    def _train_step(self) -> None:
        out = self.model(**self.inputs).sample
        loss = torch.nn.functional.mse_loss(out.float(), torch.zeros_like(out, dtype=torch.float32))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, variant: str) -> float:
        """One timed training step of ``variant``, in seconds.

        Each Flat-LoRA variant has one perturber for the whole benchmark, as a run has one for the
        whole training (its noise pool and workspace are allocated once): it is attached before the
        clock starts and detached after it stops, so only ``set_step`` (the per-step noise draw)
        and the noisy forward and backward are timed.
        """
        perturber = self._attach(variant)
        self._sync()
        start = time.perf_counter()
        self._step(variant, perturber)
        self._sync()
        elapsed = time.perf_counter() - start
        if perturber is not None:
            perturber.detach()
        return elapsed

    def count(self, variant: str) -> dict[str, int]:
        """:func:`ops_per_step` of the part of one step of ``variant`` that :meth:`run` times."""
        perturber = self._attach(variant)
        counted = ops_per_step(functools.partial(self._step, variant, perturber))
        if perturber is not None:
            perturber.detach()
        return counted

    def _attach(self, variant: str) -> FlatLoraPerturber | None:
        if variant not in ("flat", "flat_gaussian"):
            return None
        perturber = self.perturbers.get(variant)
        if perturber is None:  # its constructor attaches it
            sampler = "auto" if variant == "flat" else "gaussian"  # the default: `pooled` on CPU
            perturber = self.perturbers[variant] = FlatLoraPerturber(
                self.model, FlatLoraConfig(rho=self.rho, schedule="constant", sampler=sampler))
        else:
            perturber.attach()
        return perturber

    def _step(self, variant: str, perturber: FlatLoraPerturber | None) -> None:
        if perturber is not None:
            perturber.set_step(self.step)
        if variant == "reference":
            self.reference.add(self.step)
        self._train_step()
        if variant == "reference":
            self.reference.remove(self.step)
        self.step += 1

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def time_variants(runner, steps: int, variants: tuple[str, ...]) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved timings: one warm-up step each, then ``steps`` rounds.

    In each round every variant other than ``lora`` is timed right next to a ``lora`` step of its
    own, LoRA first in even rounds and last in odd ones, so that drifts of the machine's speed
    cancel in the paired ratios. Returns the step times and, per variant, its paired ratios.
    """
    for variant in variants:
        runner.run(variant)
    times: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants if v != "lora"}
    for round_index in range(steps):
        for variant in ratios:
            order = ("lora", variant) if round_index % 2 == 0 else (variant, "lora")
            step = {name: runner.run(name) for name in order}
            for name in order:
                times[name].append(step[name])
            ratios[variant].append(step[variant] / step["lora"])
            print(f"  round {round_index + 1}/{steps} {variant:>13}: {step[variant]:.3f} s, "
                  f"lora {step['lora']:.3f} s, ratio {ratios[variant][-1]:.3f}", flush=True)
    return times, ratios


def peak_memory_mb(variant: str, args: argparse.Namespace) -> float:
    """Peak memory (CPU: resident set; CUDA: allocated) of a fresh process running ``variant`` only."""
    cmd = [sys.executable, "-m", "flatlora_diffusion.bench", "--arch", args.arch, "--resolution",
           str(args.resolution), "--rank", str(args.rank), "--rho", str(args.rho), "--device", args.device,
           *(["--depth", str(args.depth)] if args.depth else []), "--_peak-rss", variant]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def bf16_base_unchanged(args: argparse.Namespace) -> bool:
    """Flat-LoRA steps on a bf16 denoiser leave every base weight bit-identical."""
    runner = StepRunner(args.arch, min(args.resolution, 128), args.rank, args.rho, torch.bfloat16, args.device,
                        args.depth)
    before = {n: p.clone() for n, p in runner.model.named_parameters() if not p.requires_grad}
    for _ in range(2):
        runner.run("flat")
    return all(torch.equal(before[n], p) for n, p in runner.model.named_parameters() if not p.requires_grad)


def _rss_worker(args: argparse.Namespace) -> None:
    """Print the peak memory of training steps of one variant, model construction excluded.

    The warm-up step allocates the optimiser state; then the peak counter restarts (Linux
    ``clear_refs`` 5, or ``reset_peak_memory_stats`` on CUDA), so construction does not mask it.
    """
    runner = StepRunner(args.arch, args.resolution, args.rank, args.rho, args.dtype, args.device, args.depth)
    runner.run(args._peak_rss)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
    for _ in range(3):
        runner.run(args._peak_rss)
    if args.device == "cuda":
        print(torch.cuda.max_memory_allocated() / 2**20)
    else:
        status = Path("/proc/self/status").read_text().splitlines()
        print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024)  # kB


def target_shapes(arch: str) -> list[tuple[int, int]]:
    """Weight shape of each LoRA-targeted linear of ``arch``'s denoiser (built on the meta device: no memory)."""
    import diffusers

    if arch == "tiny":
        model, _ = build_unet("tiny", 64)
    else:
        class_name, config = TRANSFORMER_CONFIGS.get(arch, ("UNet2DConditionModel", UNET_CONFIGS.get(arch)))
        with torch.device("meta"):
            model = getattr(diffusers, class_name)(**config)
    return [tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.endswith(tuple(targets_of(arch)))]


def abs_corr_worst_shift(a: torch.Tensor, b: torch.Tensor) -> float:
    """max over shifts δ of corr(|a_k|, |b_(k+δ)|) over the overlapping k (FFT cross-correlation, float64).

    Shifts whose overlap is under a quarter of the shorter vector (or 1024) are left out, so that
    estimation noise stays small. Two windows of one pool that share values line up at one shift:
    there the correlation is the shared fraction of the overlap (1 for a copy).
    """
    a, b = a.abs().double().flatten(), b.abs().double().flatten()
    la, lb = a.numel(), b.numel()
    size = 1 << (la + lb).bit_length()
    cross = torch.fft.irfft(torch.fft.rfft(a, size).conj() * torch.fft.rfft(b, size), size)  # Σ_k a_k b_(k+δ)
    shifts = torch.arange(-la + 1, lb)
    cross = cross[shifts % size]
    lo, hi = (-shifts).clamp_min(0), torch.minimum(torch.full_like(shifts, la), lb - shifts)
    count = (hi - lo).double()

    def window_sums(x: torch.Tensor, start: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
        prefix = torch.cat([x.new_zeros(1), x.cumsum(0)])
        return prefix[stop] - prefix[start]

    sa, saa = window_sums(a, lo, hi), window_sums(a.square(), lo, hi)
    sb, sbb = window_sums(b, lo + shifts, hi + shifts), window_sums(b.square(), lo + shifts, hi + shifts)
    cov = cross - sa * sb / count
    var = (saa - sa.square() / count) * (sbb - sb.square() / count)
    corr = cov / var.clamp_min(1e-300).sqrt()
    return corr[count >= max(1024, min(la, lb) // 4)].max().item()


def sampler_dependence(shapes: list[tuple[int, int]], max_pairs: int = 100, seed: int = 0) -> dict:
    """How much the pooled sampler's layers of one draw depend on each other, for layers of ``shapes``
    laid out as the perturber lays them (same-shaped layers next to each other).

    ``reuse``: perturbed weights per pool value. ``abs_corr_worst_shift``: over ``max_pairs``
    random layer pairs, corr(|z_a|, |z_b|) at the shift where it is largest (row signs do not
    change |z|): mean, max, and the share of pairs above 0.5 (pairs that share a block of values).
    """
    sizes = [rows * cols for rows, cols in shapes]
    sampler = PooledSampler(sizes, runs=runs_of_equal(shapes))
    gen = torch.Generator().manual_seed(seed)
    keys = sampler.begin_draw(gen, seed, {torch.device("cpu")})
    noise = [sampler.noise(key, (1, size), torch.device("cpu"), torch.float32) for key, size in zip(keys, sizes, strict=True)]
    pairs = [(a, b) for a in range(len(sizes)) for b in range(a + 1, len(sizes))]
    chosen = torch.randperm(len(pairs), generator=gen)[:max_pairs].tolist()
    worst = [abs_corr_worst_shift(noise[pairs[i][0]], noise[pairs[i][1]]) for i in chosen]
    # The same statistic for independent noise: the estimation floor (a maximum over many shifts).
    floor = [abs_corr_worst_shift(torch.randn(sizes[pairs[i][0]], generator=gen),
                                  torch.randn(sizes[pairs[i][1]], generator=gen)) for i in chosen]
    return {"layers": len(sizes), "perturbed_weights": sum(sizes), "fresh_samples": sampler.fresh,
            "pool_values": sampler.pool_size, "blocks": sampler.blocks, "reuse": sampler.reuse,
            "pairs": len(worst), "abs_corr_worst_shift_mean": statistics.mean(worst),
            "abs_corr_worst_shift_max": max(worst), "pairs_above_0.5": sum(w > 0.5 for w in worst) / len(worst),
            "independent_floor_mean": statistics.mean(floor), "independent_floor_max": max(floor)}


def trainer_benchmark(args: argparse.Namespace) -> dict:
    """``--mode trainer``: a whole DreamBooth trainer step -- data loading, VAE encoding, cached text
    embeddings, UNet forward/backward, clipping, AdamW, lr step -- with plain LoRA and Flat-LoRA.

    Two `DreamBoothTrainer`s on the same model and data (the bundled demo subject) take steps in
    alternating order; Flat-LoRA runs at full strength (constant schedule) from the first step.
    """
    from flatlora_diffusion.dreambooth.config import load_config
    from flatlora_diffusion.dreambooth.data import DEMO_INSTANCE_PROMPT, demo_subject_dir
    from flatlora_diffusion.dreambooth.trainer import DreamBoothTrainer

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("`--device cuda` needs a CUDA build of torch and a GPU; none is available here.")
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant, rho in (("lora", 0.0), ("flat", args.rho)):
            config = load_config([
                "--pretrained_model_name_or_path", args.model, "--instance_data_dir", str(demo_subject_dir()),
                "--instance_prompt", DEMO_INSTANCE_PROMPT, "--output_dir", str(Path(tmp) / variant),
                "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
                "--rank", str(args.rank), "--rho", str(rho), "--flat_schedule", "constant", "--seed", "0",
                "--max_train_steps", str(10 * args.steps + 10), "--report_to", "none", "--random_flip",
                "--mixed_precision", args.mixed_precision, "--cache_latents",
            ])
            trainers[variant] = trainer = DreamBoothTrainer(config)
            trainer.setup()
            trainer.batches = _endless(trainer)
        runner = _TrainerSteps(trainers, args.device)
        for _ in range(3):  # CPU kernels warm up over the first steps (oneDNN primitive caches)
            for variant in trainers:
                runner.run(variant)
        times, ratios = time_variants(runner, args.steps, tuple(trainers))
        ops = {variant: ops_per_step(functools.partial(runner.run, variant)) for variant in trainers}
    flat = trainers["flat"]
    layers = len(flat.perturbers[flat.denoiser].layers) if flat.perturbers else 0
    result = {
        "mode": "trainer", "model": args.model, "resolution": args.resolution, "batch_size": args.batch_size,
        "rank": args.rank, "rho": args.rho, "mixed_precision": args.mixed_precision, "steps": args.steps,
        "lora_layers": layers, "flat_sampler": flat.perturbers[flat.denoiser].sampler_name,
        "lora_step_s": statistics.median(times["lora"]), "flat_step_s": statistics.median(times["flat"]),
        "ratio": statistics.median(ratios["flat"]), "target_ratio": TRAINER_TARGET,
        "within_target": statistics.median(ratios["flat"]) <= TRAINER_TARGET,
        "ops_per_step": ops, "times_s": times,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu"},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "times_s"}, indent=2))
    return result


def ops_per_step(run_step: Callable[[], object]) -> dict[str, int]:
    """Torch operator calls (forward and backward, as dispatched) and Python calls into the Flat-LoRA
    core during one ``run_step()``: a deterministic measure of the per-step overhead (no timing)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from flatlora_diffusion import flat_lora

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    calls = 0
    core = flat_lora.__file__

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call" and frame.f_code.co_filename == core:
            calls += 1

    sys.setprofile(profile)
    try:
        with Count():
            run_step()
    finally:
        sys.setprofile(None)
    return {"torch_ops": Count.ops, "core_python_calls": calls}


def _endless(trainer):
    """The trainer's batches, epoch after epoch."""
    epoch = 0
    while True:
        trainer.batch_sampler.set_epoch(epoch)
        yield from trainer.dataloader
        epoch += 1


class _TrainerSteps:
    """`time_variants`' runner interface over trainers: ``run(variant)`` times one optimiser step."""

    def __init__(self, trainers: dict, device: str) -> None:
        self.trainers, self.device = trainers, device

    def run(self, variant: str) -> float:
        trainer = self.trainers[variant]
        self._sync()
        start = time.perf_counter()
        trainer.train_step(next(trainer.batches))
        self._sync()
        return time.perf_counter() - start

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", default="core", choices=["core", "trainer", "noise"],
                        help="`core`: the UNet step variants below; `trainer`: a whole DreamBooth trainer step, "
                             "LoRA vs Flat-LoRA (uses --model, --resolution, --batch_size, --rank, --rho, --steps); "
                             "`noise`: how much the pooled sampler's layers depend on each other, for --arch")
    parser.add_argument("--model", default="tiny:sd", help="trainer mode: base pipeline (hub id, folder or tiny:sd)")
    parser.add_argument("--batch_size", type=int, default=1, help="trainer mode: images per step")
    parser.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"], help="trainer mode")
    parser.add_argument("--arch", default="sd15", choices=ARCHS,
                        help="denoiser: SD1.5 / SDXL UNet, SD3.5 Medium / FLUX.1-dev transformer, or tiny:sd's UNet")
    parser.add_argument("--depth", type=int, help="sd3/flux: keep the first N blocks (FLUX: N double, 2N single), "
                                                  "real width; for CPUs, where FLUX's 12 B parameters do not fit")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                        help="weights of the core benchmark (default: fp32 for UNets, bf16 for sd3/flux)")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels (latent = /8)")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds (each runs every variant once)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-RSS processes")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--_peak-rss", dest="_peak_rss", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resolution % 8:
        parser.error(f"`--resolution` must be a multiple of 8, got {args.resolution}.")
    if args.arch in TRANSFORMER_CONFIGS and args.resolution % 16:
        parser.error(f"`--resolution` must be a multiple of 16 for `--arch {args.arch}` (2x2 latent patches).")
    if args.depth is not None and (args.arch not in TRANSFORMER_CONFIGS or args.depth < 1):
        parser.error("`--depth` must be a positive number of blocks, with `--arch sd3` or `flux`.")
    default_dtype = "bf16" if args.arch in TRANSFORMER_CONFIGS else "fp32"
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or default_dtype]
    variants = tuple(v for v in args.variants.split(",") if v)
    if "lora" not in variants or set(variants) - set(VARIANTS):
        parser.error(f"`--variants` must include `lora` and only name {', '.join(VARIANTS)}; got {args.variants!r}.")
    if args._peak_rss:
        _rss_worker(args)
        return {}
    if args.mode == "noise":
        result = {"arch": args.arch, **sampler_dependence(target_shapes(args.arch))}
        print(json.dumps(result, indent=2))
        if args.json:
            _write_json(args.json, result)
        return result
    if args.mode == "trainer":
        result = trainer_benchmark(args)
        if args.json:
            _write_json(args.json, result)
        return result

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("`--device cuda` needs a CUDA build of torch and a GPU; none is available here.")
    print(f"Building {args.arch} denoiser at {args.resolution}px, LoRA r={args.rank} on "
          f"{','.join(targets_of(args.arch))} ...", flush=True)
    runner = StepRunner(args.arch, args.resolution, args.rank, args.rho, args.dtype, args.device, args.depth)
    n_layers = len(runner.reference.layers)
    n_weights = sum(m.get_base_layer().weight.numel() for m in runner.reference.layers)
    times, ratios = time_variants(runner, args.steps, variants)
    ops = {v: runner.count(v) for v in variants if v != "reference"}
    del runner
    ratio = statistics.median(ratios["flat"]) if "flat" in ratios else None
    result: dict = {
        "arch": args.arch, "depth": args.depth, "dtype": str(args.dtype).removeprefix("torch."),
        "resolution": args.resolution, "rank": args.rank, "rho": args.rho, "steps": args.steps, "lora_layers": n_layers, "perturbed_weights": n_weights, "flat_sampler": resolve_sampler("auto", {
            torch.device(args.device)}),
        **{f"{v}_step_s": statistics.median(times[v]) for v in variants},
        "ratio": ratio, "target_ratio": CORE_TARGET, "within_target": None if ratio is None else ratio <= CORE_TARGET,
        **{f"{v}_ratio": statistics.median(ratios[v]) for v in ratios if v != "flat"},
        "paired_ratios": ratios, "ops_per_step": ops,
        "times_s": times,
    }
    if not args.no_memory:
        peak = {v: peak_memory_mb(v, args) for v in ("lora", "flat")}
        result.update(memory_measure="cuda_max_allocated" if args.device == "cuda" else "peak_rss",
                      lora_peak_mb=peak["lora"], flat_peak_mb=peak["flat"], peak_rss_ratio=peak["flat"] / peak["lora"])
    result["base_bit_identical"] = bf16_base_unchanged(args)
    result["machine"] = {
        "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
    }
    summary = {k: v for k, v in result.items() if k != "times_s"}
    print(json.dumps(summary, indent=2))
    if args.json:
        _write_json(args.json, result)
    return result



def _write_json(path: Path, result: dict) -> None:
    """Write ``result`` to ``path`` through a temporary file, so a crash never leaves half a file."""
    write_text(path, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
