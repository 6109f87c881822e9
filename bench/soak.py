"""Soak: the four services under a Poisson load with faults on a schedule, then a check that nothing was lost.

The services run as real processes on loopback (as `tests/support/processes.py` starts them). The load mixes, by
weight (`WORKLOAD`): chat and completions on the llm, streaming and not; streams the client drops after two
events (llm and RAG); RAG questions through the retriever, streaming and not, reranked or not; JSON ingestion of new
documents and edits of earlier ones (same id, new text and metadata); file uploads, new and edited (same file name:
the edit replaces the older document); deletes; searches (dense, sparse, hybrid) with metadata filters, whose hits
must all match the filter. Faults, one every `--fault-interval` seconds until the last `--quiet-tail` of the run:
kill -9 the llm, embed and rerank in turn (each started again at once on its port; the schedule does not wait for
it to be ready), then SIGSTOP one that is up for `--pause-seconds` and SIGCONT it. The load goes on past
`--duration` until every restarted service has served it for `--settle` seconds.

The report (printed, and written to bench/results/soak-<device>-<date>.json with --save):
  - requests by status code, and per route: counts by outcome, p50/p99 latency of the successful ones;
  - unexplained errors (goal 0), each with its body: anything but a 2xx, a 4xx/429/503 in the OpenAI error shape,
    or a connection error from the very service a fault had down at the time; a search hit outside its filter;
  - leaked KV blocks once the load has drained (goal 0): `llm:kv_cache_blocks_in_use` with nothing running;
  - RSS of every service, sampled every 5 s: first sample after the warm-up, last, growth (per incarnation: a
    killed service starts again from zero);
  - data integrity (goal: nothing lost): every document the client tracks is, at the end, in the state of its last
    acknowledged write or of a write sent after it whose answer never came (a 503 or a cut connection may or may
    not have landed), never older: its latest text found by its marker word (sparse) and by its whole text (dense),
    with its latest metadata, listed once; a deleted one found nowhere. Writes to one document never overlap.

    python bench/soak.py                          # 30 minutes, 1 request/s on average
    python bench/soak.py --duration 120 --fault-interval 20 --save
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from bench.report import print_table, require_clean_tree, save_result  # noqa: E402
from tests.support.processes import ServiceProcess  # noqa: E402

COLLECTION = "soak"
SERVICES = ("llm", "embed", "rerank", "retriever")
# The llm first: its restart is the slowest, and the KV check at the end reads the incarnation that follows it.
KILLED_IN_TURN = ("llm", "embed", "rerank")
RESTART_ATTEMPTS = 3
STACK_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "LLM_MAX_MODEL_LEN": "2048",
             "LLM_KV_CACHE_GIB": "0.25", "RETRIEVER_EMBED_TIMEOUT": "60", "RETRIEVER_RERANK_TIMEOUT": "60",
             "RETRIEVER_LLM_TIMEOUT": "120", "RETRIEVER_RAG_TIMEOUT": "180"}
CLIENT_TIMEOUT_S = 240.0
FAULT_GRACE_S = 5.0  # after a restarted service is ready again, connections it had refused may still surface
RSS_EVERY_S = 5.0
WORDS = ("river", "mountain", "copper", "lantern", "harbor", "meadow", "orbit", "violet", "canyon", "ember",
         "glacier", "falcon", "quartz", "willow", "thunder", "cedar", "beacon", "marble", "prairie", "comet",
         "velvet", "summit", "tide", "bramble", "cobalt", "delta", "ferry", "granite", "island", "jasmine", "kettle",
         "lagoon", "maple", "nectar", "oasis", "pebble", "quiver", "saffron", "timber", "umber", "vessel", "walnut",
         "yarrow", "zephyr", "anchor", "basalt", "cinder", "dune", "estuary", "fjord", "grove", "heron", "inlet",
         "juniper", "kelp", "larch", "mesa", "nimbus", "opal")
# The load, by weight: which requests a Poisson arrival sends.
MIX = {"llm chat": 0.10, "llm chat stream": 0.10, "llm chat dropped stream": 0.05, "llm completions": 0.05,
       "llm completions stream": 0.05, "rag": 0.06, "rag stream": 0.06, "rag dropped stream": 0.03,
       "ingest json new": 0.08, "ingest json edit": 0.08, "ingest file new": 0.04, "ingest file edit": 0.04,
       "delete": 0.06, "search": 0.20}
QUESTIONS = ("What is a {w}?", "Write one sentence about a {w}.", "Name two things a {w} has in common with a {w2}.",
             "Describe the colour of a {w}.", "Where would you find a {w}?")


# ---- outcomes ------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class Outcome:
    route: str
    service: str  # the service the client talked to
    status: str  # "200", "503", "connection error", "stream error 503", ...
    verdict: str  # ok | clear (4xx/429/503 in the error shape) | fault (connection lost to a faulted service) | bad
    started: float
    seconds: float
    detail: str = ""


def error_shaped(body: object) -> bool:
    error = body.get("error") if isinstance(body, dict) else None
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"} and \
        isinstance(error["message"], str) and bool(error["message"])


def judge_status(status: int, body: object) -> str:
    if 200 <= status < 300:
        return "ok"
    if (400 <= status < 500 or status == 503) and error_shaped(body):
        return "clear"
    return "bad"


def judge_stream_error(event: dict) -> str:
    """An error event inside a 200 stream: clear when shaped and not a server bug."""
    return "clear" if error_shaped(event) and event["error"]["code"] not in (500, "500") and \
        event["error"]["type"] != "internal_server_error" else "bad"


# ---- the stack and its faults ----------------------------------------------------------------------------------

class Stack:
    """The four services; faults kill, restart, pause and resume them, and remember when each was down."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        common = {**STACK_ENV}
        self.processes = {name: ServiceProcess(name, env=dict(common), log_dir=log_dir)
                          for name in ("llm", "embed", "rerank")}
        self.processes["retriever"] = ServiceProcess("retriever", log_dir=log_dir, env={
            **common, "RETRIEVER_DATA_DIR": str(log_dir / "data"),
            **{f"RETRIEVER_{n.upper()}_URL": p.url for n, p in self.processes.items()}})
        self.windows: list[tuple[str, float, float]] = []  # (service, down from, up again + grace)
        self.down_since: dict[str, float] = {}
        self.faults: list[dict] = []
        self.incarnation = dict.fromkeys(SERVICES, 0)

    def start(self, timeout: float = 900.0) -> None:
        for process in self.processes.values():
            process.start()
        for process in self.processes.values():
            process.wait_ready(timeout)

    def stop(self) -> None:
        for name in reversed(list(self.processes)):
            process = self.processes[name].process
            if process is not None and process.poll() is None:
                os.kill(process.pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
            self.processes[name].stop()

    def pid(self, name: str) -> int | None:
        process = self.processes[name].process
        return process.pid if process is not None and process.poll() is None else None

    def was_down(self, name: str, start: float, end: float) -> bool:
        if name in self.down_since and self.down_since[name] <= end:
            return True
        return any(s == name and a <= end and start <= b for s, a, b in self.windows)

    def settled(self, now: float, seconds: float) -> bool:
        """Nothing down, and every service back for at least `seconds`."""
        return not self.down_since and all(end - FAULT_GRACE_S + seconds <= now for _, _, end in self.windows)

    async def kill_and_restart(self, name: str, clock: Callable[[], float]) -> None:
        """kill -9, start again on the same port at once, and wait (in the background of the load) until ready."""
        process = self.processes[name]
        began = clock()
        self.down_since[name] = began
        process.process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(process.process.wait)
        fault = {"fault": "kill -9 + restart", "service": name, "at_s": round(began, 1)}
        for attempt in range(1, RESTART_ATTEMPTS + 1):
            process.start()
            self.incarnation[name] += 1
            try:
                await asyncio.to_thread(process.wait_ready, 900.0)
                break
            except (RuntimeError, TimeoutError) as exc:  # reported: a restart that fails is a finding
                fault.setdefault("failed_restarts", []).append(f"attempt {attempt}: {str(exc)[:300]}")
                process.stop()
        ready = clock()
        del self.down_since[name]
        self.windows.append((name, began, ready + FAULT_GRACE_S))
        self.faults.append({**fault, "ready_again_after_s": round(ready - began, 1)})

    async def pause(self, name: str, seconds: float, clock: Callable[[], float]) -> None:
        pid = self.pid(name)
        if pid is None:
            return
        began = clock()
        self.down_since[name] = began
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)
            del self.down_since[name]
            self.windows.append((name, began, clock() + FAULT_GRACE_S))
        self.faults.append({"fault": "SIGSTOP, SIGCONT", "service": name, "at_s": round(began, 1),
                            "paused_s": seconds})


