"""The search agent's instruction (our wording of the Search-R1 prompt: same tags, same behaviour).

It carries exactly one `<answer>…</answer>` match (the example; the tags are not named elsewhere, where
they would form a second match), so prompt + response decoded together hold one block more than the
response (docs/algorithm.md#prompt, #rewards).
"""

from __future__ import annotations

from rexrag_jax.protocol import ANSWER_CLOSE, ANSWER_OPEN, INFO_CLOSE, INFO_OPEN, SEARCH_CLOSE, SEARCH_OPEN

INSTRUCTION = (
    "Answer the question below. Whenever you receive new information, first think it through inside "
    "<think> and </think>. If you find you lack some knowledge, you can look it up by writing "
    f"{SEARCH_OPEN} your query {SEARCH_CLOSE}; the search engine returns the top results between "
    f"{INFO_OPEN} and {INFO_CLOSE}. You may search as often as you need. When you are ready, give only the "
    f"final answer, with no explanation, between answer tags, for example {ANSWER_OPEN} Beijing {ANSWER_CLOSE}. "
    "Question: {question}\n"
)


def normalize_question(question: str) -> str:
    """Strip whitespace and end with a question mark (docs/algorithm.md#prompt)."""
    question = question.strip()
    return question if question.endswith("?") else question + "?"


def build_prompt(question: str) -> str:
    return INSTRUCTION.format(question=normalize_question(question))


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of the chat-formatted prompt (one user turn, generation prompt added)."""
    from rexrag_jax.models.tokenizer import encode_chat

    return encode_chat(tokenizer, [{"role": "user", "content": build_prompt(question)}])
