"""Does reranking help? nDCG@10 on SciFact before and after reranking through our HTTP rerank service.

First stages, over the whole 5,183-abstract corpus: dense (all-MiniLM-L6-v2 via sentence-transformers,
exact cosine) and hybrid (dense + BM25 fused by RRF, k=60). Their top-20 per query is reranked by each scorer
mode of the service (`query_likelihood`, `yes_no` over the bundled SmolLM2 GGUF), alone and fused with the
first-stage ranks by RRF. Throughput: passages/s through the service, beside transformers running the same
forward passes in-process the usual way (full vocabulary logits at every position) on a sample of the pairs.

    python -m bench.rerank_eval --queries 100
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from tqdm import tqdm

from bench.report import print_table, save_result
from common.model_files import bundled_embedding_model, bundled_llm
from services.rerank.scorers import DecoderScorer, EncodedPair, load_causal_lm
from tests.support.processes import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]
RRF_K = 60


@dataclass(slots=True)
class SciFact:
    doc_ids: list[str]
    doc_texts: list[str]
    queries: dict[str, str]  # query id -> claim, only those with relevance labels
    relevant: dict[str, set[str]]


def load_scifact(directory: Path, limit: int) -> SciFact:
    docs = [json.loads(line) for line in (directory / "corpus.jsonl").open()]
    relevant: dict[str, set[str]] = defaultdict(set)
    for line in list((directory / "qrels" / "train.tsv").open())[1:]:
        query_id, doc_id, score = line.split()
        if int(score) > 0:
            relevant[query_id].add(doc_id)
    claims = {q["_id"]: q["text"] for q in map(json.loads, (directory / "queries.jsonl").open())}
    chosen = sorted((q for q in claims if q in relevant), key=int)[:limit]
    return SciFact([d["_id"] for d in docs], [f"{d['title']} {d['text']}".strip() for d in docs],
                   {q: claims[q] for q in chosen}, relevant)


def dense_rankings(data: SciFact, depth: int, cache_dir: Path) -> dict[str, list[int]]:
    """Exact cosine top-`depth` per query; the corpus vectors are cached since they dominate the cost on CPU."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(bundled_embedding_model()), device="cpu")
    cache = cache_dir / "scifact-corpus-all-MiniLM-L6-v2.npy"
    if cache.exists():
        corpus = np.load(cache)
    else:
        corpus = model.encode(data.doc_texts, batch_size=32, normalize_embeddings=True, show_progress_bar=True,
                              convert_to_numpy=True).astype(np.float32)
        cache_dir.mkdir(parents=True, exist_ok=True)
        np.save(cache, corpus)
    assert corpus.shape[0] == len(data.doc_ids)
    query_ids = list(data.queries)
    queries = model.encode([data.queries[q] for q in query_ids], normalize_embeddings=True, convert_to_numpy=True)
    top = np.argsort(-(queries @ corpus.T), axis=1)[:, :depth]
    return {q: top[i].tolist() for i, q in enumerate(query_ids)}


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class BM25:
    """Okapi BM25 (k1=0.9, b=0.4, the BEIR/Anserini defaults) over an in-memory inverted index."""

    def __init__(self, texts: list[str], k1: float = 0.9, b: float = 0.4) -> None:
        self.postings: dict[str, list[tuple[int, int]]] = defaultdict(list)
        lengths = []
        for doc, text in enumerate(texts):
            terms = Counter(words(text))
            lengths.append(sum(terms.values()))
            for term, count in terms.items():
                self.postings[term].append((doc, count))
        self.lengths = np.array(lengths, dtype=np.float64)
        self.k1, self.b, self.average = k1, b, self.lengths.mean()

    def top(self, query: str, depth: int) -> list[int]:
        scores = np.zeros(len(self.lengths))
        for term in set(words(query)):
            postings = self.postings.get(term, [])
            if not postings:
                continue
            idf = math.log(1 + (len(self.lengths) - len(postings) + 0.5) / (len(postings) + 0.5))
            docs = np.array([d for d, _ in postings])
            tf = np.array([c for _, c in postings], dtype=np.float64)
            norm = self.k1 * (1 - self.b + self.b * self.lengths[docs] / self.average)
            scores[docs] += idf * tf * (self.k1 + 1) / (tf + norm)
        return np.argsort(-scores)[:depth].tolist()


def rrf(rankings: Iterable[list[int]], depth: int) -> list[int]:
    fused: dict[int, float] = defaultdict(float)
    for ranking in rankings:
        for rank, doc in enumerate(ranking, start=1):
            fused[doc] += 1 / (RRF_K + rank)
    return sorted(fused, key=lambda doc: -fused[doc])[:depth]