# ---- what the client believes about each document --------------------------------------------------------------

@dataclass(slots=True, eq=False)
class Version:
    marker: str  # one word found in this version only
    text: str
    group: str
    document_id: str | None  # for files: known once the upload is acknowledged


DELETED = Version("", "", "", None)


@dataclass(slots=True)
class TrackedDocument:
    key: str  # the document id (JSON documents) or the file name (uploads)
    kind: str  # "json" | "file"
    acknowledged: Version | None = None  # None: never acknowledged
    unanswered: list[Version] = field(default_factory=list)  # sent after it, outcome unknown
    versions: list[Version] = field(default_factory=list)  # every version ever sent
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def allowed(self) -> list[Version]:
        return [self.acknowledged or DELETED, *self.unanswered]  # never acknowledged: maybe never stored

    @property
    def certain(self) -> bool:
        return not self.unanswered


# ---- the load ------------------------------------------------------------------------------------------------

class Soak:
    def __init__(self, stack: Stack, seed: int) -> None:
        self.stack = stack
        self.rng = random.Random(seed)  # what the requests hold
        self.arrivals = random.Random(seed + 1)  # when they come and which they are: the same list every run
        self.outcomes: list[Outcome] = []
        self.documents: dict[str, TrackedDocument] = {}
        self.t0 = time.monotonic()
        self.serial = 0
        self.http = httpx.AsyncClient(timeout=CLIENT_TIMEOUT_S, limits=httpx.Limits(max_connections=200))

    def clock(self) -> float:
        return time.monotonic() - self.t0

    def url(self, service: str) -> str:
        return self.stack.processes[service].url

    # one request, judged

    async def call(self, route: str, service: str, method: str, path: str, *, stream: bool = False,
                   drop_after: int | None = None, check: Callable[[object], str] | None = None,
                   **kwargs: object) -> tuple[str, object]:
        """Send one request and record its outcome; returns (verdict, JSON body or SSE events)."""
        started = self.clock()
        status, body, detail = "", None, ""
        try:
            if stream:
                async with self.http.stream(method, self.url(service) + path, **kwargs) as response:
                    status = str(response.status_code)
                    if response.status_code != 200:
                        body = json.loads(await response.aread() or b"null")
                        verdict = judge_status(response.status_code, body)
                    else:
                        body, verdict, status = await self._read_events(response, drop_after, status)
            else:
                response = await self.http.request(method, self.url(service) + path, **kwargs)
                status = str(response.status_code)
                body = response.json() if response.content else None
                verdict = judge_status(response.status_code, body)
            if verdict == "ok" and check is not None:
                verdict, detail = ("ok", "") if (problem := check(body)) == "" else ("bad", problem)
            if verdict == "bad" and not detail:
                detail = json.dumps(body)[:2000]
        except httpx.TransportError as exc:
            status = "connection error"
            verdict = "fault" if self.stack.was_down(service, started, self.clock()) else "bad"
            detail = f"{type(exc).__name__}: {exc}"
        except json.JSONDecodeError as exc:
            verdict, detail = "bad", f"not JSON: {exc}"
        self.outcomes.append(Outcome(route, service, status, verdict, started, self.clock() - started, detail))
        return verdict, body

    async def _read_events(self, response: httpx.Response, drop_after: int | None,
                           status: str) -> tuple[list, str, str]:
        events: list = []
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            events.append(event)
            if isinstance(event, dict) and "error" in event:
                verdict = judge_stream_error(event)
                return events, verdict, f"stream error {event.get('error', {}).get('code')}"
            if drop_after is not None and len(events) >= drop_after:
                return events, "ok", status  # leaving the block closes the connection mid-stream
        if done:
            return events, "ok", status
        return events, "bad", "stream ended without [DONE]"

    # llm

    def _question(self) -> str:
        return self.rng.choice(QUESTIONS).format(w=self.rng.choice(WORDS), w2=self.rng.choice(WORDS))

    async def llm_chat(self, stream: bool, drop: bool = False) -> None:
        body = {"messages": [{"role": "user", "content": self._question()}], "stream": stream,
                "max_tokens": 64 if drop else self.rng.randint(4, 24), "temperature": self.rng.choice([0.0, 0.7]),
                "seed": self.rng.randint(0, 1000)}
        route = "llm chat " + ("dropped stream" if drop else "stream" if stream else "whole")
        await self.call(route, "llm", "POST", "/v1/chat/completions", json=body, stream=stream,
                        drop_after=2 if drop else None)

    async def llm_completion(self, stream: bool) -> None:
        body = {"prompt": self._question(), "max_tokens": self.rng.randint(4, 24), "stream": stream,
                "stop": self.rng.choice([None, ".", ["\n", "!"]])}
        await self.call("llm completions " + ("stream" if stream else "whole"), "llm", "POST", "/v1/completions",
                        json=body, stream=stream)

    # retriever

    async def rag(self, stream: bool, drop: bool = False) -> None:
        body = {"messages": [{"role": "user", "content": f"What do the notes say about {self.rng.choice(WORDS)}?"}],
                "collection_names": [COLLECTION], "max_tokens": 48 if drop else 24, "stream": stream,
                "vdb_top_k": 8, "reranker_top_k": 3, "enable_reranker": self.rng.random() < 0.5}
        route = "rag " + ("dropped stream" if drop else "stream" if stream else "whole")
        await self.call(route, "retriever", "POST", "/v1/chat/completions", json=body, stream=stream,
                        drop_after=2 if drop else None)

    async def search(self) -> None:
        groups = sorted({v.group for d in self.documents.values() for v in d.versions}) or ["g0"]
        wanted = self.rng.sample(groups, min(len(groups), self.rng.randint(1, 2)))
        flt = {"group": wanted[0]} if len(wanted) == 1 else {"group": {"$in": wanted}}
        body = {"query": " ".join(self.rng.sample(WORDS, 3)), "collection_names": [COLLECTION],
                "top_k": 5, "search_type": self.rng.choice(["dense", "sparse", "hybrid"]), "filter": flt,
                "rerank": self.rng.random() < 0.3}

        def check(found: object) -> str:
            outside = [c["document_id"] for c in found["chunks"] if c["metadata"].get("group") not in wanted]
            return f"hits outside the filter {flt}: {outside}" if outside else ""

        await self.call(f"search {body['search_type']}", "retriever", "POST", "/v1/search", json=body, check=check)

    def _new_version(self, key: str) -> Version:
        self.serial += 1
        marker = f"soakmark{self.serial}"
        words = " ".join(self.rng.choices(WORDS, k=self.rng.randint(20, 50)))
        return Version(marker, f"Note {marker}: {words}.", f"g{self.rng.randrange(6)}", None)

    def _pick(self, kind: str, *, certain_alive: bool = False) -> TrackedDocument | None:
        candidates = [d for d in self.documents.values() if d.kind == kind and not d.lock.locked() and
                      (not certain_alive or (d.certain and d.acknowledged not in (None, DELETED)))]
        return self.rng.choice(candidates) if candidates else None

    async def ingest_json(self, edit: bool) -> None:
        document = self._pick("json", certain_alive=True) if edit else None
        if document is None:
            key = f"doc/{len(self.documents)}"  # a '/' in the id: deletes must still find it
            document = self.documents.setdefault(key, TrackedDocument(key, "json"))
        async with document.lock:
            version = self._new_version(document.key)
            version.document_id = document.key
            document.versions.append(version)
            body = {"collection_name": COLLECTION, "documents": [
                {"id": document.key, "text": version.text, "metadata": {"group": version.group}}]}
            verdict, answer = await self.call("ingest json " + ("edit" if edit else "new"), "retriever", "POST",
                                              "/v1/documents", json=body)
            self._settle(document, version, verdict, answer)

    async def ingest_file(self, edit: bool) -> None:
        document = self._pick("file", certain_alive=True) if edit else None
        if document is None:
            key = f"soak/file-{len(self.documents)}.txt"
            document = self.documents.setdefault(key, TrackedDocument(key, "file"))
        async with document.lock:
            version = self._new_version(document.key)
            document.versions.append(version)
            files = {"documents": (document.key, version.text.encode(), "text/plain")}
            data = {"collection_name": COLLECTION, "metadata": json.dumps({"group": version.group})}
            verdict, answer = await self.call("ingest file " + ("edit" if edit else "new"), "retriever", "POST",
                                              "/v1/documents", files=files, data=data)
            if verdict == "ok":
                version.document_id = answer["documents"][0]["document_id"]
            self._settle(document, version, verdict, answer)

    @staticmethod
    def _settle(document: TrackedDocument, version: Version, verdict: str, answer: object) -> None:
        if verdict == "ok":
            document.acknowledged, document.unanswered = version, []
        elif verdict == "clear" and isinstance(answer, dict) and str(answer["error"]["code"]).startswith("4"):
            return  # refused outright: nothing was written
        else:
            document.unanswered.append(version)  # a 503 or a cut connection: it may or may not have landed

    async def delete(self) -> None:
        document = self._pick(self.rng.choice(["json", "file"]), certain_alive=True)
        if document is None:
            return
        async with document.lock:
            document_id = document.acknowledged.document_id
            verdict, answer = await self.call(f"delete {document.kind}", "retriever", "DELETE",
                                              f"/v1/documents/{document_id}",
                                              params={"collection_name": COLLECTION})
            self._settle(document, DELETED, verdict, answer)

    # the mix

    def operations(self) -> dict[str, Callable[[], Awaitable[None]]]:
        """What each name in MIX sends."""
        return {
            "llm chat": lambda: self.llm_chat(stream=False),
            "llm chat stream": lambda: self.llm_chat(stream=True),
            "llm chat dropped stream": lambda: self.llm_chat(stream=True, drop=True),
            "llm completions": lambda: self.llm_completion(stream=False),
            "llm completions stream": lambda: self.llm_completion(stream=True),
            "rag": lambda: self.rag(stream=False),
            "rag stream": lambda: self.rag(stream=True),
            "rag dropped stream": lambda: self.rag(stream=True, drop=True),
            "ingest json new": lambda: self.ingest_json(edit=False),
            "ingest json edit": lambda: self.ingest_json(edit=True),
            "ingest file new": lambda: self.ingest_file(edit=False),
            "ingest file edit": lambda: self.ingest_file(edit=True),
            "delete": self.delete,
            "search": self.search,
        }

    async def load(self, keep_going: Callable[[], bool], rate: float, max_in_flight: int) -> dict:
        operations = self.operations()
        names, weights = list(MIX), list(MIX.values())
        tasks: set[asyncio.Task] = set()
        sent, shed = Counter(), 0
        while keep_going():
            await asyncio.sleep(self.arrivals.expovariate(rate))
            name = self.arrivals.choices(names, weights)[0]
            if len(tasks) >= max_in_flight:
                shed += 1  # the client holds back instead of piling up an unbounded backlog
                continue
            sent[name] += 1
            task = asyncio.create_task(operations[name]())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        drain_began = self.clock()
        if tasks:
            await asyncio.wait(tasks, timeout=CLIENT_TIMEOUT_S + 30)
        for task in tasks:  # the client's own timeout should have ended these; count them if not
            task.cancel()
        return {"sent": dict(sent), "shed_by_client": shed, "still_open_after_drain": len(tasks),
                "load_s": round(drain_began, 1), "drain_s": round(self.clock() - drain_began, 1)}


