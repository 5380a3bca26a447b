// The deliberation viewer: streams POST /v1/generate (SSE: token, injection, done, error) into a text
// whose tokens carry their positions and the plans that landed on them, and polls GET /v1/status for
// the server's last minute. Plain browser JavaScript, no build step, nothing loaded from elsewhere.
"use strict";

const $ = (selector, root = document) => root.querySelector(selector);
const KEY_STORAGE = "crsm.apiKey";      // sessionStorage: this tab only, never sent anywhere but here
const THEME_STORAGE = "crsm.theme";
const THEMES = ["auto", "light", "dark"];
const KNOWN_OUTCOMES = ["applied", "applied_late", "pruned", "vetoed", "rejected", "diverged"];
const LANDED = new Set(["applied", "applied_late"]);
const OUTCOME_LABELS = {applied: "applied", applied_late: "applied late", pruned: "pruned", vetoed: "vetoed",
                        rejected: "rejected", diverged: "diverged"};
const STATUS_EVERY_MS = 2000;
const LCS_LIMIT = 4000;                 // longer texts are compared up to their first difference only

// ---- small helpers -------------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "style") node.style.cssText = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.filter((c) => c !== undefined && c !== null));
  return node;
}

function outcomeColor(outcome) {
  return KNOWN_OUTCOMES.includes(outcome) ? `var(--outcome-${outcome})` : "var(--outcome-other)";
}

const outcomeLabel = (outcome) => OUTCOME_LABELS[outcome] || String(outcome);

function fmt(value, digits = 3) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en-US");
  return Math.abs(value) >= 100 ? value.toFixed(0) : Number(value.toPrecision(digits)).toString();
}

function ms(seconds) {
  return seconds === null || seconds === undefined ? ["–", ""] : seconds < 1
    ? [fmt(seconds * 1000), "ms"] : [fmt(seconds), "s"];
}

// A newline is shown as a faint mark (keep = false: without the break itself, which the caller adds
// after the token, so that a token stays one box).
function visibleText(text, keep = true) {
  const parts = [];
  text.split("\n").forEach((piece, i) => {
    if (i > 0) parts.push(el("span", {class: "nl"}, "↵"), keep ? "\n" : "");
    if (piece) parts.push(piece);
  });
  return parts;
}

function apiKey() { return $("#api-key").value.trim(); }

function headers(extra = {}) {
  const key = apiKey();
  return key ? {...extra, Authorization: `Bearer ${key}`} : extra;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body?.error?.message || body?.detail || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// Server-Sent Events from a fetch response: yields {event, data}, data parsed as JSON.
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield {event, data: JSON.parse(data.join("\n"))};
    }
  }
}

// ---- one run: its text, markers and final event -------------------------------------------------

class RunView {
  constructor(root, name) {
    this.root = root;
    this.name = name;
    this.text = $(".text", root);
    this.state = $(".run-state", root);
    this.reset("");
  }

  reset(prompt) {
    this.tokens = [];                   // {position, token_id, text, node}
    this.byPosition = new Map();
    this.injections = [];               // every injection event, in arrival order
    this.pending = new Map();           // target position -> injections that came before its token
    this.done = null;
    this.error = null;
    this.text.replaceChildren(el("span", {class: "prompt-text"}, ...visibleText(prompt)), el("span", {class: "cursor"}));
    this.setState("");
  }

  setState(message, kind = "") {
    this.state.textContent = message;
    this.state.className = `run-state ${kind}`;
  }

  token(event) {
    const empty = event.text === "";
    const node = el("span", {class: empty ? "tok empty" : "tok", "data-position": event.position,
                             "data-token-id": event.token_id,
                             title: `#${event.position} · token ${event.token_id}`},
                    ...visibleText(event.text, false));
    const token = {...event, node};
    this.tokens.push(token);
    this.byPosition.set(event.position, token);
    const cursor = $(".cursor", this.text);
    this.text.insertBefore(node, cursor);
    const breaks = event.text.split("\n").length - 1;
    if (breaks) this.text.insertBefore(document.createTextNode("\n".repeat(breaks)), cursor);
    for (const injection of this.pending.get(event.position) || []) this.mark(node, injection);
    this.pending.delete(event.position);
    this.setState(`${this.tokens.length} tokens`, "live");
  }

