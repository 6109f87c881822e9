// Answers: the conversation is sent to /v1/chat/completions with the chosen collections and streamed back.
// The first event carries the citations; "[n]" in the answer becomes a marker that opens source n.

import { stream } from "./api.js";
import { scopedCollections } from "./collections.js";
import { byId, clear, el } from "./dom.js";
import { openExcerpt } from "./excerpt.js";
import { settings } from "./settings.js";

const history = []; // {role, content} of finished turns
let controller = null;

export function newChat() {
  if (controller) controller.abort();
  history.length = 0;
  clear(byId("conversation"));
}

export function stopAnswer() {
  if (controller) controller.abort();
}

function marker(number, source) {
  return el("button", { type: "button", className: "citation", dataset: { citation: String(number) },
    "aria-label": `Source ${number}: ${source.document_name}`,
    on: { click: () => openExcerpt(source, `[${number}]`) } }, `[${number}]`);
}

// The answer as text nodes, with each "[n]" that names a known source turned into its marker.
function renderAnswer(node, text, sources) {
  const parts = text.split(/(\[\d+\])/);
  clear(node).append(...parts.map((part) => {
    const number = /^\[(\d+)\]$/.test(part) ? Number(part.slice(1, -1)) : 0;
    return number >= 1 && number <= sources.length ? marker(number, sources[number - 1]) : part;
  }));
}

function renderSources(node, sources) {
  clear(node);
  if (!sources.length) return;
  node.append(el("h3", {}, "Sources"), el("ol", {}, sources.map((source, i) =>
    el("li", {}, marker(i + 1, source), " ", source.document_name))));
}

function requestBody(messages, collections) {
  return {
    messages,
    collection_names: collections,
    use_knowledge_base: true,
    enable_citations: true,
    search_type: settings.searchType,
    enable_reranker: settings.rerank,
    reranker_top_k: settings.topK,
    vdb_top_k: settings.rerank ? Math.max(3 * settings.topK, 12) : settings.topK,
    max_tokens: settings.maxTokens,
    temperature: settings.temperature,
    stream: true,
  };
}

export async function ask(question) {
  const collections = scopedCollections();
  const conversation = byId("conversation");
  const answer = el("div", { className: "answer", "aria-busy": "true", dataset: { state: "streaming" } });
  const sources = el("div", { className: "sources" });
  const note = el("p", { className: "muted note" });
  conversation.append(el("div", { className: "turn user" }, el("p", {}, question)),
    el("div", { className: "turn assistant" }, answer, sources, note));
  answer.scrollIntoView({ block: "nearest" });
  if (!collections.length) {
    answer.dataset.state = "error";
    answer.setAttribute("aria-busy", "false");
    answer.textContent = "Choose at least one collection to search in.";
    return;
  }
  const messages = [...history, { role: "user", content: question }];
  let text = "";
  let cited = [];
  let finish = null;
  controller = new AbortController();
  try {
    for await (const event of stream("/v1/chat/completions", requestBody(messages, collections), controller.signal)) {
      if (event.citations) {
        cited = event.citations.results || [];
        renderSources(sources, cited);
      }
      for (const choice of event.choices || []) {
        text += (choice.delta && choice.delta.content) || "";
        finish = choice.finish_reason || finish;
      }
      renderAnswer(answer, text, cited);
    }
    answer.dataset.state = "done";
    if (finish === "length") note.textContent = "Stopped at the max-tokens limit (see Settings).";
    history.push({ role: "user", content: question }, { role: "assistant", content: text });
  } catch (error) {
    answer.dataset.state = "error";
    const reason = error.name === "AbortError" ? "stopped" : `failed: ${error.message}`;
    answer.append(el("span", { className: "error" }, `${text ? " " : ""}(answer ${reason})`));
  } finally {
    answer.setAttribute("aria-busy", "false");
    controller = null;
  }
}
