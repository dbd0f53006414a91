// posfleet support page: a thin client of the collector's JSON API.
// Data is only ever inserted with textContent (never innerHTML): terminal-supplied strings must not become markup,
// and the token in sessionStorage must not be reachable by injected script.
"use strict";

const TOKEN_KEY = "posfleet.token";
const PAGE_SIZE = 50;
const HOUR = 3600;

// ---- small DOM helpers -----------------------------------------------------------------------------------------
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") Object.assign(el.style, v); // CSSOM, not the attribute: the page's CSP forbids inline styles
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function fmtTime(t) {
  if (t === null || t === undefined) return "—";
  const d = typeof t === "number" ? new Date(t * 1000) : new Date(t);
  if (isNaN(d)) return String(t);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC").replace(/Z$/, " UTC");
}

function fmtAge(s) {
  if (s === null || s === undefined) return "—";
  const a = Math.abs(s);
  if (a < 90) return `${Math.round(s)} s`;
  if (a < 5400) return `${Math.round(s / 60)} min`;
  if (a < 172800) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function fmtValue(key, v) {
  if (v === null || v === undefined) return "—";
  if (Array.isArray(v)) return v.length ? v.map((x) => fmtValue(key, x)).join(", ") : "none";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (typeof v === "string" && /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/.test(v)) return fmtTime(v);
  if (typeof v === "number" && /(_s|_age_s)$/.test(key)) return fmtAge(v);
  return String(v);
}

function label(key) {
  return key.replace(/_/g, " ");
}

function pill(text, kind) {
  return h("span", { class: `pill ${kind || text}` }, text);
}

function evidenceList(ev) {
  const entries = Object.entries(ev || {});
  return h("dl", { class: "evidence" }, entries.map(([k, v]) => [h("dt", {}, label(k)), h("dd", {}, fmtValue(k, v))]));
}

// ---- token and API -------------------------------------------------------------------------------------------
function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function showTokenState() {
  const has = !!token();
  document.getElementById("token-form").hidden = has;
  document.getElementById("token-state").hidden = !has;
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path) {
  const headers = {};
  if (token()) headers.Authorization = `Bearer ${token()}`;
  const resp = await fetch(path, { headers, cache: "no-store" });
  if (!resp.ok) {
    let message = resp.statusText;
    try {
      message = (await resp.json()).error || message;
    } catch (_e) {
      // not JSON: keep the status text
    }
    throw new ApiError(resp.status, message);
  }
  return resp.json();
}

function notice(text, kind) {
  const el = document.getElementById("notice");
  el.textContent = text || "";
  el.className = kind || "";
  el.hidden = !text;
}

function explain(err) {
  if (err instanceof ApiError) {
    if (err.status === 401) return "A valid API token is required: enter it at the top right.";
    if (err.status === 403) return "Your token does not cover this acquirer.";
    if (err.status === 404) return "Not found (or not visible to your token).";
    return `The collector answered ${err.status}: ${err.message}`;
  }
  return `Cannot reach the collector: ${err.message}`;
}

function q(params) {
  const usp = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== "" && v !== null && v !== undefined) usp.set(k, v);
  return usp.toString();
}

// ---- views ---------------------------------------------------------------------------------------------------
const view = () => document.getElementById("view");

function setView(...children) {
  view().replaceChildren(...children);
}

async function search(text) {
  const id = text.trim();
  if (!id) return;
  try {
    await api(`/api/v1/terminals/${encodeURIComponent(id)}`);
    location.hash = `#/terminal/${encodeURIComponent(id)}`;
    return;
  } catch (err) {
    if (!(err instanceof ApiError) || err.status !== 404) {
      notice(explain(err), "error");
      return;
    }
  }
  try {
    const page = await api(`/api/v1/terminals?${q({ all: 1, merchant_id: id, limit: 1 })}`);
    if (page.total > 0) {
      location.hash = `#/merchant/${encodeURIComponent(id)}`;
      return;
    }
    notice(`No terminal or merchant "${id}" visible to your token.`, "error");
  } catch (err) {
    notice(explain(err), "error");
  }
}

