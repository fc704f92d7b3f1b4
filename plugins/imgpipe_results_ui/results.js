// The results page: plain DOM, no framework, no network beyond this plugin's own API.
// Every path is relative (the page is served under the plugin's prefix); the browser sends
// Airflow's session cookie with each same-origin request.
"use strict";

const params = new URLSearchParams(window.location.search);
const MODEL = params.get("model_name") || "";
const state = { cursors: [null], disagreementsAfter: null, labels: [] };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function api(path, query = {}) {
  const q = new URLSearchParams();
  if (MODEL) q.set("model_name", MODEL);
  for (const [key, value] of Object.entries(query)) {
    if (value !== null && value !== undefined && value !== "") q.set(key, value);
  }
  const qs = q.toString();
  return fetch(`api/${path}${qs ? "?" + qs : ""}`, { credentials: "same-origin" }).then(async (r) => {
    const body = await r.json().catch(() => ({}));
    if (!r.ok) {
      const error = new Error(body.detail || `${r.status} ${r.statusText}`);
      error.status = r.status;
      throw error;
    }
    return body;
  });
}

function showError(error) {
  const box = document.getElementById("error");
  box.hidden = false;
  box.textContent =
    error.status === 401 || error.status === 403
      ? `Not allowed (${error.status}): log in to Airflow first. ${error.message}`
      : String(error.message || error);
}

const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * Number(x)).toFixed(1)} %`);
const when = (iso) => (iso ? iso.replace("T", " ").slice(0, 19) : "–");

function thumb(imageId, size = 128) {
  return el("img", {
    class: "thumb",
    src: `api/images/${encodeURIComponent(imageId)}/thumbnail?size=${size}`,
    alt: `image ${imageId}`,
    loading: "lazy",
  });
}

// replaceChildren with nested arrays of nodes flattened (it takes nodes, not arrays).
function fill(node, ...children) {
  node.replaceChildren(...children.flat(Infinity));
}

function definitionList(pairs) {
  return el("dl", {}, pairs.filter(([, v]) => v !== undefined).map(([k, v]) => [el("dt", { text: k }), el("dd", {}, v ?? "–")]));
}

// ----------------------------------------------------------------------------- overview

function aliasCard(node, title, entry) {
  node.replaceChildren(el("h3", { text: title }));
  if (!entry) {
    node.append(el("p", { class: "muted", text: `no ${title.toLowerCase()}` }));
    return;
  }
  const run = entry.mlflow_run_url
    ? el("a", { href: entry.mlflow_run_url, target: "_blank", rel: "noopener", text: entry.run_id })
    : entry.run_id;
  node.append(
    definitionList([
      ["version", el("strong", { class: "version", text: `v${entry.model_version}` })],
      ["since", `${when(entry.moved_at)} by ${entry.actor}`],
      ["reason", entry.reason],
      ["gate", !entry.decision ? "not gated" : entry.decision_reason && entry.decision_reason !== entry.reason ? `${entry.decision}: ${entry.decision_reason}` : entry.decision],
      ["accuracy", `${pct(entry.gate_accuracy)} (champion then: ${pct(entry.champion_accuracy)})`],
      ["dataset", entry.dataset_version],
      ["MLflow run", run],
      ["Airflow run", entry.run_key],
    ]),
  );
}

function datasetCard(node, dataset) {
  node.replaceChildren(el("h3", { text: "Dataset" }));
  if (!dataset) {
    node.append(el("p", { class: "muted", text: "no dataset version recorded for the champion" }));
    return;
  }
  const perSubset = Object.entries(dataset.counts || {}).map(
    ([subset, labels]) => `${subset} ${Object.values(labels).reduce((a, b) => a + b, 0)}`,
  );
  node.append(
    definitionList([
      ["version", dataset.dataset_version],
      ["images", String(dataset.n_images)],
      ["splits", perSubset.join(", ")],
      ["labels", Object.keys(dataset.label_map || {}).length],
      ["location", `s3://${dataset.bucket}/${dataset.prefix}`],
      ["created", when(dataset.created_at)],
    ]),
  );
}

