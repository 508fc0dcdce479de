"""Tiny random HF checkpoints built offline with transformers' PyTorch models (the numerical oracle)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

# name -> (architecture, config kwargs). GQA ratios of Qwen2.5-3B (16:2) and 7B (28:4) at small widths.
CONFIGS = {
    "qwen2p5_3b_ratio_tied": (
        "qwen2",
        dict(num_attention_heads=16, num_key_value_heads=2, head_dim=8, hidden_size=128, tie_word_embeddings=True),
    ),
    "qwen2p5_7b_ratio_untied": (
        "qwen2",
        dict(
            num_attention_heads=28,
            num_key_value_heads=4,
            head_dim=8,
            hidden_size=224,
            tie_word_embeddings=False,
            rope_theta=1e6,
        ),
    ),
    "smollm2_like_tied": (
        "llama",
        dict(
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=16,
            hidden_size=144,
            tie_word_embeddings=True,
            rope_theta=1e5,
        ),
    ),
    "llama3_scaled_untied": (
        "llama",
        dict(
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            hidden_size=128,
            tie_word_embeddings=False,
            rope_theta=5e5,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
}


def build_reference(name: str, *, num_layers: int = 2, vocab_size: int = 320, seed: int = 0):
    """A transformers model with every parameter (biases and norms too) randomised."""
    arch, kwargs = CONFIGS[name]
    common = dict(
        vocab_size=vocab_size,
        intermediate_size=192,
        num_hidden_layers=num_layers,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common, **kwargs))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common, **kwargs))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def reference_logits(model, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long))
    return out.logits.float().numpy()


def padded_batch(vocab_size: int, lengths=(12, 7, 3), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 ids and mask with the given valid lengths."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = rng.integers(3, vocab_size, size=(len(lengths), t)).astype(np.int32)
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return ids * mask, mask
