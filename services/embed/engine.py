"""The embedding engine: loads the encoder in the background, batches inputs across requests, shapes answers.

Everything a route needs lives here so tests and benchmarks can call it without HTTP.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram

from common.batching import BatcherMetrics, DynamicBatcher
from common.errors import APIError, bad_request, not_found
from common.health import Readiness
from common.metrics import LATENCY_BUCKETS
from common.model_files import bundled_embedding_model
from common.offload import SerialThread
from common.schemas.embeddings import EmbeddingRequest
from common.service import ModelCard
from services.embed.encoder import BUNDLED_MODEL_ID, Encoder, InputTooLong, shorten
from services.embed.settings import EmbedSettings

log = logging.getLogger(__name__)

EncoderLoader = Callable[[EmbedSettings, str], Encoder]


def load_encoder(settings: EmbedSettings, model: str) -> Encoder:
    return Encoder.load(model, settings.device, settings.dtype, query_prefix=settings.query_prefix,
                        passage_prefix=settings.passage_prefix, cpu_attention=settings.cpu_attention)


def served_model(settings: EmbedSettings) -> tuple[str, str]:
    """(path or hub id to load, id clients use): the bundled model is known by its hub name."""
    if settings.model:
        path = settings.model
        default_id = Path(path).name if Path(path).is_dir() else path
    else:
        path, default_id = str(bundled_embedding_model()), BUNDLED_MODEL_ID
    return path, settings.served_model_name or default_id


class EmbedMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("embed_requests", "embedding requests by input type and outcome",
                                ["input_type", "outcome"], registry=registry)
        self.inputs = Counter("embed_inputs", "texts embedded", registry=registry)
        self.tokens = Counter("embed_prompt_tokens", "tokens embedded (special tokens included)",
                              registry=registry)
        self.truncated = Counter("embed_truncated_inputs", "texts cut to the model's limit", registry=registry)
        self.latency = Histogram("embed_request_seconds", "time from accepted request to vectors",
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.batcher = BatcherMetrics.create(registry, "embed")


class EmbeddingEngine:
    def __init__(self, settings: EmbedSettings, readiness: Readiness, registry: CollectorRegistry,
                 loader: EncoderLoader = load_encoder) -> None:
        self.settings, self.readiness, self.loader = settings, readiness, loader
        self.model_path, self.model_id = served_model(settings)
        self.metrics = EmbedMetrics(registry)
        self.encoder: Encoder | None = None
        self.batcher: DynamicBatcher[list[int], np.ndarray] | None = None
        self._loading: threading.Thread | None = None
        self._tokenizing = SerialThread("embed-tokenize")  # off the event loop: a long input must not stall health

    def start_loading(self) -> None:
        """Load in a thread so the server answers liveness (and 503 on ready) while the model loads."""
        self.readiness.set_not_ready(f"loading {self.model_id}")
        self._loading = threading.Thread(target=self.load, name="embed-model-load", daemon=True)
        self._loading.start()

    def load(self) -> None:
        """Load the model and start batching; on failure stay unready with the reason, never crash the server."""
        try:
            encoder = self.loader(self.settings, self.model_path)
        except Exception as exc:  # any loader failure (bad path, corrupt weights, OOM) must surface on /ready
            log.exception("could not load %s", self.model_path)
            self.readiness.set_not_ready(f"model {self.model_id} failed to load: {exc}")
            return
        batcher = DynamicBatcher(encoder.embed, name="embed",
                                 max_batch_size=self.settings.max_batch_size,
                                 max_batch_tokens=self.settings.max_batch_tokens,
                                 max_queue_items=self.settings.max_queue, metrics=self.metrics.batcher)
        batcher.start()
        self.encoder, self.batcher = encoder, batcher
        self.readiness.details = {"model": self.model_id, "device": str(encoder.device),
                                  "dimensions": encoder.dimension, "max_tokens": encoder.max_tokens}
        self.readiness.set_ready()
        log.info("serving %s", self.model_id)

    def stop(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self._tokenizing.shutdown()

    def model_cards(self) -> list[ModelCard]:
        metadata: dict[str, object] = {"root": self.model_path}
        if self.encoder is not None:
            metadata |= {"dimensions": self.encoder.dimension, "max_input_tokens": self.encoder.max_tokens}
        return [ModelCard(self.model_id, metadata=metadata)]

    async def embed(self, request: EmbeddingRequest) -> dict:
        """The OpenAI `/v1/embeddings` answer for one request; APIError for anything the client got wrong."""
        encoder, batcher = self._serving()
        if request.model not in (None, "", self.model_id, self.model_path):
            raise not_found(f"model {request.model!r} is not served here; this server serves {self.model_id!r}",
                            param="model")
        texts = request.texts
        if len(texts) > self.settings.max_inputs_per_request:
            raise APIError(413, f"{len(texts)} inputs in one request, more than the limit of "
                                f"{self.settings.max_inputs_per_request}", param="input")
        if request.dimensions is not None and request.dimensions > encoder.dimension:
            raise bad_request(f"dimensions {request.dimensions} is larger than the model's {encoder.dimension}",
                              param="dimensions")
        prefix = encoder.prefixes[request.input_type]
        try:
            tokenized = await self._tokenizing.run(encoder.tokenize, [prefix + text for text in texts] if prefix
                                                   else texts, request.truncate)
        except InputTooLong as exc:
            self.metrics.requests.labels(request.input_type, "too_long").inc()
            raise bad_request(str(exc), param="input") from exc
        start = time.perf_counter()
        try:
            vectors = await batcher.submit([one.ids for one in tokenized], [len(one.ids) for one in tokenized])
        except APIError:
            self.metrics.requests.labels(request.input_type, "refused").inc()
            raise
        self.metrics.latency.observe(time.perf_counter() - start)
        tokens = sum(len(one.ids) for one in tokenized)
        self.metrics.requests.labels(request.input_type, "ok").inc()
        self.metrics.inputs.inc(len(texts))
        self.metrics.tokens.inc(tokens)
        self.metrics.truncated.inc(sum(one.truncated for one in tokenized))
        data = [{"object": "embedding", "index": index,
                 "embedding": encode_vector(shorten(vector, request.dimensions), request.encoding_format)}
                for index, vector in enumerate(vectors)]
        return {"object": "list", "data": data, "model": self.model_id,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _serving(self) -> tuple[Encoder, DynamicBatcher[list[int], np.ndarray]]:
        if self.encoder is None or self.batcher is None:
            raise APIError(503, f"embedding model is not ready: {self.readiness.message}")
        return self.encoder, self.batcher


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    """Floats, or OpenAI's base64: the little-endian float32 bytes of the vector."""
    if encoding_format == "base64":
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()