  // a plan is drawn on the token it chose: the one at its target position (the decision position)
  injection(event) {
    this.injections.push(event);
    const token = this.byPosition.get(event.target_position);
    if (token) this.mark(token.node, event);
    else this.pending.set(event.target_position, [...(this.pending.get(event.target_position) || []), event]);
  }

  // a token's colour is its most telling plan (leadEvent)
  mark(node, event) {
    node.classList.add("marked");
    let pins = $(".pins", node);
    if (!pins) node.append(pins = el("span", {class: "pins"}));
    pins.append(el("span", {class: "inj", "data-outcome": event.outcome, "data-target": event.target_position,
                            style: `--c: ${outcomeColor(event.outcome)}`}));
    const events = this.eventsAt(node);
    const lead = leadEvent(events);
    node.style.setProperty("--c", outcomeColor(lead.outcome));
    node.classList.toggle("landed", LANDED.has(lead.outcome));
    node.dataset.outcome = lead.outcome;
    node.dataset.effect = lead.effect ?? "";     // "suggested": the token is the planner's
    node.title = `#${node.dataset.position} · token ${node.dataset.tokenId} · ` +
                 events.map((e) => outcomeLabel(e.outcome) + (e.effect ? ` (${e.effect})` : "")).join(", ");
  }

  eventsAt(node) {
    const position = Number(node.dataset.position);
    return this.injections.filter((e) => e.target_position === position);
  }

  finish() {
    $(".cursor", this.text)?.remove();
    // plans for positions the generation did not reach (it ended first) go after the text
    if (this.pending.size) {
      const trailer = el("span", {class: "trailer"}, "planned past the last token:");
      for (const [position, events] of [...this.pending].sort((a, b) => a[0] - b[0])) {
        const node = el("span", {class: "tok", "data-position": position, "data-token-id": "–"}, `#${position}`);
        trailer.append(node);
        for (const event of events) this.mark(node, event);
      }
      this.text.append(trailer);
      this.pending.clear();
    }
    if (this.error) this.setState(this.error, "error");
    else if (this.done) this.setState(`${this.tokens.length} tokens · ${this.done.finish_reason}`);
    else this.setState(`${this.tokens.length} tokens · stopped`);
  }
}

// ---- streaming a request ------------------------------------------------------------------------

async function stream(body, view, signal, onEvent) {
  let response;
  try {
    response = await fetch("/v1/generate", {method: "POST", body: JSON.stringify(body), signal,
                                            headers: headers({"Content-Type": "application/json"})});
  } catch (e) {
    view.error = e.name === "AbortError" ? null : `network error: ${e.message}`;
    return view.finish();
  }
  if (!response.ok) {
    view.error = await errorMessage(response);
    return view.finish();
  }
  try {
    for await (const {event, data} of sseEvents(response)) {
      if (event === "token") view.token(data);
      else if (event === "injection") view.injection(data);
      else if (event === "done") view.done = data;
      else if (event === "error") view.error = data?.error?.message || JSON.stringify(data);
      onEvent(event);
    }
  } catch (e) {
    if (e.name !== "AbortError") view.error = `stream broken: ${e.message}`;
  }
  view.finish();
}

// ---- the settings form --------------------------------------------------------------------------

function numberField(form, name) {
  const raw = form.elements[name].value.trim();
  return raw === "" ? undefined : Number(raw);
}

function requestBody() {
  const form = $("#settings");
  const body = {prompt: $("#prompt").value, stream: true,
                max_tokens: numberField(form, "max_tokens"),
                temperature: Number(form.elements.temperature.value),
                top_p: Number(form.elements.top_p.value),
                top_k: numberField(form, "top_k") ?? 0,
                seed: numberField(form, "seed"),
                ignore_eos: form.elements.ignore_eos.checked};
  const stop = form.elements.stop.value;
  if (stop) body.stop = stop;
  // the knobs left empty are left out: the server's defaults apply
  body.deliberation = form.elements.deliberation.checked
    ? {enabled: true, ...Object.fromEntries(knobs.map((knob) => [knob.name, knobValue(knob)]))} : {enabled: false};
  return body;
}