function diagnosisSection(d) {
  const p = d.primary_cause;
  const banner = h("section", { class: `banner ${d.healthy ? "ok" : "bad"}`, id: "diag-summary" },
    h("h2", {}, d.healthy ? "Nothing wrong found" : `Primary cause: ${label(p.code)}`),
    h("p", { class: "summary" }, d.summary));
  const parts = [banner];
  if (p) {
    parts.push(h("section", { class: "card primary", id: "primary-cause" },
      h("h3", {}, `${label(p.code)} `, pill(p.severity), h("span", { class: "muted" }, ` since ${fmtTime(p.since)}`)),
      h("p", {}, p.cause),
      evidenceList(p.evidence)));
  }
  parts.push(h("section", { class: "card messages", id: "merchant-message" },
    h("h3", {}, "Tell the merchant"),
    h("p", { class: "msg", lang: "en" }, h("b", {}, "EN "), d.merchant_message.en),
    h("p", { class: "msg", lang: "zh-CN" }, h("b", {}, "中文 "), d.merchant_message["zh-CN"])));
  parts.push(h("section", { class: "card", id: "next-steps" }, h("h3", {}, "Next steps"),
    h("ol", {}, d.next_steps.map((s) => h("li", {}, s)))));
  const problems = d.other_findings.filter((f) => f.severity !== "info");
  const notes = d.other_findings.filter((f) => f.severity === "info");
  if (problems.length || notes.length) {
    parts.push(h("section", { class: "card", id: "other-findings" }, h("h3", {}, "Other findings"),
      h("ul", { class: "findings" }, [...problems, ...notes].map((f) => h("li", {},
        pill(f.severity), " ", h("b", {}, label(f.code)), ` since ${fmtTime(f.since)}: ${f.cause}`,
        evidenceList(f.evidence))))));
  }
  parts.push(h("section", { class: "card", id: "checklist" }, h("h3", {}, "Checklist"),
    h("table", { class: "checklist" },
      h("thead", {}, h("tr", {}, h("th", {}, "#"), h("th", {}, "Step"), h("th", {}, "Result"), h("th", {}, "Evidence"))),
      h("tbody", {}, d.checklist.map((s) => h("tr", { "data-step": s.step },
        h("td", {}, s.n), h("td", {}, s.title), h("td", {}, pill(s.status)),
        h("td", {}, evidenceList(s.evidence))))))));
  return parts;
}

function timelineSection(tl, tid, hours) {
  const span = tl.to - tl.from;
  const byCond = new Map();
  for (const iv of tl.intervals) {
    if (!byCond.has(iv.condition)) byCond.set(iv.condition, []);
    byCond.get(iv.condition).push(iv);
  }
  const ticks = [];
  for (let i = 0; i <= 6; i++) {
    const t = tl.from + (span * i) / 6;
    ticks.push(h("span", { class: "tick", style: { left: `${(100 * i) / 6}%` } }, fmtTime(t).slice(11, 16)));
  }
  const rows = [...byCond.entries()].map(([cond, ivs]) => h("div", { class: "tl-row", "data-condition": cond },
    h("span", { class: "tl-label" }, label(cond)),
    h("div", { class: "tl-track" }, ivs.map((iv) => {
      const end = iv.to === null ? tl.to : iv.to;
      const left = Math.max(0, ((iv.from - tl.from) / span) * 100);
      const width = Math.max(0.4, ((end - iv.from) / span) * 100);
      return h("span", {
        class: `tl-bar ${iv.severity}`, style: { left: `${left}%`, width: `${width}%` },
        title: `${label(cond)} ${iv.detail || ""} ${fmtTime(iv.from)} → ${iv.to === null ? "now" : fmtTime(iv.to)}`,
      });
    }))));
  const range = h("select", {
    id: "tl-hours", "aria-label": "Timeline range",
    onchange: (e) => { location.hash = `#/terminal/${encodeURIComponent(tid)}?hours=${e.target.value}`; },
  }, [1, 6, 24].map((n) => h("option", { value: n, selected: n === hours }, `${n} h`)));
  return h("section", { class: "card", id: "timeline" },
    h("h3", { class: "with-control" }, `Conditions, last ${Math.round(span / HOUR)} hour${Math.round(span / HOUR) === 1 ? "" : "s"}`, range),
    rows.length ? h("div", { class: "tl" }, rows, h("div", { class: "tl-row axis" }, h("span", { class: "tl-label" }),
      h("div", { class: "tl-axis" }, ticks)))
      : h("p", { class: "muted", id: "timeline-empty" }, "No condition in this period."));
}

