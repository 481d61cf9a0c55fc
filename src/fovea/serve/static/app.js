// Fovea's web app: one page per hash route, plain DOM, no build step.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const main = $("#main");
let info = null;

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== false && v !== null && v !== undefined) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function toast(text) {
  const t = $("#toast");
  t.textContent = text;
  t.classList.add("show");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.classList.remove("show"), 2500);
}

function token() { return localStorage.getItem("fovea-token") || ""; }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (token()) headers["Authorization"] = "Bearer " + token();
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const r = await fetch(path, Object.assign({}, options, { headers }));
  const body = (r.headers.get("content-type") || "").includes("json") ? await r.json() : await r.text();
  if (!r.ok) throw Object.assign(new Error((body && body.error) || r.statusText || String(r.status)), { status: r.status });
  return body;
}

// Images behind an admin token: an <img src> sends no Authorization header, so they are fetched (when they come
// into view) and shown from a blob URL. Without a token the browser's own lazy loading does it.
async function blobURL(url) {
  const r = await fetch(url, { headers: token() ? { Authorization: "Bearer " + token() } : {} });
  if (!r.ok) {
    let message = r.statusText || String(r.status);
    try { message = (await r.json()).error || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return URL.createObjectURL(await r.blob());
}

const lazyImages = new IntersectionObserver((entries) => {
  for (const e of entries) {
    if (!e.isIntersecting) continue;
    lazyImages.unobserve(e.target);
    blobURL(e.target.dataset.src).then((u) => { e.target.src = u; }).catch(() => e.target.classList.add("broken"));
  }
}, { rootMargin: "300px" });

function image(url, alt, attrs = {}) {
  const img = h("img", Object.assign({ alt, loading: "lazy", decoding: "async", onerror: () => img.classList.add("broken") }, attrs));
  if (token()) { img.dataset.src = url; lazyImages.observe(img); } else img.src = url;
  return img;
}

const pct = (x) => (100 * x).toFixed(1) + " %";

function bars(probabilities) {
  const rows = Object.entries(probabilities).sort((a, b) => b[1] - a[1]);
  return h("div", { class: "bars" }, rows.map(([c, p]) =>
    h("div", {}, h("span", {}, `${c} ${pct(p)}`), h("div", { class: "bar", style: `width:${Math.max(1, 100 * p)}%` }))));
}

// ---- predict ----------------------------------------------------------------------------------------------
function renderPredict() {
  const results = h("div", { class: "results", "aria-live": "polite" });
  const input = h("input", { type: "file", accept: "image/*", multiple: true, id: "file", onchange: () => send(input.files) });
  const drop = h("div", { class: "drop", id: "drop" },
    h("p", {}, "Drop images here, or ", h("label", { for: "file" }, h("u", {}, "choose files")), "."), input);
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); send(e.dataTransfer.files); });

  async function send(files) {
    if (!files || !files.length) return;
    const form = new FormData();
    for (const f of files) form.append("file", f, f.name);
    results.replaceChildren(h("p", { class: "muted" }, "Predicting…"));
    const query = info && info.explainable ? "?explain=gradcam" : "";
    try {
      const body = await api("/v1/predict" + query, { method: "POST", body: form });
      results.replaceChildren(...body.predictions.map((p, i) => {
        const url = URL.createObjectURL(files[i]);
        if (p.error) return h("div", { class: "result" }, h("p", { class: "bad" }, `${files[i].name}: ${p.error}`));
        const unknown = p.unknown === true;
        return h("div", { class: unknown ? "result unknown" : "result" },
          h("div", { class: "pair" }, h("img", { src: url, alt: files[i].name }),
            p.overlay ? h("img", { src: p.overlay, alt: "Grad-CAM: where the model looked" }) : h("span")),
          unknown
            ? h("div", { class: "none-of-mine", "data-testid": "unknown" },
                h("p", {}, h("span", { class: "label", "data-testid": "label" }, "None of my classes")),
                h("p", { class: "muted" }, `Unlike the images it learnt: score ${p.unknown_score.toFixed(3)} over ` +
                  `its threshold ${p.unknown_threshold.toFixed(3)}. Closest class: ${p.class_otherwise} ` +
                  `(${pct(p.probability)}). Sent to the review queue, where people can name it.`))
            : h("p", {}, h("span", { class: "label", "data-testid": "label" }, p.label), " ",
                h("span", { class: "muted" }, pct(p.probability))),
          bars(p.probabilities),
          unknown ? h("span") : feedbackForm(body.request_id, p.label),
          h("p", { class: "muted" }, `model ${body.model}:${body.model_version} · ${body.latency_ms.toFixed(0)} ms`));
      }));
    } catch (e) { results.replaceChildren(h("p", { class: "bad" }, e.message)); }
  }
  main.replaceChildren(h("h1", {}, "Predict"), drop, results);
}

