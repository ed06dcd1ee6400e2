"""Pretraining the toy world's models, seeded and resumable:

    python -m flatlora_diffusion.toyworld pretrain OUT_DIR [--minutes 90] [--device cpu|cuda] [--seed 0]

Stages, in order (each a plain training loop over a pool of renders):

1. ``oracle``: the judge (`toyworld.oracle`), then its held-out accuracy on clean renders;
2. ``vae``: `AutoencoderKL`, reconstruction + a small KL term; `scaling_factor` = 1 / latent std;
3. ``clip``: `CLIPModel`, contrastive on (render, caption) with every caption consistent with an
   image counted as a positive (captions name only some attributes);
4. ``vit``: the DINO stand-in, a `ViTModel` trained to read the object's class, colours, pattern and
   mark from its CLS feature (object-centric, as DINO features are for subject fidelity);
5. ``unet``: the SD UNet on the frozen VAE latents and frozen CLIP text encoder (the SD 1.x recipe):
   v-prediction, min-SNR-5 weighting, 10% empty captions for classifier-free guidance, EMA 0.999;
6. ``unet_continued`` (only with ``--unet_extra_steps N``): N more UNet steps, the same loss, from
   the ``unet`` stage's EMA weights with a fresh optimiser and its own warm-up and cosine schedule.
   It spends compute beyond ``--minutes``; because it starts from the finished ``unet`` stage, it can
   extend a finished run (same command plus the flag) and gives what a run from scratch would.

The step counts are a fixed function of ``--minutes`` (`RATES` x `SHARES`, rough steps per minute on
2 CPU cores), so the same command trains the same models on any machine. Each stage checkpoints its full state
(weights, EMA, optimiser, step) atomically every two minutes; every batch, noise and caption is drawn
from a generator seeded by (seed, stage, step), so a killed run resumed with the same command
continues exactly where it stopped. The result, in ``OUT_DIR``:

    sd/       StableDiffusionPipeline (vae, unet, text_encoder, tokenizer, scheduler)   -> toy:sd
    clip/     CLIPModel + CLIPProcessor                                                  -> toy:clip
    vit/      ViTModel + ViTImageProcessor                                               -> toy:vit
    oracle/   the judge                                                                  -> toy:oracle
    MANIFEST.json  the command, settings, step counts, measured quality and sha256 of every file
    state/    checkpoints and snapshots (not shipped)
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flatlora_diffusion.files import (
    atomic_dir,
    atomic_open,
    checksums,
    other_run_message,
    recorded_run,
    write_text,
)
from flatlora_diffusion.schedules import warmup_cosine
from flatlora_diffusion.toyworld import architectures as arch
from flatlora_diffusion.toyworld.data import ScenePool, augment, scene_mix
from flatlora_diffusion.toyworld.oracle import HEADS, Oracle
from flatlora_diffusion.toyworld.text import build_tokenizer
from flatlora_diffusion.toyworld.world import COLOURS, MARKS, OBJECTS, PATTERNS, SUBJECT_PATTERNS, caption

STAGES = ("oracle", "vae", "clip", "vit", "unet", "unet_continued")
# Rough optimiser steps per minute on 2 CPU cores, and each stage's share of the budget:
# `steps = share * minutes * rate`. Only the product matters: it fixes the step counts.
RATES = {"oracle": 250.0, "vae": 90.0, "clip": 200.0, "vit": 330.0, "unet": 122.0}
SHARES = {"oracle": 0.05, "vae": 0.44, "clip": 0.04, "vit": 0.03, "unet": 0.5}
BATCH = {"oracle": 64, "vae": 16, "clip": 128, "vit": 64, "unet": 64}
LR = {"oracle": 2e-3, "vae": 1e-3, "clip": 1e-3, "vit": 1e-3, "unet": 5e-4}
POOL = {"oracle": 24_000, "vae": 24_000, "clip": 24_000, "vit": 24_000, "unet": 40_000}
CHECKPOINT_SECONDS = 120
HELD_OUT = 3000  # fresh renders the oracle's accuracy is measured on
SNAPSHOTS = 8  # EMA UNet snapshots along training, for the accuracy-against-steps curve
VIT_HEADS = {"object": OBJECTS, "colour": tuple(COLOURS), "pattern": PATTERNS + SUBJECT_PATTERNS,
             "colour2": ("tint", *COLOURS), "mark": MARKS}


class PretrainError(RuntimeError):
    """The output folder or the settings do not allow the run; the message says what to do."""


@dataclass(frozen=True)
class PretrainSettings:
    """What determines the result (the device and the folder do not)."""

    minutes: float = 90.0
    """Budget on 2 CPU cores; fixes the step count of every stage but `unet_continued`."""
    seed: int = 0
    """Seeds every initialisation, batch, noise draw and caption."""
    unet_extra_steps: int = 0
    """Steps of the `unet_continued` stage (0: no such stage)."""

    def steps(self, stage: str) -> int:
        """The stage's number of optimiser steps: a fixed function of `minutes` (or `unet_extra_steps`)."""
        if stage == "unet_continued":
            return self.unet_extra_steps
        return max(20, int(SHARES[stage] * self.minutes * RATES[stage]))

    def stages(self) -> tuple[str, ...]:
        """The stages this run has, in order."""
        return tuple(stage for stage in STAGES if self.steps(stage) > 0)