function renderOverview(data) {
  document.getElementById("model-name").textContent = data.model_name;
  const hint = document.getElementById("hint");
  hint.hidden = !data.hint;
  hint.textContent = data.hint || "";
  aliasCard(document.getElementById("champion"), "Champion", data.champion);
  aliasCard(document.getElementById("challenger"), "Challenger", data.challenger);
  datasetCard(document.getElementById("dataset"), data.dataset);
  const table = document.getElementById("alias-history");
  fill(table,
    el("tr", {}, ["moved", "alias", "from", "to", "by", "reason"].map((h) => el("th", { text: h }))),
    data.alias_history.map((h) =>
      el("tr", {}, [when(h.moved_at), h.alias, h.from_version ?? "–", h.to_version, h.actor, h.reason].map((v) => el("td", { text: v }))),
    ),
  );
}

// ----------------------------------------------------------------------------- accuracy

function accuracyChart(items) {
  const ns = "http://www.w3.org/2000/svg";
  const w = 560, h = 200, left = 40, bottom = 28, top = 12;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("width", w);
  svg.setAttribute("height", h);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", "accuracy by model version");
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  const plotH = h - bottom - top;
  for (const tick of [0, 0.25, 0.5, 0.75, 1]) {
    const y = top + plotH * (1 - tick);
    add("line", { x1: left, x2: w, y1: y, y2: y, stroke: "#d9dee7" });
    add("text", { x: left - 6, y: y + 4, "text-anchor": "end", "font-size": 11, fill: "#5a6478" }, `${tick * 100}%`);
  }
  const slot = (w - left) / Math.max(items.length, 1);
  const barW = Math.min(48, slot * 0.6);
  items.forEach((item, i) => {
    const acc = Number(item.accuracy);
    const x = left + slot * i + (slot - barW) / 2;
    const y = top + plotH * (1 - acc);
    const color = item.alias === "champion" ? "#1a7f37" : item.alias === "challenger" ? "#f0883e" : "#017cee";
    add("rect", { class: "bar", x, y, width: barW, height: plotH * acc, fill: color, "data-version": item.model_version });
    add("text", { x: x + barW / 2, y: y - 3, "text-anchor": "middle", "font-size": 11 }, pct(acc));
    add("text", { x: x + barW / 2, y: h - 10, "text-anchor": "middle", "font-size": 11 }, `v${item.model_version}${item.alias ? " " + item.alias : ""}`);
  });
  return svg;
}

function renderAccuracy(data) {
  const chart = document.getElementById("accuracy-chart");
  const table = document.getElementById("accuracy-table");
  if (!data.items.length) {
    chart.replaceChildren(el("p", { class: "empty", text: "no scored version yet: the DAG's score_images task writes predictions" }));
    table.replaceChildren();
    return;
  }
  chart.replaceChildren(accuracyChart(data.items));
  fill(table,
    el("tr", {}, ["version", "alias", "labelled", "correct", "accuracy", "macro-F1", "evaluated", "last scored"].map((h) => el("th", { text: h }))),
    data.items.map((r) =>
      el("tr", {},
        el("td", { text: `v${r.model_version}` }), el("td", { text: r.alias || "" }),
        el("td", { class: "num", text: r.n_labelled }), el("td", { class: "num", text: r.n_correct }),
        el("td", { class: "num", text: pct(r.accuracy) }),
        el("td", { class: "num", text: r.macro_f1 === null ? "–" : Number(r.macro_f1).toFixed(3) }),
        el("td", { text: when(r.evaluated_at) }), el("td", { text: when(r.last_scored_at) }),
      ),
    ),
  );
  const versions = data.items.map((r) => r.model_version);
  for (const id of ["confusion-version"]) {
    const select = document.getElementById(id);
    select.replaceChildren(...versions.map((v) => el("option", { value: v, text: `v${v}` })));
  }
  const reviewVersion = document.querySelector("#filters [name=model_version]");
  reviewVersion.replaceChildren(el("option", { value: "", text: "champion" }), ...versions.map((v) => el("option", { value: v, text: `v${v}` })));
  const champion = data.items.find((r) => r.alias === "champion");
  if (champion) document.getElementById("confusion-version").value = champion.model_version;
}