function feedbackForm(requestId, said) {
  const choice = h("select", { "aria-label": "the true label", class: "truth" },
    (info ? info.classes : [said]).map((c) => h("option", { value: c, selected: c === said }, c)));
  const form = h("form", { class: "feedback", onsubmit: async (e) => {
    e.preventDefault();
    try {
      await api("/v1/feedback", { method: "POST", json: { request_id: requestId, label: choice.value } });
      form.replaceChildren(h("span", { class: "good" }, choice.value === said ? "✓ confirmed" : `✓ corrected to ${choice.value}`));
    } catch (err) { toast(err.message); }
  } }, h("label", {}, "True label ", choice), " ", h("button", { type: "submit" }, "Send"));
  return form;
}

// ---- review queue -----------------------------------------------------------------------------------------
async function renderReview() {
  const reviewer = h("input", { id: "reviewer", value: localStorage.getItem("fovea-reviewer") || "",
    placeholder: "your name", oninput: () => localStorage.setItem("fovea-reviewer", reviewer.value) });
  const cards = h("div", { class: "cards" });
  main.replaceChildren(h("h1", {}, "Review queue"),
    h("p", { class: "muted" }, "Uploads the model was unsure of, or found like none of its classes. Keys: ",
      h("kbd", {}, "j"), "/", h("kbd", {}, "k"), " move, ", h("kbd", {}, "1"), "–", h("kbd", {}, "9"),
      " choose a class, ", h("kbd", {}, "0"), " none of them, ", h("kbd", {}, "n"), " a new class."),
    h("p", {}, h("label", {}, "Reviewer ", reviewer)), cards);
  let data;
  try { data = await api("/v1/reviews"); } catch (e) { cards.replaceChildren(h("p", { class: "bad" }, e.message)); return; }
  if (!data.reviews.length) { cards.replaceChildren(h("p", { class: "muted", id: "empty" }, "Nothing to review.")); return; }
  if (data.consensus > 1) main.insertBefore(h("p", {}, `${data.consensus} reviewers must agree on a label.`), cards);
  for (const r of data.reviews) {
    const suspect = r.kind === "label";  // an image of a training data set whose label is suspected wrong
    const name = h("input", { class: "new-class", "aria-label": "a new class", placeholder: "new class" });
    const card = h("div", { class: r.predicted === "unknown" ? "card unknown" : suspect ? "card suspect" : "card", tabindex: 0, "data-id": r.id },
      image(r.image_url, `${suspect ? "training image" : "upload"} ${r.id}`),
      suspect
        ? h("p", {}, "labelled ", h("b", {}, r.given), "; looks like ", h("b", {}, r.predicted))
        : r.predicted === "unknown"
        ? h("p", {}, "model said ", h("b", {}, "none of my classes"))
        : h("p", {}, "model said ", h("b", {}, r.predicted), ` (${pct(r.confidence)})`),
      h("p", { class: "muted votes" }, r.votes.map((v) => `${v.reviewer}: ${v.label || "none"}`).join(", ")),
      h("div", { class: "choices" }, data.classes.map((c, i) =>
        h("button", { type: "button", "data-label": c, onclick: () => vote(card, r.id, c) }, `${i + 1} ${c}`)),
        h("button", { type: "button", "data-label": "", onclick: () => vote(card, r.id, "") }, suspect ? "0 drop it" : "0 none")),
      suspect
        ? h("p", { class: "muted" }, "The verdict goes to the data set's corrections, which the next training applies.")
        : h("form", { class: "row", onsubmit: (e) => { e.preventDefault(); if (name.value.trim()) vote(card, r.id, name.value.trim(), true); } },
            name, h("button", { type: "submit" }, "Add class")));
    card.addEventListener("focus", () => { document.querySelectorAll(".card").forEach((x) => x.classList.remove("focused")); card.classList.add("focused"); });
    cards.append(card);
  }
  cards.firstChild.focus();

  async function vote(card, id, label, newClass = false) {
    try {
      const r = await api(`/v1/reviews/${id}`, { method: "POST",
        json: { label, reviewer: reviewer.value || "anonymous", new_class: newClass } });
      if (r.state === "pending") {
        $(".votes", card).textContent = r.votes.map((v) => `${v.reviewer}: ${v.label || "none"}`).join(", ");
        toast("vote recorded; waiting for agreement");
      } else {
        const next = card.nextElementSibling || card.previousElementSibling;
        card.remove();
        toast(r.state === "labelled" ? `saved as ${r.label}` : "rejected");
        if (next) next.focus(); else cards.replaceChildren(h("p", { class: "muted", id: "empty" }, "Nothing to review."));
      }
    } catch (e) { toast(e.message); }
  }
}

