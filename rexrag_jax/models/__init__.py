"""Qwen2 / Qwen2.5 / Llama decoder in Flax NNX, HF checkpoint I/O and tokenizers."""

from rexrag_jax.models.config import ModelConfig
from rexrag_jax.models.decoder import Decoder, KVCache, extend, forward, init_cache, init_model
from rexrag_jax.models.hf_io import load_hf, save_hf

__all__ = ["Decoder", "KVCache", "ModelConfig", "extend", "forward", "init_cache", "init_model", "load_hf", "save_hf"]
