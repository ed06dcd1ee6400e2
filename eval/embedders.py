"""DINO and CLIP embedders loaded through transformers, and cached, batched embedding of image files.

* DINO: ``ViTModel`` without pooler; the feature is the CLS token of ``last_hidden_state``
  (after the final LayerNorm). The checkpoint's pooler is untrained, so it is never used.
* CLIP: ``CLIPModel`` image and text embeddings after the projection (``image_embeds`` /
  ``text_embeds``), raw (the metrics normalise).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from eval.cache import EmbeddingCache, default_cache_dir, model_fingerprint
from eval.config import DTYPES, ScoringConfig, resolve_device
from eval.errors import EvalError
from eval.images import Skipped, decode_image, sha256
from eval.preprocess import Preprocess, clip_preprocess, dino_preprocess

DINO_TYPES = ("vit", "dinov2")
CLIP_TYPES = ("clip",)


def _load_config(model_id: str, flag: str, what: str):
    """The model's transformers config, or an `EvalError` saying how to provide the model offline."""
    from transformers import AutoConfig

    looks_local = model_id.startswith(("/", "./", "../", "~")) or Path(model_id).expanduser().exists()
    if looks_local and not Path(model_id).expanduser().is_dir():
        raise EvalError(f"`{flag}` folder `{model_id}` does not exist; pass an existing model folder or a hub id.")
    try:
        return AutoConfig.from_pretrained(str(Path(model_id).expanduser()) if looks_local else model_id)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EvalError(
            f"Could not load the {what} model `{model_id}` (`{flag}`): {reason}\n"
            f"Without internet access, download it once on a connected machine "
            f"(`hf download {model_id}`) and run with `HF_HUB_OFFLINE=1`, or pass a local folder: "
            f"`{flag} /path/to/model`."
        ) from err


def _resolve(model_id: str, flag: str) -> str:
    """`toy:`/`tiny:` ids -> their local folder (`flatlora_diffusion.model_ids`); other ids unchanged."""
    from flatlora_diffusion.model_ids import ModelIdError, resolve_model_id

    try:
        return resolve_model_id(model_id, flag)
    except ModelIdError as err:
        raise EvalError(str(err)) from err


def _check_type(config, allowed: tuple[str, ...], model_id: str, flag: str, example: str) -> None:
    if config.model_type not in allowed:
        raise EvalError(
            f"`{flag}` `{model_id}` is a `{config.model_type}` model, not one of {', '.join(allowed)}; "
            f"pass a checkpoint such as `{example}`."
        )


def _features(output) -> torch.Tensor:
    """transformers 4 returns a tensor from `get_*_features`, transformers 5 an output object."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclass
class ImageEmbedder:
    """A vision model and the preprocessing it is evaluated with."""

    name: str
    model_id: str
    model: torch.nn.Module
    preprocess: Preprocess
    device: torch.device
    dtype: torch.dtype
    fingerprint: str = field(default="", repr=False)

    def describe(self) -> dict:
        """Model id, weights hash and preprocessing, for reports."""
        return {
            "model": self.model_id,
            "class": type(self.model).__name__,
            "weights_sha256": self.fingerprint or None,
            "preprocess": self.preprocess.to_dict(),
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    @torch.inference_mode()
    def embed_images(self, images: Sequence[Image.Image], map_fn=map) -> torch.Tensor:
        """Images → (N, D) float32 CPU embeddings (not normalised); `map_fn` may preprocess in parallel."""
        pixels = torch.stack(list(map_fn(self.preprocess, images))).to(self.device, self.dtype)  # (N, 3, S, S)
        return self._forward(pixels).float().cpu()

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class DinoEmbedder(ImageEmbedder):
    """CLS token of a DINO ViT."""

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]  # (N, D): CLS after final LayerNorm


@dataclass
class ClipEmbedder(ImageEmbedder):
    """Projected CLIP image embeddings, plus text embeddings for CLIP-T."""

    tokenizer: object = field(default=None, repr=False)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Prompts → (N, D) float32 CPU embeddings; prompts longer than CLIP's 77 tokens are truncated."""
        max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(self.device)
            chunks.append(_features(self.model.get_text_features(**batch)).float().cpu())
        return torch.cat(chunks)


def _prepare(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, fingerprint: bool) -> str:
    digest = model_fingerprint(model) if fingerprint else ""  # before the cast: the stored weights
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return digest


def load_dino(model_id: str, device: torch.device, dtype: torch.dtype, *, fingerprint: bool = True) -> DinoEmbedder:
    """A DINO ViT from a hub id or folder, with the DINO evaluation crop for its input size."""
    from transformers import AutoModel, ViTModel

    source = _resolve(model_id, "--dino_model")
    config = _load_config(source, "--dino_model", "DINO")
    _check_type(config, DINO_TYPES, model_id, "--dino_model", "facebook/dino-vits16")
    path = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ff]ast image processor.*")
        if config.model_type == "vit":
            model = ViTModel.from_pretrained(path, add_pooling_layer=False)
        else:
            model = AutoModel.from_pretrained(path)
    digest = _prepare(model, device, dtype, fingerprint)
    return DinoEmbedder("dino", model_id, model, dino_preprocess(config.image_size), device, dtype, digest)