function reviewKeys(e) {
  if (location.hash !== "#/review" || e.target.tagName === "INPUT") return;
  const card = document.activeElement && document.activeElement.closest && document.activeElement.closest(".card");
  if (!card) return;
  if (e.key === "j" || e.key === "ArrowRight") (card.nextElementSibling || card).focus();
  else if (e.key === "k" || e.key === "ArrowLeft") (card.previousElementSibling || card).focus();
  else if (/^[0-9]$/.test(e.key)) {
    const buttons = [...card.querySelectorAll(".choices button")];  // the classes, then "none"
    const k = Number(e.key);
    const b = k === 0 ? buttons[buttons.length - 1] : k < buttons.length ? buttons[k - 1] : null;
    if (b) b.click();
  } else if (e.key === "n" && $(".new-class", card)) {  // name a class the model does not have yet
    e.preventDefault();
    $(".new-class", card).focus();
  }
}

// ---- models -----------------------------------------------------------------------------------------------
async function renderModels() {
  main.replaceChildren(h("h1", {}, "Models"));
  try {
    const data = await api("/v1/models");
    main.append(h("div", { class: "scroll" }, h("table", {},
      h("tr", {}, ["version", "aliases", "runtime", "accuracy", "size", "created", "report"].map((x) => h("th", {}, x))),
      data.versions.map((v) => h("tr", {}, h("td", {}, v.ref), h("td", {}, v.aliases.join(", ")), h("td", {}, v.runtime),
        h("td", {}, v.accuracy == null ? "—" : pct(v.accuracy)), h("td", {}, `${v.image_size} px`), h("td", {}, v.created),
        h("td", {}, v.report ? h("a", { href: v.report, target: "_blank" }, "report") : "—"))))));
  } catch (e) { main.append(h("p", { class: "bad" }, e.message)); }
}