def _generator(settings: PretrainSettings, stage: str, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(settings.seed * 1_000_003 + STAGES.index(stage) * 100_000_007 + step)


def _save_state(path: Path, state: dict) -> None:
    with atomic_open(path, "wb") as handle:
        torch.save(state, handle)


@dataclass
class Stage:
    """One training loop: `step_fn(step, generator) -> loss` does forward and backward."""

    name: str
    modules: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    step_fn: Callable[[int, torch.Generator], torch.Tensor]
    ema: dict[str, torch.Tensor] | None = None  # EMA of modules["model"], when used
    on_snapshot: Callable[[int], None] | None = None


def run_stage(stage: Stage, settings: PretrainSettings, state_dir: Path, *, ema_decay: float = 0.999) -> list[dict]:
    """Train `stage` to its step count, resuming from its checkpoint; return its loss history."""
    total = settings.steps(stage.name)
    path = state_dir / f"{stage.name}.pt"
    start, history = 0, []
    if path.is_file():
        state = torch.load(path, map_location="cpu", weights_only=False)
        for key, module in stage.modules.items():
            module.load_state_dict(state["modules"][key])
        stage.optimizer.load_state_dict(state["optimizer"])
        if stage.ema is not None:
            stage.ema.update(state["ema"])
        start, history = state["step"], state["history"]
    model = stage.modules["model"]
    params = [p for p in model.parameters() if p.requires_grad]
    base_lrs = [group.get("initial_lr", group["lr"]) for group in stage.optimizer.param_groups]
    for group, lr in zip(stage.optimizer.param_groups, base_lrs, strict=True):
        group["initial_lr"] = lr
    snapshot_every = max(1, total // SNAPSHOTS)
    running, last_save = [], time.monotonic()
    bar = tqdm(total=total, initial=start, desc=f"pretrain {stage.name}", unit="step", dynamic_ncols=True)
    for step in range(start, total):
        for group in stage.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * warmup_cosine(step, total)
        model.train()
        loss = stage.step_fn(step, _generator(settings, stage.name, step))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        stage.optimizer.step()
        stage.optimizer.zero_grad(set_to_none=True)
        if stage.ema is not None:
            decay = min(ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for name, param in model.named_parameters():
                    stage.ema[name].lerp_(param.detach(), 1 - decay)
        if not math.isfinite(float(loss)):
            raise PretrainError(f"Stage `{stage.name}`: the loss became {float(loss)} at step {step}; the run "
                                "cannot continue (its last checkpoint is intact).")
        running.append(float(loss))
        if (step + 1) % 50 == 0 or step + 1 == total:
            history.append({"step": step + 1, "loss": sum(running) / len(running)})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            running = []
        bar.update(1)
        done = step + 1 == total
        if stage.on_snapshot is not None and ((step + 1) % snapshot_every == 0 or done):
            stage.on_snapshot(step + 1)
        if done or time.monotonic() - last_save > CHECKPOINT_SECONDS:
            _save_state(path, {"step": step + 1, "history": history, "optimizer": stage.optimizer.state_dict(),
                               "modules": {k: m.state_dict() for k, m in stage.modules.items()},
                               "ema": stage.ema})
            last_save = time.monotonic()
    bar.close()
    return history


def _atomic_save_pretrained(objects, out: Path) -> None:
    """`save_pretrained` every object into a temporary sibling, then rename it to `out`."""
    with atomic_dir(out) as tmp:
        for obj in objects:
            obj.save_pretrained(tmp)


def _cross_entropy_heads(logits: dict, labels: dict) -> torch.Tensor:
    return sum(F.cross_entropy(logits[name], labels[name]) for name in labels) / len(labels)


# ---------------------------------------------------------------------------------------------
# The stages


def _oracle_stage(settings: PretrainSettings, work: Path, device: torch.device) -> dict:
    pool = ScenePool.render(scene_mix(POOL["oracle"], settings.seed + 11, distractors=0.2, subjects=0.3))
    model = Oracle().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR["oracle"], weight_decay=0.01)

    def step_fn(step, g):
        index = torch.randint(len(pool.scenes), (BATCH["oracle"],), generator=g)
        images = augment(pool.images(index), g).to(device)
        loss = _cross_entropy_heads(model(images), {k: v.to(device) for k, v in pool.labels(index).items()})
        loss.backward()
        return loss.detach()

    history = run_stage(Stage("oracle", {"model": model}, optimizer, step_fn), settings, work)
    model = model.cpu().eval()
    # Held-out accuracy on clean renders of a fresh seed (pretraining scenes, distractors, subjects).
    held_out = ScenePool.render(scene_mix(HELD_OUT, settings.seed + 999, distractors=0.2, subjects=0.3))
    predictions = model.predict(held_out.images(torch.arange(HELD_OUT)))
    truth = held_out.labels(torch.arange(HELD_OUT))
    accuracy = {name: sum(options[t] == p for t, p in zip(truth[name].tolist(), predictions[name], strict=True))
                / HELD_OUT for name, options in HEADS.items()}
    model.save(work / "oracle")
    return {"history": history, "held_out_accuracy": accuracy}


def _vae_stage(settings: PretrainSettings, work: Path, device: torch.device) -> dict:
    pool = ScenePool.render(scene_mix(POOL["vae"], settings.seed + 12, distractors=0.2))
    vae = arch.build_vae().to(device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=LR["vae"], weight_decay=0.0)

    def step_fn(step, g):
        index = torch.randint(len(pool.scenes), (BATCH["vae"],), generator=g)
        x = (pool.images(index) * 2 - 1).to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g).to(device)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        return loss.detach()

    history = run_stage(Stage("vae", {"model": vae}, optimizer, step_fn), settings, work)
    vae = vae.cpu().eval()
    with torch.no_grad():
        count = min(1024, len(pool.scenes))
        sample = (pool.images(torch.arange(count)) * 2 - 1)
        latents = torch.cat([vae.encode(sample[i:i + 128]).latent_dist.mean for i in range(0, count, 128)])
        recon = torch.cat([vae.decode(latents[i:i + 128]).sample for i in range(0, count, 128)])
    vae.register_to_config(scaling_factor=round(1.0 / float(latents.std()), 5))
    _atomic_save_pretrained([vae], work / "vae")
    psnr = float(-10 * torch.log10(F.mse_loss((recon.clamp(-1, 1) + 1) / 2, (sample + 1) / 2)))
    return {"history": history, "scaling_factor": vae.config.scaling_factor, "psnr_db": round(psnr, 2)}


def _consistent(scene, words: set[str]) -> bool:
    """Whether a caption naming `words` describes `scene` (every attribute it names matches)."""
    named = [w for w in words if w in COLOURS or w in OBJECTS or w in PATTERNS]
    return all(w in (scene.colour, scene.object, scene.pattern) for w in named)


def _clip_stage(settings: PretrainSettings, work: Path, device: torch.device) -> dict:
    from flatlora_diffusion.toyworld.world import scene_of_prompt

    pool = ScenePool.render(scene_mix(POOL["clip"], settings.seed + 13))
    tokenizer = build_tokenizer()
    model = arch.build_clip(tokenizer).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR["clip"], weight_decay=0.05)
    mean = torch.tensor(arch.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(arch.CLIP_STD).view(1, 3, 1, 1)

    def step_fn(step, g):
        index = torch.randint(len(pool.scenes), (BATCH["clip"],), generator=g)
        scenes = [pool.scenes[i] for i in index.tolist()]
        captions = [caption(s, g, drop=0.25) for s in scenes]
        images = ((augment(pool.images(index), g) - mean) / std).to(device)
        # Padding to the longest caption changes nothing: the causal mask keeps padding out of the EOS state.
        ids = tokenizer(captions, padding="longest", truncation=True, return_tensors="pt").input_ids.to(device)
        out = model(input_ids=ids, pixel_values=images)
        targets = torch.tensor([[float(_consistent(s, set(c.split())) and scene_of_prompt(c) in (None, s.scene))
                                 for c in captions] for s in scenes], device=device)
        logits = out.logits_per_image
        loss_i = -(targets / targets.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
        loss_t = -(targets.T / targets.T.sum(1, keepdim=True) * logits.T.log_softmax(1)).sum(1).mean()
        loss = (loss_i + loss_t) / 2
        loss.backward()
        return loss.detach()

    history = run_stage(Stage("clip", {"model": model}, optimizer, step_fn), settings, work)
    _atomic_save_pretrained([model.cpu().eval(), arch.clip_processor(tokenizer)], work / "clip")
    return {"history": history}


def _vit_stage(settings: PretrainSettings, work: Path, device: torch.device) -> dict:
    pool = ScenePool.render(scene_mix(POOL["vit"], settings.seed + 14, distractors=0.4))
    model = arch.build_vit().to(device)
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(64, len(v)) for k, v in VIT_HEADS.items()}).to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=LR["vit"], weight_decay=0.05)
    mean = torch.tensor(arch.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(arch.IMAGENET_STD).view(1, 3, 1, 1)

    def step_fn(step, g):
        index = torch.randint(len(pool.scenes), (BATCH["vit"],), generator=g)
        images = ((augment(pool.images(index), g) - mean) / std).to(device)
        cls = model(pixel_values=images).last_hidden_state[:, 0]
        labels = {}
        for name, options in VIT_HEADS.items():
            values = [(pool.scenes[i].colour2 or "tint") if name == "colour2" else getattr(pool.scenes[i], name)
                      for i in index.tolist()]
            labels[name] = torch.tensor([options.index(v) for v in values], device=device)
        loss = _cross_entropy_heads({k: head(cls) for k, head in heads.items()}, labels)
        loss.backward()
        return loss.detach()

    history = run_stage(Stage("vit", {"model": model, "heads": heads}, optimizer, step_fn), settings, work)
    _atomic_save_pretrained([model.cpu().eval(), arch.vit_processor()], work / "vit")
    return {"history": history}


def _unet_stage(settings: PretrainSettings, work: Path, device: torch.device, name: str = "unet") -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from safetensors.torch import save
    from transformers import CLIPTextModel

    tokenizer = build_tokenizer()
    vae = AutoencoderKL.from_pretrained(work / "vae").eval()
    text_encoder = CLIPTextModel.from_pretrained(work / "clip").to(device).eval()
    pool = scene_mix(POOL["unet"], settings.seed + 15)
    cache = work / "unet_latents.pt"
    if cache.is_file():
        means, stds = torch.load(cache).values()
    else:
        with torch.no_grad():
            means, stds = [], []
            for start in tqdm(range(0, len(pool), 256), desc="encode latents", unit="batch", dynamic_ncols=True):
                chunk = ScenePool.render(pool[start:start + 256])
                posterior = vae.encode(chunk.images(torch.arange(len(chunk.scenes))) * 2 - 1).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
        means, stds = torch.cat(means), torch.cat(stds)
        _save_state(cache, {"means": means, "stds": stds})
    scaling = vae.config.scaling_factor
    continued = name == "unet_continued"
    unet = (UNet2DConditionModel.from_pretrained(work / "unet") if continued else arch.build_unet()).to(device)
    first_step = settings.steps("unet") if continued else 0  # snapshots are named by the total UNet step
    ema = {key: param.detach().clone() for key, param in unet.named_parameters()}
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR["unet"], weight_decay=0.01)
    scheduler = DDPMScheduler(**arch.BETAS, prediction_type="v_prediction")
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    weights = torch.clamp(snr, max=5.0) / (snr + 1)  # min-SNR-5 for v-prediction
    snapshots = work / "unet_snapshots"

    def step_fn(step, g):
        index = torch.randint(len(pool), (BATCH["unet"],), generator=g)
        latents = (means[index] + stds[index] * torch.randn(means[index].shape, generator=g)) * scaling
        captions = [caption(pool[i], g, drop=0.2) if float(torch.rand((), generator=g)) >= 0.1 else ""
                    for i in index.tolist()]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=g)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        with torch.no_grad():
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            context = text_encoder(ids).last_hidden_state
        pred = unet(noisy.to(device), t.to(device), context).sample
        loss = (weights[t].to(device) * F.mse_loss(pred, target.to(device), reduction="none").mean(dim=(1, 2, 3))).mean()
        loss.backward()
        return loss.detach()

    def on_snapshot(step: int) -> None:
        snapshots.mkdir(parents=True, exist_ok=True)
        with atomic_open(snapshots / f"ema-{first_step + step:06d}.safetensors", "wb") as handle:
            handle.write(save({k: v.contiguous() for k, v in ema.items()}))

    history = run_stage(Stage(name, {"model": unet}, optimizer, step_fn, ema=ema, on_snapshot=on_snapshot),
                        settings, work)
    unet = unet.cpu()
    unet.load_state_dict({**unet.state_dict(), **ema})
    _atomic_save_pretrained([unet.eval()], work / name)
    return {"history": history}