function txnTable(items, kind) {
  if (!items.length) return h("p", { class: "muted" }, "None.");
  return h("table", { class: `txns ${kind}` },
    h("thead", {}, h("tr", {}, ["Terminal", "Transaction", "Time", "Age", "Amount (minor)", "Merchant"]
      .map((c) => h("th", {}, c)))),
    h("tbody", {}, items.map((x) => h("tr", {},
      h("td", {}, h("a", { href: `#/terminal/${encodeURIComponent(x.terminal_id)}` }, x.terminal_id)),
      h("td", { class: "mono" }, x.txn_id),
      h("td", {}, fmtTime(x.received_at || x.ts || x.recorded_at)),
      h("td", {}, fmtAge(x.age_s)),
      h("td", { class: "num" }, x.amount_minor === null || x.amount_minor === undefined ? "—"
        : `${x.amount_minor} ${x.currency || ""}`),
      h("td", {}, x.merchant_id || "—")))));
}

function reconcileSection(r, title) {
  const t = r.totals;
  return h("section", { class: "card", id: "unreconciled" },
    h("h3", {}, title),
    h("p", { class: "muted" }, `${fmtTime(r.window.from)} – ${fmtTime(r.window.to)}; grace ${fmtAge(r.grace_s)}. `,
      `Completed ${t.completed}, recorded ${t.recorded}, matched ${t.matched}, pending ${t.pending}.`),
    h("h4", {}, `Completed, not recorded by the acquirer: ${t.missing_at_acquirer}`),
    txnTable(r.missing_at_acquirer, "missing"),
    h("h4", {}, `Recorded by the acquirer, not completed on a terminal: ${t.unknown_to_terminal}`),
    txnTable(r.unknown_to_terminal, "unknown"),
    r.truncated ? h("p", { class: "muted" }, "Lists truncated; use `posfleet reconcile` for everything.") : null);
}

async function showTerminal(tid, params) {
  const hours = [1, 6, 24].includes(Number(params.get("hours"))) ? Number(params.get("hours")) : 24;
  setView(h("p", { class: "muted" }, `Diagnosing ${tid}…`));
  const enc = encodeURIComponent(tid);
  try {
    const [d, tl, r] = await Promise.all([
      api(`/api/v1/terminals/${enc}/diagnosis`),
      api(`/api/v1/terminals/${enc}/timeline?hours=${hours}`),
      api(`/api/v1/reconcile?${q({ terminal_id: tid })}`),
    ]);
    notice("");
    const head = h("div", { class: "title" },
      h("h1", { id: "terminal-title" }, `Terminal ${d.terminal_id}`),
      h("p", { class: "muted" }, "Merchant ",
        d.merchant_id ? h("a", { href: `#/merchant/${encodeURIComponent(d.merchant_id)}` }, d.merchant_id) : "—",
        ` · acquirer ${d.acquirer} · site ${d.site} · as of ${fmtTime(d.at)}`));
    const [banner, ...rest] = diagnosisSection(d);
    setView(head, banner, h("div", { class: "grid" },
      h("div", { class: "col" }, rest.slice(0, 3)),
      h("div", { class: "col" }, timelineSection(tl, tid, hours), reconcileSection(r, "Unreconciled transactions (24 h)"))),
    ...rest.slice(3));
  } catch (err) {
    setView(h("p", { class: "error", id: "view-error" }, explain(err)));
  }
}

async function showMerchant(mid) {
  setView(h("p", { class: "muted" }, `Loading merchant ${mid}…`));
  try {
    const [page, r] = await Promise.all([
      api(`/api/v1/terminals?${q({ all: 1, merchant_id: mid, limit: 200 })}`),
      api(`/api/v1/reconcile?${q({ merchant_id: mid })}`),
    ]);
    notice("");
    setView(h("div", { class: "title" }, h("h1", { id: "merchant-title" }, `Merchant ${mid}`),
      h("p", { class: "muted" }, `${page.total} terminal(s)`)),
    h("section", { class: "card" }, h("h3", {}, "Terminals"), terminalTable(page.terminals, "merchant-terminals")),
    reconcileSection(r, "Unreconciled transactions (24 h)"));
  } catch (err) {
    setView(h("p", { class: "error", id: "view-error" }, explain(err)));
  }
}

function terminalTable(terminals, id) {
  if (!terminals.length) return h("p", { class: "muted", id: `${id}-empty` }, "No terminal matches.");
  return h("table", { class: "fleet", id },
    h("thead", {}, h("tr", {}, ["Terminal", "Merchant", "Acquirer", "Site", "Status", "Last heartbeat (ago)", "Conditions"]
      .map((c) => h("th", {}, c)))),
    h("tbody", {}, terminals.map((t) => h("tr", { "data-terminal": t.terminal_id },
      h("td", {}, h("a", { href: `#/terminal/${encodeURIComponent(t.terminal_id)}` }, t.terminal_id)),
      h("td", {}, t.merchant_id || "—"), h("td", {}, t.acquirer), h("td", {}, t.site),
      h("td", {}, t.status), h("td", {}, fmtAge(t.last_heartbeat_age_s)),
      h("td", {}, t.conditions.length ? t.conditions.map((c) => [pill(label(c.condition), c.severity), " "])
        : pill("ok"))))));
}

