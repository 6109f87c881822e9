// The retriever's REST API as the page uses it: JSON calls, a server-sent-event stream, uploads with progress.
// The API key (when the server has one) lives in sessionStorage only. Failures are announced on `apiEvents`:
// "unauthorized" (401), "unavailable" (503: the message names the service that is down) and "unreachable".

const KEY_ITEM = "rag-playground.api-key";

export const apiEvents = new EventTarget();

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function setApiKey(key) {
  sessionStorage.setItem(KEY_ITEM, key);
}

function authHeaders() {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function announce(error) {
  const type = { 401: "unauthorized", 503: "unavailable", 0: "unreachable" }[error.status];
  if (type) apiEvents.dispatchEvent(new CustomEvent(type, { detail: error.message }));
  return error;
}

function errorFrom(status, text) {
  let message = text || `HTTP ${status}`;
  try {
    const body = JSON.parse(text);
    if (body && body.error && body.error.message) message = body.error.message;
  } catch {
    // not JSON (a proxy's page, an empty body): keep the text
  }
  return announce(new ApiError(status, message));
}

async function send(method, path, body, signal) {
  const init = { method, signal, headers: { ...authHeaders() } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  try {
    return await fetch(path, init);
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw announce(new ApiError(0, "the retriever is unreachable"));
  }
}

export async function request(method, path, body) {
  const response = await send(method, path, body);
  const text = await response.text();
  if (!response.ok) throw errorFrom(response.status, text);
  return text ? JSON.parse(text) : {};
}

// Health is open (no key) and answers 503 with the same body while something is not ready.
export async function health() {
  const response = await send("GET", "/v1/health/ready");
  return response.json();
}

// POST and yield each `data:` event of the SSE reply until [DONE]; an `{"error": ...}` event throws.
export async function* stream(path, body, signal) {
  const response = await send("POST", path, body, signal);
  if (!response.ok) throw errorFrom(response.status, await response.text());
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw announce(new ApiError(Number(event.error.code) || 500, event.error.message));
        yield event;
      }
    }
  }
}

// Multipart upload of one file; `onProgress(fraction)` while the bytes go up. fetch() cannot report upload
// progress, XMLHttpRequest can.
export function uploadFile(collection, file, onProgress) {
  return new Promise((resolve, reject) => {
    const form = new FormData();
    form.append("collection_name", collection);
    form.append("documents", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/documents");
    for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    xhr.upload.addEventListener("load", () => onProgress(1));
    xhr.addEventListener("load", () => {
      if (xhr.status >= 200 && xhr.status < 300) resolve(JSON.parse(xhr.responseText));
      else reject(errorFrom(xhr.status, xhr.responseText));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0,
      "the upload was cut off (the file may be larger than the server accepts, or the retriever is down)")));
    xhr.send(form);
  });
}
