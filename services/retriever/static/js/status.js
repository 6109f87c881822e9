// Service status: the retriever's health (which names each dependency, its URL and model) polled every few
// seconds, and a banner whenever something is down or a request failed because something was.

import { apiEvents, health, request } from "./api.js";
import { byId, clear, el } from "./dom.js";

const POLL_MS = 4000;
// The retriever re-checks its dependencies every 5 s, so a fresh 503 outranks health for one round.
const REQUEST_ERROR_HOLD_MS = 6000;
const DEPENDENCIES = ["embed", "rerank", "llm"];
const CONSEQUENCE = {
  embed: "uploads and dense or hybrid search fail",
  rerank: "searches with reranking fail",
  llm: "answers fail; sources-only search still works",
};

const state = { health: null, unreachable: false, requestError: null, requestErrorAt: 0, retrieverModel: "" };

export function startStatus() {
  apiEvents.addEventListener("unavailable", (event) => noteRequestError(event.detail));
  apiEvents.addEventListener("unreachable", () => refresh());
  refresh();
  setInterval(refresh, POLL_MS);
}

function noteRequestError(message) {
  state.requestError = message;
  state.requestErrorAt = Date.now();
  render();
  refresh();
}

async function refresh() {
  try {
    state.health = await health();
    state.unreachable = false;
  } catch {
    state.unreachable = true;
  }
  if (allReady() && Date.now() - state.requestErrorAt > REQUEST_ERROR_HOLD_MS) state.requestError = null;
  if (!state.retrieverModel && state.health && state.health.ready) {
    request("GET", "/v1/models").then((models) => {
      state.retrieverModel = (models.data && models.data[0] && models.data[0].id) || "";
      render();
    }, () => {}); // needs the key; the key prompt handles a 401
  }
  render();
}

function allReady() {
  const h = state.health;
  return !state.unreachable && h && h.ready && DEPENDENCIES.every((name) => dependency(name).ready);
}

function dependency(name) {
  return (state.health && state.health.details && state.health.details[name]) || {};
}

function services() {
  const h = state.health || {};
  const retriever = { name: "retriever", ready: !state.unreachable && Boolean(h.ready),
    detail: state.unreachable ? "unreachable" : (h.ready ? state.retrieverModel : h.message) };
  return [retriever, ...DEPENDENCIES.map((name) => {
    const d = dependency(name);
    return { name, ready: Boolean(d.ready), detail: d.ready ? d.model || "" : d.url || "", url: d.url };
  })];
}

function render() {
  const list = clear(byId("service-status"));
  for (const service of services()) {
    list.append(el("li", { className: "service", dataset: { service: service.name, state: service.ready ? "up" : "down" },
      title: service.url || "" },
    el("span", { className: "dot", "aria-hidden": "true" }),
    el("strong", {}, service.name), " ",
    el("span", { className: "state" }, service.ready ? "ready" : "down"),
    service.detail ? el("span", { className: "model" }, service.detail) : null));
  }
  const problems = [];
  if (state.unreachable) {
    problems.push(`The retriever at ${location.origin} is unreachable: nothing works until it is back.`);
  } else if (state.health) {
    if (!state.health.ready) problems.push(`The retriever is not ready: ${state.health.message}.`);
    for (const name of DEPENDENCIES) {
      const d = dependency(name);
      if (state.health.details && !d.ready) problems.push(`${name} is down (${d.url || "no URL"}): ${CONSEQUENCE[name]}.`);
    }
  }
  if (state.requestError) problems.push(`Last request failed: ${state.requestError}`);
  const banner = byId("banner");
  if (banner.dataset.shown === problems.join("\n")) return; // unchanged: do not make screen readers repeat it
  banner.dataset.shown = problems.join("\n");
  banner.hidden = problems.length === 0;
  clear(banner).append(...problems.map((text) => el("p", {}, text)));
}
