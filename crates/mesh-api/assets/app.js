// The mesh price page: a live table over the WebSocket, the network panel and the provider
// settings. Plain JavaScript, no external resources. Elements keep stable ids and data
// attributes (data-asset, data-blockchain, data-field, data-enabled) for the browser test.
"use strict";

const state = {
  prices: new Map(), // "blockchain\u0000asset" -> { view, receivedAt }
  network: null,
  provider: null,
  live: false,
};

const $ = (id) => document.getElementById(id);
const keyOf = (p) => p.blockchain + "\u0000" + p.asset;

function short(text, keep = 6) {
  return text.length > keep * 2 + 1 ? text.slice(0, keep) + "…" + text.slice(-keep) : text;
}

// Prices are exact decimal strings; long ones are shown to 8 significant digits (the exact
// value is in the cell's title), as plain decimals: rounded on the digits of the text, never
// through a float (which would show 1.2345679e-7, or lose digits of a large price).
function priceText(text) {
  const digits = text.replace(/^-?0*\.?0*/, "").replace(".", "");
  if (digits.length <= 10) return text;
  return roundDecimal(text, 8);
}

// `text` (a plain decimal: optional "-", digits, optional "." and digits) rounded half up to
// `sig` significant digits, trailing zeros of the fraction dropped. Anything else is returned
// as it is.
function roundDecimal(text, sig) {
  const m = /^(-?)(\d+)(?:\.(\d+))?$/.exec(text);
  if (!m) return text;
  const sign = m[1];
  let digits = (m[2] + (m[3] || "")).split("").map(Number);
  let point = m[2].length;
  const first = digits.findIndex((d) => d !== 0);
  if (first < 0 || digits.length - first <= sig) return text;
  const end = first + sig;
  const up = digits[end] >= 5;
  digits = digits.slice(0, end);
  if (up) {
    let i = end - 1;
    while (i >= 0 && digits[i] === 9) {
      digits[i] = 0;
      i--;
    }
    if (i >= 0) {
      digits[i] += 1;
    } else {
      digits.unshift(1);
      point += 1;
    }
  }
  while (digits.length < point) digits.push(0);
  const int = digits.slice(0, point).join("").replace(/^0+(?=\d)/, "") || "0";
  const frac = digits.slice(point).join("").replace(/0+$/, "");
  return sign + int + (frac ? "." + frac : "");
}

function ageText(secs) {
  if (secs < 60) return secs + "s";
  if (secs < 3600) return Math.floor(secs / 60) + "m";
  if (secs < 86400) return Math.floor(secs / 3600) + "h";
  return Math.floor(secs / 86400) + "d";
}

function ageOf(entry) {
  return entry.view.age_secs + Math.floor((Date.now() - entry.receivedAt) / 1000);
}

// ---- connection state ------------------------------------------------------------------

function setConnection(text, kind) {
  const pill = $("connection");
  pill.textContent = text;
  pill.dataset.state = kind;
}

function setNodeProblem(message) {
  const banner = $("node-banner");
  banner.hidden = !message;
  banner.textContent = message || "";
}

// ---- prices -----------------------------------------------------------------------------

