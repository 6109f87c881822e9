"""Retrieval and answer quality of the RAG stack, through its REST API, with the default models.

SciFact (BEIR): nDCG@10 of dense, sparse, hybrid and hybrid+rerank search over the 5,183-abstract corpus (or,
with --scifact-corpus-docs, the abstracts the scored claims cite plus random others), plus ingestion throughput.
SQuAD v1.1 (articles 0-23): retrieval hit@k and answer EM/F1 for a subset of questions, next to the EM/F1 the same
LLM gets from the same prompt holding only the gold paragraph (the ceiling; the system prompt and answer instruction
are this checkout's RETRIEVER_* settings, so give the same ones to a retriever passed with --retriever-url).

    python bench/rag_eval.py                       # starts the services itself on loopback
    python bench/rag_eval.py --retriever-url http://127.0.0.1:8080 --llm-url http://127.0.0.1:8000

The peer column holds published reference points (BEIR/MTEB, test split; we score the training claims).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import random
import re
import string
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.embed import EMBED_DTYPES  # noqa: E402
from bench.report import print_table, save_result  # noqa: E402
from services.retriever.prompt import rag_messages, source_block  # noqa: E402
from services.retriever.settings import RetrieverSettings  # noqa: E402
from tests.support.processes import ServiceProcess  # noqa: E402

EVAL = ROOT.parent / "shared" / "eval"
PUBLISHED = {"sparse (BM25)": 0.665, "dense (all-MiniLM-L6-v2)": 0.645, "BM25 + MiniLM cross-encoder": 0.688}


# metrics

def ndcg_at_k(ranked: list[str], relevant: dict[str, int], k: int = 10) -> float:
    gains = sum(relevant.get(doc, 0) / math.log2(rank + 2) for rank, doc in enumerate(ranked[:k]))
    ideal = sum(g / math.log2(rank + 2) for rank, g in enumerate(sorted(relevant.values(), reverse=True)[:k]))
    return gains / ideal if ideal else 0.0


def normalize_answer(text: str) -> str:
    """The official SQuAD v1.1 normalisation: lowercase, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, truths: list[str]) -> float:
    return max(float(normalize_answer(prediction) == normalize_answer(t)) for t in truths)


def f1_score(prediction: str, truths: list[str]) -> float:
    def one(truth: str) -> float:
        predicted, gold = normalize_answer(prediction).split(), normalize_answer(truth).split()
        common = sum((collections.Counter(predicted) & collections.Counter(gold)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(predicted), common / len(gold)
        return 2 * precision * recall / (precision + recall)

    return max(one(t) for t in truths)


# REST helpers

async def ingest(http: httpx.AsyncClient, collection: str, documents: list[dict], keep: bool, batch: int = 64,
                 concurrency: int = 2) -> dict:
    """Upload documents in batches (into a fresh collection unless `keep`); throughput counts new documents."""
    if not keep:
        await http.delete(f"/v1/collections/{collection}")
    created = await http.post("/v1/collections", json={"name": collection})
    if created.status_code not in (200, 409):
        created.raise_for_status()
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(documents), unit="doc", desc=f"ingest {collection}")
    new = 0

    async def send(part: list[dict]) -> None:
        nonlocal new
        async with gate:
            reply = await http.post("/v1/documents", json={"collection_name": collection, "documents": part})
            reply.raise_for_status()
            new += sum(d["status"] == "ingested" for d in reply.json()["documents"])
            bar.update(len(part))

    started = time.perf_counter()
    await asyncio.gather(*(send(documents[i:i + batch]) for i in range(0, len(documents), batch)))
    elapsed = time.perf_counter() - started
    bar.close()
    return {"new_docs": new, "seconds": elapsed, "docs_per_s": new / elapsed if new else None}


async def search(http: httpx.AsyncClient, collection: str, query: str, search_type: str, top_k: int,
                 rerank: bool = False, reranker_top_k: int | None = None) -> list[dict]:
    body = {"query": query, "collection_names": [collection], "top_k": top_k, "search_type": search_type,
            "rerank": rerank, "reranker_top_k": reranker_top_k}
    reply = await http.post("/v1/search", json=body)
    reply.raise_for_status()
    return reply.json()["chunks"]


def documents_in_order(chunks: list[dict]) -> list[str]:
    """Document ids in order of their best chunk."""
    return list(dict.fromkeys(c["document_id"] for c in chunks))


async def gather_bounded(items: list, work, concurrency: int, desc: str) -> list:
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(items), desc=desc)

    async def one(item: object) -> object:
        async with gate:
            result = await work(item)
            bar.update(1)
            return result

    results = await asyncio.gather(*(one(i) for i in items))
    bar.close()
    return results


# SciFact

