// The playground's entry point: wires the panes together and asks for the API key when the server wants one.

import { apiEvents, request, setApiKey } from "./api.js";
import { ask, newChat, stopAnswer } from "./chat.js";
import { bindCollections, refreshCollections } from "./collections.js";
import { bindDocuments, refreshDocuments } from "./documents.js";
import { byId } from "./dom.js";
import { bindSettings } from "./settings.js";
import { search } from "./sources.js";
import { startStatus } from "./status.js";
import { bindUpload } from "./upload.js";

function askForKey() {
  const dialog = byId("key-dialog");
  if (!dialog.open) dialog.showModal();
}

function bindKeyDialog() {
  const form = byId("key-form");
  const error = byId("key-error");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    setApiKey(form.elements.key.value.trim());
    try {
      await request("GET", "/v1/collections");
    } catch (failure) {
      error.hidden = false;
      error.textContent = failure.status === 401 ? "That key was refused; try again." : failure.message;
      return;
    }
    error.hidden = true;
    form.reset();
    byId("key-dialog").close();
    await loadLibrary();
  });
  apiEvents.addEventListener("unauthorized", askForKey);
}

async function loadLibrary() {
  try {
    await refreshCollections();
    await refreshDocuments();
  } catch {
    // announced already: a 401 opens the key prompt, a dead retriever shows the banner
  }
}

function mode() {
  return byId("ask-form").elements.mode.value;
}

function showMode() {
  const searching = mode() === "search";
  byId("conversation").hidden = searching;
  byId("results").hidden = !searching;
  byId("new-chat").hidden = searching;
}

function bindAsk() {
  const form = byId("ask-form");
  const question = byId("question");
  const send = byId("send");
  const stop = byId("stop");
  form.addEventListener("change", (event) => {
    if (event.target.name === "mode") showMode();
  });
  question.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = question.value.trim();
    if (!text || send.disabled) return;
    send.disabled = true;
    stop.hidden = mode() !== "answer";
    try {
      if (mode() === "answer") {
        question.value = "";
        await ask(text);
      } else {
        await search(text);
      }
    } finally {
      send.disabled = false;
      stop.hidden = true;
      question.focus();
    }
  });
  stop.addEventListener("click", stopAnswer);
  byId("new-chat").addEventListener("click", newChat);
  showMode();
}

bindSettings(byId("settings"));
bindKeyDialog();
bindCollections();
bindDocuments();
bindUpload();
bindAsk();
startStatus();
loadLibrary();
