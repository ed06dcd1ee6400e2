"""Shared pytest fixtures: tiny randomly initialised models, built once per test session."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from flatlora_diffusion.tiny import build_tiny


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 1.x-style pipeline folder (epsilon prediction, 64 px native)."""
    return build_tiny("sd", tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture(scope="session")
def tiny_sd_v_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD 2.x-style pipeline folder (v-prediction)."""
    return build_tiny("sd", tmp_path_factory.mktemp("tiny") / "sd_v", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SDXL pipeline folder (two text encoders, 64 px native)."""
    return build_tiny("sdxl", tmp_path_factory.mktemp("tiny") / "sdxl")


@pytest.fixture(scope="session")
def tiny_sd3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SD3 pipeline folder (two CLIP encoders + T5, MM-DiT transformer, 16-channel VAE, 64 px native)."""
    return build_tiny("sd3", tmp_path_factory.mktemp("tiny") / "sd3")


@pytest.fixture(scope="session")
def tiny_flux_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FLUX.1-dev-style pipeline folder (CLIP + T5, transformer with a guidance embedding)."""
    return build_tiny("flux", tmp_path_factory.mktemp("tiny") / "flux")


@pytest.fixture(scope="session")
def tiny_clip_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`CLIPModel` + `CLIPProcessor` folder (224 px, patch 32)."""
    return build_tiny("clip", tmp_path_factory.mktemp("tiny") / "clip")


@pytest.fixture(scope="session")
def tiny_dino_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DINO-style `ViTModel` + `ViTImageProcessor` folder (224 px, patch 16)."""
    return build_tiny("dino", tmp_path_factory.mktemp("tiny") / "dino")


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`LlamaForCausalLM` + byte-level fast tokenizer folder."""
    return build_tiny("llama", tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def dreambench_dir() -> Path:
    """The DreamBench dataset (`prompts_and_classes.txt`, `images/<subject>/NN.jpg`) beside the repository."""
    path = Path(__file__).resolve().parents[2] / "shared/data/dreambench"
    if not (path / "prompts_and_classes.txt").is_file():
        pytest.skip(f"DreamBench dataset not found at `{path}` (expected `../shared/data/dreambench`).")
    return path


def add_random_lora(pipe, *, rank: int = 4, alpha: int = 8, dora: bool = False, text_encoders: bool = True,
                    seed: int = 0) -> dict:
    """Add a LoRA adapter `default` with random A and B to the pipeline's denoiser (and CLIP text encoders).

    peft's `gaussian` init leaves B = 0 (a no-op adapter), so B is redrawn too. Text encoders get
    theirs through `peft.inject_adapter_in_model`: transformers 5's `add_adapter` demands peft >= 0.22.
    Returns the text encoders that got one, by pipeline component name.
    """
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from flatlora_diffusion.adapters import denoiser_of

    _, denoiser = denoiser_of(pipe)
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, use_dora=dora, init_lora_weights="gaussian",
                                    target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    encoders = {}
    if text_encoders:
        for name in ("text_encoder", "text_encoder_2"):
            if isinstance(getattr(pipe, name, None), (CLIPTextModel, CLIPTextModelWithProjection)):  # not T5
                config = LoraConfig(r=2, lora_alpha=4, init_lora_weights="gaussian",
                                    target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
                encoders[name] = inject_adapter_in_model(config, getattr(pipe, name), adapter_name="default")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for model in (denoiser, *encoders.values()):
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
    return encoders


def save_random_adapter(base: Path, out_dir: Path, *, kohya: bool = False, **lora) -> Path:
    """Load the tiny pipeline at `base`, add a random LoRA, save it as a trainer would; returns `out_dir`."""
    from flatlora_diffusion.adapters import denoiser_of, save_adapter
    from flatlora_diffusion.flat_lora import FlatLoraConfig
    from flatlora_diffusion.sampling import load_pipeline

    pipe = load_pipeline(base)
    encoders = add_random_lora(pipe, **lora)
    save_adapter(out_dir, pipeline_class=type(pipe), denoiser=denoiser_of(pipe), text_encoders=encoders,
                 base_model=str(base), prediction_type=pipe.scheduler.config.get("prediction_type", "flow_matching"),
                 lora_config={"rank": lora.get("rank", 4), "alpha": lora.get("alpha", 8)},
                 flat_lora=FlatLoraConfig(rho=0.1, total_steps=2).to_dict(),
                 training={"instance_prompt": "a photo of sks dog", "steps": 2, "seed": 0}, kohya=kohya)
    return out_dir


@pytest.fixture(scope="session")
def sd_adapter_dir(tiny_sd_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random SD LoRA (UNet rank 4 / alpha 8 + text encoder) saved with the kohya copy."""
    return save_random_adapter(tiny_sd_path, tmp_path_factory.mktemp("adapters") / "sd_dog", kohya=True)


@pytest.fixture(scope="session")
def sdxl_adapter_dir(tiny_sdxl_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random SDXL LoRA (UNet + both text encoders)."""
    return save_random_adapter(tiny_sdxl_path, tmp_path_factory.mktemp("adapters") / "sdxl_dog")


@pytest.fixture
def single_thread():
    """Run the test on one intra-op thread: on the shared 2-core machine, two OpenMP threads competing
    with other processes make the tiny pipelines 10-50x slower (measured: 0.1 s vs 2-10 s per call)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextmanager
def serve_app(studio) -> Iterator[str]:
    """The app for `studio` on a free port of 127.0.0.1; yields its URL and stops the server after."""
    import socket

    from flatlora_diffusion.app_ui import launch

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = launch(studio, host="127.0.0.1", port=port, prevent_thread_lock=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


class Killed(Exception):
    """Stands in for SIGKILL at a chosen moment."""


def kill_while_writing_checkpoint(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the trainer "die" (raise `Killed`) mid-write of ``checkpoint-{step}``, after its first
    `torch.save` into the temporary folder; `monkeypatch.undo()` revives it."""
    import torch

    real_save = torch.save

    def save_then_die(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if Path(path).parent.name == f".checkpoint-{step}.tmp":
            raise Killed

    monkeypatch.setattr(torch, "save", save_then_die)


@contextmanager
def captured_logs(*names: str, level: int = logging.WARNING) -> Iterator[list[str]]:
    """Messages logged at `level` or above on the named loggers (and their children) inside the block.

    A handler on each logger: the libraries' own loggers do not propagate to the root, where caplog listens.
    """

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(f"{record.name}: {record.getMessage()}")

    messages: list[str] = []
    handler = Collect(level)
    loggers = [logging.getLogger(name) for name in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield messages
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
