"""Stop sequences matched on device with one automaton per stop, stepped a whole token at a time.

A stop is either a token sequence (EOS, or `stop=[[...]]` of `generate`) or a text string such as
`</search>`. Strings are the hard case: BPE may emit `</search>` as `</`,`search`,`>` or end it inside
a merged token like `>\\n\\n`. So each stop becomes a KMP automaton over bytes (or over token ids) and
is lifted on the host into a table `[states, vocab]`: the state after reading a whole token. The last
state (the stop's length) means "matched somewhere in or before this token" and is absorbing. On
device one decode step is a single gather per row and stop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


def kmp_automaton(pattern: Sequence[int], alphabet: int) -> np.ndarray:
    """DFA `[len+1, alphabet]` for "longest prefix of `pattern` that is a suffix of the input"; the
    accept state `len(pattern)` is absorbing."""
    if not pattern:
        raise ValueError("a stop sequence must not be empty")
    length = len(pattern)
    dfa = np.zeros((length + 1, alphabet), np.int32)
    dfa[0, pattern[0]] = 1
    restart = 0
    for k in range(1, length):
        dfa[k] = dfa[restart]
        dfa[k, pattern[k]] = k + 1
        restart = dfa[restart, pattern[k]]
    dfa[length] = length
    return dfa


def lift_to_tokens(byte_dfa: np.ndarray, token_bytes: Sequence[bytes]) -> np.ndarray:
    """Per-token transitions `[states, vocab]` of a byte DFA: run every token's bytes from every state."""
    num_states = byte_dfa.shape[0]
    lengths = np.fromiter((len(b) for b in token_bytes), np.int64, len(token_bytes))
    order = np.argsort(-lengths, kind="stable")  # longest first: byte j only touches tokens longer than j
    width = int(lengths.max(initial=0))
    padded = np.zeros((len(token_bytes), max(width, 1)), np.uint8)
    for i, b in enumerate(token_bytes):
        padded[i, : len(b)] = np.frombuffer(b, np.uint8)
    state = np.broadcast_to(np.arange(num_states)[:, None], (num_states, len(token_bytes))).copy()
    sorted_len = lengths[order]
    for j in range(width):
        live = order[: int(np.searchsorted(-sorted_len, -j, side="left"))]  # tokens with len > j
        state[:, live] = byte_dfa[state[:, live], padded[live, j][None, :]]
    return state


@dataclass(frozen=True)
class StopTable:
    """Stacked stop automata: `table [S, Q, V]` int8 next states, `accept [S]` accepting state per stop."""

    table: np.ndarray
    accept: np.ndarray
    names: tuple[str, ...]

    @property
    def num_stops(self) -> int:
        return self.table.shape[0]

    def index(self, name: str) -> int:
        return self.names.index(name)


def build_stop_table(
    vocab_size: int,
    token_stops: Sequence[Sequence[int]] = (),
    string_stops: Sequence[str] = (),
    token_bytes: Sequence[bytes] | None = None,
) -> StopTable:
    """Stops in order `token_stops` then `string_stops` (string stops need each token's bytes).

    With no stops at all the table holds one automaton that never accepts, so shapes stay fixed.
    """
    tables, accept, names = [], [], []
    for seq in token_stops:
        seq = [int(t) for t in seq]
        bad = [t for t in seq if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop sequence {seq} has token ids outside [0, {vocab_size}): {bad}")
        tables.append(kmp_automaton(seq, vocab_size))
        accept.append(len(seq))
        names.append(f"tokens:{','.join(map(str, seq))}")
    if string_stops:
        if token_bytes is None:
            raise ValueError("string stops need token_bytes (see rexrag_jax.rollout.stops.tokenizer_bytes)")
        if len(token_bytes) != vocab_size:
            raise ValueError(f"token_bytes has {len(token_bytes)} entries, vocab_size is {vocab_size}")
    for text in string_stops:
        raw = text.encode("utf-8")
        tables.append(lift_to_tokens(kmp_automaton(list(raw), 256), token_bytes))
        accept.append(len(raw))
        names.append(text)
    if not tables:
        return StopTable(np.zeros((1, 2, vocab_size), np.int8), np.asarray([1], np.int32), ())
    states = max(t.shape[0] for t in tables)
    if states > 127:
        raise ValueError(f"stop sequences are limited to 126 tokens/bytes; got one of length {states - 1}")
    table = np.zeros((len(tables), states, vocab_size), np.int8)
    for i, t in enumerate(tables):
        table[i, : t.shape[0]] = t
    return StopTable(table, np.asarray(accept, np.int32), tuple(names))


def step_stops(table: jax.Array, accept: jax.Array, state: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Advance every row's automata by one token: `state [B, S]`, `tokens [B]` -> (new state, first
    matched stop `[B]` or -1)."""
    stops = jnp.arange(table.shape[0])[None, :]
    new = table[stops, state, tokens[:, None]].astype(jnp.int32)
    matched = new == accept[None, :]
    first = jnp.where(jnp.any(matched, axis=-1), jnp.argmax(matched, axis=-1), -1)
    return new, first.astype(jnp.int32)


def tokenizer_bytes(tokenizer, vocab_size: int) -> list[bytes]:
    """The bytes each token id contributes to decoded text (`skip_special_tokens=True`): special and
    out-of-tokenizer ids contribute nothing. Byte-level BPE (Qwen, GPT-2, Llama-3) is mapped exactly;
    other tokenizers fall back to decoding each id alone."""
    special = set(tokenizer.all_special_ids)
    special.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special)
    n = min(len(tokenizer), vocab_size)
    out = [b""] * vocab_size
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if type(decoder).__name__ == "ByteLevel":
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
            if i not in special and piece is not None:
                out[i] = bytes(to_byte[c] for c in piece) if all(c in to_byte for c in piece) else piece.encode()
    else:
        for i in range(n):
            if i not in special:
                out[i] = tokenizer.decode([i], clean_up_tokenization_spaces=False).encode("utf-8")
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable-character map used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars
