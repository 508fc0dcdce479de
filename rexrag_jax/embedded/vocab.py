"""A small byte-level BPE tokenizer trained on the synthetic world, with the protocol tags as single tokens.

Qwen's 151k-token vocabulary would make the LM head of a laptop-sized model its whole cost; a vocabulary
of ~1-2k tokens learned from the corpus, the questions and the demonstrations keeps every entity name
to a few tokens. Byte-level, so any text (e.g. exploratory prompts) still encodes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from rexrag_jax import protocol as P

EOS, PAD = "<|im_end|>", "<|endoftext|>"
# Protocol tags: added as normal (not special) tokens, so decoding keeps them and the rollout sees them.
TAGS = (P.SEARCH_OPEN, P.SEARCH_CLOSE, P.ANSWER_OPEN, P.ANSWER_CLOSE, P.INFO_OPEN, P.INFO_CLOSE, "<think>", "</think>")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str):
    """Train, save to `out_dir` (tokenizer.json + config, loadable by AutoTokenizer) and return it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[PAD, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return load_tokenizer_dir(out_dir)


def load_tokenizer_dir(path: str):
    """A tokenizer saved by `train_tokenizer`, checked to carry every tag as one token."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    for tag in TAGS:
        ids = tok(tag, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{path}: tag {tag!r} encodes to {len(ids)} tokens, expected one")
    return tok