// The deliberation knobs are the server's own: the fields of the request's `deliberation` object in its
// /openapi.json (their types, bounds and descriptions), so the form offers what this server accepts.
let knobs = [];                         // {name, type, input}

async function loadKnobs() {
  const fieldset = $("#deliberation-knobs");
  let doc;
  try {
    const response = await fetch("/openapi.json", {headers: headers()});
    if (!response.ok) throw new Error(response.status === 401 ? "an API key is needed" : await errorMessage(response));
    doc = await response.json();
  } catch (e) {
    knobs = [];
    fieldset.replaceChildren(el("p", {class: "hint"}, `The server's deliberation settings could not be read (${e.message}).`));
    return;
  }
  const schemas = doc.components.schemas;
  const ref = nonNull(schemas.GenerateRequest.properties.deliberation).$ref;
  const properties = schemas[ref.split("/").pop()].properties;
  const before = new Map(knobs.map((knob) => [knob.name, knob.input.value]));   // read again: keep what was set
  knobs = Object.entries(properties).filter(([name]) => name !== "enabled").map(([name, p]) => knobField(name, p));
  for (const knob of knobs) if (before.has(knob.name)) knob.input.value = before.get(knob.name);
  fieldset.replaceChildren(...knobs.map((knob) => knob.field));
}

const nonNull = (property) => (property.anyOf || [property]).find((o) => o.type !== "null");

function knobField(name, property) {
  const type = nonNull(property);
  const unset = el("option", {value: ""}, "server's");
  let input;
  if (type.type === "boolean") {
    input = el("select", {name}, unset, el("option", {value: "true"}, "on"), el("option", {value: "false"}, "off"));
  } else if (type.enum) {
    input = el("select", {name}, unset, ...type.enum.map((v) => el("option", {value: v}, String(v))));
  } else if (type.type === "integer" || type.type === "number") {
    input = el("input", {type: "number", name, min: type.minimum, max: type.maximum,
                         step: type.type === "integer" ? 1 : "any", placeholder: "server's"});
  } else {
    input = el("input", {type: "text", name, maxlength: type.maxLength, placeholder: "server's"});
  }
  const title = property.title || name;
  const field = el("label", {class: "field", "data-knob": name, title: property.description},
                   el("span", {}, title[0] + title.slice(1).toLowerCase()), input);
  return {name, type: type.type, input, field};
}

function knobValue(knob) {
  const raw = knob.input.value.trim();
  if (raw === "") return undefined;
  if (knob.type === "boolean") return raw === "true";
  if (knob.type === "integer" || knob.type === "number") return Number(raw);
  return raw;
}

function wireSettings() {
  const form = $("#settings");
  for (const range of form.querySelectorAll("input[type=range]")) {
    const output = range.nextElementSibling;
    const show = () => { output.textContent = Number(range.value).toFixed(2); };
    range.addEventListener("input", show);
    show();
  }
  const fieldset = $("#deliberation-knobs");
  const toggle = () => {
    fieldset.disabled = !form.elements.deliberation.checked;
    $("h3", $("#run-main")).textContent = form.elements.deliberation.checked ? "Deliberation on" : "Deliberation off";
  };
  form.elements.deliberation.addEventListener("change", toggle);
  toggle();
  form.addEventListener("submit", (e) => e.preventDefault());
}

// ---- legend, stats, counters --------------------------------------------------------------------

function renderLegend(views) {
  const counts = new Map(KNOWN_OUTCOMES.map((o) => [o, 0]));
  for (const view of views) for (const e of view.injections) counts.set(e.outcome, (counts.get(e.outcome) || 0) + 1);
  const chips = [...counts].map(([outcome, n]) =>
    el("span", {class: n ? "chip" : "chip zero", "data-outcome": outcome, style: `--c: ${outcomeColor(outcome)}`},
       el("i"), outcomeLabel(outcome), el("b", {}, String(n))));
  if (views.some((view) => view.injections.some((e) => e.effect === "suggested")))
    chips.push(el("span", {class: "legend-note"}, el("b", {}, "bold"), ": the planner's token (suggested)"));
  $("#legend").replaceChildren(...chips);
}