let facets = null;
let navigations = 0; // counted by route(): a fleet view still loading for an older one must not replace the newer

async function showFleet(params) {
  const condition = params.get("condition") || "";
  const acquirer = params.get("acquirer") || "";
  const site = params.get("site") || "";
  const offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
  const asked = navigations;
  try {
    if (!facets) facets = await api("/api/v1/support/facets");
    const page = await api(`/api/v1/terminals?${q({ condition, acquirer, site, offset, limit: PAGE_SIZE })}`);
    if (asked !== navigations) return;
    notice("");
    const go = (changes) => {
      // What the filters show now, not what this view was built with: a second filter changed before the view of
      // the first change arrived must not undo the first.
      const shown = { condition, acquirer, site };
      for (const name of Object.keys(shown)) {
        const el = document.getElementById(`f-${name}`);
        if (el) shown[name] = el.value;
      }
      const next = new URLSearchParams({ ...shown, offset: "0", ...changes });
      for (const [k, v] of [...next.entries()]) if (!v || (k === "offset" && v === "0")) next.delete(k);
      location.hash = `#/fleet${next.toString() ? "?" + next.toString() : ""}`;
    };
    const select = (id, name, value, options, labelText) => h("label", {}, labelText,
      h("select", { id, name, onchange: (e) => go({ [name]: e.target.value }) },
        h("option", { value: "" }, "all"),
        options.map(([v, text]) => h("option", { value: v, selected: v === value }, text))));
    const sites = acquirer ? facets.sites[acquirer] || [] : Object.values(facets.sites).flat();
    const counts = facets.problem_terminals_by_condition;
    const filters = h("form", { class: "filters", id: "filters", onsubmit: (e) => e.preventDefault() },
      select("f-condition", "condition", condition,
        facets.conditions.map((c) => [c, `${label(c)} (${counts[c] || 0})`]), "Condition "),
      select("f-acquirer", "acquirer", acquirer, facets.acquirers.map((a) => [a, a]), "Acquirer "),
      select("f-site", "site", site, sites.map((s) => [s, s]), "Site "));
    const last = Math.min(offset + page.terminals.length, page.total);
    const pager = h("div", { class: "pager" },
      h("button", { id: "page-prev", type: "button", disabled: offset === 0,
        onclick: () => go({ offset: String(Math.max(0, offset - PAGE_SIZE)) }) }, "‹ Previous"),
      h("span", { id: "page-info" }, page.total ? `${offset + 1}–${last} of ${page.total}` : "0 of 0"),
      h("button", { id: "page-next", type: "button", disabled: offset + PAGE_SIZE >= page.total,
        onclick: () => go({ offset: String(offset + PAGE_SIZE) }) }, "Next ›"));
    setView(h("div", { class: "title" }, h("h1", { id: "fleet-title" }, "Problem terminals"),
      h("p", { class: "muted" }, "Terminals with at least one active condition, by terminal id. Paged by the collector.")),
    filters, pager, terminalTable(page.terminals, "fleet-table"));
  } catch (err) {
    if (asked === navigations) setView(h("p", { class: "error", id: "view-error" }, explain(err)));
  }
}

function route() {
  navigations += 1;
  const hash = location.hash || "#/fleet";
  const [path, query] = hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "terminal" && parts[1]) {
    return showTerminal(decodeURIComponent(parts[1]), new URLSearchParams(query || ""));
  }
  if (parts[0] === "merchant" && parts[1]) return showMerchant(decodeURIComponent(parts[1]));
  return showFleet(new URLSearchParams(query || ""));
}

document.addEventListener("DOMContentLoaded", () => {
  showTokenState();
  document.getElementById("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const input = document.getElementById("token");
    if (input.value.trim()) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    facets = null;
    showTokenState();
    route();
  });
  document.getElementById("token-forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    facets = null;
    showTokenState();
    route();
  });
  document.getElementById("search").addEventListener("submit", (e) => {
    e.preventDefault();
    search(document.getElementById("q").value);
  });
  window.addEventListener("hashchange", route);
  route();
});