def ndcg_at_10(ranking: list[int], data: SciFact, query_id: str) -> float:
    relevant = data.relevant[query_id]
    gains = [1.0 if data.doc_ids[doc] in relevant else 0.0 for doc in ranking[:10]]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains))
    ideal = sum(1 / math.log2(i + 2) for i in range(min(10, len(relevant))))
    return dcg / ideal


def mean_ndcg(rankings: dict[str, list[int]], data: SciFact) -> float:
    return float(np.mean([ndcg_at_10(rankings[q], data, q) for q in rankings]))


@dataclass(slots=True)
class ServiceRun:
    scores: dict[tuple[str, int], float]  # (query id, doc) -> logit
    seconds: float
    pairs: int


def rerank_through_service(mode: str, candidates: dict[str, list[int]], data: SciFact, max_length: int,
                           concurrency: int) -> ServiceRun:
    env = {"RERANK_SCORER": mode, "RERANK_MAX_LENGTH": str(max_length), "HF_HUB_OFFLINE": "1",
           "RERANK_LOG_LEVEL": "warning"}
    with ServiceProcess("rerank", env=env) as service:
        service.wait_ready(timeout=900)
        scores: dict[tuple[str, int], float] = {}
        progress = tqdm(total=sum(map(len, candidates.values())), desc=f"rerank {mode}", unit="passage")

        async def rank(client: httpx.AsyncClient, gate: asyncio.Semaphore, query_id: str, docs: list[int]) -> None:
            async with gate:
                response = await client.post("/v1/ranking", json={
                    "query": {"text": data.queries[query_id]}, "truncate": "END",
                    "passages": [{"text": data.doc_texts[doc]} for doc in docs]})
            response.raise_for_status()
            for ranking in response.json()["rankings"]:
                scores[query_id, docs[ranking["index"]]] = ranking["logit"]
            progress.update(len(docs))

        async def rank_all() -> None:
            gate = asyncio.Semaphore(concurrency)
            async with httpx.AsyncClient(base_url=service.url, timeout=3600) as client:
                await asyncio.gather(*(rank(client, gate, q, docs) for q, docs in candidates.items()))

        start = time.perf_counter()
        asyncio.run(rank_all())
        seconds = time.perf_counter() - start
        progress.close()
    return ServiceRun(scores, seconds, len(scores))


def full_logits_scores(scorer: DecoderScorer, pairs: list[EncodedPair]) -> list[float]:
    """The peer: transformers' usual forward pass, vocabulary logits at every position, same prompts and scores."""
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(p.input_ids) for p in pairs], batch_first=True,
                                          padding_value=scorer.pad_id)
    mask = (torch.arange(ids.shape[1])[None, :] < torch.tensor([p.cost for p in pairs])[:, None]).long()
    with torch.inference_mode():
        logits = scorer.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logp = torch.log_softmax(logits.float(), dim=-1)
    scores = []
    for row, pair in enumerate(pairs):
        if scorer.mode == "yes_no":
            last = logp[row, pair.cost - 1]
            scores.append((torch.logsumexp(last[scorer.yes_ids], 0) - torch.logsumexp(last[scorer.no_ids], 0)).item())
        else:
            positions = range(pair.cost - pair.query_tokens, pair.cost)
            scores.append(float(np.mean([logp[row, t - 1, pair.input_ids[t]].item() for t in positions])))
    return scores


def in_process_throughput(model_and_tokenizer: tuple, mode: str, sample: list[tuple[str, str]], max_length: int,
                          batch_size: int) -> dict[str, float]:
    """Ours (hidden states of scored positions only) vs the peer (full logits), same pairs, same batches; best of 2."""
    scorer = DecoderScorer(*model_and_tokenizer, mode, max_length)  # type: ignore[arg-type]
    pairs = sorted((scorer.encode(q, [p], truncate=True)[0] for q, p in sample), key=lambda p: p.cost)
    batches = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
    runs = {"ours": scorer.score, "peer": lambda batch: full_logits_scores(scorer, batch)}
    timings: dict[str, float] = defaultdict(float)
    outputs = {}
    for run in runs.values():
        run(pairs[:1])  # warm-up, untimed
    for _ in range(2):  # alternate, so a burst of load on the shared CPU hits both sides
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = [score for batch in batches for score in run(batch)]
            timings[name] = max(timings[name], len(pairs) / (time.perf_counter() - start))
    gap = max(abs(a - b) for a, b in zip(outputs["ours"], outputs["peer"], strict=True))
    return {"ours_passages_per_s": timings["ours"], "peer_passages_per_s": timings["peer"],
            "max_score_difference": gap, "pairs": len(pairs)}