function cell(row, field, cls) {
  const td = document.createElement("td");
  td.dataset.field = field;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function makeRow(view) {
  const row = document.createElement("tr");
  row.dataset.asset = view.asset;
  row.dataset.blockchain = view.blockchain;
  const asset = cell(row, "asset", "asset");
  asset.title = view.asset;
  cell(row, "blockchain", "col-chain");
  cell(row, "price", "num");
  cell(row, "change_24h", "num");
  cell(row, "age", "num");
  cell(row, "hops", "num col-optional");
  cell(row, "providers", "num col-optional");
  return row;
}

function fillRow(row, entry) {
  const v = entry.view;
  const field = (name) => row.querySelector('[data-field="' + name + '"]');
  const asset = field("asset");
  asset.textContent = short(v.asset);
  // On a phone the chain column is hidden and the chain shows under the asset.
  const chain = document.createElement("span");
  chain.className = "chain-inline";
  chain.textContent = v.blockchain;
  if (v.discrepancy) {
    const badge = document.createElement("span");
    badge.className = "badge";
    badge.dataset.discrepancy = "true";
    badge.textContent = "discrepancy";
    badge.title = entry.discrepancyNote || "Providers disagree on this price";
    asset.appendChild(badge);
  }
  asset.appendChild(chain);
  row.dataset.discrepancy = String(Boolean(v.discrepancy));
  row.dataset.stale = String(Boolean(v.stale));
  field("blockchain").textContent = v.blockchain;
  const price = field("price");
  price.textContent = priceText(v.price);
  price.title = v.price;
  const change = field("change_24h");
  if (v.change_24h === null || v.change_24h === undefined) {
    change.textContent = "–";
    change.className = "num";
  } else {
    const n = Number(v.change_24h);
    change.textContent = (n > 0 ? "+" : "") + v.change_24h + "%";
    change.className = "num " + (n > 0 ? "up" : n < 0 ? "down" : "");
  }
  field("age").textContent = ageText(ageOf(entry));
  // null: reloaded from the store at start-up, not yet heard of again.
  field("hops").textContent = v.hop_count === null || v.hop_count === undefined ? "–" : String(v.hop_count);
  field("providers").textContent =
    v.providers_reporting > 1 ? v.providers_agreeing + "/" + v.providers_reporting : String(v.providers_reporting);
}

function renderPrices() {
  const body = document.querySelector("#prices tbody");
  const filter = $("price-filter").value.trim().toLowerCase();
  const entries = [...state.prices.values()]
    .filter((e) => !filter || e.view.asset.toLowerCase().includes(filter) || e.view.blockchain.toLowerCase().includes(filter))
    .sort((a, b) => a.view.blockchain.localeCompare(b.view.blockchain) || a.view.asset.localeCompare(b.view.asset));
  const existing = new Map([...body.rows].map((r) => [r.dataset.blockchain + "\u0000" + r.dataset.asset, r]));
  const rows = entries.map((e) => {
    const k = keyOf(e.view);
    const row = existing.get(k) || makeRow(e.view);
    existing.delete(k);
    fillRow(row, e);
    return row;
  });
  existing.forEach((row) => row.remove());
  rows.forEach((row) => body.appendChild(row)); // appendChild moves: keeps the sort order
  $("prices-empty").hidden = state.prices.size > 0;
}

function upsertPrice(view) {
  const k = keyOf(view);
  const old = state.prices.get(k);
  state.prices.set(k, { view, receivedAt: Date.now(), discrepancyNote: old && old.discrepancyNote });
  renderPrices();
  const row = [...document.querySelectorAll("#prices tbody tr")].find(
    (r) => r.dataset.asset === view.asset && r.dataset.blockchain === view.blockchain);
  if (row) {
    row.classList.remove("flash");
    void row.offsetWidth; // restart the animation
    row.classList.add("flash");
  }
}

function markDiscrepancy(d) {
  const entry = state.prices.get(d.blockchain + "\u0000" + d.asset);
  if (!entry) return;
  entry.view.discrepancy = true;
  entry.discrepancyNote = "Providers disagree by " + d.difference_percent + "%: " + d.price_a + " vs " + d.price_b;
  renderPrices();
}

// ---- network ----------------------------------------------------------------------------

function freshnessText(f) {
  if (f === "Fresh") return "Fresh";
  if (f === "Stale") return "Stale";
  if (f && f.MinutesAgo !== undefined) return f.MinutesAgo + " minutes ago";
  if (f && f.HoursAgo !== undefined) return f.HoursAgo + " hours ago";
  return "–";
}

function hoursSince(iso) {
  const t = Date.parse(iso || "");
  return Number.isNaN(t) ? null : Math.max(0, Math.floor((Date.now() - t) / 3600000));
}

function renderStaleBanner(n) {
  const banner = $("stale-banner");
  const f = n && n.data_freshness;
  let text = "";
  if (f && f.HoursAgo !== undefined) {
    text = "Data is " + f.HoursAgo + (f.HoursAgo === 1 ? " hour" : " hours") + " old";
  } else if (f === "Stale") {
    const h = hoursSince(n.last_update_time);
    // No receipt since the node started: the prices (if any) were reloaded from its store.
    text = h === null
      ? (state.prices.size ? "Data is stale: no price update received since the node started" : "Data is stale: no price update received yet")
      : "Data is " + h + (h === 1 ? " hour" : " hours") + " old";
  }
  banner.hidden = !text;
  banner.textContent = text;
  banner.dataset.freshness = JSON.stringify(f === undefined ? null : f);
}

function renderNetwork() {
  const n = state.network;
  renderStaleBanner(n);
  if (!n) return;
  $("net-node-id").textContent = n.node_id;
  $("net-peers").textContent = String(n.connected_peers);
  $("net-freshness").textContent = freshnessText(n.data_freshness);
  $("net-last-update").textContent = n.last_update_time || "never";
  $("net-degraded").textContent = n.degraded ? "yes (" + (n.degraded_components || []).join(", ") + ")" : "no";
  const list = $("net-providers");
  list.replaceChildren(...n.active_providers.map((p) => {
    const li = document.createElement("li");
    li.dataset.nodeId = p.node_id;
    const id = document.createElement("span");
    id.className = "mono";
    id.title = p.node_id;
    id.textContent = short(p.node_id, 8);
    const hops = document.createElement("span");
    hops.dataset.field = "hop_count";
    hops.textContent = p.hop_count === 1 ? "1 hop" : p.hop_count + " hops";
    li.append(id, hops);
    return li;
  }));
  $("net-providers-empty").hidden = n.active_providers.length > 0;
}

// ---- provider settings ------------------------------------------------------------------

function showProviderStatus(text, kind) {
  const status = $("provider-status");
  status.textContent = text;
  status.dataset.state = kind;
}

function renderProvider() {
  const p = state.provider;
  if (!p) return;
  const status = $("provider-status");
  status.dataset.enabled = String(p.enabled);
  const toggle = $("provider-toggle");
  if (document.activeElement !== toggle || p.enabled) toggle.checked = p.enabled;
  // Kept open while the API's token is asked for (askForToken), whatever else arrives.
  $("provider-form").hidden = !state.askingToken && (!toggle.checked || p.enabled);
  if (status.dataset.state !== "error" && status.dataset.state !== "busy") {
    showProviderStatus(p.enabled ? "Provider mode is on." : "Provider mode is off." + (p.reason ? " (" + p.reason + ")" : ""), "idle");
  }
  const details = $("provider-details");
  const facts = [["Node", p.node_id], ["Last fetch", p.last_fetch_time], ["Last result", p.last_fetch_result],
    ["Next round", p.next_round_time], ["Rounds fetched", p.rounds_fetched], ["Last error", p.last_error]];
  details.replaceChildren(...facts.filter(([, v]) => v !== null && v !== undefined).flatMap(([k, v]) => {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = String(v);
    return [dt, dd];
  }));
}

async function providerCall(path, body) {
  const headers = { "Content-Type": "application/json" };
  const token = $("api-token").value.trim();
  if (token) headers.Authorization = "Bearer " + token;
  let response;
  try {
    response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  } catch (e) {
    return { ok: false, error: "The API is not reachable: " + e.message };
  }
  let answer = null;
  try { answer = await response.json(); } catch (e) { /* not JSON */ }
  if (response.ok && answer && answer.success) return { ok: true, data: answer.data };
  const error = (answer && answer.error) || "HTTP " + response.status;
  // 401 from the token check (mesh-api, or the nginx site in front of it), not Birdeye's
  // "Invalid API key": ask for the API's token.
  if (response.status === 401 && /MESH_API_TOKEN|bearer token/i.test(error)) {
    return { ok: false, needsToken: true, error };
  }
  return { ok: false, error };
}

// Shows the form with the token field focused after a 401 of the token check.
function askForToken(error) {
  state.askingToken = true;
  $("provider-form").hidden = false;
  $("api-token-row").hidden = false;
  $("api-token").focus();
  showProviderStatus("This API needs its token (MESH_API_TOKEN): enter it and try again. (" +
    error + ")", "error");
}

async function enableProvider(event) {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) {
    showProviderStatus("Enter your Birdeye API key.", "error");
    return;
  }
  const button = $("provider-enable");
  button.disabled = true;
  showProviderStatus("Checking the key with Birdeye…", "busy");
  const result = await providerCall("/api/mesh/provider/enable", { api_key: key });
  button.disabled = false;
  if (result.ok) {
    $("api-key").value = "";
    state.askingToken = false;
    state.provider = result.data;
    showProviderStatus("Provider mode is on.", "idle");
  } else if (result.needsToken) {
    askForToken(result.error);
  } else {
    showProviderStatus(result.error, "error");
  }
  renderProvider();
}

