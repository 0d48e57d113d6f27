// The status page: one snapshot a second from /v1/status/events (SSE, read with fetch so that the
// API key travels in a header, never in a URL). The key lives in sessionStorage: gone when the
// tab closes. Every action is an API call checked by the same code as any client's.
"use strict";

const KEY = "mlx-gateway-key";
const $ = (selector) => document.querySelector(selector);
let stream = null;

function headers() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (className) td.className = className;
  return td;
}

function button(label, confirmText, action) {
  const b = document.createElement("button");
  b.textContent = label;
  b.addEventListener("click", async () => {
    if (!confirm(confirmText)) return;
    b.disabled = true;
    const reply = await action();
    if (!reply.ok) {
      const body = await reply.json().catch(() => ({}));
      alert((body.error && body.error.message) || `failed: HTTP ${reply.status}`);
    }
    b.disabled = false;
  });
  return b;
}

function post(path, body) {
  return fetch(path, {
    method: "POST",
    headers: { ...headers(), "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
}

function percent(rate) {
  return `${Math.floor(rate * 100)}%`;
}

function bar(share, className) {
  const outer = document.createElement("div");
  outer.className = className ? `bar ${className}` : "bar";
  const fill = document.createElement("div");
  fill.style.width = `${Math.min(Math.max(share, 0), 1) * 100}%`;
  outer.appendChild(fill);
  return outer;
}

// A prompt's tokens; while it is prefilled, how many are in its KV cache so far, as a bar.
function promptCell(r) {
  const td = cell(r.prompt_tokens || null, "prompt");
  if (r.state === "prefilling" && r.prompt_tokens) {
    td.dataset.progress = String(Math.floor(r.prefill_progress * 100));
    td.title = "prompt tokens in the KV cache so far (from the prefix cache, or prefilled)";
    const label = document.createElement("span");
    label.className = "progress";
    label.textContent = `${r.prefilled_tokens} / ${r.prompt_tokens} (${percent(r.prefill_progress)})`;
    td.replaceChildren(bar(r.prefill_progress, "prefill"), label);
  }
  return td;
}

// Prompt tokens served from the prefix cache, by tier.
function cachedCell(cached, ram, disk) {
  const td = cell(cached ? `${cached} (RAM ${ram} / disk ${disk})` : cached, "cached");
  td.title = "prompt tokens served from the prefix cache (RAM, disk tier)";
  return td;
}

function modelCache(m) {
  const cache = m.prompt_cache;
  if (!cache || !cache.prompt_tokens) return "–";
  return `${percent(cache.hit_rate)} of ${cache.prompt_tokens} prompt tokens (RAM ${cache.cached_tokens_ram} / disk ${cache.cached_tokens_disk})`;
}

function speculation(drafted, accepted, rate) {
  return drafted ? `${percent(rate)} (${accepted} of ${drafted})` : "–";
}

function bytes(n) {
  if (!n) return "0";
  const units = ["B", "KB", "MB", "GB", "TB"];
  const i = Math.min(Math.floor(Math.log(n) / Math.log(1024)), units.length - 1);
  return `${(n / 1024 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
}

function renderMemory(memory) {
  const box = $("#memory");
  if (!memory) { box.textContent = ""; return; }
  const share = memory.used_bytes / Math.max(memory.budget_bytes, 1);
  box.innerHTML = "";
  const label = document.createElement("div");
  label.textContent = `memory ${bytes(memory.used_bytes)} of ${bytes(memory.budget_bytes)} budget`;
  box.append(label, bar(share, share > 1 ? "over" : ""));
}

// Rows keyed by `key`: a row still listed keeps its node, and its actions cell (the first: other
// cells' changing widths do not move it) while its `actionsKey` is the same, so a snapshot arriving
// between a button's press and its release does not swallow the click (each snapshot replaced
// every button, and a busy machine's test clicked nothing).
function renderRows(body, items, key, cells, actions, actionsKey) {
  const old = new Map([...body.children].map((row) => [row.dataset.key, row]));
  const rows = items.map((item) => {
    const row = old.get(key(item)) || document.createElement("tr");
    row.dataset.key = key(item);
    const kept = row.firstElementChild;
    const fresh = cells(item);
    if (kept && kept.dataset.actions === actionsKey(item)) {
      while (kept.nextSibling) kept.nextSibling.remove();
      kept.after(...fresh);
    } else {
      const td = actions(item);
      td.dataset.actions = actionsKey(item);
      row.replaceChildren(td, ...fresh);
    }
    return row;
  });
  const same = rows.length === body.children.length && rows.every((row, i) => body.children[i] === row);
  if (!same) body.replaceChildren(...rows);
  return rows;
}

function renderModels(models, budget) {
  const body = $("#models tbody");
  // Speculation's column only once a worker reports its figures.
  const speculating = models.some((m) => m.speculation);
  document.querySelectorAll("#models .speculation").forEach((th) => { th.hidden = !speculating; });
  const cells = (m) => {
    const memory = budget ? `${bytes(m.memory_bytes)} (${((m.memory_bytes / budget) * 100).toFixed(1)}%)` : bytes(m.memory_bytes);
    const abilities = `${m.tool_calls ? "tools" : "–"} / ${m.thinking ? "thinking" : "–"}`;
    const state = m.reason && m.state !== "loaded" ? `${m.state}: ${m.reason}` : m.state;
    const out = [cell(m.name), cell(state, `state state-${m.state}`), cell((m.pids || []).join(", ")),
      cell(memory), cell(m.context_length), cell(abilities), cell(m.requests ?? ""), cell(modelCache(m), "cache")];
    if (speculating) {
      const s = m.speculation || {};
      out.push(cell(speculation(s.drafted_tokens, s.accepted_tokens, s.acceptance_rate), "speculation"));
    }
    return out;
  };
  const rows = renderRows(body, models, (m) => m.name, cells, modelActions,
    (m) => `${m.external}/${m.state}/${m.pinned}`);
  rows.forEach((row, i) => { row.dataset.model = models[i].name; });
}

function modelActions(m) {
  const actions = document.createElement("td");
  if (!m.external) {
    const name = encodeURIComponent(m.name);
    if (m.state === "loaded") {
      actions.append(button("Unload", `Unload ${m.name}? Its memory goes back to the system.`,
        () => post(`/v1/models/${name}/unload`)));
    } else if (m.state !== "loading" && m.state !== "unloading") {
      actions.append(button("Load", `Load ${m.name}?`, () => post(`/v1/models/${name}/load`)));
    }
    actions.append(button(m.pinned ? "Unpin" : "Pin", `${m.pinned ? "Unpin" : "Pin"} ${m.name}?`,
      () => post(`/v1/models/${name}/pin`, { pinned: !m.pinned })));
  }
  return actions;
}

function renderRequests(requests) {
  $("#no-requests").hidden = requests.length > 0;
  const cells = (r) => {
    const id = cell(r.id, "id");
    id.title = r.id;
    return [id, cell(r.family), cell(r.model), cell(r.key || "none"),
      cell(r.state, `state state-${r.state}`), promptCell(r),
      cachedCell(r.cached_tokens, r.cached_tokens_ram, r.cached_tokens_disk), cell(r.output_tokens, "output"),
      cell(r.tokens_per_second), cell(speculation(r.drafted_tokens, r.accepted_tokens, r.acceptance_rate), "accepted"),
      cell(`${r.elapsed_s} s`)];
  };
  const actions = (r) => {
    const td = document.createElement("td");
    td.append(button("Cancel", `Cancel ${r.id}? Its client gets an error.`,
      () => post(`/v1/requests/${encodeURIComponent(r.request_id)}/cancel`)));
    return td;
  };
  const rows = renderRows($("#requests tbody"), requests, (r) => r.id, cells, actions, () => "cancel");
  rows.forEach((row, i) => { row.dataset.request = requests[i].id; row.dataset.model = requests[i].model; });
}

function renderFailures(failures) {
  $("#no-failures").hidden = failures.length > 0;
  $("#failures tbody").replaceChildren(...failures.map((f) => {
    const row = document.createElement("tr");
    row.dataset.request = f.request_id;
    row.append(cell(new Date(f.at * 1000).toLocaleTimeString()), cell(f.request_id), cell(f.model),
      cell(f.code, "error"), cell(f.message, "message"));
    return row;
  }));
}

function renderThroughput(series, now) {
  const canvas = $("#throughput");
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  const end = Math.floor(now);
  const values = new Map(series.map(([second, tokens]) => [second, tokens]));
  const points = [];
  for (let s = end - 299; s <= end; s++) points.push(values.get(s) || 0);
  const top = Math.max(10, ...points);
  context.strokeStyle = "#0071e3";
  context.lineWidth = 2;
  context.beginPath();
  points.forEach((v, i) => {
    const x = (i / (points.length - 1)) * width;
    const y = height - 14 - (v / top) * (height - 24);
    if (i) context.lineTo(x, y); else context.moveTo(x, y);
  });
  context.stroke();
  context.fillStyle = "#6e6e73";
  context.fillText(`${top} tokens/s`, 4, 10);
  context.fillText(`now: ${points[points.length - 1]} tokens/s`, width - 120, 10);
}

function render(status) {
  renderMemory(status.memory);
  renderModels(status.models, status.memory && status.memory.budget_bytes);
  renderRequests(status.requests);
  renderThroughput(status.throughput, status.time);
  renderFailures(status.failures);
  $("#panels").hidden = false;
  $("#login").hidden = true;
  $("#connection").textContent = `live · ${new Date(status.time * 1000).toLocaleTimeString()}`;
}

function showLogin(message) {
  $("#panels").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  $("#connection").textContent = "";
}

async function follow() {
  if (stream) stream.abort();
  stream = new AbortController();
  let reply;
  try {
    reply = await fetch("/v1/status/events", { headers: headers(), signal: stream.signal });
  } catch (error) {
    $("#connection").textContent = "gateway unreachable; retrying…";
    setTimeout(follow, 2000);
    return;
  }
  if (reply.status === 401) {
    const hadKey = sessionStorage.getItem(KEY) !== null;
    sessionStorage.removeItem(KEY);
    showLogin(hadKey ? "That key was refused." : "");
    return;
  }
  $("#logout").hidden = sessionStorage.getItem(KEY) === null;
  const reader = reply.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        if (event.startsWith("data: ")) render(JSON.parse(event.slice(6)));
      }
    }
  } catch (error) {
    if (error.name === "AbortError") return;
  }
  $("#connection").textContent = "disconnected; retrying…";
  setTimeout(follow, 2000);
}

$("#login").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("#key").value);
  $("#key").value = "";
  follow();
});
$("#logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  if (stream) stream.abort();
  showLogin("");
});
follow();