def report(args: argparse.Namespace, data: SciFact, quality: dict[str, dict[str, float]],
           throughput: dict[str, dict[str, float]]) -> None:
    columns = ["first_stage"] + [f"{m}_{how}" for m in list(throughput) for how in ("alone", "rrf")]
    print_table(f"SciFact nDCG@10, {len(data.queries)} training claims, top-{args.depth} reranked",
                ["first stage", *columns], [[stage, *(quality[stage][c] for c in columns)] for stage in quality])
    print_table("Throughput (passages/s, CPU)", ["mode", "service (HTTP)", "ours in-process", "transformers",
                                                   "max |score diff|"],
                [[m, t["service_passages_per_s"], t["ours_passages_per_s"], t["peer_passages_per_s"],
                  t["max_score_difference"]] for m, t in throughput.items()])
    workload = {"dataset": "BEIR SciFact, training claims", "queries": len(data.queries), "depth": args.depth,
                "scored_pairs": "union of both first stages' top-depth per query, each pair scored once",
                "first_stages": {"dense": "all-MiniLM-L6-v2 exact cosine over title + text",
                                 "hybrid": "dense top-100 + BM25 (k1=0.9, b=0.4) top-100, RRF k=60"},
                "reranker_model": bundled_llm().name, "max_length": args.max_length, "truncate": "END",
                "fusion": f"RRF k={RRF_K} of first-stage and reranker ranks", "cross_encoder": "none available "
                "locally (no cross-encoder ships in any installed package), not measured"}
    path = save_result(args.name, workload=workload,
                       ours={"ndcg_at_10": quality, "passages_per_s": {m: {k: v for k, v in t.items()
                                                                           if not k.startswith("peer")}
                                                                       for m, t in throughput.items()}},
                       peer={"name": "transformers AutoModelForCausalLM full-logits forward, in-process",
                             "passages_per_s": {m: t["peer_passages_per_s"] for m, t in throughput.items()}})
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "eval" / "scifact")
    parser.add_argument("--queries", type=int, default=100, help="first N labelled training claims (by id)")
    parser.add_argument("--depth", type=int, default=20, help="first-stage candidates reranked per query")
    parser.add_argument("--modes", default="query_likelihood,yes_no")
    parser.add_argument("--max-length", type=int, default=512, help="RERANK_MAX_LENGTH of the service")
    parser.add_argument("--concurrency", type=int, default=2, help="ranking requests in flight")
    parser.add_argument("--peer-pairs", type=int, default=32, help="pairs timed in-process, ours vs transformers")
    parser.add_argument("--name", default="rerank_eval", help="result file name prefix (rerank_eval-<tag>)")
    parser.add_argument("--cache-dir", type=Path,
                        default=Path(os.environ.get("TMPDIR", "/tmp")) / "rerank_eval_cache")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    data = load_scifact(args.data, args.queries)
    print(f"{len(data.queries)} queries, {len(data.doc_ids)} documents")
    dense = dense_rankings(data, 100, args.cache_dir)
    bm25 = BM25(data.doc_texts)
    first_stages = {
        "dense": {q: dense[q][:args.depth] for q in data.queries},
        "hybrid": {q: rrf([dense[q], bm25.top(text, 100)], args.depth) for q, text in data.queries.items()},
    }
    candidates = {q: sorted(set(first_stages["dense"][q]) | set(first_stages["hybrid"][q])) for q in data.queries}

    quality: dict[str, dict[str, float]] = {stage: {"first_stage": mean_ndcg(r, data)}
                                            for stage, r in first_stages.items()}
    throughput: dict[str, dict[str, float]] = {}
    model = load_causal_lm(str(bundled_llm()), torch.device("cpu"))
    sample = [(data.queries[q], data.doc_texts[d]) for q in data.queries for d in candidates[q]][:args.peer_pairs]
    for mode in args.modes.split(","):
        run = rerank_through_service(mode, candidates, data, args.max_length, args.concurrency)
        throughput[mode] = {"service_passages_per_s": run.pairs / run.seconds, "service_pairs": run.pairs,
                            **in_process_throughput(model, mode, sample, args.max_length, 32)}
        for stage, rankings in first_stages.items():
            reranked = {q: sorted(docs, key=lambda d, q=q: -run.scores[q, d]) for q, docs in rankings.items()}
            quality[stage][f"{mode}_alone"] = mean_ndcg(reranked, data)
            quality[stage][f"{mode}_rrf"] = mean_ndcg({q: rrf([docs, reranked[q]], args.depth)
                                                       for q, docs in rankings.items()}, data)
        report(args, data, quality, throughput)  # after every mode, so a cut-short run still leaves its figures



if __name__ == "__main__":
    main()