async function toggleProvider() {
  const toggle = $("provider-toggle");
  if (toggle.checked) {
    $("provider-form").hidden = state.provider && state.provider.enabled;
    showProviderStatus("Enter your Birdeye API key and click Enable.", "idle");
    $("api-key").focus();
    return;
  }
  $("provider-form").hidden = true;
  if (!state.provider || !state.provider.enabled) {
    showProviderStatus("Provider mode is off.", "idle");
    return;
  }
  showProviderStatus("Turning provider mode off…", "busy");
  const result = await providerCall("/api/mesh/provider/disable", {});
  if (result.ok) {
    state.askingToken = false;
    state.provider = result.data;
    showProviderStatus("Provider mode is off.", "idle");
  } else if (result.needsToken) {
    toggle.checked = true;
    askForToken(result.error);
  } else {
    toggle.checked = true;
    showProviderStatus(result.error, "error");
  }
  renderProvider();
}

// ---- stream -----------------------------------------------------------------------------

function handle(message) {
  switch (message.type) {
    case "snapshot": {
      state.prices.clear();
      const now = Date.now();
      message.data.prices.forEach((view) => state.prices.set(keyOf(view), { view, receivedAt: now }));
      state.network = message.data.network;
      state.provider = message.data.provider;
      setNodeProblem("");
      renderPrices();
      renderNetwork();
      renderProvider();
      break;
    }
    case "price": upsertPrice(message.data); break;
    case "discrepancy": markDiscrepancy(message.data); break;
    case "network": state.network = message.data; renderNetwork(); break;
    case "provider": state.provider = message.data; renderProvider(); break;
    case "node":
      setNodeProblem(message.data.connected ? "" : message.data.error || "node unavailable");
      break;
    default: break;
  }
}

