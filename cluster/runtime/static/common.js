// Shared by the pages: the bearer token (kept in this tab only), API calls, colours.
"use strict";

const TOKEN_KEY = "saga-token";

const STATE_COLOURS = {
  // sagas
  RUNNING: "#3b82f6", COMPLETED: "#16a34a", ABORTING: "#f59e0b", ABORTED: "#9333ea",
  STUCK: "#b91c1c",
  // vertices
  PENDING: "#d1d5db", STARTED: "#3b82f6", DONE: "#16a34a", FAILED: "#dc2626",
  COMPENSATING: "#f59e0b", COMPENSATED: "#9333ea", VERTEX_STUCK: "#b91c1c",
};

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = Object.assign({}, authHeaders(), options.headers || {});
  const init = Object.assign({}, options, { headers });
  if (options.json !== undefined) {
    init.method = init.method || "POST";
    init.body = JSON.stringify(options.json);
    headers["Content-Type"] = "application/json";
  }
  let reply;
  try {
    reply = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, "the node cannot be reached");
  }
  const body = await reply.json().catch(() => ({}));
  if (!reply.ok) {
    throw new ApiError(reply.status, body.error || reply.statusText);
  }
  return body;
}

// The token form in the header: shown by every page.
function setUpTokenForm() {
  const form = document.getElementById("token-form");
  const input = document.getElementById("token");
  input.value = token();
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    location.reload();
  });
}

function showProblem(error) {
  const box = document.getElementById("problem");
  if (!error) {
    box.hidden = true;
    box.textContent = "";
    return;
  }
  box.hidden = false;
  box.dataset.status = String(error.status || 0);
  box.textContent =
    error.status === 401 ? "This cluster needs a token: paste yours above." : error.message;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function badge(state) {
  const b = el("span", { class: "badge", "data-state": state }, state);
  b.style.background = STATE_COLOURS[state] || "#6b7280";
  return b;
}

function when(ms) {
  return ms ? new Date(Number(ms)).toISOString().replace("T", " ").replace("Z", "") : "";
}