// ---- deployments ------------------------------------------------------------------------------------------
async function renderDeployments() {
  main.replaceChildren(h("h1", {}, "Deployments"));
  let models, deps;
  try { [models, deps] = await Promise.all([api("/v1/models"), api("/v1/deployments")]); }
  catch (e) { main.append(h("p", { class: "bad" }, e.message)); return; }
  const running = deps.deployments.find((d) => d.state === "running");
  const version = h("select", { id: "candidate" }, models.versions.filter((v) => !v.aliases.includes("production"))
    .map((v) => h("option", { value: v.ref }, v.ref + (v.aliases.length ? ` (${v.aliases.join(", ")})` : ""))));
  const strategy = h("select", { id: "strategy" }, ["canary", "shadow", "blue-green"].map((s) => h("option", { value: s }, s)));
  const percent = h("input", { id: "percent", type: "number", min: 1, max: 100, value: 10, size: 4 });
  const steps = h("input", { id: "steps", value: "10,25,50,100", size: 12 });
  const interval = h("input", { id: "interval", value: "10m", size: 6 });
  const form = h("form", { class: "row", id: "deploy-form", onsubmit: async (e) => {
    e.preventDefault();
    const body = { model: version.value, strategy: strategy.value, interval: interval.value };
    if (strategy.value === "canary") { body.percent = Number(percent.value); body.steps = steps.value.split(",").map(Number); }
    try { await api("/v1/admin/deploy", { method: "POST", json: body }); toast(`${strategy.value} of ${version.value} started`); renderDeployments(); }
    catch (err) { toast(err.message); }
  } },
    h("label", {}, "candidate", version), h("label", {}, "strategy", strategy), h("label", {}, "first %", percent),
    h("label", {}, "steps %", steps), h("label", {}, "interval", interval),
    h("button", { class: "primary", type: "submit", disabled: !version.options.length || !!running }, "Start"));
  const rollback = h("button", { class: "danger", type: "button", id: "rollback", onclick: async () => {
    try { const d = await api("/v1/admin/rollback", { method: "POST", json: { reason: "rolled back in the web app" } });
      toast(`deployment #${d.id} ${d.state.replace("_", " ")}`); renderDeployments(); } catch (err) { toast(err.message); }
  } }, running ? "Roll back the running deployment" : "Undo the last promotion");
  main.append(form, h("p", {}, rollback),
    h("div", { class: "scroll" }, h("table", { id: "deployments" },
      h("tr", {}, ["#", "strategy", "candidate", "production", "state", "share", "figures", "why"].map((x) => h("th", {}, x))),
      deps.deployments.map((d) => {
        const f = d.figures && d.figures.candidate;
        const figures = f ? `n=${f.n} errors=${f.errors} agree=${d.figures.agreement == null ? "—" : pct(d.figures.agreement)}` : "";
        return h("tr", {}, h("td", {}, d.id), h("td", {}, d.strategy), h("td", {}, d.candidate || "—"), h("td", {}, d.production),
          h("td", { class: "state-" + d.state }, d.state.replace("_", " ")), h("td", {}, d.state === "running" && d.strategy === "canary" ? d.percent + " %" : ""),
          h("td", {}, figures), h("td", {}, d.reason || ""));
      }))));
}

