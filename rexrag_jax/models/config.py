"""ModelConfig: the decoder's hyper-parameters, read from and written to a HF `config.json`.

One frozen (hashable) dataclass covers Qwen2 / Qwen2.5 (q/k/v biases) and Llama (SmolLM2, Llama-3 with
its rope scaling). Anything we would silently compute differently from transformers is an error.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

from rexrag_jax.config import choices

SUPPORTED_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = choices("model.remat")
ATTENTION_IMPLEMENTATIONS = choices("model.attention")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Decoder shape and numerics. `dtype` is the compute dtype, `param_dtype` the storage dtype."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    # Hashable form of the HF rope parameters beyond theta, e.g. (("factor", 8.0), ("rope_type", "llama3"), ...).
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: str = "full"
    # Self-attention of right-padded rows: "auto" | "xla" | "cudnn" | "splash" (models/attention.py).
    attention: str = "auto"

    def __post_init__(self):
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name}={getattr(self, name)!r}; expected one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r}; expected one of {REMAT_POLICIES}")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention={self.attention!r}; expected one of {ATTENTION_IMPLEMENTATIONS}")
        rope_type = dict(self.rope_scaling).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        d, f, h, k, hd, v = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
        )
        attn = d * hd * (h + 2 * k) + h * hd * d + (hd * (h + 2 * k) if self.attention_bias else 0)
        per_layer = attn + 3 * d * f + 2 * d
        return self.num_layers * per_layer + v * d * (1 if self.tie_word_embeddings else 2) + d

    # ---------------------------------------------------------------- HF config.json

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict, **overrides: Any) -> ModelConfig:
        """Build from a HF config: a dict, a `config.json` path, or a model directory."""
        source = "config dict"
        if isinstance(path_or_dict, dict):
            hf = path_or_dict
        else:
            path = os.fspath(path_or_dict)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            if not os.path.isfile(path):
                raise FileNotFoundError(f"missing HF config: {path} does not exist")
            try:
                with open(path, encoding="utf-8") as f:
                    hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls(**{**_parse_hf(hf, source), **overrides})

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers' AutoModelForCausalLM loads into the same model."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default", **dict(self.rope_scaling)}
        eos = list(self.eos_token_id)
        hf: dict[str, Any] = {
            "architectures": [SUPPORTED_ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "dtype": self.param_dtype,
        }
        if self.architecture == "llama":
            hf.update(attention_bias=self.attention_bias, mlp_bias=False, pretraining_tp=1)
        else:
            hf.update(use_sliding_window=False, sliding_window=None)
        return hf


def _parse_hf(hf: dict[str, Any], source: str) -> dict[str, Any]:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_ARCHITECTURES:
        archs = hf.get("architectures")
        raise ValueError(
            f"{source}: unknown architecture model_type={model_type!r} architectures={archs!r}; "
            f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
        )

    def need(key: str) -> Any:
        if key not in hf:
            raise ValueError(f"{source}: missing required key {key!r}")
        return hf[key]

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: unsupported hidden_act={act!r} (only 'silu')")
    if hf.get("mlp_bias"):
        raise ValueError(f"{source}: unsupported mlp_bias=true")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError(f"{source}: unsupported use_sliding_window=true")
    other_layers = sorted(set(hf.get("layer_types") or ["full_attention"]) - {"full_attention"})
    if other_layers:
        raise ValueError(f"{source}: unsupported layer_types {other_layers} (only full_attention)")

    # transformers 5 keeps theta and scaling in `rope_parameters`; 4.x used `rope_theta` + `rope_scaling`.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: unsupported rope scaling type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    scaling: tuple[tuple[str, Any], ...] = ()
    if rope_type != "default":
        keys = {
            "linear": ("factor",),
            "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        }
        missing = [k for k in keys[rope_type] if k not in rope]
        if missing:
            raise ValueError(f"{source}: rope scaling {rope_type!r} is missing {missing}")
        scaling = tuple(sorted([(k, rope[k]) for k in keys[rope_type]] + [("rope_type", rope_type)]))

    heads = int(need("num_attention_heads"))
    hidden = int(need("hidden_size"))
    eos = hf.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
    bias_default = model_type == "qwen2"
    return dict(
        architecture=model_type,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", bias_default)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=eos_ids,
    )
