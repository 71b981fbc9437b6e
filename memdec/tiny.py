"""Tiny tokenizers and models built locally (no hub): for tests, `memdec demo` and CPU benchmarks."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

EOS = "<|endoftext|>"


def train_tokenizer(texts: Sequence[str], vocab_size: int = 512, name: str = "memdec-tiny-bpe",
                    gpt2_style: bool = False):
    """A byte-level BPE tokenizer trained on `texts`, as a `PreTrainedTokenizerFast`.

    Default: <|endoftext|> is id 0 and EOS = BOS = UNK = pad. `gpt2_style` lays it out as GPT-2's
    tokenizer: <|endoftext|> is the last id (in the BPE vocabulary and an added special token),
    EOS = BOS = UNK, no pad token, a byte-level post-processor and model_max_length 1024.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1 if gpt2_style else vocab_size,
        special_tokens=[] if gpt2_style else [EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if not gpt2_style:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                       pad_token=EOS)
        fast.name_or_path = name
        return fast
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = {**model["vocab"], EOS: len(model["vocab"])}
    gpt2 = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) for m in model["merges"]]))
    gpt2.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    gpt2.post_processor = processors.ByteLevel(trim_offsets=False)
    gpt2.decoder = decoders.ByteLevel()
    gpt2.add_special_tokens([EOS])
    fast = PreTrainedTokenizerFast(tokenizer_object=gpt2, eos_token=EOS, bos_token=EOS, unk_token=EOS,
                                   model_max_length=1024)
    fast.name_or_path = name
    return fast


def tiny_model(
    tokenizer,
    arch: str = "gpt2",
    n_layer: int = 2,
    hidden: int = 64,
    n_head: int = 4,
    max_positions: int = 256,
    vocab_pad: int = 0,
    seed: int = 0,
):
    """A randomly initialised causal LM of `arch` ('gpt2' or 'llama') sized for `tokenizer`.

    `vocab_pad` extra embedding rows beyond the tokenizer's length mimic padded vocabularies.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    vocab = len(tokenizer) + vocab_pad
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=max_positions, n_embd=hidden, n_layer=n_layer,
                         n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=n_layer, num_attention_heads=n_head,
                          num_key_value_heads=max(1, n_head // 2), max_position_embeddings=max_positions,
                          tie_word_embeddings=False, **ids)
    else:
        raise ValueError(f"tiny_model: unknown arch {arch!r} (use 'gpt2' or 'llama')")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()


def save_model(model, tokenizer, path: str | os.PathLike) -> str:
    """Save model and tokenizer together so `AutoModelForCausalLM/AutoTokenizer.from_pretrained(path)` work."""
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
