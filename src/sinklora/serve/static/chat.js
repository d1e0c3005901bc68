// The chat page: the conversation lives here (and in this browser's local storage), every reply is one
// streamed request to the server's OpenAI-compatible API, with this page's KV-cache settings in the body.
"use strict";

const $ = (id) => document.getElementById(id);
const KEYS = { conversation: "sinklora.conversation", settings: "sinklora.settings" };
const SETTINGS = ["cache", "budget", "positions", "max_tokens", "temperature", "seed", "system", "api_key"];
const WELCOME = [
  "## Welcome to sinklora chat",
  "Ask anything; replies stream in as the model writes them. Under each reply: **time to first token**,",
  "**tokens/s**, and the KV cache it ran with (tokens *kept* of tokens *seen*, and its memory in MiB).",
  "",
  "- **Settings** picks this page's KV-cache policy and budget, e.g. `snapkv` with budget `0.2`",
  "  keeps 20% of the prompt's keys and values; **Stop** ends a reply early.",
  "- The conversation stays in this browser (a reload restores it); **New chat** starts over.",
  "- Any OpenAI client can talk to the same server at `/v1`.",
].join("\n");

const log = $("log"), box = $("message");
let conversation = load(KEYS.conversation, []);  // [{role, content, stats?}]
let controller = null;

function load(key, fallback) {
  try { return JSON.parse(localStorage.getItem(key)) ?? fallback; } catch { return fallback; }
}

function saveConversation() { localStorage.setItem(KEYS.conversation, JSON.stringify(conversation)); }

function settings() {
  const s = {};
  for (const k of SETTINGS) s[k] = $(k).value.trim();
  return s;
}

function authHeaders() {
  const key = settings().api_key;
  return key ? { Authorization: "Bearer " + key } : {};
}

function scrollDown() { log.scrollTop = log.scrollHeight; }

function addMessage(msg) {
  const node = document.createElement("div");
  node.className = "msg " + msg.role;
  if (msg.role === "assistant") markdown.render(node, msg.content);
  else node.textContent = msg.content;
  log.append(node);
  const stats = document.createElement("div");
  stats.className = "stats";
  stats.textContent = msg.stats || "";
  if (msg.role === "assistant") log.append(stats);
  scrollDown();
  return { node, stats };
}

function showConversation() {
  log.replaceChildren();
  if (!conversation.length) {
    const welcome = document.createElement("div");
    welcome.className = "msg welcome";
    markdown.render(welcome, WELCOME);
    log.append(welcome);
  }
  conversation.forEach(addMessage);
}

function requestBody(s) {
  const messages = s.system ? [{ role: "system", content: s.system }] : [];
  for (const m of conversation) messages.push({ role: m.role, content: m.content });
  const body = { messages, stream: true, stream_options: { include_usage: true } };
  if (s.cache) body.cache = s.cache;
  if (s.budget) body.budget = s.budget;  // "0.2" or "20%": a share of the prompt; "512": tokens
  if (s.positions) body.positions = s.positions;
  if (s.max_tokens) body.max_tokens = Number(s.max_tokens);
  if (s.temperature) body.temperature = Number(s.temperature);
  if (s.seed) body.seed = Number(s.seed);
  return body;
}

// Server-sent events of a fetch response, as parsed JSON objects, up to "data: [DONE]".
async function* events(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        if (line === "data: [DONE]") return;
        yield JSON.parse(line.slice(6));
      }
    }
  }
}

function statsLine(t) {
  const parts = [];
  if (t.firstToken !== null) parts.push(`${((t.firstToken - t.sent) / 1000).toFixed(2)} s to first token`);
  if (t.usage && t.usage.completion_tokens > 1 && t.last > t.firstToken) {
    const rate = (t.usage.completion_tokens - 1) / ((t.last - t.firstToken) / 1000);
    parts.push(`${rate.toFixed(1)} tokens/s`);
  }
  if (t.usage) parts.push(`${t.usage.completion_tokens} tokens (prompt ${t.usage.prompt_tokens})`);
  const c = t.server && t.server.cache;
  if (c) {
    parts.push(`KV kept ${c.kept_tokens} of ${c.seen_tokens} tokens`);
    parts.push(`${(c.kv_bytes / 1048576).toFixed(2)} MiB`);
    parts.push(c.policy + (c.budget !== null ? ` budget ${c.budget}` : ""));
  }
  if (t.note) parts.push(t.note);
  return parts.join(" · ");
}

async function send(text) {
  const s = settings(), thread = conversation;  // "New chat" during a reply replaces `conversation`
  thread.push({ role: "user", content: text });
  if (conversation.length === 1) log.replaceChildren();
  addMessage({ role: "user", content: text });
  const reply = { role: "assistant", content: "", stats: "" };
  const view = addMessage(reply);
  const t = { sent: performance.now(), firstToken: null, last: null, usage: null, server: null, note: "" };
  let pending = false;
  const draw = () => { pending = false; markdown.render(view.node, reply.content); scrollDown(); };
  controller = new AbortController();
  $("stop").disabled = false;
  $("send").disabled = true;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", signal: controller.signal, body: JSON.stringify(requestBody(s)),
      headers: { "Content-Type": "application/json", ...authHeaders() },
    });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      throw new Error((body.error && body.error.message) || `HTTP ${response.status}`);
    }
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) t.usage = chunk.usage;
      if (chunk.sinklora) t.server = chunk.sinklora;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        t.firstToken = t.firstToken ?? performance.now();
        t.last = performance.now();
        reply.content += delta.content;
        if (!pending) { pending = true; requestAnimationFrame(draw); }
      }
    }
  } catch (err) {
    if (err.name === "AbortError") {
      t.note = "stopped";
    } else if (!reply.content) {  // nothing said: take the question back, show why
      thread.pop();
      view.node.className = "msg error";
      view.node.textContent = "error: " + err.message;
      box.value = box.value || text;
      saveConversation();
      return;
    } else {
      t.note = "error: " + err.message;
    }
  } finally {
    controller = null;
    $("stop").disabled = true;
    $("send").disabled = false;
  }
  if (thread !== conversation) return;
  draw();
  reply.stats = statsLine(t);
  view.stats.textContent = reply.stats;
  scrollDown();
  thread.push(reply);
  saveConversation();
}

async function showModel() {
  try {
    const response = await fetch("v1/models", { headers: authHeaders() });
    if (response.status === 401) { $("model").textContent = "API key needed: open Settings"; return; }
    const card = (await response.json()).data[0];
    const c = card.sinklora.cache;
    $("model").textContent = `${card.id} · context ${card.context_length} · server cache ${c.cache}` +
      (c.budget ? ` budget ${c.budget}` : "");
  } catch (err) {
    $("model").textContent = "server unreachable";
  }
}

const savedSettings = load(KEYS.settings, {});
for (const k of SETTINGS) {
  $(k).value = savedSettings[k] ?? "";
  $(k).addEventListener("change", () => {
    localStorage.setItem(KEYS.settings, JSON.stringify(settings()));
    if (k === "api_key") showModel();
  });
}
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = box.value.trim();
  if (text && !controller) { box.value = ""; send(text); }
});
box.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation = [];
  saveConversation();
  showConversation();
});
$("toggle-settings").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
});
$("settings").addEventListener("submit", (e) => e.preventDefault());

showConversation();
showModel();