// ----------------------------------------------------------------------------- confusion

function heatColor(share, diagonal) {
  const alpha = Math.min(1, 0.08 + share * 0.92);
  return diagonal ? `rgba(26, 127, 55, ${alpha})` : `rgba(198, 40, 40, ${alpha})`;
}

function renderConfusion(data) {
  const table = document.getElementById("heatmap");
  document.getElementById("confusion-summary").textContent =
    `v${data.model_version}: ${data.n_images} test images, accuracy ${pct(data.accuracy)}, macro-F1 ${data.macro_f1.toFixed(3)} ` +
    `(evaluated ${when(data.evaluated_at)}). Rows: true label, columns: predicted. A cell lists its images.`;
  setLabels(data.labels);
  fill(table,
    el("tr", {}, el("th", { class: "corner", text: "true \\ predicted" }), data.labels.map((l) => el("th", { text: l }))),
    data.labels.map((trueLabel, i) => {
      const rowTotal = data.matrix[i].reduce((a, b) => a + b, 0) || 1;
      return el("tr", {}, el("th", { text: trueLabel }), data.labels.map((predicted, j) => {
        const n = data.matrix[i][j];
        const cell = el("td", { "data-true": trueLabel, "data-predicted": predicted });
        if (n > 0) {
          cell.style.background = heatColor(n / rowTotal, i === j);
          const link = el("a", { href: "#review", title: `${n} images: true ${trueLabel}, predicted ${predicted}`, text: n });
          link.addEventListener("click", (event) => {
            event.preventDefault();
            showCell(data.model_version, trueLabel, predicted);
          });
          cell.append(link);
        }
        return cell;
      }));
    }),
  );
}

function setLabels(labels) {
  state.labels = labels;
  for (const name of ["true_label", "predicted_label"]) {
    const select = document.querySelector(`#filters [name=${name}]`);
    const current = select.value;
    select.replaceChildren(el("option", { value: "", text: "any" }), ...labels.map((l) => el("option", { value: l, text: l })));
    select.value = current;
  }
}

function loadConfusion() {
  const version = document.getElementById("confusion-version").value;
  return api("confusion", { model_version: version })
    .then(renderConfusion)
    .catch((error) => {
      document.getElementById("heatmap").replaceChildren();
      document.getElementById("confusion-summary").textContent = error.message;
    });
}

function showCell(version, trueLabel, predicted) {
  const form = document.getElementById("filters");
  form.queue.value = "all";
  form.true_label.value = trueLabel;
  form.predicted_label.value = predicted;
  form.subset.value = "";
  form.below.value = "";
  form.wrong.checked = false;
  form.model_version.value = String(version);
  state.cursors = [null];
  loadReview().then(() => document.getElementById("review").scrollIntoView());
}

// ----------------------------------------------------------------------------- review queue

function topK(items) {
  return el("ul", { class: "topk" }, (items || []).slice(0, 3).map((k) =>
    el("li", {}, el("span", { class: "bar", style: `width:${Math.round(60 * k.prob)}px` }), `${k.label} ${pct(k.prob)}`),
  ));
}

function predictionCard(p) {
  const wrong = p.correct === 0;
  return el("div", { class: wrong ? "item wrong" : "item", "data-image-id": p.image_id },
    thumb(p.image_id),
    el("div", { class: "labels" },
      el("div", {}, "true ", el("strong", { text: p.true_label ?? "–" })),
      el("div", { class: wrong ? "bad" : p.correct === 1 ? "ok" : "" }, "predicted ", el("strong", { text: p.predicted_label }), ` (${pct(p.confidence)})`),
    ),
    topK(p.top_k),
    el("div", { class: "key", text: `#${p.image_id} · ${p.subset} · ${p.object_key}` }),
  );
}