let retryMs = 1000;
function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(scheme + "//" + location.host + "/api/mesh/ws");
  socket.onopen = () => { retryMs = 1000; setConnection("live", "live"); };
  socket.onmessage = (e) => {
    try { handle(JSON.parse(e.data)); } catch (err) { console.error("bad event", err); }
  };
  socket.onclose = (e) => {
    setConnection("reconnecting…", "down");
    if (e.reason) console.warn("stream closed:", e.code, e.reason);
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 10000);
  };
}

// ---- views ------------------------------------------------------------------------------

function show(view) {
  document.querySelectorAll(".tab").forEach((tab) => {
    if (tab.dataset.view === view) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  });
  $("view-prices").hidden = view !== "prices";
  $("view-settings").hidden = view !== "settings";
}

document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".tab").forEach((tab) => tab.addEventListener("click", () => {
    location.hash = tab.dataset.view === "settings" ? "#settings" : "";
    show(tab.dataset.view);
  }));
  show(location.hash === "#settings" ? "settings" : "prices");
  $("price-filter").addEventListener("input", renderPrices);
  $("provider-toggle").addEventListener("change", toggleProvider);
  $("provider-form").addEventListener("submit", enableProvider);
  // Ages and the stale banner move with the clock.
  setInterval(() => {
    document.querySelectorAll("#prices tbody tr").forEach((row) => {
      const entry = state.prices.get(row.dataset.blockchain + "\u0000" + row.dataset.asset);
      if (entry) row.querySelector('[data-field="age"]').textContent = ageText(ageOf(entry));
    });
  }, 1000);
  connect();
});
