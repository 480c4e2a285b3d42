"""Tiny random checkpoints of today's encoder families, saved as sentence-transformers folders.

Each carries what makes its family easy to get wrong, so a toolkit that rebuilds every model as
``Transformer -> mean Pooling -> Normalize`` fails on it:

- ``bert_cls``: BERT, CLS pooling, a Dense head, ``query: ``/``passage: `` prompts (bge/e5-style).
- ``modernbert``: ModernBERT, mean pooling.
- ``qwen3``: a Qwen3 decoder, last-token pooling, left padding, EOS appended by the tokenizer,
  an ``Instruct: ...\\nQuery: `` query prompt (Qwen3-Embedding-style).
- ``gemma3``: Gemma3 text, bidirectional attention, mean pooling, two Dense layers and task
  prompts (EmbeddingGemma-style).

Nothing is downloaded: configs are built here with 2 layers and a character-level tokenizer.
"""

from __future__ import annotations

import string
from pathlib import Path

CHARS = list(" " + string.ascii_lowercase + string.digits + string.punctuation)
FAMILIES = ("bert_cls", "modernbert", "qwen3", "gemma3")


def char_tokenizer(padding_side: str = "right", eos: str | None = None, cls_sep: bool = False):
    """A character-level fast tokenizer; ``eos`` is appended to every text, ``cls_sep`` wraps it BERT-style."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>"] + ([eos] if eos else []) + (["[CLS]", "[SEP]"] if cls_sep else [])
    vocab = {t: i for i, t in enumerate(specials + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    if eos:
        tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[(eos, vocab[eos])])
    if cls_sep:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    extra = {"eos_token": eos} if eos else {}
    if cls_sep:
        extra.update(cls_token="[CLS]", sep_token="[SEP]")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", padding_side=padding_side, **extra
    )
    return fast, len(vocab)


def _config(family: str, vocab_size: int, hidden: int, shape: dict | None = None):
    import transformers as tf

    small = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        pad_token_id=0,
    )
    cls, extra = {
        # BERT's default init (0.02) leaves the CLS vector nearly the same for every text (cosines
        # within 1e-6), so rankings would be decided by float noise and tie-breaking, not the model
        "bert_cls": (tf.BertConfig, dict(max_position_embeddings=128, initializer_range=0.2)),
        "modernbert": (
            tf.ModernBertConfig,
            dict(max_position_embeddings=128, **{f"{t}_token_id": None for t in ("bos", "eos", "cls", "sep")}),
        ),
        "qwen3": (
            tf.Qwen3Config,
            dict(num_key_value_heads=1, head_dim=16, max_position_embeddings=128, eos_token_id=2, bos_token_id=None),
        ),
        "gemma3": (
            tf.Gemma3TextConfig,
            dict(
                num_key_value_heads=1,
                head_dim=16,
                max_position_embeddings=128,
                sliding_window=16,
                layer_types=["sliding_attention", "full_attention"],
                use_bidirectional_attention=True,
            ),
        ),
    }[family]
    kwargs = {**small, **extra, **(shape or {})}
    if shape and "num_hidden_layers" in shape:
        kwargs.pop("layer_types", None)  # the config derives them for the new depth
    return cls(**kwargs)


# Qwen3-Embedding-0.6B's shape (random weights: cost does not depend on their values)
QWEN3_0_6B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    vocab_size=151669,
    max_position_embeddings=32768,
)


def build_family_model(family: str, folder: Path, hidden: int = 32, seed: int = 0, shape: dict | None = None) -> Path:
    """Save a random checkpoint of ``family`` (one of :data:`FAMILIES`) under ``folder/st`` and return it.

    Tiny (2 layers, ``hidden`` wide) unless ``shape`` gives other config values, e.g. :data:`QWEN3_0_6B`.
    """
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling, Transformer
    from transformers import AutoModel

    tokenizer, vocab_size = {
        "bert_cls": lambda: char_tokenizer(cls_sep=True),
        "modernbert": lambda: char_tokenizer(cls_sep=True),
        "qwen3": lambda: char_tokenizer(padding_side="left", eos="<|endoftext|>"),
        "gemma3": lambda: char_tokenizer(eos="<eos>"),
    }[family]()
    torch.manual_seed(seed)
    raw = folder / "hf"
    AutoModel.from_config(_config(family, vocab_size, hidden, shape)).save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    transformer = Transformer(str(raw), max_seq_length=96)
    dim = transformer.get_embedding_dimension()
    torch.manual_seed(seed + 1)
    modules, prompts = {
        "bert_cls": lambda: (
            [Pooling(dim, "cls"), Dense(dim, dim // 2, activation_function=torch.nn.Tanh())],
            {"query": "query: ", "document": "passage: "},
        ),
        "modernbert": lambda: ([Pooling(dim, "mean")], {}),
        "qwen3": lambda: (
            [Pooling(dim, "lasttoken")],
            {"query": "Instruct: find the answer\nQuery: ", "document": ""},
        ),
        "gemma3": lambda: (
            [
                Pooling(dim, "mean"),
                Dense(dim, 2 * dim, bias=False, activation_function=torch.nn.Identity()),
                Dense(2 * dim, dim, bias=False, activation_function=torch.nn.Identity()),
            ],
            {"query": "task: search result | query: ", "document": "title: none | text: "},
        ),
    }[family]()
    model = SentenceTransformer(modules=[transformer, *modules, Normalize()], device="cpu", prompts=prompts)
    out = folder / "st"
    model.save(str(out))
    return out
