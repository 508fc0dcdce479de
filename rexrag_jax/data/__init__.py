"""Training and evaluation data: QA examples, the agent's prompt, and resumable batch iterators."""

from rexrag_jax.data.prompts import build_prompt, normalize_question, prompt_ids
from rexrag_jax.data.questions import QAExample, QuestionBatches, read_qa_jsonl

__all__ = ["QAExample", "QuestionBatches", "build_prompt", "normalize_question", "prompt_ids", "read_qa_jsonl"]
