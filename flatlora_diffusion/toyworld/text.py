"""The toy world's tokenizer: word-level, CLIP-style start/end tokens, built offline from the vocabulary."""

from __future__ import annotations

from flatlora_diffusion.toyworld.world import vocabulary

BOS, EOS, UNK = "<|startoftext|>", "<|endoftext|>", "<|unk|>"
MAX_LENGTH = 77  # as every CLIP tokenizer; the pipelines pad and truncate to it


def build_tokenizer():
    """A `PreTrainedTokenizerFast` over the world's words; unknown words map to `<|unk|>`.

    Lower-cases, splits on whitespace and punctuation, wraps the ids in start/end tokens and pads
    with the end token, as SD 1.x's CLIP tokenizer does.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = [BOS, EOS, UNK, *vocabulary()]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}", special_tokens=[(BOS, 0), (EOS, 1)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                   pad_token=EOS, model_max_length=MAX_LENGTH)