// ---- drift ------------------------------------------------------------------------------------------------
function lineChart(title, series, ymax = 1, threshold = null) {
  const W = 760, H = 220, pad = 32;
  const n = Math.max(...series.map((s) => s.values.length), 2);
  const x = (i) => pad + (W - 2 * pad) * (i / (n - 1));
  const y = (v) => H - pad - (H - 2 * pad) * Math.min(1, v / ymax);
  const colours = ["#2456c9", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#495057"];
  const svg = [`<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="${title}">`,
    `<line x1="${pad}" y1="${H - pad}" x2="${W - pad}" y2="${H - pad}" stroke="#999"/>`,
    `<line x1="${pad}" y1="${pad}" x2="${pad}" y2="${H - pad}" stroke="#999"/>`,
    `<text x="4" y="${pad}" font-size="11">${ymax}</text><text x="4" y="${H - pad}" font-size="11">0</text>`];
  if (threshold !== null) svg.push(`<line x1="${pad}" x2="${W - pad}" y1="${y(threshold)}" y2="${y(threshold)}" stroke="#b00020" stroke-dasharray="4"/>`);
  series.forEach((s, k) => {
    const pts = s.values.map((v, i) => v == null ? null : `${x(i)},${y(v)}`).filter(Boolean).join(" ");
    const colour = colours[k % colours.length];
    svg.push(`<polyline fill="none" stroke="${colour}" stroke-width="2" points="${pts}"/>`);
    s.values.forEach((v, i) => { if (v != null) svg.push(`<circle cx="${x(i)}" cy="${y(v)}" r="3.5" fill="${colour}"><title>${s.name}: ${Number(v).toPrecision(3)}</title></circle>`); });
    svg.push(`<text x="${pad + 8 + 120 * k}" y="14" font-size="11" fill="${colour}">● ${s.name}</text>`);
  });
  svg.push("</svg>");
  const box = h("div", { class: "chart" }, h("strong", {}, title));
  box.insertAdjacentHTML("beforeend", svg.join(""));
  return box;
}

async function renderDrift() {
  const check = h("button", { type: "button", id: "drift-check", onclick: async () => {
    check.disabled = true;
    try { const r = await api("/v1/drift/check", { method: "POST" }); toast(r.summary); } catch (e) { toast(e.message); }
    renderDrift();
  } }, "Check now");
  main.replaceChildren(h("h1", {}, "Drift"), h("p", {}, check, " ", h("a", { href: "/v1/drift/report", target: "_blank" }, "latest report")));
  let data;
  try { data = await api("/v1/drift"); } catch (e) { main.append(h("p", { class: "bad" }, e.message)); return; }
  if (!data.history.length) { main.append(h("p", { class: "muted" }, "No drift checks yet: the server runs one every few minutes once it has answered enough requests.")); return; }
  const last = data.history[data.history.length - 1];
  main.append(h("p", { class: last.alert ? "bad" : "good" }, `Latest (${last.time}): ` + (last.alert ? "ALERT" : "no drift") +
    ` · p = ${last.drift.p_value.toPrecision(3)} on ${last.drift.n_window} answers`));
  const families = [...new Set(data.history.flatMap((c) => c.drift.tests.map((t) => t.family)))];
  main.append(lineChart("p-value per test (below the red line: drift)", families.map((f) => ({ name: f,
    values: data.history.map((c) => { const t = c.drift.tests.find((x) => x.family === f); return t ? t.p_value : null; }) })), 1, 0.05));
  if (data.history.some((c) => c.concept)) {
    main.append(lineChart("accuracy on answers with feedback", [{ name: "accuracy", values: data.history.map((c) => c.concept ? c.concept.accuracy : null) },
      { name: "validation", values: data.history.map((c) => c.concept ? c.concept.reference_accuracy : null) }], 1));
  } else {
    main.append(h("p", { class: "muted" }, "Accuracy over time appears once people send true labels (the review queue, or POST /v1/feedback)."));
  }
}

// ---- data -------------------------------------------------------------------------------------------------
const FILTERS = [
  ["suspect", "Suspected label errors"], ["unknown", "Answered unknown"], ["duplicate", "Near-duplicates"],
  ["low_confidence", "Low confidence"], ["wrong", "Wrong on validation"]];
const PAGE = 60;
const queued = new Set();  // images sent to review from this page (the server also says "already queued")

function dataQuery() {
  const q = new URLSearchParams((location.hash.split("?")[1]) || "");
  return { cls: q.get("class") || "", filter: q.get("filter") || "" };
}

function setDataQuery(cls, filter) {
  const q = new URLSearchParams();
  if (cls) q.set("class", cls);
  if (filter) q.set("filter", filter);
  history.replaceState(null, "", "#/data" + (q.toString() ? "?" + q : ""));  // no hashchange: no full re-render
}

function badges(r) {
  const out = [];
  if (r.suspect && r.suspect.issue)
    out.push(h("span", { class: "badge suspect" }, `given ${r.label}, looks ${r.suspect.suggested} ${r.suspect.quality.toFixed(2)}`));
  if (r.corrected) out.push(h("span", { class: "badge good" }, r.corrected.action === "relabel" ? `relabelled from ${r.corrected.from}`
    : r.corrected.action === "drop" ? "dropped" : "label kept"));
  if (queued.has(r.id)) out.push(h("span", { class: "badge queued" }, "queued"));
  if (r.unknown) out.push(h("span", { class: "badge unknown" }, "unknown"));
  if (r.wrong) out.push(h("span", { class: "badge wrong" }, "wrong"));
  if (r.low_confidence) out.push(h("span", { class: "badge" }, "unsure"));
  if (r.duplicate_of !== null) out.push(h("span", { class: "badge" }, `duplicate of #${r.duplicate_of}`));
  if (r.error) out.push(h("span", { class: "badge wrong" }, "unreadable"));
  return out;
}

function said(r) {
  if (r.predicted === null) return "cannot be read";
  return (r.unknown ? `unknown (else ${r.predicted})` : r.predicted) + ` ${pct(r.confidence)}`;
}

function tile(r, open) {
  const flags = badges(r).map((b) => b.textContent).join(", ");
  const t = h("button", { type: "button", class: r.suspect && r.suspect.issue ? "tile suspect" : "tile", tabindex: -1,
    "data-id": r.id, "aria-label": `#${r.id} ${r.label}, ${r.split}; model: ${said(r)}${flags ? "; " + flags : ""}`,
    onclick: () => open(r, t) },
    image(`/v1/data/${r.id}/image?size=240`, ""),
    h("span", { class: "tile-text" }, h("b", {}, r.label), h("span", { class: "muted" }, ` · ${r.split}`)),
    h("span", { class: "tile-text muted" }, "model: " + said(r)),
    h("span", { class: "badges" }, badges(r)));
  return t;
}

async function renderData() {
  const me = renderData.generation = (renderData.generation || 0) + 1;
  const current = () => me === renderData.generation && location.hash.startsWith("#/data");
  const status = h("div", { id: "data-status", "aria-live": "polite" });
  main.replaceChildren(h("h1", {}, "Data"), status);
  let { cls, filter } = dataQuery();
  let body;
  for (;;) {  // the table is built once per model version: show its progress until it is there
    try { body = await api(`/v1/data?limit=${PAGE}` + (cls ? `&class=${encodeURIComponent(cls)}` : "") + (filter ? `&filter=${filter}` : "")); }
    catch (e) {
      if (!current()) return;
      if (cls || filter) { cls = filter = ""; setDataQuery("", ""); continue; }  // an old link's class or filter
      status.replaceChildren(h("p", { class: "bad" }, e.message)); return;
    }
    if (!current()) return;
    if (body.state !== "computing") break;
    const p = body.progress;
    status.replaceChildren(h("p", {}, p.stage === "predicting"
      ? `Looking at every image of the training data (once per model version): ${p.done} of ${p.total}…`
      : p.stage === "starting" ? "Finding the training data…" : `Finding near-duplicates among ${p.total} images…`),
      h("progress", { id: "data-progress", max: Math.max(1, p.total), value: p.stage === "predicting" ? p.done : p.total }));
    await new Promise((ok) => setTimeout(ok, 700));
    if (!current()) return;
  }
  if (body.state !== "ready") {
    status.replaceChildren(h("div", { class: "empty", id: "data-empty" },
      h("h2", {}, "No data set to show"), h("p", {}, body.reason),
      h("p", { class: "muted" }, `The data page shows the training images of ${body.model}:${body.version}.`)));
    return;
  }
  const classSelect = h("select", { id: "data-class", "aria-label": "class" },
    h("option", { value: "" }, "every class"), body.classes.map((c) => h("option", { value: c, selected: c === cls }, `${c} (${body.class_counts[c]})`)));
  const bar = h("div", { class: "filters", role: "toolbar", "aria-label": "filters" });
  const grid = h("div", { class: "grid", id: "grid" });
  const more = h("button", { type: "button", id: "more" }, "Show more");
  const hint = h("p", { class: "muted" });
  const dialog = detailDialog();
  status.replaceChildren(
    h("p", { class: "muted" }, `${body.data} · ${body.counts.all} images. Keys: arrows move, `, h("kbd", {}, "Enter"),
      " opens an image, ", h("kbd", {}, "Esc"), " closes it."),
    h("div", { class: "row" }, h("label", {}, "Class ", classSelect)), bar, hint, grid, h("p", {}, more), dialog.el);
  classSelect.addEventListener("change", () => { cls = classSelect.value; load(); });

  function buttons(counts) {
    const hadFocus = bar.contains(document.activeElement);
    bar.replaceChildren(...[["", "All"], ...FILTERS].map(([f, name]) => h("button", {
      type: "button", "data-filter": f, "aria-pressed": String(f === filter), class: f === filter ? "active" : "",
      title: f === "low_confidence" ? `top probability under ${pct(body.low_confidence_below)}` : f === "wrong" ? "validation and test images the model gets wrong" : "",
      onclick: () => { filter = f; load(); } }, name, " ", h("span", { class: "count" }, counts[f || "all"]))));
    if (hadFocus) bar.querySelector(".active").focus();  // the buttons are new: keep the keyboard where it was
    hint.textContent = body.label_check === null
      ? "No label check has been run on this data set yet: `fovea check DATA --labels` finds the suspected label errors."
      : body.label_check.error ? body.label_check.error
      : `Label check of ${body.label_check.created}: ${body.label_check.n_issues} suspected label errors (low score: likely wrong).`;
  }

  let rows = [], total = 0;
  async function load(append = false) {
    setDataQuery(cls, filter);
    const offset = append ? rows.length : 0;
    let page;
    try { page = await api(`/v1/data?limit=${PAGE}&offset=${offset}` + (cls ? `&class=${encodeURIComponent(cls)}` : "") + (filter ? `&filter=${filter}` : "")); }
    catch (e) { toast(e.message); return; }
    if (!current() || page.state !== "ready") return;
    body = page;
    show(page, append);
  }

  function show(page, append) {
    buttons(page.counts);
    total = page.total;
    rows = append ? rows.concat(page.rows) : page.rows;
    const tiles = page.rows.map((r) => tile(r, dialog.open));
    if (append) grid.append(...tiles);
    else grid.replaceChildren(...(tiles.length ? tiles : [h("p", { class: "muted", id: "grid-empty" }, "No image here.")]));
    const first = grid.querySelector(".tile[tabindex='0']") || grid.querySelector(".tile");
    if (first) first.tabIndex = 0;  // one tab stop for the whole grid; arrows move inside it
    more.hidden = rows.length >= total;
    more.textContent = `Show more (${total - rows.length} left)`;
  }
  more.addEventListener("click", () => load(true));

  grid.addEventListener("focusin", (e) => {
    const t = e.target.closest(".tile");
    if (!t) return;
    grid.querySelectorAll(".tile[tabindex='0']").forEach((x) => { if (x !== t) x.tabIndex = -1; });
    t.tabIndex = 0;
  });
  grid.addEventListener("keydown", (e) => {
    const tiles = [...grid.querySelectorAll(".tile")];
    const i = tiles.indexOf(document.activeElement);
    if (i < 0) return;
    let cols = 0;
    while (cols < tiles.length && tiles[cols].offsetTop === tiles[0].offsetTop) cols++;
    const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: cols, ArrowUp: -cols, Home: -i, End: tiles.length - 1 - i }[e.key];
    if (step === undefined) return;
    e.preventDefault();
    const j = i + step;
    if (j >= tiles.length && !more.hidden && e.key !== "End") { load(true).then(() => { const t = grid.querySelectorAll(".tile")[Math.min(j, grid.children.length - 1)]; if (t) t.focus(); }); return; }
    tiles[Math.max(0, Math.min(tiles.length - 1, j))].focus();
  });

  dialog.onqueued = (id) => {
    const t = grid.querySelector(`.tile[data-id='${id}'] .badges`);
    if (t && !t.querySelector(".queued")) t.prepend(h("span", { class: "badge queued" }, "queued"));
  };
  show(body, false);
}

