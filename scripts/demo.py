"""The whole platform in one run: start the local stack, ingest `examples/docs/`, ask one question, stop the stack.

The question's answer is a single fact that appears in exactly one sample document, so a correct run prints
that fact and cites that document.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
DOCS = ROOT / "examples" / "docs"
COLLECTION = "demo"
QUESTION = "How many litres does the Aurora X2 water tank hold?"
RETRIEVER_PORT_OFFSET = 80  # scripts/stack.py puts the retriever on base port + 80


class DemoFailed(RuntimeError):
    pass


def run_script(name: str, *args: str, check: bool = True) -> None:
    """Run one of our scripts with this interpreter, its output going straight to the terminal."""
    command = [sys.executable, str(SCRIPTS / name), *args]
    print(f"$ {' '.join(command[1:])}", flush=True)
    returncode = subprocess.run(command, cwd=ROOT).returncode
    if returncode != 0 and check:
        raise DemoFailed(f"{name} {args[0] if args else ''} failed (see the output above)")
    if returncode != 0:
        print(f"warning: {name} {args[0] if args else ''} exited with {returncode}", file=sys.stderr, flush=True)


def ask(retriever_url: str, question: str, timeout: float) -> dict:
    headers = {"Authorization": f"Bearer {os.environ['API_KEY']}"} if os.environ.get("API_KEY") else {}
    body = {
        "messages": [{"role": "user", "content": question}],
        "collection_names": [COLLECTION],
        "use_knowledge_base": True,
        "enable_citations": True,
        # Three sources keep the prompt short enough for a 135M model on a CPU.
        "reranker_top_k": 3,
        "temperature": 0.0,
        "max_tokens": 64,
        # A small model keeps talking after the answer; the first paragraph is the answer.
        "stop": ["\n\n"],
        "stream": False,
    }
    response = httpx.post(f"{retriever_url}/v1/chat/completions", json=body, headers=headers, timeout=timeout)
    if response.status_code != 200:
        raise DemoFailed(f"/v1/chat/completions answered {response.status_code}: {response.text[:500]}")
    return response.json()


def cited_documents(completion: dict) -> list[tuple[str, float]]:
    """(document name, best chunk score) of the citations, best first, each document once."""
    cited: dict[str, float] = {}
    for citation in (completion.get("citations") or {}).get("results", []):
        name = citation.get("document_name") or citation.get("document_id", "?")
        cited.setdefault(name, float(citation.get("score", 0.0)))
    return list(cited.items())


def print_answer(question: str, completion: dict, seconds: float) -> None:
    answer = completion["choices"][0]["message"]["content"].strip()
    print(f"\nQuestion: {question}", flush=True)
    print(f"Answer:   {answer}", flush=True)
    print("Citations:", flush=True)
    for rank, (name, score) in enumerate(cited_documents(completion), start=1):
        print(f"  [{rank}] {name}  (score {score:.4f})", flush=True)
    usage = completion.get("usage") or {}
    print(f"({seconds:.1f}s, {usage.get('prompt_tokens', '?')} prompt tokens, "
          f"{usage.get('completion_tokens', '?')} completion tokens)\n", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "run", help="the stack's run folder [default: run/]")
    parser.add_argument("--base-port", type=int, default=int(os.environ.get("STACK_BASE_PORT", "8000")),
                        help="the stack's base port (retriever on BASE+80) [default: env STACK_BASE_PORT or 8000]")
    parser.add_argument("--question", default=QUESTION, help="what to ask [default: %(default)s]")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the stack and the answer")
    args = parser.parse_args(argv)

    stack_options = ["--run-dir", str(args.run_dir), "--base-port", str(args.base_port)]
    retriever_url = f"http://127.0.0.1:{args.base_port + RETRIEVER_PORT_OFFSET}"
    try:
        run_script("stack.py", "up", *stack_options, "--timeout", str(args.timeout))
        try:
            run_script("ingest.py", str(DOCS), "--collection", COLLECTION, "--url", retriever_url)
            started = time.monotonic()
            completion = ask(retriever_url, args.question, args.timeout)
            print_answer(args.question, completion, time.monotonic() - started)
        finally:
            # Never mask the demo's own error with one from stopping the stack.
            run_script("stack.py", "down", *stack_options, check=False)
    except (DemoFailed, httpx.HTTPError) as error:
        print(f"demo failed: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