# ---- faults, RSS -----------------------------------------------------------------------------------------------

async def inject_faults(stack: Stack, clock: Callable[[], float], first_at: float, interval: float, until: float,
                        pause_seconds: float) -> None:
    """On schedule, whatever the restarts before are doing: kill each of KILLED_IN_TURN in turn, then pause the next
    service that is up; repeat. Returns once every fault has ended (restarted services ready again)."""
    turn, pauses, running = 0, 0, []
    while first_at + turn * interval < until:
        await asyncio.sleep(max(0.0, first_at + turn * interval - clock()))
        step = turn % (len(KILLED_IN_TURN) + 1)
        if step < len(KILLED_IN_TURN):
            if KILLED_IN_TURN[step] not in stack.down_since:
                running.append(asyncio.create_task(stack.kill_and_restart(KILLED_IN_TURN[step], clock)))
        else:
            up = [n for n in KILLED_IN_TURN[pauses:] + KILLED_IN_TURN[:pauses] if n not in stack.down_since]
            if up:
                running.append(asyncio.create_task(stack.pause(up[0], pause_seconds, clock)))
            pauses = (pauses + 1) % len(KILLED_IN_TURN)
        turn += 1
    await asyncio.gather(*running)


async def sample_rss(stack: Stack, clock: Callable[[], float], samples: dict[str, list]) -> None:
    while True:
        for name in SERVICES:
            pid = stack.pid(name)
            if pid is not None and name not in stack.down_since:
                with contextlib.suppress(psutil.Error):  # it may exit between the check and the read
                    samples[name].append((clock(), stack.incarnation[name], psutil.Process(pid).memory_info().rss))
        await asyncio.sleep(RSS_EVERY_S)