function detailDialog() {
  const dialog = h("dialog", { id: "detail", "aria-labelledby": "detail-title" });
  let opener = null, showing = null;
  const self = { el: dialog, onqueued: () => {} };
  dialog.addEventListener("close", () => { showing = null; if (opener && opener.isConnected) opener.focus(); });
  dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); });  // the backdrop

  self.open = (r, from) => {
    if (from) opener = from;
    showing = r.id;
    const gradcam = h("figure", {}, h("p", { class: "muted" }, "Grad-CAM…"));
    const similar = h("div", { class: "similar", id: "similar" }, h("p", { class: "muted" }, "Finding similar images…"));
    const send = h("button", { type: "button", class: "primary", id: "send-review", disabled: queued.has(r.id) || r.predicted === null },
      queued.has(r.id) ? "Queued" : "Send to review");
    send.addEventListener("click", async () => {
      send.disabled = true;
      try {
        const q = await api(`/v1/data/${r.id}/review`, { method: "POST" });
        queued.add(r.id);
        send.textContent = q.already_queued ? "Already queued" : "Queued";
        toast(q.already_queued ? "already in the review queue" : `sent to the review queue (#${q.review_id})`);
        self.onqueued(r.id);
      } catch (e) { send.disabled = false; toast(e.message); }
    });
    const facts = [`label ${r.label} · ${r.split}`, `model: ${said(r)}`];
    if (r.suspect) facts.push(r.suspect.issue
      ? `The label check suspects this label: it looks like ${r.suspect.suggested} (label score ${r.suspect.quality.toFixed(3)}, #${r.suspect.rank} most suspect).`
      : `The label check found this label plausible (score ${r.suspect.quality.toFixed(3)}).`);
    if (r.corrected) facts.push(`Reviewed${r.corrected.reviewer ? " by " + r.corrected.reviewer : ""}: ` +
      (r.corrected.action === "relabel" ? `relabelled ${r.corrected.from} → ${r.corrected.label}` : r.corrected.action === "drop" ? "dropped from training" : "label kept"));
    if (r.duplicate_of !== null) facts.push(`A near-duplicate of #${r.duplicate_of}.`);
    if (r.error) facts.push(`Cannot be read: ${r.error}`);
    dialog.replaceChildren(
      h("div", { class: "detail-head" }, h("h2", { id: "detail-title" }, `#${r.id} ${r.path}`),
        h("button", { type: "button", class: "close", "aria-label": "Close", onclick: () => dialog.close() }, "✕")),
      h("div", { class: "detail-body" },
        h("div", { class: "pair" }, h("figure", {}, image(`/v1/data/${r.id}/image?size=480`, r.path), h("figcaption", { class: "muted" }, "the image")), gradcam),
        h("div", {}, h("div", { class: "badges" }, badges(r)), ...facts.map((f) => h("p", {}, f)), h("p", {}, send))),
      h("h3", {}, "Similar images"), similar);
    if (!dialog.open) dialog.showModal();
    send.focus();
    if (info && info.explainable === false) gradcam.replaceChildren(h("p", { class: "muted" }, "No Grad-CAM: it needs a PyTorch model."));
    else blobURL(`/v1/data/${r.id}/gradcam`).then((u) => {
      gradcam.replaceChildren(h("img", { src: u, alt: `Grad-CAM: where the model looks for ${r.predicted}` }),
        h("figcaption", { class: "muted" }, `Grad-CAM: where the model looks for “${r.predicted}”`));
    }).catch((e) => gradcam.replaceChildren(h("p", { class: "muted" }, `No Grad-CAM: ${e.message}`)));
    loadSimilar(r.id, similar);
  };

  async function loadSimilar(id, box) {
    for (let tries = 0; ; tries++) {
      try {
        const s = await api(`/v1/data/${id}/similar?k=8`);
        if (showing !== id) return;
        box.replaceChildren(...(s.similar.length ? s.similar.map((n) => h("button", { type: "button", class: "near", "data-id": n.id,
          "aria-label": `#${n.id} ${n.label}, distance ${n.distance.toFixed(3)}`, onclick: () => self.open(n) },
          image(`/v1/data/${n.id}/image?size=160`, ""), h("span", {}, h("b", {}, n.label), ` ${n.distance.toFixed(3)}`),
          h("span", { class: "badges" }, badges(n)))) : [h("p", { class: "muted" }, "No other image.")]));
        return;
      } catch (e) {
        if (showing !== id) return;
        if (e.status === 503 && tries < 100) {  // the index of the data set is built on first use
          box.replaceChildren(h("p", { class: "muted" }, "Indexing the data set for similar images (the first time only)…"));
          await new Promise((ok) => setTimeout(ok, 2000));
          if (showing !== id) return;
          continue;
        }
        box.replaceChildren(h("p", { class: "muted" }, `No similar images: ${e.message}`));
        return;
      }
    }
  }
  return self;
}

// ---- shell ------------------------------------------------------------------------------------------------
const pages = { predict: renderPredict, review: renderReview, data: renderData, models: renderModels, deployments: renderDeployments,
  drift: renderDrift };

function route() {
  const page = (location.hash.match(/^#\/(\w+)/) || [])[1] || "predict";
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === page));
  (pages[page] || renderPredict)();
  main.focus({ preventScroll: true });
}

$("#token-button").addEventListener("click", () => {
  const t = prompt("Admin token (kept in this browser):", token());
  if (t !== null) { localStorage.setItem("fovea-token", t.trim()); route(); }
});
document.addEventListener("keydown", reviewKeys);
window.addEventListener("hashchange", route);
api("/v1/info").then((i) => { info = i; $("#model").textContent = `${i.model}:${i.version}`; }).catch(() => {}).finally(route);