function reviewQuery() {
  const form = document.getElementById("filters");
  return {
    queue: form.queue.value,
    true_label: form.true_label.value,
    predicted_label: form.predicted_label.value,
    subset: form.subset.value,
    below: form.below.value,
    wrong: form.wrong.checked ? "true" : "",
    model_version: form.model_version.value,
  };
}

function loadReview() {
  const page = state.cursors.length - 1;
  return api("predictions", { ...reviewQuery(), after: state.cursors[page], limit: 24 })
    .then((data) => {
      const box = document.getElementById("review-items");
      box.replaceChildren(...data.items.map(predictionCard));
      if (!data.items.length) box.append(el("p", { class: "empty", text: "nothing matches these filters" }));
      document.getElementById("review-summary").textContent =
        `v${data.model_version}: ${data.total} predictions match; page ${page + 1}, lowest confidence first.`;
      state.next = data.next;
      document.getElementById("review-next").disabled = !data.next;
      document.getElementById("review-prev").disabled = page === 0;
      document.getElementById("review-first").disabled = page === 0;
    })
    .catch((error) => {
      document.getElementById("review-items").replaceChildren(el("p", { class: "empty", text: error.message }));
    });
}

// ----------------------------------------------------------------------------- drift

const pValue = (p) => (p === null || p === undefined ? "–" : Number(p).toFixed(4));

// Why a check has no statistics, in words (its numbers would mean nothing).
function unjudged(d) {
  if (d.status === "not_enough_images") return `not enough images: ${d.n_images} scored, at least ${d.min_images} needed`;
  if (d.status === "no_reference") return `no reference: v${d.model_version} was registered without a drift reference (retrain to get one)`;
  return d.verdict;
}

function driftRow(d) {
  const classes = [d.latest ? "latest" : "", d.drifted ? "drifted" : ""].filter(Boolean).join(" ");
  const cells = [
    el("td", { text: when(d.checked_at) }),
    el("td", { text: `v${d.model_version}` }),
    el("td", { class: "key", text: d.run_key }),
    el("td", { text: d.subset }),
    el("td", { class: "verdict", text: d.verdict }),
  ];
  if (d.status === "checked") {
    cells.push(
      el("td", { class: "num", text: d.n_images }),
      el("td", { class: "num", text: pValue(d.mmd_p_value) }),
      el("td", { class: "num", text: `${Number(d.label_shift).toFixed(3)} (p ${pValue(d.label_p_value)})` }),
      el("td", { class: "num", text: `${pct(d.reference_confidence)} → ${pct(d.mean_confidence)} (p ${pValue(d.confidence_p_value)})` }),
      el("td", { text: `p ≤ ${pValue(d.p_value_threshold / 3)}; shift ≥ ${d.label_shift_threshold}; drop ≥ ${d.confidence_drop_threshold}` }),
    );
  } else {
    cells.push(el("td", { class: "unjudged", colspan: 6, text: unjudged(d) }));
  }
  return el("tr", { class: classes || null, "data-subset": d.subset, "data-status": d.status }, cells);
}

function loadDrift() {
  return api("drift", { limit: 40 }).then((data) => {
    const table = document.getElementById("drift-table");
    const summary = document.getElementById("drift-summary");
    if (!data.items.length) {
      summary.textContent = "no drift check yet: the DAG's check_drift task (after score_images) writes one per scored subset.";
      table.replaceChildren();
      return;
    }
    const latest = data.items.filter((d) => d.latest).map((d) => `${d.subset} — ${d.verdict} (v${d.model_version}, ${when(d.checked_at)})`);
    summary.textContent =
      `Latest: ${latest.join("; ")}. Each check compares the images one run scored in a subset with the ` +
      "scoring version's val images; the newest check of each subset is highlighted.";
    fill(table,
      el("tr", {}, ["checked", "version", "run", "subset", "verdict", "images", "embeddings (MMD p)", "label shift", "confidence (val → run)", "judged at"].map((h) => el("th", { text: h }))),
      data.items.map(driftRow),
    );
  });
}