def load_clip(model_id: str, device: torch.device, dtype: torch.dtype, *, fingerprint: bool = True) -> ClipEmbedder:
    """A CLIP model and its tokenizer from a hub id or folder, with OpenAI's preprocessing."""
    from transformers import AutoTokenizer, CLIPModel

    source = _resolve(model_id, "--clip_model")
    config = _load_config(source, "--clip_model", "CLIP")
    _check_type(config, CLIP_TYPES, model_id, "--clip_model", "openai/clip-vit-base-patch32")
    path = str(Path(source).expanduser()) if Path(source).expanduser().is_dir() else source
    model = CLIPModel.from_pretrained(path)
    digest = _prepare(model, device, dtype, fingerprint)
    tokenizer = AutoTokenizer.from_pretrained(path)
    preprocess = clip_preprocess(config.vision_config.image_size)
    return ClipEmbedder("clip", model_id, model, preprocess, device, dtype, digest, tokenizer)


@dataclass
class Embedded:
    """Embeddings of the readable files, in input order, and the files that were skipped."""

    paths: list[Path]
    vectors: dict[str, torch.Tensor]  # embedder name → (N, D)
    skipped: list[Skipped]


class ImageEncoder:
    """Embeds image files with several embedders at once: each file is read and decoded once.

    Reading, decoding and preprocessing run in a thread pool (Pillow releases the GIL), so on
    a GPU the CPU-side image work, not the models, sets the pace only on machines with few cores.
    """

    def __init__(self, embedders: Sequence[ImageEmbedder], config: ScoringConfig) -> None:
        self.embedders = list(embedders)
        self.batch_size = config.batch_size
        self.workers = config.num_workers or min(8, os.cpu_count() or 1)
        self.caches: dict[str, EmbeddingCache] = {}
        if not config.no_cache:
            root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
            for e in self.embedders:
                key = {"model": e.model_id, "weights_sha256": e.fingerprint, "preprocess": e.preprocess.to_dict(),
                       "dtype": str(e.dtype), "feature": type(e).__name__}
                self.caches[e.name] = EmbeddingCache(root, key)

    @classmethod
    def from_config(cls, config: ScoringConfig) -> ImageEncoder:
        """Load DINO and CLIP as `config` says."""
        device, dtype = resolve_device(config.device), DTYPES[config.dtype]
        fingerprint = not config.no_cache
        embedders = [load_dino(config.dino_model, device, dtype, fingerprint=fingerprint),
                     load_clip(config.clip_model, device, dtype, fingerprint=fingerprint)]
        return cls(embedders, config)

    def __getitem__(self, name: str) -> ImageEmbedder:
        return next(e for e in self.embedders if e.name == name)

    def encode(self, paths: Sequence[Path], desc: str = "embedding") -> Embedded:
        """Embed `paths` with every embedder; unreadable images are skipped with a warning."""
        kept: list[Path] = []
        rows: list[dict[str, torch.Tensor]] = []
        skipped: list[Skipped] = []
        with ThreadPoolExecutor(self.workers) as pool, \
                tqdm(total=len(paths), desc=desc, unit="img", disable=None, leave=False) as bar:
            for start in range(0, len(paths), self.batch_size):
                chunk = paths[start : start + self.batch_size]
                for path, row, error in self._encode_chunk(chunk, pool):
                    if error is not None:
                        skipped.append(Skipped(path, error))
                    else:
                        kept.append(path)
                        rows.append(row)
                bar.update(len(chunk))
        if skipped:
            warnings.warn(
                f"Skipped {len(skipped)} unreadable image(s): "
                + "; ".join(f"`{s.path}` ({s.reason})" for s in skipped[:5]),
                stacklevel=2,
            )
        vectors = {e.name: torch.stack([r[e.name] for r in rows]) if rows else torch.empty(0, 0)
                   for e in self.embedders}
        return Embedded(kept, vectors, skipped)

    def _load(self, path: Path) -> tuple[str, dict[str, torch.Tensor], Image.Image | None, str | None]:
        """(content hash, cached vectors, decoded image if some embedder needs it, error)."""
        try:
            data = path.read_bytes()
        except OSError as err:
            return "", {}, None, f"unreadable file ({err.strerror or err})"
        digest = sha256(data)
        hits = {name: cache.get(digest) for name, cache in self.caches.items()}
        row = {name: vector for name, vector in hits.items() if vector is not None}
        if len(row) == len(self.embedders):
            return digest, row, None, None
        try:
            return digest, row, decode_image(data), None
        except OSError as err:
            return digest, row, None, str(err)

    def _encode_chunk(self, chunk: Sequence[Path], pool: ThreadPoolExecutor) -> list[tuple[Path, dict, str | None]]:
        """(path, {embedder: vector}, error) per file; cache misses are embedded in one batch per model."""
        loaded = list(pool.map(self._load, chunk))
        for e in self.embedders:
            misses = [i for i, (_, row, image, error) in enumerate(loaded) if error is None and e.name not in row]
            if not misses:
                continue
            out = e.embed_images([loaded[i][2] for i in misses], pool.map)  # (n_miss, D)
            for i, vector in zip(misses, out, strict=True):
                digest, row = loaded[i][0], loaded[i][1]
                row[e.name] = vector
                if e.name in self.caches:
                    self.caches[e.name].put(digest, vector)
        return [(path, row, error) for path, (_, row, _, error) in zip(chunk, loaded, strict=True)]
