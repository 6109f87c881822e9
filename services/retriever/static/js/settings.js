// Answer and search settings, bound to the settings form and kept in localStorage.

const ITEM = "rag-playground.settings";
const DEFAULTS = { searchType: "hybrid", topK: 4, rerank: false, maxTokens: 128, temperature: 0 };
const LIMITS = { topK: [1, 100], maxTokens: [1, 4096], temperature: [0, 2] };

export const settings = load();

function load() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(ITEM) || "{}") || {};
  } catch {
    saved = {};
  }
  const merged = { ...DEFAULTS };
  for (const key of Object.keys(DEFAULTS)) {
    if (typeof saved[key] === typeof DEFAULTS[key]) merged[key] = saved[key];
  }
  return merged;
}

// A number field's value within its limits; an empty or unreadable field keeps the previous setting.
function readNumber(field, key, round) {
  const typed = field.valueAsNumber;
  if (!Number.isFinite(typed)) return settings[key];
  const [low, high] = LIMITS[key];
  const kept = Math.min(high, Math.max(low, round ? Math.round(typed) : typed));
  if (kept !== typed) field.value = kept; // show what was kept
  return kept;
}

export function bindSettings(form) {
  const fields = form.elements;
  fields.searchType.value = settings.searchType;
  fields.topK.value = settings.topK;
  fields.rerank.checked = settings.rerank;
  fields.maxTokens.value = settings.maxTokens;
  fields.temperature.value = settings.temperature;
  form.addEventListener("change", () => {
    settings.searchType = fields.searchType.value;
    settings.topK = readNumber(fields.topK, "topK", true);
    settings.rerank = fields.rerank.checked;
    settings.maxTokens = readNumber(fields.maxTokens, "maxTokens", true);
    settings.temperature = readNumber(fields.temperature, "temperature", false);
    localStorage.setItem(ITEM, JSON.stringify(settings));
  });
  form.addEventListener("submit", (event) => event.preventDefault());
}
