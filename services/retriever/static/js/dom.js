// Building the page from data. Every string becomes a text node or an attribute value, never markup:
// model output and document text can hold "<script>", and here it stays text.

export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === "on") {
      for (const [event, handler] of Object.entries(value)) node.addEventListener(event, handler);
    } else if (key === "dataset") {
      Object.assign(node.dataset, value);
    } else if (key === "className") {
      node.className = value;
    } else if (key.startsWith("on")) {
      throw new Error(`use props.on for event handlers, not ${key}`);
    } else {
      node.setAttribute(key, value === true ? "" : String(value));
    }
  }
  node.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return node;
}

export function byId(id) {
  const node = document.getElementById(id);
  if (!node) throw new Error(`#${id} is missing from index.html`);
  return node;
}

export function clear(node) {
  node.replaceChildren();
  return node;
}

// "page 3" when a chunk came from a paged document (PDF), else "".
export function pageOf(metadata) {
  const page = metadata && metadata.page;
  return page === undefined || page === null ? "" : `page ${page}`;
}

export function formatScore(score) {
  return typeof score === "number" ? score.toFixed(4) : String(score);
}

export function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}