def load_scifact(limit: int, corpus_docs: int = 0) -> tuple[list[dict], dict[str, str], dict[str, dict[str, int]]]:
    """Documents, the scored claims and their judgements. With `corpus_docs`, a smaller corpus: every abstract a
    scored claim cites, plus random others up to that size (the same subset on every run)."""
    corpus = [json.loads(line) for line in (EVAL / "scifact" / "corpus.jsonl").open()]
    queries = {q["_id"]: q["text"] for q in map(json.loads, (EVAL / "scifact" / "queries.jsonl").open())}
    qrels: dict[str, dict[str, int]] = {}
    for line in list((EVAL / "scifact" / "qrels" / "train.tsv").open())[1:]:
        query_id, corpus_id, score = line.split("\t")
        qrels.setdefault(query_id, {})[corpus_id] = int(score)
    judged = sorted(q for q in qrels if q in queries)
    random.Random(0).shuffle(judged)
    judged = judged[:limit] if limit else judged
    if corpus_docs:
        cited = {doc for q in judged for doc in qrels[q]}
        others = [d for d in corpus if d["_id"] not in cited]
        random.Random(1).shuffle(others)
        keep = cited | {d["_id"] for d in others[:max(0, corpus_docs - len(cited))]}
        corpus = [d for d in corpus if d["_id"] in keep]
    documents = [{"id": d["_id"], "text": f"{d['title']}\n\n{d['text']}", "name": d["title"][:100]} for d in corpus]
    return documents, {q: queries[q] for q in judged}, {q: qrels[q] for q in judged}


async def scifact(http: httpx.AsyncClient, args: argparse.Namespace) -> dict:
    documents, queries, qrels = load_scifact(args.scifact_queries, args.scifact_corpus_docs)
    throughput = await ingest(http, "scifact", documents, args.keep)
    judged = list(queries)  # in load_scifact's (seeded, shuffled) order
    results: dict[str, float] = {}
    for search_type in ("dense", "sparse", "hybrid"):
        async def score(query_id: str, kind: str = search_type) -> float:
            chunks = await search(http, "scifact", queries[query_id], kind, top_k=30)
            return ndcg_at_k(documents_in_order(chunks), qrels[query_id])
        scores = await gather_bounded(judged, score, 4, f"scifact {search_type}")
        results[search_type] = sum(scores) / len(scores)
    rerank_subset = judged[:args.rerank_queries]
    if rerank_subset and args.rerank:
        async def reranked(query_id: str) -> tuple[float, float]:
            chunks = await search(http, "scifact", queries[query_id], "hybrid", top_k=args.rerank_depth,
                                  rerank=True, reranker_top_k=args.rerank_depth)
            base = await search(http, "scifact", queries[query_id], "hybrid", top_k=30)
            return (ndcg_at_k(documents_in_order(chunks), qrels[query_id]),
                    ndcg_at_k(documents_in_order(base), qrels[query_id]))
        pairs = await gather_bounded(rerank_subset, reranked, 1, "scifact hybrid+rerank")
        results["hybrid+rerank (subset)"] = sum(p[0] for p in pairs) / len(pairs)
        results["hybrid (same subset)"] = sum(p[1] for p in pairs) / len(pairs)
    return {"ndcg@10": results, "queries": len(judged), "rerank_queries": len(rerank_subset) if args.rerank else 0,
            "corpus_docs": len(documents), "ingestion": throughput}


# SQuAD

