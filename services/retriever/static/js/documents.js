// The current collection's documents, each with a delete button.

import { request } from "./api.js";
import { currentCollection, library, refreshCollections } from "./collections.js";
import { byId, clear, el, plural } from "./dom.js";

let shown = null; // the collection whose documents are on screen
let latest = 0; // only the newest listing is drawn when several overlap

export async function refreshDocuments() {
  const collection = currentCollection();
  const ticket = ++latest;
  shown = collection;
  let documents = [];
  let failure = null;
  if (collection) {
    try {
      const query = new URLSearchParams({ collection_name: collection });
      documents = (await request("GET", `/v1/documents?${query}`)).documents;
    } catch (error) {
      failure = error;
    }
  }
  if (ticket !== latest) return;
  const list = clear(byId("document-list"));
  byId("documents-empty").hidden = !collection || failure !== null || documents.length > 0;
  if (failure) list.append(el("li", { className: "error" }, `Could not list documents: ${failure.message}`));
  for (const document of documents) {
    const name = document.document_name;
    list.append(el("li", { dataset: { documentId: document.document_id, documentName: name } },
      el("span", { className: "name", title: document.document_id }, name),
      el("span", { className: "muted count" }, plural(document.num_chunks, "chunk")),
      el("button", { type: "button", className: "danger", "aria-label": `Delete document ${name}`,
        on: { click: () => remove(collection, document) } }, "Delete")));
  }
}

async function remove(collection, document) {
  if (!window.confirm(`Delete "${document.document_name}" from ${collection}?`)) return;
  const query = new URLSearchParams({ collection_name: collection });
  try {
    await request("DELETE", `/v1/documents/${encodeURIComponent(document.document_id)}?${query}`);
  } catch (error) {
    window.alert(`Could not delete "${document.document_name}": ${error.message}`);
  }
  await Promise.all([refreshDocuments(), refreshCollections()]);
}

export function bindDocuments() {
  library.addEventListener("change", () => {
    if (currentCollection() !== shown) refreshDocuments();
  });
}
