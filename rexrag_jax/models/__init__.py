"""Qwen2 / Qwen2.5 / Llama decoder in Flax NNX, HF checkpoint I/O and tokenizers (names load on first use)."""

from rexrag_jax.lazy import lazy_exports

_M = "rexrag_jax.models."
__getattr__, __all__ = lazy_exports(
    __name__,
    {
        "ModelConfig": _M + "config",
        **{n: _M + "decoder" for n in ("Decoder", "extend", "forward", "init_model")},
        **{n: _M + "kv_cache" for n in ("KVCache", "init_cache")},
        **{n: _M + "hf_io" for n in ("load_hf", "save_hf")},
        **{n: _M + "tokenizer" for n in ("encode_chat", "load_tokenizer", "make_qwen25_tokenizer_dir")},
    },
)
