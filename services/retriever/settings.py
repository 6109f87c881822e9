"""Retriever settings, read from `RETRIEVER_*` env vars."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from common.settings import ServiceSettings


class RetrieverSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="RETRIEVER_", extra="ignore", populate_by_name=True)

    port: int = Field(8080, description="TCP port")
    data_dir: Path = Field(Path("data/retriever"), description="where the SQLite database and vector indexes live")
    vector_store: Literal["local", "milvus"] = Field(
        "local", description="where chunks, vectors and BM25 live: 'local' (SQLite + FAISS in data_dir, one replica) "
                             "or 'milvus' (RETRIEVER_MILVUS_URI; the retriever keeps no state)")
    milvus_uri: str = Field("", description="Milvus server, e.g. http://milvus:19530 (empty: an embedded milvus-lite "
                                            "file in data_dir, one process only)")
    milvus_token: str = Field("", description="Milvus token ('user:password' or an API key); empty: no auth")
    milvus_db: str = Field("", description="Milvus database (empty: the server's default)")
    milvus_prefix: str = Field("rag_", description="prefix of the Milvus collections this retriever owns")
    milvus_index_type: str = Field("HNSW", description="Milvus index of new collections' vectors (HNSW, IVF_FLAT, "
                                                       "GPU_CAGRA with a GPU Milvus...)")
    milvus_index_params: str = Field("", description="JSON build parameters of that index (empty: M=16, "
                                                     "efConstruction=200 for HNSW, Milvus defaults otherwise)")
    milvus_search_params: str = Field("", description="JSON search parameters (empty: ef=max(64, k) for HNSW, "
                                                      "nprobe=16 for IVF)")
    embed_url: str = Field("http://127.0.0.1:8001", description="embedding service base URL (several: comma-separated, "
                                                                "the least busy is used)")
    rerank_url: str = Field("http://127.0.0.1:8002", description="reranking service base URL (several: "
                                                                 "comma-separated)")
    llm_url: str = Field("http://127.0.0.1:8000", description="LLM service base URL (several: comma-separated)")
    llm_balance: Literal["affinity", "round_robin"] = Field(
        "affinity", description="with several LLM URLs: 'affinity' sends answers over the same sources to the same "
                                "replica (prefix-cache hits), others to the least busy; 'round_robin' takes turns")
    embed_model: str = Field("", description="embedding model id (empty: ask the embed service's /v1/models)")
    rerank_model: str = Field("", description="reranker model id (empty: ask the rerank service's /v1/models)")
    llm_model: str = Field("", description="LLM model id (empty: ask the LLM service's /v1/models)")
    tokenizer: str = Field("", description="embedding tokenizer directory for chunking (empty: bundled model's)")
    embed_max_tokens: int = Field(0, description="embedding model input limit incl. special tokens (0: tokenizer's)")
    chunk_size: int = Field(512, description="default chunk size in embedding tokens (capped at the model limit)")
    chunk_overlap: int = Field(128, description="default overlap between neighbouring chunks, in tokens; when the "
                                                "size is capped at the model limit, the overlap shrinks in the same "
                                                "ratio (512/128 with a 256-token model: 254/63)")
    ann_threshold: int = Field(20_000, description="vectors in a collection above which an IVF index (nprobe measured "
                                                   "for recall@10 >= 0.95) replaces exact search")
    index_snapshot_changes: int = Field(1024, description="vectors added/removed before a collection's index file is "
                                                          "rewritten (and at least a quarter of its size); start-up "
                                                          "adds what the file lacks from SQLite")
    index_save_interval: float = Field(5.0, description="seconds between checks for index files to rewrite")
    max_query_chars: int = Field(8192, description="longest search query or RAG question, in characters (413 above)")
    max_pdf_pages: int = Field(2000, description="most pages read from one PDF (more: the file is refused)")
    pdf_parse_seconds: float = Field(120.0, description="longest time spent reading one PDF (more: the file is "
                                                        "refused)")
    vdb_top_k: int = Field(40, description="default number of candidates retrieved before reranking")
    reranker_top_k: int = Field(8, description="default number of chunks kept after reranking")
    embed_batch_size: int = Field(64, gt=0, description="texts per embeddings request during ingestion")
    embed_concurrency: int = Field(4, gt=0, description="embeddings requests one ingestion keeps in flight (the "
                                                        "embed service batches what arrives together)")
    embed_timeout: float = Field(120.0, description="seconds before an embeddings request fails")
    rerank_timeout: float = Field(60.0, description="seconds before a ranking request fails")
    llm_timeout: float = Field(300.0, description="seconds before an LLM request fails")
    default_max_tokens: int = Field(256, description="answer length when a request names none")
    rag_timeout: float = Field(600.0, description="overall deadline of one RAG answer, retrieval and generation "
                                                  "included, in seconds (503 past it)")
    llm_context_length: int = Field(0, description="LLM context in tokens when the LLM reports none (0: 4096)")
    system_prompt: str = Field(
        "You are a helpful assistant. Answer the question using only the numbered sources below. "
        "If the sources do not contain the answer, say you do not know.",
        description="system prompt of RAG answers (the cached head of every RAG prompt)",
    )
    answer_instruction: str = Field(
        "Answer with the exact words from the sources, as few as possible.",
        description="line after the question in RAG prompts: asks the model to quote the span that answers "
                    "(empty: none)")
    rag_source_tokens: int = Field(
        0, ge=0, description="most prompt tokens of sources in a RAG answer (0: by the LLM's size from its "
                             "/v1/models `parameters`: 384 up to 0.5B, 4096 up to 3B, else all its context holds)")
    rag_min_score_ratio: float = Field(
        0.95, ge=0.0, le=1.0,
        description="for an LLM with a source budget (see RETRIEVER_RAG_SOURCE_TOKENS): a source after the best "
                    "goes in only if its score is at least this fraction of the best one's (0: no cut-off; not "
                    "applied where the best score is not positive)")
    rag_sole_source_parameters: int = Field(
        500_000_000, ge=0,
        description="an LLM of at most this many parameters (its /v1/models `parameters`) answers from the best "
                    "source alone when hybrid search's dense and sparse rankings both put that chunk first (0: "
                    "never; not applied to an LLM whose card gives no size)")
