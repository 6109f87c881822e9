// The source-excerpt dialog a citation marker or a search result opens: document name, page, score, text.

import { byId, formatScore, pageOf } from "./dom.js";

export function openExcerpt(source, label = "") {
  const dialog = byId("excerpt");
  byId("excerpt-title").textContent = `${label ? `${label} ` : ""}${source.document_name}`;
  const where = [pageOf(source.metadata), `score ${formatScore(source.score)}`,
    source.collection_name ? `collection ${source.collection_name}` : ""].filter(Boolean);
  byId("excerpt-meta").textContent = where.join(" · ");
  byId("excerpt-text").textContent = source.content;
  dialog.showModal();
  byId("excerpt-close").focus();
}
