"""The agent's prompt: our wording of the Search-R1 instruction, one example answer block, chat template."""

from rexrag_jax.data import build_prompt, normalize_question, prompt_ids
from rexrag_jax.scoring import ANSWER_BLOCK_RE


def test_question_normalisation():
    assert normalize_question("  who wrote hamlet ") == "who wrote hamlet?"
    assert normalize_question("Where is Paris?\n") == "Where is Paris?"


def test_prompt_has_the_protocol_and_exactly_one_example_answer():
    text = build_prompt("who wrote hamlet")
    for tag in ("<think>", "</think>", "<search>", "</search>", "<information>", "</information>"):
        assert tag in text
    assert len(ANSWER_BLOCK_RE.findall(text)) == 1  # as the authors' prompt (the reward counts on it)
    assert text.endswith("Question: who wrote hamlet?\n")


def test_prompt_ids_use_the_chat_template(qwen25_tokenizer):
    ids = prompt_ids(qwen25_tokenizer, "who wrote hamlet")
    text = qwen25_tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\n" + build_prompt("who wrote hamlet") in text