function stat(label, [value, unit]) {
  return el("div", {class: "stat"}, el("small", {}, label), el("strong", {}, value, unit ? el("em", {}, unit) : null));
}

function renderStats(target, view, label) {
  const done = view.done;
  if (!done) {
    target.replaceChildren(el("p", {class: "empty-note"}, view.error ? `No timings: ${view.error}` : "Streaming…"));
    return;
  }
  const t = done.timings;
  target.replaceChildren(
    label ? el("div", {class: "run-label"}, label) : null,
    stat("Time to first token", ms(t.ttft_s)),
    stat("Inter-token latency", ms(t.mean_itl_s)),
    stat("Tokens / s", [fmt(t.tokens_per_s), ""]),
    stat("Total", ms(t.total_s)),
    stat("Tokens", [fmt(done.usage.completion_tokens), `+${fmt(done.usage.prompt_tokens)} prompt`]),
    stat("Finish", [done.finish_reason, ""]),
  );
  target.dataset.ttft = t.ttft_s;
}

function renderCounters(view) {
  const target = $("#counters");
  const counters = view.done?.deliberation;
  if (!counters && !view.injections.length) {
    target.replaceChildren(el("p", {class: "empty-note"}, view.done ? "Deliberation was off." : "No plans yet."));
    return;
  }
  const resolved = view.injections.length;
  const landed = view.injections.filter((e) => LANDED.has(e.outcome)).length;
  const byOutcome = new Map();
  for (const e of view.injections) byOutcome.set(e.outcome, (byOutcome.get(e.outcome) || 0) + 1);
  const ratio = el("div", {class: "ratio"},
    el("div", {class: "ratio-row"}, "Landing ratio",
       el("strong", {id: "landing-ratio"}, resolved ? `${fmt(100 * landed / resolved, 3)} %` : "–")),
    el("div", {class: "ratio-bar"}, ...[...byOutcome].map(([o, n]) =>
      el("span", {style: `--c: ${outcomeColor(o)}; width: ${100 * n / resolved}%`, title: `${outcomeLabel(o)}: ${n}`}))));
  const rows = [];
  for (const [name, value] of Object.entries(counters || {})) {
    const dot = name in OUTCOME_LABELS ? el("i", {style: `--c: ${outcomeColor(name)}`}) : el("i");
    rows.push(el("dt", {}, dot, name.replaceAll("_", " ")), el("dd", {"data-counter": name}, fmt(value)));
  }
  target.replaceChildren(ratio, rows.length ? el("dl", {class: "counter-list"}, ...rows) : null);
}

// a token's most telling plan: one that put the planner's token there, else one that landed, else the
// last one resolved for it (several plans can target one position)
function leadEvent(events) {
  return events.find((e) => LANDED.has(e.outcome) && e.effect === "suggested")
      || events.find((e) => LANDED.has(e.outcome)) || events[events.length - 1];
}

// ---- the plan detail ----------------------------------------------------------------------------

const DETAIL_FIRST = ["outcome", "effect", "target_position", "position", "state_position", "captured_position",
                      "lateness", "action", "action_text", "value", "alpha", "reason", "latency_s"];