async def squad(http: httpx.AsyncClient, llm: httpx.AsyncClient, args: argparse.Namespace) -> dict:
    data = json.loads((EVAL / "squad" / "dev-v1.1-articles-00-23.json").read_text())["data"]
    paragraphs, questions = [], []
    for article in data:
        for number, paragraph in enumerate(article["paragraphs"]):
            doc_id = f"{article['title']}-{number}"
            paragraphs.append({"id": doc_id, "text": paragraph["context"], "name": f"{article['title']} #{number}"})
            questions.extend((doc_id, paragraph["context"], qa["question"], [a["text"] for a in qa["answers"]])
                             for qa in paragraph["qas"])
    throughput = await ingest(http, "squad", paragraphs, args.keep)
    random.Random(args.squad_seed).shuffle(questions)
    questions = questions[args.squad_skip:args.squad_skip + args.squad_questions]
    settings = RetrieverSettings()
    records = args.squad_records.open("w") if args.squad_records else None

    async def evaluate(item: tuple) -> dict:
        doc_id, context, question, answers = item
        chunks = await search(http, "squad", question, "hybrid", top_k=args.hit_k)
        ranked = [c["document_id"] for c in chunks]
        reply = await http.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": question}], "collection_names": ["squad"], "temperature": 0,
            "max_tokens": 32, "reranker_top_k": args.hit_k, "enable_reranker": False})
        reply.raise_for_status()
        answer = reply.json()["choices"][0]["message"]["content"]
        cited = [c["document_id"] for c in reply.json()["citations"]["results"]]
        # the ceiling: the retriever's own prompt, holding the gold paragraph as its only source
        gold_prompt = rag_messages(settings.system_prompt, [], [source_block(1, context)], question,
                                   settings.answer_instruction)
        ceiling = await llm.post("/v1/chat/completions", json={"messages": gold_prompt, "temperature": 0,
                                                                "max_tokens": 32})
        ceiling.raise_for_status()
        gold_answer = ceiling.json()["choices"][0]["message"]["content"]
        record = {"question": question, "answers": answers, "hit": doc_id in ranked,
                  "gold_rank": ranked.index(doc_id) + 1 if doc_id in ranked else None,
                  "gold_source": cited.index(doc_id) + 1 if doc_id in cited else None,
                  "scores": [round(c["score"], 5) for c in chunks], "sources": len(cited),
                  "source_scores": [round(c["score"], 5) for c in reply.json()["citations"]["results"]],
                  "answer": answer, "gold_answer": gold_answer,
                  "em": exact_match(answer, answers), "f1": f1_score(answer, answers),
                  "ceiling_em": exact_match(gold_answer, answers), "ceiling_f1": f1_score(gold_answer, answers)}
        if records:
            records.write(json.dumps(record) + "\n")
            records.flush()
        return record

    rows = await gather_bounded(questions, evaluate, args.squad_concurrency, "squad")
    if records:
        records.close()
    numeric = ("hit", "sources", "em", "f1", "ceiling_em", "ceiling_f1")
    mean = {key: sum(r[key] for r in rows) / len(rows) for key in numeric}
    return {"questions": len(rows), f"hit@{args.hit_k}": mean["hit"], "rag": {"em": mean["em"], "f1": mean["f1"]},
            "gold_paragraph": {"em": mean["ceiling_em"], "f1": mean["ceiling_f1"]},
            "rag_f1_over_gold_f1": mean["f1"] / mean["ceiling_f1"] if mean["ceiling_f1"] else None,
            "sources_per_answer": mean["sources"], "prompt": {"system": settings.system_prompt,
                                                              "answer_instruction": settings.answer_instruction},
            "by_gold_source": by_gold_source(rows), "paragraphs": len(paragraphs), "ingestion": throughput,
            "per_question": rows}


def by_gold_source(rows: list[dict]) -> dict[str, dict]:
    """Where RAG answers lose to the gold-paragraph ones: means per position of the gold paragraph among the
    prompt's sources (1: the best, written last), "none" where it did not go in."""
    groups: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        groups[str(row["gold_source"] or "none")].append(row)
    return {key: {"questions": len(group), "f1": sum(r["f1"] for r in group) / len(group),
                  "ceiling_f1": sum(r["ceiling_f1"] for r in group) / len(group),
                  "sources": sum(r["sources"] for r in group) / len(group),
                  "answer_words": sum(len(r["answer"].split()) for r in group) / len(group),
                  "ceiling_answer_words": sum(len(r["gold_answer"].split()) for r in group) / len(group)}
            for key, group in sorted(groups.items())}


def start_stack(args: argparse.Namespace, stack: ExitStack) -> None:
    """Start the services the run needs on free loopback ports, unless their URLs were given."""
    logs = Path(tempfile.mkdtemp(prefix="rag-eval-"))
    env = {"HF_HUB_OFFLINE": "1"}
    needed = {"embed"} | ({"rerank"} if args.rerank and "scifact" in args.parts else set()) | \
        ({"llm"} if "squad" in args.parts else set())
    urls = {name: getattr(args, f"{name}_url") for name in ("embed", "rerank", "llm")}
    for name in sorted(needed):
        if not urls[name]:
            service_env = {**env, "EMBED_DTYPE": args.embed_dtype} if name == "embed" else env
            process = stack.enter_context(ServiceProcess(name, env=service_env, log_dir=logs))
            process.wait_ready(600)
            urls[name] = process.url
            setattr(args, f"{name}_url", process.url)
    if not args.retriever_url:
        retriever_env = {**env, "RETRIEVER_DATA_DIR": str(logs / "data"),
                         **{f"RETRIEVER_{n.upper()}_URL": u for n, u in urls.items() if u}}
        process = stack.enter_context(ServiceProcess("retriever", env=retriever_env, log_dir=logs))
        args.retriever_url = process.wait_ready().url
    print(f"services: {urls | {'retriever': args.retriever_url}} (logs in {logs})")