STAGE_FUNCTIONS = {"oracle": _oracle_stage, "vae": _vae_stage, "clip": _clip_stage, "vit": _vit_stage,
                   "unet": _unet_stage, "unet_continued": functools.partial(_unet_stage, name="unet_continued")}
NEEDS = {"unet": ("vae", "clip"), "unet_continued": ("unet",)}


# ---------------------------------------------------------------------------------------------
# The run: folder checks, stages, assembly


def _check_folder(out: Path, settings: PretrainSettings, resume: bool, overwrite: bool) -> PretrainSettings:
    recorded = recorded_run(out, resume=resume, overwrite=overwrite, error=PretrainError)
    if recorded is None:
        return settings
    previous = PretrainSettings(**{"unet_extra_steps": 0, **recorded})
    if previous == settings or resume:
        return previous
    extends = (previous.unet_extra_steps == 0 and replace(previous, unet_extra_steps=settings.unet_extra_steps)
               == settings and not (out / "state" / "unet_continued.pt").exists())
    if extends:
        print(f"[pretrain] extending the run in {out} with {settings.unet_extra_steps} more UNet steps",
              file=sys.stderr)
        return settings
    raise PretrainError(other_run_message(out, asdict(previous), asdict(settings)))


def pretrain(out_dir: str | Path, settings: PretrainSettings = PretrainSettings(), *, device: str = "cpu",
             resume: bool = False, overwrite: bool = False, stages: tuple[str, ...] | None = None,
             threads: int = 1) -> Path:
    """Run (or resume) `stages` (default: all the run has) into `out_dir`; then assemble the toy models.

    Stages are independent but for `unet`, which needs `vae` and `clip`, and `unet_continued`, which
    needs `unet`: two processes may run disjoint `stages` into the same folder at once.
    """
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    out = Path(out_dir)
    settings = _check_folder(out, settings, resume, overwrite)
    work = out / "state"
    work.mkdir(parents=True, exist_ok=True)
    # Thread counts change float rounding, so they belong to the command that reproduces the weights.
    command = " ".join(["python -m flatlora_diffusion.toyworld pretrain", str(out_dir), f"--minutes {settings.minutes:g}",
                        f"--seed {settings.seed}", *([f"--threads {threads}"] if threads != 1 else []),
                        *([f"--unet_extra_steps {settings.unet_extra_steps}"] if settings.unet_extra_steps else [])])
    write_text(work / "run.json", json.dumps({"settings": asdict(settings), "command": command}, indent=2) + "\n")
    torch_device = torch.device(device)
    started = time.monotonic()
    for stage in stages or settings.stages():
        report_path = work / f"{stage}.json"
        if report_path.is_file() or settings.steps(stage) == 0:
            continue
        needed = NEEDS.get(stage, ())
        if not all((work / f"{name}.json").is_file() for name in needed):
            names = " and ".join(f"`{name}`" for name in needed)
            raise PretrainError(f"Stage `{stage}` needs the {names} stage{'s' if len(needed) > 1 else ''}: "
                                "run them first (drop `--stages`).")
        print(f"[pretrain] stage {stage}: {settings.steps(stage)} steps", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        torch.manual_seed(settings.seed * 1_000_003 + STAGES.index(stage))  # weight initialisation
        result = {**STAGE_FUNCTIONS[stage](settings, work, torch_device), "steps": settings.steps(stage),
                  "seconds": round(time.monotonic() - t0, 1), "threads": torch.get_num_threads(),
                  "device": str(torch_device)}
        write_text(report_path, json.dumps(result, indent=1) + "\n")
        (work / f"{stage}.pt").unlink(missing_ok=True)
    if not all((work / f"{stage}.json").is_file() for stage in settings.stages()):
        print("[pretrain] stages done; the models are assembled once every stage has run", file=sys.stderr)
        return out
    report = {stage: json.loads((work / f"{stage}.json").read_text()) for stage in settings.stages()}
    unet_dir = work / settings.stages()[-1]  # `unet_continued` when the run has it

    tokenizer = build_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(work / "vae"), text_encoder=CLIPTextModel.from_pretrained(work / "clip"),
        tokenizer=tokenizer, unet=UNet2DConditionModel.from_pretrained(unet_dir), scheduler=arch.sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    _atomic_save_pretrained([pipe], out / "sd")
    for name in ("clip", "vit", "oracle"):
        with atomic_dir(out / name) as tmp:
            shutil.copytree(work / name, tmp, dirs_exist_ok=True)
    manifest = {"command": command, "settings": asdict(settings),
                "steps": {stage: settings.steps(stage) for stage in settings.stages()},
                "results": {stage: {k: v for k, v in report[stage].items() if k != "history"}
                            for stage in settings.stages()},
                "versions": _versions(), "sha256": checksums(out, ("sd", "clip", "vit", "oracle"))}
    write_text(out / "MANIFEST.json", json.dumps(manifest, indent=2) + "\n")
    print(f"[pretrain] done in {time.monotonic() - started:.0f} s this session; models in {out}", file=sys.stderr)
    return out


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}
