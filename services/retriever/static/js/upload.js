// Uploads: files dropped on the drop zone or chosen with the file input go up one request per file, two at a
// time, each with its own progress bar and its own outcome (ingested, unchanged, or the server's error).

import { uploadFile } from "./api.js";
import { currentCollection, refreshCollections } from "./collections.js";
import { refreshDocuments } from "./documents.js";
import { byId, el, plural } from "./dom.js";

const PARALLEL = 2;
const queue = [];
let running = 0;

export function bindUpload() {
  const zone = byId("dropzone");
  const input = byId("file-input");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    enqueue([...event.dataTransfer.files]);
  });
  input.addEventListener("change", () => {
    enqueue([...input.files]);
    input.value = "";
  });
}

function enqueue(files) {
  const collection = currentCollection();
  for (const file of files) {
    const row = uploadRow(file);
    if (!collection) {
      finish(row, "error", "create or choose a collection first");
      continue;
    }
    queue.push({ file, row, collection });
  }
  pump();
}

function uploadRow(file) {
  const bar = el("progress", { max: "1", value: "0", "aria-label": `Upload of ${file.name}` });
  const status = el("span", { className: "upload-status" }, "queued");
  const row = el("li", { className: "upload", dataset: { file: file.name, state: "queued" } },
    el("span", { className: "name" }, file.name), bar, status);
  byId("upload-list").prepend(row);
  return { row, bar, status };
}

function finish(upload, state, message) {
  upload.row.dataset.state = state;
  upload.status.textContent = message;
  upload.bar.value = upload.bar.max;
  upload.bar.hidden = true;
}

function outcome(file, reply) {
  const failed = (reply.failed || []).filter((f) => f.document_name === file.name);
  if (failed.length) return ["error", failed.map((f) => f.error).join("; ")];
  const documents = reply.documents || [];
  const chunks = documents.reduce((sum, d) => sum + d.chunks, 0);
  const fresh = documents.filter((d) => d.status === "ingested").length;
  if (fresh === 0) return ["done", "unchanged (already in the collection)"];
  return ["done", `ingested: ${documents.length > 1 ? `${plural(fresh, "document")}, ` : ""}${plural(chunks, "chunk")}`];
}

async function pump() {
  while (running < PARALLEL && queue.length) {
    const { file, row, collection } = queue.shift();
    running += 1;
    row.row.dataset.state = "uploading";
    row.status.textContent = "uploading";
    uploadFile(collection, file, (fraction) => {
      row.bar.value = fraction;
      if (fraction >= 1 && row.row.dataset.state === "uploading") {
        row.bar.removeAttribute("value"); // indeterminate: the server is chunking and embedding
        row.row.dataset.state = "indexing";
        row.status.textContent = "indexing";
      }
    }).then((reply) => finish(row, ...outcome(file, reply)),
      (error) => finish(row, "error", error.message))
      .finally(() => {
        running -= 1;
        if (running === 0 && queue.length === 0) {
          refreshDocuments();
          refreshCollections();
        }
        pump();
      });
  }
}