async def main_async(args: argparse.Namespace) -> dict:
    results: dict[str, object] = {}
    async with httpx.AsyncClient(base_url=args.retriever_url, timeout=900) as http, \
            httpx.AsyncClient(base_url=args.llm_url or "http://127.0.0.1:8000", timeout=300) as llm:
        if "scifact" in args.parts:
            results["scifact"] = await scifact(http, args)
        if "squad" in args.parts:
            results["squad"] = await squad(http, llm, args)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["scifact", "squad"], choices=["scifact", "squad"])
    parser.add_argument("--retriever-url", default="", help="a running retriever (else one is started)")
    parser.add_argument("--embed-url", default="")
    parser.add_argument("--rerank-url", default="")
    parser.add_argument("--llm-url", default="")
    parser.add_argument("--embed-dtype", default="auto", choices=EMBED_DTYPES,
                        help="EMBED_DTYPE of the embed service started here (auto: bf16 on a CPU with native bf16)")
    parser.add_argument("--scifact-queries", type=int, default=0, help="0: all 809 judged training claims")
    parser.add_argument("--scifact-corpus-docs", type=int, default=0,
                        help="0: all 5,183 abstracts; N: those the scored claims cite plus random others up to N "
                             "(a shorter run on a small machine; scores are higher than over the whole corpus)")
    parser.add_argument("--rerank", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--rerank-queries", type=int, default=40, help="claims scored with hybrid+rerank")
    parser.add_argument("--rerank-depth", type=int, default=20, help="hybrid candidates the reranker reorders")
    parser.add_argument("--squad-questions", type=int, default=60)
    parser.add_argument("--squad-seed", type=int, default=0, help="shuffle seed of the SQuAD questions")
    parser.add_argument("--squad-skip", type=int, default=0,
                        help="skip the first N shuffled questions (a tuning slice apart from the reported one)")
    parser.add_argument("--squad-records", type=Path, default=None,
                        help="also write each question's record to this JSONL file as it is answered")
    parser.add_argument("--squad-concurrency", type=int, default=2, help="SQuAD questions answered at once")
    parser.add_argument("--hit-k", type=int, default=5)
    parser.add_argument("--keep", action="store_true",
                        help="reuse existing collections: documents already there are skipped, not re-embedded")
    args = parser.parse_args()
    with ExitStack() as stack:
        start_stack(args, stack)
        results = asyncio.run(main_async(args))
    rows = []
    if "scifact" in results:
        sci = results["scifact"]
        for kind, value in sci["ndcg@10"].items():  # type: ignore[index]
            rows.append([f"SciFact nDCG@10 {kind}", value, ""])
        rows += [["SciFact nDCG@10 BM25 (published, test split)", "", PUBLISHED["sparse (BM25)"]],
                 ["SciFact nDCG@10 MiniLM dense (published)", "", PUBLISHED["dense (all-MiniLM-L6-v2)"]],
                 ["SciFact nDCG@10 BM25+cross-encoder (published)", "", PUBLISHED["BM25 + MiniLM cross-encoder"]],
                 ["SciFact ingestion docs/s", sci["ingestion"]["docs_per_s"], ""]]  # type: ignore[index]
    if "squad" in results:
        sq = results["squad"]
        rows += [[f"SQuAD hit@{args.hit_k}", sq[f"hit@{args.hit_k}"], ""],  # type: ignore[index]
                 ["SQuAD RAG EM / F1", f"{sq['rag']['em']:.3f} / {sq['rag']['f1']:.3f}", ""],  # type: ignore[index]
                 ["SQuAD gold-paragraph EM / F1 (ceiling)", "",
                  f"{sq['gold_paragraph']['em']:.3f} / {sq['gold_paragraph']['f1']:.3f}"],  # type: ignore[index]
                 ["SQuAD RAG F1 / gold-paragraph F1", sq["rag_f1_over_gold_f1"], ""],  # type: ignore[index]
                 ["SQuAD sources per RAG answer", sq["sources_per_answer"], ""]]  # type: ignore[index]
        for key, group in sq["by_gold_source"].items():  # type: ignore[index]
            rows.append([f"SQuAD gold as source {key}: n / F1 (gold-paragraph F1)",
                         f"{group['questions']} / {group['f1']:.3f}", f"{group['ceiling_f1']:.3f}"])
    print_table("RAG evaluation (REST API, default models)", ["metric", "ours", "reference"], rows)
    # a SQuAD-only run must not overwrite the SciFact record written under "rag_eval"
    name = "rag_eval" if "scifact" in results else "rag_eval_squad"
    path = save_result(name, workload={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                                                   if not k.endswith("_url")},
                       ours=results, peer={"scifact_published_test_split": PUBLISHED,
                                           "squad_gold_paragraph": (results.get("squad") or {}).get("gold_paragraph")})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