def rss_report(samples: dict[str, list], warmup: float, stack: Stack) -> dict:
    report = {}
    for name, rows in samples.items():
        last_life = [r for r in rows if r[1] == stack.incarnation[name]]
        settled = [r for r in last_life if r[0] >= warmup] or last_life
        if not settled:
            continue
        first, last = settled[0], settled[-1]
        report[name] = {"restarts": stack.incarnation[name], "from_s": round(first[0], 1),
                        "first_mib": round(first[2] / 2**20, 1), "last_mib": round(last[2] / 2**20, 1),
                        "peak_mib": round(max(r[2] for r in settled) / 2**20, 1),
                        "growth_mib": round((last[2] - first[2]) / 2**20, 1)}
    return report


# ---- after the load: KV blocks, integrity --------------------------------------------------------------------

def llm_metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name.startswith("llm:") and "{" not in name:
            values[name] = float(value)
    return values


def leaked_kv_blocks(url: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        metrics = llm_metrics(url)
        idle = metrics["llm:num_requests_running"] == 0 and metrics["llm:num_requests_waiting"] == 0
        if idle or time.monotonic() > deadline:
            return {"idle": idle, "leaked_blocks": int(metrics["llm:kv_cache_blocks_in_use"]),
                    "kv_cache_usage_perc": metrics["llm:kv_cache_usage_perc"]}
        time.sleep(0.5)


def check_integrity(http: httpx.Client, documents: dict[str, TrackedDocument]) -> dict:
    """Each tracked document's state at the end, against what the client may expect."""
    listed = []
    while len(batch := http.get("/v1/documents", params={"collection_name": COLLECTION, "limit": 10_000,
                                                         "offset": len(listed)}).raise_for_status()
               .json()["documents"]):
        listed.extend(batch)
    listed_ids = Counter(d["document_id"] for d in listed)
    problems: list[dict] = []
    states = Counter()
    seen_ids = {v.document_id for d in documents.values() for v in d.versions if v.document_id}
    for document in documents.values():
        try:
            problem = _check_document(http, document, listed_ids, seen_ids, states)
        except httpx.HTTPError as exc:  # a failing check is a finding, not the end of the report
            problem = {"document": document.key, "check_failed": f"{type(exc).__name__}: {exc}"}
        if problem:
            problems.append(problem)
    strangers = sorted(i for i in listed_ids if i not in seen_ids)
    if strangers:
        problems.append({"listed_but_never_written": strangers[:20]})
    return {"documents_tracked": len(documents), "states": dict(states), "listed": len(listed),
            "lost_or_wrong": len(problems), "problems": problems[:50]}


def _check_document(http: httpx.Client, document: TrackedDocument, listed_ids: Counter, seen_ids: set[str],
                    states: Counter) -> dict | None:
    found = {}
    for version in document.versions:
        hits = http.post("/v1/search", json={"query": version.marker, "collection_names": [COLLECTION],
                                             "top_k": 5, "search_type": "sparse"}).raise_for_status().json()
        for chunk in hits["chunks"]:
            if version.marker in chunk["content"]:
                found[version.marker] = chunk
                seen_ids.add(chunk["document_id"])  # an upload whose answer was lost has an id we never saw
    allowed = document.allowed()
    state = next((v for v in allowed if set(found) == ({v.marker} if v is not DELETED else set())), None)
    states["deleted" if state is DELETED else "present" if state else "wrong"] += 1
    if state is None:
        return {"document": document.key, "kind": document.kind,
                "allowed_markers": [v.marker or "deleted" for v in allowed], "found_markers": sorted(found)}
    chunk = found.get(state.marker, {})
    stale = [v.document_id for v in document.versions
             if v.document_id and v.document_id != chunk.get("document_id") and listed_ids[v.document_id]]
    if stale:
        return {"document": document.key, "older_versions_still_listed": stale}
    if state is DELETED:
        return None
    ids = {chunk["document_id"]} | ({state.document_id} if state.document_id else set())
    if len(ids) != 1 or listed_ids[chunk["document_id"]] != 1 or chunk["metadata"].get("group") != state.group:
        return {"document": document.key, "chunk_document_id": chunk["document_id"],
                "expected_id": state.document_id, "listed": listed_ids[chunk["document_id"]],
                "group": chunk["metadata"].get("group"), "expected_group": state.group}
    dense = http.post("/v1/search", json={"query": state.text, "collection_names": [COLLECTION], "top_k": 3,
                                          "search_type": "dense"}).raise_for_status().json()
    if not any(state.marker in c["content"] for c in dense["chunks"]):
        return {"document": document.key, "not_found_by_dense_search": state.marker}
    return None


# ---- the run ---------------------------------------------------------------------------------------------------

@dataclass(slots=True)
class SoakSettings:
    duration: float = 1800.0
    rate: float = 1.0
    fault_interval: float = 90.0
    first_fault_at: float = 20.0
    quiet_tail: float = 0.2
    pause_seconds: float = 10.0
    settle: float = 30.0
    max_in_flight: int = 32
    seed: int = 0
    seed_documents: int = 12


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def summarize(outcomes: list[Outcome]) -> dict:
    routes: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in outcomes:
        routes[outcome.route].append(outcome)
    per_route = {}
    for route, rows in sorted(routes.items()):
        ok = [o.seconds for o in rows if o.verdict == "ok"]
        per_route[route] = {"requests": len(rows), **Counter(o.verdict for o in rows),
                            "statuses": dict(Counter(o.status for o in rows)),
                            "p50_s": percentile(ok, 0.5), "p99_s": percentile(ok, 0.99)}
    unexplained = [{"route": o.route, "status": o.status, "at_s": round(o.started, 1), "detail": o.detail}
                   for o in outcomes if o.verdict == "bad"]
    return {"requests": len(outcomes), "by_status": dict(Counter(o.status for o in outcomes)),
            "by_verdict": dict(Counter(o.verdict for o in outcomes)), "routes": per_route,
            "unexplained_errors": len(unexplained), "unexplained": unexplained[:100]}


async def _seed(soak: Soak, count: int) -> None:
    response = await soak.http.post(soak.url("retriever") + "/v1/collections", json={"name": COLLECTION})
    response.raise_for_status()
    for i in range(count):
        await (soak.ingest_file(edit=False) if i % 3 == 2 else soak.ingest_json(edit=False))


async def _run(stack: Stack, settings: SoakSettings) -> dict:
    soak = Soak(stack, settings.seed)
    samples: dict[str, list] = defaultdict(list)
    rss_task = asyncio.create_task(sample_rss(stack, soak.clock, samples))
    await _seed(soak, settings.seed_documents)
    soak.t0 = time.monotonic()  # the clock starts with the load
    fault_until = settings.duration * (1 - settings.quiet_tail)
    faults = asyncio.create_task(inject_faults(stack, soak.clock, settings.first_fault_at, settings.fault_interval,
                                               fault_until, settings.pause_seconds))
    # The load goes on past `duration` until every restarted service has served it for `settle` seconds.
    load = await soak.load(lambda: soak.clock() < settings.duration or not stack.settled(soak.clock(),
                                                                                         settings.settle),
                           settings.rate, settings.max_in_flight)
    await faults
    rss_task.cancel()
    await soak.http.aclose()
    kv = await asyncio.to_thread(leaked_kv_blocks, stack.processes["llm"].url)
    with httpx.Client(base_url=stack.processes["retriever"].url, timeout=120) as http:
        integrity = await asyncio.to_thread(check_integrity, http, soak.documents)
    return {"load": load, **summarize(soak.outcomes), "faults": stack.faults, "kv_cache_after_drain": kv,
            "rss": rss_report(samples, min(60.0, settings.duration / 4), stack), "integrity": integrity}


def run_soak(settings: SoakSettings, log_dir: Path) -> dict:
    """Start the stack under `log_dir`, run the soak, stop the stack; the report."""
    stack = Stack(log_dir)
    try:
        began = time.monotonic()
        stack.start()
        started_s = time.monotonic() - began
        report = asyncio.run(_run(stack, settings))
        report["stack_start_s"] = round(started_s, 1)
        return report
    finally:
        stack.stop()


def print_report(report: dict) -> None:
    print_table("requests per route (latency of successful ones, seconds)",
                ["route", "requests", "ok", "clear 4xx/503", "fault", "unexplained", "p50", "p99"],
                [[r, v["requests"], v.get("ok", 0), v.get("clear", 0), v.get("fault", 0), v.get("bad", 0),
                  v["p50_s"], v["p99_s"]] for r, v in report["routes"].items()])
    print_table("by status", ["status", "count"], [[s, n] for s, n in sorted(report["by_status"].items())])
    print_table("faults", ["at s", "fault", "service", "back after s"],
                [[f["at_s"], f["fault"], f["service"], f.get("ready_again_after_s", f.get("paused_s"))]
                 for f in report["faults"]])
    print_table("RSS (MiB, last incarnation)", ["service", "restarts", "first", "last", "peak", "growth"],
                [[n, v["restarts"], v["first_mib"], v["last_mib"], v["peak_mib"], v["growth_mib"]]
                 for n, v in report["rss"].items()])
    kv, integrity = report["kv_cache_after_drain"], report["integrity"]
    print(f"\nunexplained errors: {report['unexplained_errors']}   leaked KV blocks: {kv['leaked_blocks']}   "
          f"documents lost or wrong: {integrity['lost_or_wrong']} of {integrity['documents_tracked']} "
          f"({integrity['states']})")
    for error in report["unexplained"][:20]:
        print(f"  {error['at_s']:>8}s  {error['route']}  {error['status']}  {error['detail'][:300]}")
    for problem in integrity["problems"][:20]:
        print(f"  integrity: {problem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SoakSettings()
    parser.add_argument("--duration", type=float, default=defaults.duration, help="seconds of load (default 1800)")
    parser.add_argument("--rate", type=float, default=defaults.rate, help="mean requests per second (Poisson)")
    parser.add_argument("--fault-interval", type=float, default=defaults.fault_interval,
                        help="seconds between faults (kill embed, kill rerank, kill llm, pause one, repeat)")
    parser.add_argument("--first-fault-at", type=float, default=defaults.first_fault_at)
    parser.add_argument("--quiet-tail", type=float, default=defaults.quiet_tail,
                        help="fraction of the run at its end without faults (the KV check reads the last llm)")
    parser.add_argument("--pause-seconds", type=float, default=defaults.pause_seconds)
    parser.add_argument("--settle", type=float, default=defaults.settle,
                        help="the load goes on until every restarted service has served it this long")
    parser.add_argument("--max-in-flight", type=int, default=defaults.max_in_flight,
                        help="client-side cap on open requests; arrivals past it are counted as shed")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--log-dir", type=Path, help="service logs and the retriever's data (default: a temp dir)")
    parser.add_argument("--save", action="store_true", help="write bench/results/soak-<device>-<date>.json")
    parser.add_argument("--allow-dirty", action="store_true", help="save even from uncommitted code")
    args = parser.parse_args()
    if args.save and not args.allow_dirty:
        require_clean_tree()
    settings = SoakSettings(duration=args.duration, rate=args.rate, fault_interval=args.fault_interval,
                            first_fault_at=args.first_fault_at, quiet_tail=args.quiet_tail,
                            pause_seconds=args.pause_seconds, settle=args.settle, max_in_flight=args.max_in_flight,
                            seed=args.seed)
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="soak-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"soak: {settings.duration:.0f} s at {settings.rate} req/s, faults every {settings.fault_interval:.0f} s; "
          f"logs in {log_dir}")
    report = run_soak(settings, log_dir)
    print_report(report)
    if args.save:
        workload = {**{k: getattr(settings, k) for k in SoakSettings.__slots__}, "stack_env": STACK_ENV,
                    "mix": MIX}
        path = save_result("soak", workload=workload, ours=report, peer=None,
                           extra={"note": "one shared, loaded 2-core machine: latencies are noisy"})
        print(f"\nsaved {path}")
    goal_met = report["unexplained_errors"] == 0 and report["kv_cache_after_drain"]["leaked_blocks"] == 0 and \
        report["integrity"]["lost_or_wrong"] == 0
    raise SystemExit(0 if goal_met else 1)


if __name__ == "__main__":
    main()