// ----------------------------------------------------------------------------- disagreements, inbox

function loadDisagreements(append = false) {
  return api("disagreements", { after: append ? state.disagreementsAfter : null, limit: 20 }).then((data) => {
    const table = document.getElementById("disagreements-table");
    if (!append) {
      table.replaceChildren(el("tr", {}, ["image", "true label", "champion", "challenger", "key"].map((h) => el("th", { text: h }))));
    }
    for (const d of data.items) {
      const mark = (label) => (d.true_label === null ? "" : label === d.true_label ? "ok" : "bad");
      table.append(el("tr", { "data-image-id": d.image_id },
        el("td", {}, thumb(d.image_id, 64)),
        el("td", { text: d.true_label ?? "– (inbox)" }),
        el("td", { class: mark(d.champion_label) }, `v${d.champion_version}: `, el("strong", { text: d.champion_label }), ` ${pct(d.champion_confidence)}`),
        el("td", { class: mark(d.challenger_label) }, `v${d.challenger_version}: `, el("strong", { text: d.challenger_label }), ` ${pct(d.challenger_confidence)}`),
        el("td", { class: "key", text: d.object_key }),
      ));
    }
    const shown = table.querySelectorAll("tr[data-image-id]").length;
    document.getElementById("disagreements-summary").textContent = shown
      ? `${shown} images shown where the champion and the challenger disagree.`
      : "no disagreements (or no challenger scored yet).";
    state.disagreementsAfter = data.next;
    document.getElementById("disagreements-next").disabled = !data.next;
  });
}

function loadInbox() {
  return api("inbox", { limit: 12 }).then((data) => {
    document.getElementById("inbox-summary").textContent = data.total
      ? `${data.total} live inbox images; the latest ${data.items.length}:`
      : "the inbox is empty: upload images under <prefix>/inbox/ and the inbox DAG scores them.";
    document.getElementById("inbox-items").replaceChildren(...data.items.map((p) =>
      el("div", { class: "item", "data-image-id": p.image_id },
        thumb(p.image_id),
        p.predicted_label
          ? el("div", { class: "labels" }, "predicted ", el("strong", { text: p.predicted_label }), ` (${pct(p.confidence)}) by v${p.model_version}`)
          : el("div", { class: "labels muted", text: "not scored yet" }),
        topK(p.top_k),
        el("div", { class: "key", text: `${when(p.scored_at)} · ${p.object_key}` }),
      ),
    ));
  });
}

// ----------------------------------------------------------------------------- wiring

function wire() {
  document.getElementById("confusion-version").addEventListener("change", loadConfusion);
  document.getElementById("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    state.cursors = [null];
    loadReview();
  });
  document.getElementById("review-next").addEventListener("click", () => {
    if (!state.next) return;
    state.cursors.push(state.next);
    loadReview();
  });
  document.getElementById("review-prev").addEventListener("click", () => {
    if (state.cursors.length > 1) state.cursors.pop();
    loadReview();
  });
  document.getElementById("review-first").addEventListener("click", () => {
    state.cursors = [null];
    loadReview();
  });
  document.getElementById("disagreements-next").addEventListener("click", () => loadDisagreements(true));
}

async function main() {
  wire();
  try {
    const overview = await api("overview");
    renderOverview(overview);
    renderAccuracy(await api("accuracy"));
    if (!overview.champion) {
      document.getElementById("review-summary").textContent = overview.hint;
    } else {
      await loadConfusion();
      await loadReview();
    }
    await Promise.all([loadDrift(), loadDisagreements(), loadInbox()]);
    document.body.dataset.loaded = "true";
  } catch (error) {
    showError(error);
    document.body.dataset.loaded = "error";
  }
}

main();