// the detail opens on the plan that landed on the token, if one did, else on its first plan
function renderDetail(view, node, index = null) {
  const events = view.eventsAt(node);
  index ??= Math.max(0, events.findIndex((e) => e === leadEvent(events) && LANDED.has(e.outcome)));
  const detail = $("#detail");
  for (const selected of document.querySelectorAll(".tok.selected")) selected.classList.remove("selected");
  if (!events.length) { detail.hidden = true; return; }
  node.classList.add("selected");
  const event = events[Math.min(index, events.length - 1)];
  const color = outcomeColor(event.outcome);
  detail.style.setProperty("--c", color);
  detail.dataset.outcome = event.outcome;
  detail.dataset.position = event.target_position;

  const tabs = events.length > 1 ? el("div", {class: "detail-tabs"}, ...events.map((e, i) =>
    el("button", {type: "button", class: e === event ? "on" : "", style: `--c: ${outcomeColor(e.outcome)}`,
                  onclick: () => renderDetail(view, node, i)}, `plan ${i + 1}: ${outcomeLabel(e.outcome)}`))) : null;
  const head = el("div", {class: "detail-head"},
    el("span", {class: "badge", style: `--c: ${color}`}, outcomeLabel(event.outcome)),
    el("span", {class: "detail-title"}, `Plan for #${event.target_position}`),
    el("span", {class: "detail-sub"}, `snapshot at #${event.captured_position}` +
       ("state_position" in event ? ` · state at #${event.state_position}` : "") + ` · resolved at #${event.position}`),
    tabs);

  const facts = [];
  const fact = (name, ...value) => facts.push(el("dt", {}, name), el("dd", {class: name === "action" ? "action" : ""}, ...value));
  if ("action" in event) {
    const text = event.action_text;
    fact("action", text === undefined ? "" : JSON.stringify(text), " ", el("span", {class: "id"}, `token ${event.action}`));
  }
  if ("effect" in event) fact("effect", event.effect ?? "–");
  if ("value" in event) fact("value", fmt(event.value, 4));
  if ("lateness" in event) fact("lateness", `${event.lateness} token${event.lateness === 1 ? "" : "s"}`);
  if ("latency_s" in event) fact("latency", ms(event.latency_s).join(" "));
  if (event.reason) fact("reason", event.reason);

  const alpha = Array.isArray(event.alpha) ? event.alpha : [];
  const peak = Math.max(...alpha, 1e-12);
  const alphaBlock = el("div", {class: "alpha"}, el("h4", {}, alpha.length ? "Gate α per layer" : "Gate α per layer: none (not blended)"));
  if (alpha.length) {
    alphaBlock.append(
      el("div", {class: "alpha-bars"}, ...alpha.map((a) =>
        el("div", {class: a > 0 ? "alpha-bar" : "alpha-bar zero", "data-alpha": a, title: String(a)},
           el("span", {}, a > 0 ? fmt(a, 2) : "0"), el("div", {style: `height: ${Math.max(1, 100 * a / peak)}%`})))),
      el("div", {class: "alpha-labels"}, ...alpha.map((_, i) => el("span", {}, `L${i}`))));
  }

  const names = [...DETAIL_FIRST.filter((k) => k in event), ...Object.keys(event).filter((k) => !DETAIL_FIRST.includes(k))];
  const fields = el("div", {class: "fields"}, el("h4", {}, "Every field of the event"),
    el("table", {}, ...names.map((k) => el("tr", {"data-field": k}, el("td", {}, k),
      el("td", {}, JSON.stringify(event[k]))))));

  detail.replaceChildren(head, el("div", {class: "detail-body"},
    el("dl", {class: "facts"}, ...facts), el("div", {}, alphaBlock, fields)));
  detail.hidden = false;
}

// ---- compare ------------------------------------------------------------------------------------

