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
  if (!r.ok) throw new Error((body && body.error) || r.statusText || String(r.status));
  return body;
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
    const name = h("input", { class: "new-class", "aria-label": "a new class", placeholder: "new class" });
    const card = h("div", { class: r.predicted === "unknown" ? "card unknown" : "card", tabindex: 0, "data-id": r.id },
      h("img", { src: r.image_url, alt: `upload ${r.id}` }),
      r.predicted === "unknown"
        ? h("p", {}, "model said ", h("b", {}, "none of my classes"))
        : h("p", {}, "model said ", h("b", {}, r.predicted), ` (${pct(r.confidence)})`),
      h("p", { class: "muted votes" }, r.votes.map((v) => `${v.reviewer}: ${v.label || "none"}`).join(", ")),
      h("div", { class: "choices" }, data.classes.map((c, i) =>
        h("button", { type: "button", "data-label": c, onclick: () => vote(card, r.id, c) }, `${i + 1} ${c}`)),
        h("button", { type: "button", "data-label": "", onclick: () => vote(card, r.id, "") }, "0 none")),
      h("form", { class: "row", onsubmit: (e) => { e.preventDefault(); if (name.value.trim()) vote(card, r.id, name.value.trim(), true); } },
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
  } else if (e.key === "n") {  // name a class the model does not have yet
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

// ---- shell ------------------------------------------------------------------------------------------------
const pages = { predict: renderPredict, review: renderReview, models: renderModels, deployments: renderDeployments, drift: renderDrift };

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
