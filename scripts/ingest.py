"""Ingest files or folders into a retriever collection.

    python scripts/ingest.py PATH... --collection NAME [--url URL] [--dry-run]

Files are read locally first to learn their document ids and fingerprints (computed as the server computes
them), so files already in the collection as they are now are skipped without uploading. The rest go up in
batches, a few at a time, with progress bars over files and chunks; each file is sent under its absolute path,
so an edited file replaces its older version on the server (README, "Updates"). Exits non-zero if any file failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from services.retriever.loaders import (
    SUPPORTED_EXTENSIONS,
    UnsupportedDocument,
    iter_supported_files,
    load_file,
)


@dataclass(slots=True)
class FilePlan:
    path: Path  # absolute: the server keys a file's documents by it
    documents: dict[str, str] = field(default_factory=dict)  # document id -> fingerprint
    error: str | None = None
    characters: int = 0  # of text, what embedding costs grow with
    bytes: int = 0  # of the file, what an upload carries

    @property
    def document_ids(self) -> list[str]:
        return list(self.documents)


@dataclass(slots=True)
class Summary:
    ingested: list[Path] = field(default_factory=list)
    updated: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    chunks: int = 0
    replaced: int = 0


def plan_files(paths: list[Path], extensions: set[str]) -> list[FilePlan]:
    plans = []
    for path in iter_supported_files([p.resolve() for p in paths]):
        if path.suffix.lower() not in extensions:
            continue
        try:
            documents = [d for d in load_file(path) if d.text]
            plans.append(FilePlan(path, {d.id: d.fingerprint for d in documents},
                                  characters=sum(len(d.text) for d in documents), bytes=path.stat().st_size))
        except (UnsupportedDocument, OSError) as exc:
            plans.append(FilePlan(path, error=str(exc)))
    return plans


def upload_batches(plans: list[FilePlan], max_files: int, max_bytes: int) -> list[list[FilePlan]]:
    """Files grouped for upload, longest text first, each group within `max_files` and `max_bytes` (a bigger
    file goes alone). Neighbours of similar length make chunks of similar length, which the embed service
    batches with little padding."""
    batches: list[list[FilePlan]] = []
    current: list[FilePlan] = []
    size = 0
    for plan in sorted(plans, key=lambda p: (-p.characters, str(p.path))):
        if current and (len(current) >= max_files or size + plan.bytes > max_bytes):
            batches.append(current)
            current, size = [], 0
        current.append(plan)
        size += plan.bytes
    if current:
        batches.append(current)
    return batches


async def stored_fingerprints(http: httpx.AsyncClient, collection: str) -> dict[str, str]:
    found: dict[str, str] = {}
    offset, page = 0, 10_000
    while True:
        reply = await http.get("/v1/documents", params={"collection_name": collection, "limit": page,
                                                        "offset": offset})
        reply.raise_for_status()
        documents = reply.json()["documents"]
        found.update((d["document_id"], d.get("fingerprint", "")) for d in documents)
        if len(documents) < page:
            return found
        offset += page


async def ensure_collection(http: httpx.AsyncClient, collection: str) -> bool:
    """True if the collection had to be created."""
    if (await http.get(f"/v1/collections/{collection}")).status_code == 200:
        return False
    reply = await http.post("/v1/collections", json={"name": collection})
    if reply.status_code not in (200, 409):  # 409: created meanwhile by someone else
        raise RuntimeError(f"cannot create collection {collection!r}: {_error(reply)}")
    return True


async def upload(http: httpx.AsyncClient, collection: str, batch: list[FilePlan], options: dict,
                 summary: Summary, files_bar: tqdm, chunks_bar: tqdm) -> None:
    files = [("documents", (str(plan.path), plan.path.read_bytes())) for plan in batch]
    try:
        reply = await http.post("/v1/documents", data={"collection_name": collection, **options}, files=files)
    except httpx.HTTPError as exc:
        summary.failed.extend((plan.path, f"upload failed: {type(exc).__name__}: {exc}") for plan in batch)
        files_bar.update(len(batch))
        return
    if reply.status_code != 200:
        summary.failed.extend((plan.path, f"HTTP {reply.status_code}: {_error(reply)}") for plan in batch)
        files_bar.update(len(batch))
        return
    body = reply.json()
    status = {d["document_id"]: d for d in body["documents"]}
    refused = {f["document_name"]: f["error"] for f in body.get("failed", [])}
    summary.replaced += len(body.get("replaced", []))
    for plan in batch:
        statuses = {status.get(i, {}).get("status") for i in plan.document_ids}
        if str(plan.path) in refused:
            summary.failed.append((plan.path, refused[str(plan.path)]))
        elif "updated" in statuses:
            summary.updated.append(plan.path)
        elif "ingested" in statuses:
            summary.ingested.append(plan.path)
        else:
            summary.unchanged.append(plan.path)
        new_chunks = sum(status.get(i, {}).get("chunks", 0) for i in plan.document_ids)
        summary.chunks += new_chunks
        chunks_bar.update(new_chunks)
    files_bar.update(len(batch))


async def run(args: argparse.Namespace) -> Summary:
    extensions = {e if e.startswith(".") else f".{e}" for e in args.ext} if args.ext else set(SUPPORTED_EXTENSIONS)
    plans = plan_files([Path(p) for p in args.paths], extensions)
    summary = Summary(failed=[(p.path, p.error) for p in plans if p.error])
    plans = [p for p in plans if not p.error]
    for plan in plans:
        if not plan.document_ids:
            summary.failed.append((plan.path, "no text found"))
    plans = [p for p in plans if p.document_ids]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout) as http:
        try:
            created = False if args.dry_run else await ensure_collection(http, args.collection)
            known = {} if created else await stored_fingerprints(http, args.collection)
        except httpx.HTTPStatusError as exc:
            if not (args.dry_run and exc.response.status_code == 404):
                raise
            known = {}
        todo = [p for p in plans if not p.documents.items() <= known.items()]
        summary.unchanged.extend(p.path for p in plans if p.documents.items() <= known.items())
        if args.dry_run:
            for plan in todo:
                print(f"would upload {plan.path} ({len(plan.document_ids)} documents)")
            summary.ingested = [p.path for p in todo]
            return summary
        options = {k: str(v) for k, v in (("chunk_size", args.chunk_size), ("chunk_overlap", args.chunk_overlap))
                   if v is not None}
        batches = upload_batches(todo, args.batch_size, args.batch_mib * 1024 * 1024)
        gate = asyncio.Semaphore(args.concurrency)
        with tqdm(total=len(todo), unit="file", desc="files") as files_bar, \
                tqdm(unit="chunk", desc="chunks", position=1) as chunks_bar:
            async def send(batch: list[FilePlan]) -> None:
                async with gate:
                    await upload(http, args.collection, batch, options, summary, files_bar, chunks_bar)

            await asyncio.gather(*(send(b) for b in batches))
    return summary


def _error(reply: httpx.Response) -> str:
    try:
        return reply.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return reply.text[:300]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Ingest files or folders into a retriever collection.")
    parser.add_argument("paths", nargs="+", help="files or folders (walked recursively)")
    parser.add_argument("--collection", required=True, help="collection name (created if missing)")
    parser.add_argument("--url", default=os.environ.get("RETRIEVER_URL", "http://127.0.0.1:8080"),
                        help="retriever base URL [env RETRIEVER_URL, default %(default)s]")
    parser.add_argument("--api-key", default=os.environ.get("API_KEY"), help="bearer key [env API_KEY]")
    parser.add_argument("--ext", action="append", help="only these extensions (repeatable), e.g. --ext pdf")
    parser.add_argument("--chunk-size", type=int, help="tokens per chunk (server default 512, capped at the model's)")
    parser.add_argument("--chunk-overlap", type=int, help="overlap in tokens (server default 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="most files per upload request")
    parser.add_argument("--batch-mib", type=float, default=8.0,
                        help="most MiB of files per upload request (a bigger file goes alone; the server refuses "
                             "bodies over its RETRIEVER_MAX_BODY_BYTES, 16 MiB by default)")
    parser.add_argument("--concurrency", type=int, default=4, help="upload requests in flight")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per upload request")
    parser.add_argument("--dry-run", action="store_true", help="show what would be uploaded; change nothing")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.concurrency < 1 or args.batch_mib <= 0:
        parser.error("--batch-size and --concurrency must be at least 1, --batch-mib above 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = asyncio.run(run(args))
    except (httpx.HTTPError, RuntimeError) as exc:
        print(f"error: cannot reach the retriever at {args.url}: {exc}", file=sys.stderr)
        return 2
    verb = "would ingest" if args.dry_run else "ingested"
    print(f"{verb}: {len(summary.ingested)} files ({summary.chunks} chunks); updated: {len(summary.updated)} "
          f"(replacing {summary.replaced} older documents); unchanged: {len(summary.unchanged)}; "
          f"failed: {len(summary.failed)}")
    for path, reason in summary.failed:
        print(f"  failed {path}: {reason}", file=sys.stderr)
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