// Marks the tokens outside a longest common subsequence of the two token sequences.
function highlightDifferences(a, b, seed) {
  for (const t of [...a.tokens, ...b.tokens]) t.node.classList.remove("diff");
  const x = a.tokens.map((t) => t.token_id), y = b.tokens.map((t) => t.token_id);
  let first = 0;
  while (first < x.length && first < y.length && x[first] === y[first]) first++;
  const note = $("#compare-note");
  note.hidden = false;
  const shared = ` Both used seed ${seed}.`;
  if (first === x.length && first === y.length) {
    note.replaceChildren(`The two texts are identical.${shared}`);
    note.dataset.firstDifference = "";
    return;
  }
  const common = new Set(), commonB = new Set();
  const n = x.length - first, m = y.length - first;
  if (n * m <= LCS_LIMIT * LCS_LIMIT / 4) {
    const width = m + 1, table = new Uint16Array((n + 1) * width);
    for (let i = n - 1; i >= 0; i--)
      for (let j = m - 1; j >= 0; j--)
        table[i * width + j] = x[first + i] === y[first + j] ? table[(i + 1) * width + j + 1] + 1
          : Math.max(table[(i + 1) * width + j], table[i * width + j + 1]);
    for (let i = 0, j = 0; i < n && j < m;) {
      if (x[first + i] === y[first + j]) { common.add(first + i); commonB.add(first + j); i++; j++; }
      else if (table[(i + 1) * width + j] >= table[i * width + j + 1]) i++;
      else j++;
    }
  }
  let differing = 0;
  a.tokens.forEach((t, i) => { if (i >= first && !common.has(i)) { t.node.classList.add("diff"); differing++; } });
  b.tokens.forEach((t, j) => { if (j >= first && !commonB.has(j)) t.node.classList.add("diff"); });
  const position = (a.tokens[first] || b.tokens[first]).position;
  note.dataset.firstDifference = position;
  note.replaceChildren("The texts part at ", el("b", {}, `#${position}`),
    `: ${differing} of ${a.tokens.length} tokens with deliberation are not in the text without it (tinted).${shared}`);
}

// ---- the page -----------------------------------------------------------------------------------

const main = new RunView($("#run-main"), "main");
const baseline = new RunView($("#run-baseline"), "baseline");
let controller = null;

async function run() {
  if (controller) return;               // one run (or compared pair) at a time: Stop ends it
  controller = new AbortController();
  const body = requestBody();
  const compare = $("#compare").checked;
  if (compare && body.seed === undefined) body.seed = Math.floor(Math.random() * 2 ** 31);  // one draw for both
  $("#outputs").classList.toggle("compare", compare);
  $("#run-baseline").hidden = !compare;
  $("#stats-baseline").hidden = !compare;
  $("#compare-note").hidden = true;
  $("#detail").hidden = true;
  $("#run-button").disabled = true;
  $("#stop-button").disabled = false;
  main.reset(body.prompt);
  baseline.reset(body.prompt);
  const views = compare ? [main, baseline] : [main];
  let frame = 0;
  const refresh = () => {
    if (frame) return;
    frame = requestAnimationFrame(() => { frame = 0; renderLegend(views); renderCounters(main); });
  };
  refresh();
  renderStats($("#stats-main"), main, compare ? "with deliberation" : null);
  const runs = [stream(body, main, controller.signal, refresh)];
  if (compare) runs.push(stream({...body, deliberation: {enabled: false}}, baseline, controller.signal, () => {}));
  await Promise.all(runs);
  renderLegend(views);
  renderCounters(main);
  renderStats($("#stats-main"), main, compare ? "with deliberation" : null);
  if (compare) {
    renderStats($("#stats-baseline"), baseline, "without deliberation");
    if (main.done && baseline.done) highlightDifferences(main, baseline, body.seed);
  }
  controller = null;
  $("#run-button").disabled = false;
  $("#stop-button").disabled = true;
  document.body.dataset.runs = String(Number(document.body.dataset.runs || 0) + 1);  // finished runs, for tests
}

// ---- the server's last minute -------------------------------------------------------------------

function sparkline(values, {min = 0, max, second} = {}) {
  const W = 100, H = 30;
  const all = [...values, ...(second || [])].filter((v) => v !== null && v !== undefined);
  const top = max ?? Math.max(1e-9, ...all);
  const y = (v) => H - (H * (v - min)) / (top - min || 1);
  const x = (i, n) => (n <= 1 ? W : (W * i) / (n - 1));
  const path = (series) => {
    let d = "", open = false;
    series.forEach((v, i) => {
      if (v === null || v === undefined) { open = false; return; }
      d += `${open ? "L" : "M"}${x(i, series.length).toFixed(2)},${y(v).toFixed(2)}`;
      open = true;
    });
    return d;
  };
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("preserveAspectRatio", "none");
  const line = path(values);
  const add = (d, cls) => {
    const p = document.createElementNS("http://www.w3.org/2000/svg", "path");
    p.setAttribute("d", d);
    p.setAttribute("class", cls);
    p.setAttribute("vector-effect", "non-scaling-stroke");
    svg.append(p);
  };
  if (line && values.every((v) => v !== null && v !== undefined) && values.length > 1)
    add(`${line}L${W},${H}L0,${H}Z`, "area");
  if (line) add(line, "line");
  if (second) add(path(second), "line second");
  // a point with no neighbour draws no line: a dot instead
  values.forEach((v, i) => {
    const gap = (k) => k < 0 || k >= values.length || values[k] === null || values[k] === undefined;
    if (v === null || v === undefined || !gap(i - 1) || !gap(i + 1)) return;
    add(`M${x(i, values.length).toFixed(2)},${y(v).toFixed(2)}h0`, "line dot");
  });
  return svg;
}

