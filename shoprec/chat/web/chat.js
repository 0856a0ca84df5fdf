// The chat page: sends messages to POST /v1/chat (SSE), shows cards, sends clicks / add-to-cart to /v1/chat/events.
// Catalog text (titles, brands, categories, reasons) is untrusted: it only ever goes through textContent.
"use strict";

const $ = (id) => document.getElementById(id);
let conversationId = null;
let editedState = null;

function headers() {
  const h = { "Content-Type": "application/json", Accept: "text/event-stream" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

function say(who, text) {
  const node = el("div", "msg " + who, text);
  $("log").appendChild(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

function money(x) {
  return x === null || x === undefined ? "" : "$" + Number(x).toFixed(2);
}

async function sendEvent(answer, card, type) {
  const res = await fetch("/v1/chat/events", {
    method: "POST",
    headers: headers(),
    body: JSON.stringify({
      conversation_id: conversationId, recommendation_id: answer.recommendation_id, item_id: card.item_id, type,
    }),
  });
  const body = await res.json();
  $("status").textContent = res.ok ? `${type} on ${card.item_id} stored (recommendation ${answer.recommendation_id})`
    : "event not stored: " + (body.detail || res.status);
}

function render(node, answer) {
  node.replaceChildren();
  node.appendChild(el("div", "text", answer.text));
  if (answer.suggestions && answer.suggestions.length) {
    const box = el("div", "suggestions");
    for (const s of answer.suggestions) {
      const b = el("button", "suggestion", s);
      b.type = "button";
      b.addEventListener("click", () => ask(s));
      box.appendChild(b);
    }
    node.appendChild(box);
  }
  if (answer.cards && answer.cards.length) {
    const grid = el("div", "cards");
    for (const card of answer.cards) {
      const c = el("div", "card" + (answer.stage === "retrieval" ? " pending" : ""));
      c.dataset.itemId = card.item_id;
      c.dataset.price = card.price === null ? "" : String(card.price);
      c.appendChild(el("div", "title", card.title));
      c.appendChild(el("div", "category", card.category + (card.brand ? " · " + card.brand : "")));
      c.appendChild(el("div", "price", money(card.price)));
      c.appendChild(el("div", "reason", card.reason || "Ranking in progress..."));
      const why = el("button", "why-btn", "why this?");
      why.type = "button";
      why.addEventListener("click", (e) => { e.stopPropagation(); c.classList.toggle("why"); });
      const cart = el("button", "cart-btn", "add to cart");
      cart.type = "button";
      cart.addEventListener("click", (e) => { e.stopPropagation(); sendEvent(answer, card, "cart"); });
      c.append(why, cart);
      c.addEventListener("click", () => sendEvent(answer, card, "click"));
      grid.appendChild(c);
    }
    node.appendChild(grid);
  }
  node.dataset.stage = answer.stage;
  node.dataset.kind = answer.kind;
  const shownState = Object.assign({}, answer.state);
  delete shownState.shown;
  $("state").value = JSON.stringify(shownState, null, 2);
  editedState = null;
}

function readEditedState() {
  // the shopper may edit the state (drop a brand ban, widen the budget); it replaces the server's copy
  const text = $("state").value.trim();
  $("state-error").textContent = "";
  if (!$("state-panel").open || !text) return null;
  try {
    return JSON.parse(text);
  } catch (e) {
    $("state-error").textContent = "the state is not valid JSON: " + e.message;
    throw e;
  }
}

async function ask(message) {
  say("user", message);
  const node = say("bot", "...");
  node.classList.add("answer");
  const body = { message, conversation_id: conversationId, stream: true };
  const user = $("user").value.trim();
  if (user) body.user = user;
  try { editedState = readEditedState(); } catch (e) { node.textContent = "fix the state first"; return; }
  if (editedState) body.state = editedState;
  const res = await fetch("/v1/chat", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!res.ok) {
    const err = await res.json().catch(() => ({}));
    node.textContent = "error: " + (err.detail || res.status);
    return;
  }
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const lines = block.split("\n");
      const event = (lines.find((l) => l.startsWith("event: ")) || "event: final").slice(7);
      const data = lines.filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (!data) continue;
      const out = JSON.parse(data);
      if (event === "error") {  // e.g. 409: another tab answered a turn of this conversation meanwhile
        node.textContent = "error: " + (out.detail || out.status);
        return;
      }
      conversationId = out.conversation_id;
      render(node, out.answer);
    }
  }
  node.classList.add("done");
}

$("ask").addEventListener("submit", (e) => {
  e.preventDefault();
  const message = $("message").value.trim();
  if (!message) return;
  $("message").value = "";
  ask(message);
});
