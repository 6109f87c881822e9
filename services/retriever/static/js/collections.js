// Collections: the list (create, delete), the current one (whose documents the left pane shows) and the
// ones questions search in. The choice is kept in localStorage; `library` fires "change" when anything moves.

import { request } from "./api.js";
import { byId, clear, el, plural } from "./dom.js";

const ITEM = "rag-playground.selection";

export const library = new EventTarget();

const saved = (() => {
  try {
    return JSON.parse(localStorage.getItem(ITEM) || "{}") || {};
  } catch {
    return {};
  }
})();
let collections = [];
let current = typeof saved.current === "string" ? saved.current : null;
let scope = new Set(Array.isArray(saved.scope) ? saved.scope : []);

export function currentCollection() {
  return current;
}

export function scopedCollections() {
  return collections.map((c) => c.name).filter((name) => scope.has(name));
}

function remember() {
  localStorage.setItem(ITEM, JSON.stringify({ current, scope: [...scope] }));
  library.dispatchEvent(new Event("change"));
}

function select(name) {
  current = name;
  render();
  remember();
}

export async function refreshCollections() {
  collections = (await request("GET", "/v1/collections")).collections;
  const names = new Set(collections.map((c) => c.name));
  if (!names.has(current)) current = collections.length ? collections[0].name : null;
  scope = new Set([...scope].filter((name) => names.has(name)));
  if (scope.size === 0 && current) scope.add(current);
  render();
  remember();
}

function showError(message) {
  const error = byId("collection-error");
  error.hidden = !message;
  error.textContent = message || "";
}

export function bindCollections() {
  const form = byId("new-collection");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = form.elements.name.value.trim();
    try {
      await request("POST", "/v1/collections", { name });
      showError("");
      form.reset();
      current = name;
      scope.add(name);
      await refreshCollections();
    } catch (error) {
      showError(`Could not create "${name}": ${error.message}`);
    }
  });
}

async function remove(collection) {
  const what = `collection "${collection.name}" and its ${plural(collection.documents, "document")}`;
  if (!window.confirm(`Delete ${what}?`)) return;
  try {
    await request("DELETE", `/v1/collections/${encodeURIComponent(collection.name)}`);
    showError("");
  } catch (error) {
    showError(`Could not delete ${what}: ${error.message}`);
  }
  await refreshCollections();
}

function render() {
  byId("collections-empty").hidden = collections.length > 0;
  const list = clear(byId("collection-list"));
  for (const collection of collections) {
    const isCurrent = collection.name === current;
    list.append(el("li", { className: isCurrent ? "current" : "", dataset: { collection: collection.name } },
      el("button", { type: "button", className: "select", "aria-pressed": String(isCurrent),
        on: { click: () => select(collection.name) } }, collection.name),
      el("span", { className: "muted count" }, `${plural(collection.documents, "doc")} · ${plural(collection.chunks, "chunk")}`),
      el("button", { type: "button", className: "danger", "aria-label": `Delete collection ${collection.name}`,
        on: { click: () => remove(collection) } }, "Delete")));
  }
  const fieldset = byId("scope");
  for (const old of fieldset.querySelectorAll("label")) old.remove();
  byId("scope-empty").hidden = collections.length > 0;
  for (const collection of collections) {
    const box = el("input", { type: "checkbox", name: "scope", value: collection.name,
      on: { change: (event) => {
        if (event.target.checked) scope.add(collection.name); else scope.delete(collection.name);
        remember();
      } } });
    box.checked = scope.has(collection.name);
    fieldset.append(el("label", { className: "chip" }, box, ` ${collection.name}`));
  }
  byId("current-collection").textContent = current ? `in ${current}` : "";
  byId("dropzone").dataset.disabled = String(!current);
}
