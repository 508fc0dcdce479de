"""Qwen2 / Qwen2.5 / Llama decoder in Flax NNX, HF checkpoint I/O and tokenizers."""

from rexrag_jax.models.config import ModelConfig
from rexrag_jax.models.decoder import Decoder, KVCache, extend, forward, init_cache, init_model
from rexrag_jax.models.hf_io import load_hf, save_hf
from rexrag_jax.models.tokenizer import encode_chat, load_tokenizer, make_qwen25_tokenizer_dir

__all__ = [
    "Decoder", "KVCache", "ModelConfig", "encode_chat", "extend", "forward", "init_cache", "init_model", "load_hf",
    "load_tokenizer", "make_qwen25_tokenizer_dir", "save_hf",
]
