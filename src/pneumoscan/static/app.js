// pneumoscan's page: uploads X-rays to the JSON API and shows the results as a triage list.
// Plain browser JavaScript, no build step and nothing loaded from elsewhere.
"use strict";

(() => {
  const PREVIEWABLE = new Set(["image/jpeg", "image/png"]);
  const MB = 1024 * 1024;

  const $ = (id) => document.getElementById(id);
  const ui = {
    drop: $("drop-zone"),
    input: $("file-input"),
    mode: $("mode"),
    model: $("model-line"),
    status: $("status"),
    section: $("results-section"),
    summary: $("results-summary"),
    list: $("results"),
    csv: $("download-csv"),
    clear: $("clear"),
    tokenForm: $("token-form"),
    token: $("token"),
  };
  const state = {
    entries: [],
    nextId: 1,
    limits: { max_file_bytes: 20 * MB, max_files: 20 },
    fields: [], // the API's result fields in the CLI's CSV order: from the model card
  };

  // ---- small helpers -------------------------------------------------------------------

  function h(tag, attrs = {}, ...children) {
    const el = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") el.className = value;
      else if (key === "text") el.textContent = value;
      else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
      else el.setAttribute(key, value === true ? "" : value);
    }
    el.append(...children.filter((c) => c !== null && c !== undefined));
    return el;
  }

  const fmt = (x, digits = 2) => (typeof x === "number" ? x.toFixed(digits) : "–");
  // As report.shown_probability: what rounds to 1 or 0 is shown as beyond the last step, since
  // no calibration off the training population supports a certainty.
  const shownProbability = (p) => (p >= 0.995 ? "> 0.99" : p < 0.005 ? "< 0.01" : fmt(p));
  const sizeText = (bytes) => (bytes >= MB ? `${(bytes / MB).toFixed(0)} MB` : `${bytes} bytes`);
  const say = (text) => {
    ui.status.textContent = text;
  };

  async function errorText(res) {
    let detail = `${res.status} ${res.statusText}`;
    try {
      const body = await res.json();
      if (typeof body.detail === "string") detail = body.detail;
      else if (Array.isArray(body.detail) && body.detail.length) detail = body.detail[0].msg;
    } catch {
      // not JSON: keep the status line
    }
    return detail;
  }

  function failure(name, message, mode) {
    const result = Object.fromEntries(state.fields.map((f) => [f, null]));
    return { ...result, file: name, mode, error: message, heatmap_png: null };
  }

  // ---- the API token (`serve --token-file`): asked for once, kept for this tab only -------

  const TOKEN_KEY = "pneumoscan-token";

  function api(path, options = {}) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    return fetch(path, { ...options, headers }).then((res) => {
      if (res.status === 401) askToken(token ? "That token was not accepted; enter it again." : null);
      return res;
    });
  }

  function askToken(message) {
    ui.tokenForm.hidden = false;
    if (message) say(message);
    ui.token.focus();
  }

  ui.tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = ui.token.value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    ui.token.value = "";
    ui.tokenForm.hidden = true;
    say("");
    loadModel();
  });

  // ---- the model card ------------------------------------------------------------------

  async function loadModel() {
    try {
      const res = await api("api/v1/model");
      if (!res.ok) throw new Error(await errorText(res));
      const card = await res.json();
      if (card.limits) state.limits = card.limits;
      state.fields = card.result_fields;
      // In the selector's order, each with the validation metrics that justify it.
      const modes = Array.from(ui.mode.options, (option) => option.value);
      const points = modes
        .filter((name) => name in card.operating_points)
        .map((name) => {
          const point = card.operating_points[name];
          const v = point.validation || {};
          const ci = point.sensitivity_ci ? ` (95% CI ${fmt(point.sensitivity_ci[0])}-${fmt(point.sensitivity_ci[1])})` : "";
          return `${name} ${fmt(point.threshold)} (validation sensitivity ${fmt(v.sensitivity)}${ci}, specificity ${fmt(v.specificity)})`;
        });
      // An ensemble averages its networks' answers: "mean of cnn + transfer", "mean of cnn x3".
      const about =
        (card.gated ? `experts per population, ${card.description}, ` : "") +
        (card.members > 1 && !card.gated ? `mean of ${card.description}, ` : "") +
        (card.members === 1 && card.name !== card.architecture ? `${card.architecture}, ` : "");
      ui.model.textContent =
        `Model: ${card.name} (${about}${card.input_size}×${card.input_size} pixels). ` +
        `Thresholds: ${points.join("; ")}.` +
        populationText(card.operating_points.detection) +
        ` Files up to ${sizeText(state.limits.max_file_bytes)}.` +
        (card.domain ? ` Trained on ${card.domain.trained_on}: other X-rays are marked less reliable.` : "") +
        externalText(card.external_check, card.domain);
    } catch (err) {
      ui.model.textContent = `Could not load the model description: ${err.message}`;
    }
  }

  // A model of several populations: the detection point's figures in each one's validation.
  function populationText(point) {
    if (!point || !point.populations) return "";
    const each = Object.entries(point.populations).map(([name, p]) => {
      const v = p.validation;
      const ci = (pair) => `${fmt(pair[0])}-${fmt(pair[1])}`;
      return `${name}: sensitivity ${fmt(v.sensitivity)} (${ci(p.sensitivity_ci)}), specificity ${fmt(v.specificity)} (${ci(p.specificity_ci)})`;
    });
    return ` At detection, in each population's validation: ${each.join("; ")}.`;
  }

  // What the model did on chest X-rays from elsewhere (model.json's external_check), if measured.
  function externalText(ext, domain) {
    if (!ext) return "";
    const counts = (labels) =>
      Object.entries(labels).map(([label, n]) => `${n} ${label}`).join(", ") || "none";
    const clean = Object.values(ext.no_finding).reduce((a, b) => a + b, 0);
    return (
      ` On ${ext.images} ${ext.films}: ${ext.recognised} recognised as chest X-rays, ` +
      `${ext.domain.shifted} of them marked less reliable; labels ${counts(ext.labels)}` +
      (clean ? ` (the ${clean} with no finding: ${counts(ext.no_finding)})` : "") +
      (domain && domain.populations.length > 1 ? "." : `. On such films a label means little.`)
    );
  }

  // ---- talking to the API --------------------------------------------------------------

  async function post(files, mode, heatmap) {
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    const query = new URLSearchParams({ mode, heatmap: String(heatmap) });
    const res = await api(`api/v1/predict?${query}`, { method: "POST", body: form });
    if (!res.ok) {
      const err = new Error(await errorText(res));
      err.status = res.status;
      throw err;
    }
    return (await res.json()).results;
  }

  function addFiles(fileList) {
    const files = Array.from(fileList);
    if (!files.length) return;
    const added = files.map((file) => ({
      id: state.nextId++,
      file,
      thumbUrl: PREVIEWABLE.has(file.type) ? URL.createObjectURL(file) : null,
      result: null,
      ticket: 0,
      heatmap: null,
      showHeatmap: false,
      heatmapBusy: false,
      el: null,
    }));
    state.entries.push(...added);
    score(added);
  }

  async function score(entries) {
    const mode = ui.mode.value;
    const sendable = [];
    for (const entry of entries) {
      entry.ticket += 1;
      entry.heatmap = null; // the overlay's caption names the operating point
      entry.showHeatmap = false;
      if (entry.file.size > state.limits.max_file_bytes) {
        const limit = sizeText(state.limits.max_file_bytes);
        entry.result = failure(entry.file.name, `${entry.file.name}: larger than the limit of ${limit}`, mode);
      } else {
        entry.result = null;
        sendable.push(entry);
      }
    }
    render();
    if (!sendable.length) {
      say(summaryText());
      return;
    }
    say(`Scoring ${sendable.length} file${sendable.length === 1 ? "" : "s"} at the ${mode} operating point…`);
    for (let start = 0; start < sendable.length; start += state.limits.max_files) {
      const chunk = sendable.slice(start, start + state.limits.max_files);
      const tickets = chunk.map((e) => e.ticket);
      let results;
      try {
        results = await post(chunk.map((e) => e.file), mode, false);
      } catch (err) {
        const message = (e) =>
          err.status === 415 && chunk.length > 1
            ? `${e.file.name}: not a readable image (use JPEG, PNG, TIFF or DICOM)`
            : err.message;
        results = chunk.map((e) => failure(e.file.name, message(e), mode));
      }
      chunk.forEach((entry, i) => {
        if (entry.ticket === tickets[i]) entry.result = results[i];
      });
      render();
    }
    say(summaryText());
  }

  async function toggleHeatmap(entry) {
    if (entry.heatmap) {
      entry.showHeatmap = !entry.showHeatmap;
      update(entry);
      say(`Heatmap ${entry.showHeatmap ? "shown" : "hidden"} for ${entry.file.name}.`);
      return;
    }
    const ticket = entry.ticket;
    entry.heatmapBusy = true;
    update(entry);
    say(`Computing the heatmap for ${entry.file.name}…`);
    try {
      const [result] = await post([entry.file], entry.result.mode, true);
      if (entry.ticket !== ticket) return;
      if (!result.heatmap_png) throw new Error(result.error || "the server sent no heatmap");
      entry.heatmap = `data:image/png;base64,${result.heatmap_png}`;
      entry.showHeatmap = true;
      say(`Heatmap shown for ${entry.file.name}.`);
    } catch (err) {
      say(`No heatmap for ${entry.file.name}: ${err.message}`);
    } finally {
      entry.heatmapBusy = false;
      update(entry);
    }
  }

  // ---- rendering -----------------------------------------------------------------------

  // Most likely pneumonia first; then what is not a chest X-ray, unreadable files and those
  // still being scored: none of those has a probability to rank by.
  function rank(entry) {
    const r = entry.result;
    if (!r) return -4;
    if (r.error) return -3;
    if (r.ood) return -2;
    return typeof r.probability === "number" ? r.probability : -1;
  }

  function sorted() {
    return [...state.entries].sort((a, b) => rank(b) - rank(a) || a.id - b.id);
  }

  function render() {
    ui.section.hidden = state.entries.length === 0;
    const order = sorted();
    order.forEach((entry, i) => {
      entry.position = i + 1;
      update(entry);
    });
    const current = Array.from(ui.list.children);
    if (order.some((entry, i) => current[i] !== entry.el)) {
      for (const entry of order) ui.list.append(entry.el); // keeps nodes, so no flicker
    }
    ui.summary.textContent = summaryText();
    ui.csv.disabled = !state.entries.some((e) => e.result);
  }

  function summaryText() {
    const results = state.entries.map((e) => e.result);
    const count = (test) => results.filter((r) => r && test(r)).length;
    const parts = [];
    for (const name of ["PNEUMONIA", "NORMAL"]) {
      const n = count((r) => r.label === name);
      if (n) parts.push(`${n} ${name}`);
    }
    const ood = count((r) => r.ood === true);
    const shifted = count((r) => r.domain === "shifted");
    const failed = count((r) => r.error !== null);
    const pending = results.filter((r) => !r).length;
    if (shifted) parts.push(`${shifted} unlike the training images`);
    if (ood) parts.push(`${ood} not a chest X-ray`);
    if (failed) parts.push(`${failed} unreadable`);
    if (pending) parts.push(`${pending} being scored`);
    const n = state.entries.length;
    return `${n} file${n === 1 ? "" : "s"}, most likely pneumonia first: ${parts.join(", ") || "none yet"}.`;
  }

  function update(entry) {
    const focused = entry.el && entry.el.contains(document.activeElement) ? document.activeElement.dataset.role : null;
    const card = buildCard(entry);
    if (entry.el) entry.el.replaceWith(card);
    entry.el = card;
    if (focused) card.querySelector(`[data-role="${focused}"]`)?.focus();
  }

  function buildCard(entry) {
    const r = entry.result;
    const kind = !r ? "pending" : r.error ? "error" : r.ood ? "ood" : r.label === "PNEUMONIA" ? "positive" : "negative";
    return h(
      "li",
      { class: `result result-${kind}`, "data-file": entry.file.name },
      thumbnail(entry),
      h(
        "div",
        { class: "result-body" },
        h(
          "div",
          { class: "result-title" },
          h("span", { class: "rank", text: `#${entry.position ?? ""}` }),
          h("span", { class: "file-name", text: entry.file.name }),
        ),
        r ? details(entry, r) : h("p", { class: "pending", text: "Scoring…" }),
      ),
    );
  }

  function thumbnail(entry) {
    const source = entry.thumbUrl || entry.heatmap;
    const unreadable = entry.result && entry.result.error;
    const placeholder = () =>
      h("div", {
        class: "thumb-placeholder",
        text: unreadable ? "No preview" : "No preview in the browser (DICOM): show the heatmap to see the image",
      });
    if (!source) return h("div", { class: "thumb" }, placeholder());
    const img = h("img", { src: source, alt: `Thumbnail of ${entry.file.name}` });
    img.addEventListener("error", () => img.replaceWith(placeholder()));
    return h("div", { class: "thumb" }, img);
  }

  function details(entry, r) {
    const parts = [];
    if (r.error) {
      parts.push(h("p", { class: "warning", role: "alert", text: `Could not read this file. ${r.error}` }));
      return h("div", {}, ...parts);
    }
    const labelText = r.label ?? "no label";
    parts.push(h("p", { class: `label label-${(r.label || "none").toLowerCase()}`, text: labelText }));
    if (r.ood) {
      // No probability bar and no number: a score of something that is not a chest X-ray means nothing.
      parts.push(
        h("p", {
          class: "warning",
          text: "This does not look like a chest X-ray, so it gets no label and no score.",
        }),
      );
      return h("div", {}, ...parts);
    }
    if (r.warning) {
      const text = r.warning.charAt(0).toUpperCase() + r.warning.slice(1);
      parts.push(h("p", { class: "warning shifted", text: `${text}.` }));
    }
    parts.push(probabilityBar(r));
    parts.push(
      h("p", {
        class: "numbers",
        text: `P(pneumonia) ${shownProbability(r.probability)} · threshold ${fmt(r.threshold)} · ${r.mode} operating point`,
      }),
    );
    const pressed = entry.showHeatmap && entry.heatmap !== null;
    parts.push(
      h("button", {
        type: "button",
        class: "heatmap-toggle",
        "data-role": "heatmap-toggle",
        "aria-pressed": String(pressed),
        disabled: entry.heatmapBusy,
        text: entry.heatmapBusy ? "Computing heatmap…" : pressed ? "Hide heatmap" : "Show heatmap",
        onclick: () => toggleHeatmap(entry),
      }),
    );
    if (pressed) {
      parts.push(
        h(
          "figure",
          { class: "heatmap" },
          h("img", { src: entry.heatmap, alt: `Grad-CAM heatmap over ${entry.file.name}` }),
          h("figcaption", { text: "Grad-CAM: warm colours mark where the model found its evidence." }),
        ),
      );
    }
    return h("div", {}, ...parts);
  }

  function probabilityBar(r) {
    const p = Math.min(1, Math.max(0, r.probability));
    const t = Math.min(1, Math.max(0, r.threshold));
    const tone = r.ood ? " unscored" : p >= t ? " above" : ""; // grey: no label, no alarm colour
    const fill = h("div", { class: `bar-fill${tone}` });
    fill.style.width = `${(p * 100).toFixed(1)}%`;
    const mark = h("div", { class: "bar-mark", title: `threshold ${fmt(t)}` });
    mark.style.left = `${(t * 100).toFixed(1)}%`;
    return h(
      "div",
      { class: "bar", role: "img", "aria-label": `Probability of pneumonia ${fmt(p)}; threshold ${fmt(t)}` },
      fill,
      mark,
    );
  }

  // ---- CSV -----------------------------------------------------------------------------

  function csvCell(value) {
    let text = value === null || value === undefined ? "" : String(value);
    if (/^[=+\-@\t\r]/.test(text) && typeof value === "string") text = `'${text}`; // no spreadsheet formulas
    return /[",\n\r]/.test(text) ? `"${text.replace(/"/g, '""')}"` : text;
  }

  function downloadCsv() {
    const rows = sorted()
      .filter((e) => e.result)
      .map((e) => state.fields.map((f) => csvCell(e.result[f])).join(","));
    const blob = new Blob([[state.fields.join(","), ...rows].join("\r\n") + "\r\n"], { type: "text/csv" });
    const url = URL.createObjectURL(blob);
    const link = h("a", { href: url, download: "pneumoscan-results.csv" });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
    say(`Downloaded pneumoscan-results.csv (${rows.length} rows).`);
  }

  function clearAll() {
    for (const entry of state.entries) if (entry.thumbUrl) URL.revokeObjectURL(entry.thumbUrl);
    state.entries = [];
    ui.list.replaceChildren();
    render();
    say("Cleared.");
    ui.drop.focus();
  }

  // ---- wiring --------------------------------------------------------------------------

  ui.drop.addEventListener("click", () => ui.input.click());
  ui.input.addEventListener("change", () => {
    addFiles(ui.input.files);
    ui.input.value = ""; // choosing the same file again still fires `change`
  });
  for (const name of ["dragenter", "dragover"]) {
    ui.drop.addEventListener(name, (event) => {
      event.preventDefault();
      ui.drop.classList.add("dragging");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    ui.drop.addEventListener(name, () => ui.drop.classList.remove("dragging"));
  }
  ui.drop.addEventListener("drop", (event) => {
    event.preventDefault();
    addFiles(event.dataTransfer.files);
  });
  // A file dropped beside the drop zone must not make the browser navigate away to it.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
  ui.mode.addEventListener("change", () => {
    if (state.entries.length) score(state.entries);
  });
  ui.csv.addEventListener("click", downloadCsv);
  ui.clear.addEventListener("click", clearAll);

  loadModel();
})();
