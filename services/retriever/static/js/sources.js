// Sources only: /v1/search with the current settings, the ranked chunks shown with their scores.

import { request } from "./api.js";
import { scopedCollections } from "./collections.js";
import { byId, clear, el, formatScore, pageOf } from "./dom.js";
import { openExcerpt } from "./excerpt.js";
import { settings } from "./settings.js";

export async function search(query) {
  const results = clear(byId("results"));
  results.setAttribute("aria-busy", "true");
  const collections = scopedCollections();
  if (!collections.length) {
    results.append(el("p", { className: "error" }, "Choose at least one collection to search in."));
    results.setAttribute("aria-busy", "false");
    return;
  }
  const body = { query, collection_names: collections, search_type: settings.searchType, rerank: settings.rerank,
    top_k: settings.rerank ? Math.max(3 * settings.topK, 12) : settings.topK, reranker_top_k: settings.topK };
  try {
    const { chunks } = await request("POST", "/v1/search", body);
    results.append(el("p", { className: "muted" },
      `${chunks.length} chunk(s) for "${query}" · ${settings.searchType}${settings.rerank ? " + rerank" : ""}`));
    results.append(el("ol", { className: "hits" }, chunks.map((chunk, i) => hit(chunk, i + 1))));
  } catch (error) {
    results.append(el("p", { className: "error" }, `Search failed: ${error.message}`));
  } finally {
    results.setAttribute("aria-busy", "false");
  }
}

function hit(chunk, rank) {
  return el("li", { className: "hit", dataset: { documentName: chunk.document_name } },
    el("div", { className: "hit-head" },
      el("strong", {}, chunk.document_name),
      pageOf(chunk.metadata) ? el("span", { className: "page" }, pageOf(chunk.metadata)) : null,
      el("span", { className: "score" }, `score ${formatScore(chunk.score)}`),
      el("span", { className: "muted" }, chunk.collection_name),
      el("button", { type: "button", "aria-label": `Show chunk ${rank} (${chunk.document_name}) in full`,
        on: { click: () => openExcerpt(chunk, `#${rank}`) } }, "Open")),
    el("p", { className: "content" }, chunk.content));
}
