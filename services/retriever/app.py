"""Retriever routes (SPEC §6): collections, documents, search, and RAG answers over the other three services."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from prometheus_client import CollectorRegistry, Counter
from pydantic import BaseModel, ValidationError

from common.errors import APIError, bad_request, error_body
from common.health import Readiness
from common.model_files import bundled_embedding_model
from common.replicas import ReplicaPool, split_urls
from common.schemas.retriever import (
    CollectionCreate,
    DocumentsUpload,
    DocumentsUploadResponse,
    FailedDocument,
    GenerateRequest,
    IngestedDocument,
    SearchChunk,
    SearchRequest,
    SearchResponse,
)
from common.service import ModelCard, create_app
from services.retriever.chunking import Chunker
from services.retriever.dependencies import EmbeddingClient, LLMClient, RerankClient
from services.retriever.knowledge_base import KnowledgeBase
from services.retriever.loaders import LoadLimits, SourceDocument, UnsupportedDocument, load_bytes, make_document
from services.retriever.openapi import describe_request_bodies
from services.retriever.playground import mount_playground
from services.retriever.rag import PreparedAnswer, RagPipeline, sse
from services.retriever.settings import RetrieverSettings
from services.retriever.vector_store import open_vector_store

log = logging.getLogger(__name__)
_HEALTH_POLL_S = 5.0
_SAVE_RETRY_MAX_S = 60.0
_Model = TypeVar("_Model", bound=BaseModel)


def build_app(settings: RetrieverSettings) -> FastAPI:
    readiness = Readiness()
    registry = CollectorRegistry()
    ingested = Counter("retriever_documents_ingested", "documents stored", registry=registry)
    # Each dependency may have several replicas (comma-separated URLs); LLM answers over the same sources keep to
    # one replica (RETRIEVER_LLM_BALANCE=affinity), everything else goes to the least busy.
    clients = {
        "embed": ReplicaPool("embed", split_urls(settings.embed_url), api_key=settings.api_key,
                             timeout=settings.embed_timeout),
        "rerank": ReplicaPool("rerank", split_urls(settings.rerank_url), api_key=settings.api_key,
                              timeout=settings.rerank_timeout),
        "llm": ReplicaPool("llm", split_urls(settings.llm_url), balance=settings.llm_balance,
                           api_key=settings.api_key, timeout=settings.llm_timeout, retries=1),
    }
    embedder = EmbeddingClient(clients["embed"], settings.embed_model, settings.embed_batch_size,
                               settings.embed_concurrency)
    reranker = RerankClient(clients["rerank"], settings.rerank_model)
    tokenizer_dir = Path(settings.tokenizer) if settings.tokenizer else bundled_embedding_model()
    load_limits = LoadLimits(max_pdf_pages=settings.max_pdf_pages, pdf_parse_seconds=settings.pdf_parse_seconds)
    state: dict[str, object] = {}

    def kb() -> KnowledgeBase:
        if "kb" not in state:
            raise APIError(503, "retriever is starting")
        return state["kb"]  # type: ignore[return-value]

    def pipeline() -> RagPipeline:
        return state["rag"]  # type: ignore[return-value]

    discovery = {"embed": embedder.models, "rerank": reranker.models}  # and "llm" once the lifespan made its client

    async def watch_dependencies() -> None:
        while True:
            for name, client in clients.items():
                status: dict[str, object] = {"url": client.base_url, "ready": await client.is_ready()}
                if status["ready"] and name in discovery:
                    with suppress(APIError):  # the model id is for display; readiness is what counts
                        status["model"] = await discovery[name].model()
                readiness.details[name] = status
            await asyncio.sleep(_HEALTH_POLL_S)

    async def save_indexes(knowledge_base: KnowledgeBase) -> None:
        """Rewrite index files that fell behind; while that fails (disk full...), log, say not ready, retry."""
        delay, failing = settings.index_save_interval, False
        while True:
            await asyncio.sleep(delay)
            try:
                await asyncio.to_thread(knowledge_base.save_indexes)
            except Exception as exc:
                log.exception("saving vector indexes failed; retrying in %.0fs", delay)
                readiness.set_not_ready(f"saving vector indexes failed: {type(exc).__name__}: {exc}")
                failing, delay = True, min(max(2 * delay, 1.0), _SAVE_RETRY_MAX_S)
                continue
            if failing:
                log.info("saving vector indexes works again")
                readiness.set_ready()
            failing, delay = False, settings.index_save_interval

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        chunker = await asyncio.to_thread(Chunker.from_model_dir, tokenizer_dir, settings.embed_max_tokens)
        vector_store = await asyncio.to_thread(open_vector_store, settings)
        knowledge_base = await asyncio.to_thread(KnowledgeBase, settings.data_dir, chunker, embedder,
                                                 reranker=reranker, max_query_chars=settings.max_query_chars,
                                                 vector_store=vector_store)
        state["kb"] = app.state.knowledge_base = knowledge_base
        llm = LLMClient(clients["llm"], settings.llm_model, fallback_counter=chunker.count,
                        fallback_context=settings.llm_context_length)
        discovery["llm"] = llm.models
        state["rag"] = RagPipeline(knowledge_base, llm, reranker, system_prompt=settings.system_prompt,
                                   vdb_top_k=settings.vdb_top_k, reranker_top_k=settings.reranker_top_k,
                                   default_max_tokens=settings.default_max_tokens,
                                   answer_instruction=settings.answer_instruction,
                                   source_tokens=settings.rag_source_tokens,
                                   min_score_ratio=settings.rag_min_score_ratio,
                                   sole_source_parameters=settings.rag_sole_source_parameters,
                                   deadline=settings.rag_timeout)
        readiness.details.update({**vector_store.details(),
                                  "chunk_limit_tokens": chunker.max_tokens})
        tasks = [asyncio.create_task(watch_dependencies()), asyncio.create_task(save_indexes(knowledge_base))]
        readiness.set_ready()
        log.info("retriever ready: data in %s, %d collections", settings.data_dir,
                 len(vector_store.collections()))
        try:
            yield
        finally:
            readiness.set_not_ready("shutting down")
            for task in tasks:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            try:
                await asyncio.to_thread(knowledge_base.close)
            except Exception:
                log.exception("saving vector indexes at shutdown failed; start-up will catch them up from SQLite")
            for client in clients.values():
                await client.aclose()

    app = create_app(title="RAG retriever", service="retriever", settings=settings, readiness=readiness,
                     registry=registry, models=lambda: [ModelCard("rag-retriever")], lifespan=lifespan)
    mount_playground(app)

    # Every call into the knowledge base that touches SQLite or an index runs in a thread: a long write holds
    # the store lock, and the event loop (health included) must keep answering meanwhile.

    @app.post("/v1/collections")
    async def create_collection(body: CollectionCreate) -> dict:
        collection = await asyncio.to_thread(kb().create_collection, body.name, body.description, body.metadata)
        return await asyncio.to_thread(kb().describe, collection)

    @app.get("/v1/collections")
    async def list_collections() -> dict:
        return {"collections": await asyncio.to_thread(kb().describe_all)}

    @app.get("/v1/collections/{name}")
    async def get_collection(name: str) -> dict:
        return await asyncio.to_thread(lambda: kb().describe(kb().collection(name)))

    @app.delete("/v1/collections/{name}")
    async def delete_collection(name: str) -> dict:
        await asyncio.to_thread(kb().delete_collection, name)
        return {"deleted": name}

    @app.post("/v1/documents")
    async def upload_documents(request: Request) -> DocumentsUploadResponse:
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            collection_name, documents, failed, size, overlap = await _read_multipart(request, load_limits)
        else:
            upload = _parse(DocumentsUpload, await _json_body(request))
            collection_name, size, overlap = upload.collection_name, upload.chunk_size, upload.chunk_overlap
            documents = [make_document(d.name or str(d.metadata.get("source") or d.id or "document"), d.text,
                                       d.metadata, d.id) for d in upload.documents]
            failed = []
        if not documents:
            reasons = "; ".join(f.error for f in failed) or "no documents given"
            raise bad_request(f"nothing to ingest: {reasons}", param="documents")
        result = await kb().ingest(collection_name, documents, chunk_size=size or settings.chunk_size,
                                   chunk_overlap=settings.chunk_overlap if overlap is None else overlap)
        ingested.inc(sum(o.status != "unchanged" for o in result.documents))
        return DocumentsUploadResponse(collection_name=collection_name, failed=failed, replaced=result.replaced,
                                       documents=[IngestedDocument(document_id=o.document_id,
                                                                   document_name=o.document_name,
                                                                   status=o.status,  # type: ignore[arg-type]
                                                                   chunks=o.chunks) for o in result.documents])

    @app.get("/v1/documents")
    async def list_documents(collection_name: str, limit: int = 1000, offset: int = 0) -> dict:
        if not 1 <= limit <= 100_000 or not 0 <= offset < 2**62:
            raise bad_request("limit must be 1..100000 and offset 0..2^62", param="limit")
        documents = await asyncio.to_thread(kb().documents, collection_name, limit, offset)
        return {"collection_name": collection_name, "documents": documents}

    @app.delete("/v1/documents/{document_id:path}")  # :path, so an id with '/' can be deleted
    async def delete_document(document_id: str, collection_name: str) -> dict:
        await asyncio.to_thread(kb().delete_document, collection_name, document_id)
        return {"deleted": document_id, "collection_name": collection_name}

    @app.post("/v1/search")
    async def search(body: SearchRequest) -> SearchResponse:
        found = await kb().search(body.query, body.collection_names, top_k=body.top_k, search_type=body.search_type,
                                  metadata_filter=body.filter, rerank=body.rerank,
                                  reranker_top_k=body.reranker_top_k)
        return SearchResponse(warnings=found.warnings, chunks=[
            SearchChunk(document_id=h.chunk.document_id, document_name=h.chunk.document_name,
                        chunk_id=h.chunk.chunk_id, collection_name=h.chunk.collection, content=h.chunk.content,
                        score=h.score, metadata=h.chunk.metadata) for h in found.hits])

    async def generate(request: Request) -> object:
        body = _parse(GenerateRequest, await _json_body(request))
        rag = pipeline()
        deadline = rag.start_deadline()
        prepared = await rag.within(deadline, rag.prepare(body))
        if not body.stream:
            return await rag.within(deadline, rag.answer(prepared))
        options = (body.model_extra or {}).get("stream_options") or {}
        return await _stream_response(rag, prepared, bool(options.get("include_usage")), deadline)

    app.add_api_route("/v1/generate", generate, methods=["POST"])
    app.add_api_route("/v1/chat/completions", generate, methods=["POST"])
    describe_request_bodies(app)
    return app


async def _stream_response(rag: RagPipeline, prepared: PreparedAnswer, include_usage: bool,
                           deadline: float) -> StreamingResponse:
    chunks = rag.bounded(await rag.within(deadline, rag.stream(prepared, include_usage)), deadline)

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield sse(chunk)
        except APIError as exc:
            # Headers are gone: the error travels as an event, then the stream ends normally.
            log.warning("stream ended early: %s", exc.message)
            yield sse(error_body(exc.status, exc.message, type=exc.type, code=exc.code))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def _json_body(request: Request) -> object:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request("request body is not valid JSON") from exc


def _parse(model: type[_Model], payload: object) -> _Model:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise bad_request(f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param=param) from exc


async def _read_multipart(request: Request, limits: LoadLimits) -> tuple[str, list[SourceDocument],
                                                                         list[FailedDocument], int | None, int | None]:
    form = await request.form()
    collection_name = form.get("collection_name")
    if not isinstance(collection_name, str) or not collection_name:
        raise bad_request("form field collection_name is required", param="collection_name")
    extra: dict = {}
    if isinstance(form.get("metadata"), str):
        try:
            extra = json.loads(form["metadata"])  # type: ignore[arg-type]
        except json.JSONDecodeError as exc:
            raise bad_request("form field metadata must be a JSON object", param="metadata") from exc
        if not isinstance(extra, dict):
            raise bad_request("form field metadata must be a JSON object", param="metadata")
    size, overlap = _form_int(form.get("chunk_size"), "chunk_size"), _form_int(form.get("chunk_overlap"),
                                                                               "chunk_overlap")
    documents: list[SourceDocument] = []
    failed: list[FailedDocument] = []
    for upload in form.getlist("documents"):
        if isinstance(upload, str):
            raise bad_request("documents must be files", param="documents")
        name = upload.filename or "upload"
        try:
            loaded = await asyncio.to_thread(load_bytes, name, await upload.read(), limits=limits)
        except UnsupportedDocument as exc:
            failed.append(FailedDocument(document_name=name, error=str(exc)))
            continue
        except Exception as exc:  # a loader bug on one file must not fail the others
            log.exception("reading %s failed", name)
            failed.append(FailedDocument(document_name=name, error=f"{name}: unreadable ({type(exc).__name__})"))
            continue
        for document in loaded:
            document.metadata.update(extra)
        documents.extend(d for d in loaded if d.text)
        if not any(d.text for d in loaded):
            failed.append(FailedDocument(document_name=name, error=f"{name}: no text found"))
    return collection_name, documents, failed, size, overlap


def _form_int(value: object, name: str) -> int | None:
    if value is None or value == "":
        return None
    try:
        number = int(str(value))
    except ValueError as exc:
        raise bad_request(f"{name} must be an integer", param=name) from exc
    if number < 0:
        raise bad_request(f"{name} must be >= 0", param=name)
    return number
