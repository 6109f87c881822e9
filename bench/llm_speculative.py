"""Speculative decoding on the retriever's SQuAD RAG prompts: accepted tokens per step and speed-up.

The same engine settings, prompts and greedy answers run with speculation off and on (prompt lookup by
default; `--method draft --draft-model PATH` for a draft model), at batch 1 (one request at a time) and at
batch 8 (eight requests in flight). Both sides get the same untimed warm-up and load outside the timed region;
the runs alternate off/on per group of prompts so a busy machine's drift hits both alike. Greedy answers are
checked equal on both sides. Writes bench/results/llm_speculative-*.json.

    python bench/llm_speculative.py                       # bundled SmolLM2-135M, 48 questions
    python bench/llm_speculative.py --num-questions 16 --batch-sizes 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import print_table, require_clean_tree, save_result
from bench.squad_prompts import squad_rag_prompts
from common.model_files import bundled_llm
from services.llm.engine import EngineConfig, LLMEngine, SamplingParams
from services.llm.speculative import SpeculativeConfig


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="HF directory or .gguf (default: the bundled SmolLM2 GGUF)")
    parser.add_argument("--num-questions", type=int, default=48)
    parser.add_argument("--num-sources", type=int, default=2,
                        help="retrieved paragraphs per prompt (2: what the retriever's source budget gives the "
                             "bundled 135M model, 1.9 on average in bench/rag_eval.py --parts squad)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--method", default="ngram", choices=["ngram", "draft"])
    parser.add_argument("--num-spec-tokens", type=int, default=4)
    parser.add_argument("--ngram-min", type=int, default=2)
    parser.add_argument("--ngram-max", type=int, default=4)
    parser.add_argument("--draft-model", default="")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--allow-dirty", action="store_true", help="run even from uncommitted code")
    return parser.parse_args()


def build(args: argparse.Namespace, speculative: SpeculativeConfig) -> LLMEngine:
    return LLMEngine(EngineConfig(model=args.model or str(bundled_llm()), device="cpu", dtype=args.dtype,
                                  speculative=speculative, max_num_seqs=max(args.batch_sizes)))


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, batch: int) -> tuple[float, list]:
    """Seconds and outputs for the prompts, `batch` at a time (each group runs to completion)."""
    start = time.perf_counter()
    outputs = []
    for first in range(0, len(prompts), batch):
        outputs += engine.generate(prompts[first:first + batch], params, use_tqdm=False)
    return time.perf_counter() - start, outputs


def main() -> None:
    args = parse_args()
    if not args.allow_dirty:
        require_clean_tree()
    spec = SpeculativeConfig(method=args.method, num_tokens=args.num_spec_tokens, ngram_min=args.ngram_min,
                             ngram_max=args.ngram_max, draft_model=args.draft_model)
    off, on = build(args, SpeculativeConfig()), build(args, spec)
    tokenizer = off.tokenizer
    # Rendered and encoded the way the server's chat route does it.
    texts = [tokenizer.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
             for p in squad_rag_prompts(args.num_questions, args.num_sources)]
    prompts = [list(tokenizer.encode(text, add_special_tokens=False)) for text in texts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    for engine in (off, on):  # the same untimed warm-up for both
        engine.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    rows, results = [], {}
    for batch in args.batch_sizes:
        seconds = {"off": 0.0, "on": 0.0}
        answers: dict[str, list] = {"off": [], "on": []}
        group = max(batch, 8)
        before = on.stats()
        for first in range(0, len(prompts), group):  # alternate so drift on a busy machine hits both sides
            part = prompts[first:first + group]
            for name, engine in (("off", off), ("on", on)):
                took, outputs = run(engine, part, params, batch)
                seconds[name] += took
                answers[name] += [o.outputs[0].token_ids for o in outputs]
        after = on.stats()
        # Each side's own token count: in bf16 a near-tie can flip with the step's shape, so answers may differ.
        tokens_off, tokens = sum(len(a) for a in answers["off"]), sum(len(a) for a in answers["on"])
        same = sum(a == b for a, b in zip(answers["off"], answers["on"], strict=True))
        drafted = after.spec_draft_tokens_total - before.spec_draft_tokens_total
        accepted = after.spec_accepted_tokens_total - before.spec_accepted_tokens_total
        # Steps in which a sequence decoded: every token is one decode row except accepted drafts.
        decode_rows = tokens - accepted
        tok_s_off, tok_s_on = tokens_off / seconds["off"], tokens / seconds["on"]
        result = {"output_tokens_off": tokens_off, "output_tokens_on": tokens,
                  "seconds_off": round(seconds["off"], 3), "seconds_on": round(seconds["on"], 3),
                  "output_tok_s_off": tok_s_off, "output_tok_s_on": tok_s_on, "speedup": tok_s_on / tok_s_off,
                  "draft_tokens": drafted, "accepted_tokens": accepted,
                  "acceptance_rate": accepted / drafted if drafted else 0.0,
                  "tokens_per_sequence_step": tokens / decode_rows if decode_rows else 0.0,
                  "identical_answers": f"{same}/{len(prompts)}"}
        results[f"batch_{batch}"] = result
        rows.append([batch, f"{tokens_off}/{tokens}", f"{tok_s_off:.1f}", f"{tok_s_on:.1f}",
                     f"{result['speedup']:.2f}x", f"{result['acceptance_rate']:.2f}",
                     f"{result['tokens_per_sequence_step']:.2f}", result["identical_answers"]])
    print_table(f"speculative decoding ({args.method}) on SQuAD RAG prompts, greedy",
                ["batch", "tokens off/on", "off tok/s", "on tok/s", "speed-up", "accepted/drafted", "tokens/step",
                 "same answers"], rows)
    workload = {"prompts": "retriever-format SQuAD RAG prompts (bench/squad_prompts.py)",
                "num_questions": len(prompts), "num_sources": args.num_sources, "max_tokens": args.max_tokens,
                "mean_prompt_tokens": sum(map(len, prompts)) / len(prompts), "greedy": True,
                "speculative": {"method": args.method, "num_tokens": args.num_spec_tokens,
                                "ngram": [args.ngram_min, args.ngram_max], "draft_model": args.draft_model},
                "dtype": str(on.dtype), "note": "off and on alternate per group of 8 prompts in one process"}
    path = save_result("llm_speculative", workload=workload, ours=results,
                       peer={"note": "the peer is our own engine with speculation off, in the same run"})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