function renderLive(status) {
  const points = status.series;
  const window = status.window || {};
  const pick = (k) => points.map((p) => p[k]);
  const card = (id, title, value, svg, legend, color) => el("div", {class: "spark", id, style: color ? `--c: ${color}` : null},
    el("div", {class: "spark-head"}, title, el("strong", {}, value)), svg, legend ? el("div", {class: "spark-legend"}, legend) : null);
  $("#live").replaceChildren(
    card("live-sessions", "Sessions", `${status.now.running} · ${status.now.waiting}`,
         sparkline(pick("running"), {second: pick("waiting")}), "running — · waiting ┄"),
    card("live-tokens", "Tokens / s", fmt(window.tokens_per_s ?? null), sparkline(pick("tokens_per_s"))),
    card("live-landing", "Landing ratio",
         window.landing_ratio === null || window.landing_ratio === undefined ? "–" : `${fmt(100 * window.landing_ratio, 3)} %`,
         sparkline(pick("landing_ratio"), {max: 1}), `${fmt(window.resolved_plans ?? 0)} plans resolved`,
         "var(--outcome-applied)"),
    card("live-lag", "Planner lag", window.planner_lag_tokens === null || window.planner_lag_tokens === undefined
         ? "–" : `${fmt(window.planner_lag_tokens)} tok`, sparkline(pick("planner_lag_tokens")), null, "var(--outcome-vetoed)"),
  );
}

let statusTimer = 0;

async function pollStatus() {
  const dot = $("#ready-dot"), name = $("#model-name");
  try {
    const response = await fetch("/v1/status", {headers: headers()});
    if (!response.ok) {
      dot.className = "dot down";
      name.textContent = response.status === 401 ? "API key needed" : await errorMessage(response);
    } else {
      const status = await response.json();
      dot.className = status.ready ? "dot ready" : "dot";
      name.textContent = status.ready ? status.model : `${status.model} · loading`;
      renderLive(status);
    }
  } catch {
    dot.className = "dot down";
    name.textContent = "server unreachable";
  }
  clearTimeout(statusTimer);
  if (!document.hidden) statusTimer = setTimeout(pollStatus, STATUS_EVERY_MS);
}

function wireTheme() {
  const button = $("#theme-button");
  const apply = (theme) => {
    document.documentElement.dataset.theme = theme;
    button.title = `Theme: ${theme}`;
  };
  apply(localStorage.getItem(THEME_STORAGE) || "auto");
  button.addEventListener("click", () => {
    const next = THEMES[(THEMES.indexOf(document.documentElement.dataset.theme) + 1) % THEMES.length];
    localStorage.setItem(THEME_STORAGE, next);
    apply(next);
  });
}

function start() {
  wireTheme();
  wireSettings();
  const key = $("#api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    pollStatus();
    loadKnobs();
  });
  $("#run-button").addEventListener("click", run);
  $("#stop-button").addEventListener("click", () => controller?.abort());
  $("#prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); run(); }
  });
  $("#show-positions").addEventListener("change", (e) => $("#outputs").classList.toggle("show-positions", e.target.checked));
  for (const view of [main, baseline]) {
    view.text.addEventListener("click", (e) => {
      const node = e.target.closest(".tok.marked");
      if (node) renderDetail(view, node);
    });
  }
  document.addEventListener("visibilitychange", () => { if (!document.hidden) pollStatus(); });
  renderLegend([]);
  pollStatus();
  loadKnobs();
}

start();
