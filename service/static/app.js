// The inspector page: pick a model and an image, see the top-5, run an analysis, follow it,
// see its result. State lives in this module; the API is the only source of data.

import { ApiError, apiKey, forgetBlobs, getJSON, jobPath } from "./api.js";
import { $, clear, fmt, h } from "./dom.js";
import { follow, isTerminal } from "./follow.js";
import { buildForm } from "./form.js";
import * as history from "./history.js";
import { renderResult } from "./results.js";

const state = {
  models: new Map(),
  kinds: new Map(),
  image: null, // {blob, name, url}
  form: null,
  jobId: null,
  follow: null, // AbortController of the job being followed
  predict: null, // AbortController of the top-5 request in flight
  countdown: null, // interval of a 429's "retry in N s"
  waiting: false, // Run is disabled until that countdown ends
};

const el = {
  key: $("#api-key"),
  keyError: $("#key-error"),
  banner: $("#banner"),
  model: $("#model"),
  modelInfo: $("#model-info"),
  kind: $("#kind"),
  kindInfo: $("#kind-info"),
  file: $("#image-file"),
  drop: $("#drop"),
  imageError: $("#image-error"),
  imageOptional: $("#image-optional"),
  imageClear: $("#image-clear"),
  preview: $("#preview"),
  previewImg: $("#preview-img"),
  previewName: $("#preview-name"),
  top5: $("#top5"),
  form: $("#params-form"),
  uploads: $("#uploads"),
  fields: $("#fields"),
  rawToggle: $("#raw-toggle"),
  rawBox: $("#raw-box"),
  raw: $("#raw"),
  rawError: $("#raw-error"),
  formError: $("#form-error"),
  submit: $("#submit"),
  cancel: $("#cancel"),
  progressBox: $("#progress-box"),
  progress: $("#progress"),
  progressText: $("#progress-text"),
  jobHead: $("#job-head"),
  result: $("#result"),
  history: $("#history"),
  labels: $("#labels-list"),
};

// --- messages --------------------------------------------------------------------------------

function say(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}

function banner(message) {
  say(el.banner, message);
}

function clearErrors() {
  for (const n of [el.keyError, el.imageError, el.rawError, el.formError]) say(n, "");
  for (const n of el.uploads.querySelectorAll(".field-error")) say(n, "");
  state.form?.clearErrors();
  banner("");
}

/** Shows an API error where it belongs; `where` is the element for errors of no field. */
function showError(err, where = el.formError) {
  if (!(err instanceof ApiError)) {
    if (err?.name === "AbortError") return;
    banner(`Unexpected error: ${err?.message || err}`);
    return;
  }
  const text = `${err.message}`;
  if (err.status === 401) {
    say(el.keyError, `${text}. Enter the API key above.`);
    el.key.focus();
  } else if (err.status === 503 || err.status === 0) {
    banner(err.retryAfter ? `${text} (retry in ${err.retryAfter} s)` : text);
  } else if (err.status === 429) {
    countdown(where, text, err.retryAfter ?? 1);
  } else if ([400, 413, 415].includes(err.status)) {
    const upload = [...el.uploads.querySelectorAll("input[type=file]")].find((i) => text.includes(`'${i.name}'`));
    say(upload ? upload.closest(".field").querySelector(".field-error") : el.imageError, text);
  } else if (err.status === 422 && Array.isArray(err.details) && state.form && where === el.formError) {
    say(el.formError, text);
    for (const d of err.details) {
      const loc = (d.loc || []).filter((p) => p !== "body" && p !== "params");
      const node = state.form.locate(loc);
      const msg = d.msg || d.message || JSON.stringify(d);
      if (node === state.form.root) say(el.formError, `${text}: ${msg}`);
      else node.showError(node.errorEl.textContent ? `${node.errorEl.textContent}; ${msg}` : msg);
    }
  } else {
    say(where, text);
  }
}

/** 429: the message with a live "retry in N s", Run disabled until then. */
function countdown(where, text, seconds) {
  clearInterval(state.countdown);
  let left = Math.max(1, Math.ceil(seconds));
  state.waiting = true;
  el.submit.disabled = true;
  const tick = () => {
    if (left <= 0) {
      clearInterval(state.countdown);
      say(where, "");
      state.waiting = false;
      el.submit.disabled = false;
      return;
    }
    say(where, `${text}: retry in ${left} s`);
    left -= 1;
  };
  tick();
  state.countdown = setInterval(tick, 1000);
}

// --- catalogue: models and kinds -------------------------------------------------------------

async function loadCatalog() {
  try {
    const [models, methods] = await Promise.all([getJSON("/v1/models"), getJSON("/v1/methods")]);
    say(el.keyError, "");
    state.models = new Map(models.models.map((m) => [m.id, m]));
    state.kinds = new Map(methods.kinds.map((k) => [k.kind, k]));
    const keepModel = el.model.value;
    const keepKind = el.kind.value;
    el.model.replaceChildren(...models.models.map((m) => h("option", { value: m.id }, m.id)));
    el.kind.replaceChildren(...methods.kinds.map((k) => h("option", { value: k.kind }, k.kind)));
    if (state.models.has(keepModel)) el.model.value = keepModel;
    if (state.kinds.has(keepKind)) el.kind.value = keepKind;
    modelChanged(false);
    kindChanged();
    document.body.dataset.ready = String(Math.round(performance.now()));
    return true;
  } catch (err) {
    showError(err, el.keyError);
    return false;
  }
}

const currentModel = () => state.models.get(el.model.value);
const currentKind = () => state.kinds.get(el.kind.value);
const labels = () => currentModel()?.labels || [];

function modelChanged(predictAgain = true) {
  const m = currentModel();
  if (!m) return;
  const [hgt, wid] = m.input_size;
  say(
    el.modelInfo,
    `${m.description} — input ${wid}×${hgt} ${m.input_mode}, ${m.num_classes} classes` +
      (m.has_training_set ? ", training set registered" : ""),
  );
  el.labels.replaceChildren(...m.labels.map((l, i) => h("option", { value: `${i}: ${l}` })));
  if (predictAgain) predict();
}

function kindChanged() {
  const k = currentKind();
  if (!k) return;
  clearErrors();
  say(el.kindInfo, k.description);
  el.imageOptional.hidden = k.min_images !== 0;
  state.form = buildForm(k.params_schema, { labels, labelsList: "labels-list" });
  el.fields.replaceChildren(state.form.el);
  el.uploads.replaceChildren(
    ...k.files.map((f) => {
      const input = h("input", { type: "file", name: f.name, id: `upload-${f.name}` });
      const err = h("p.field-error", { role: "alert", hidden: true, id: `upload-${f.name}-error` });
      const help = h("p.help", { id: `upload-${f.name}-help` }, f.description);
      input.setAttribute("aria-describedby", `${help.id} ${err.id}`);
      return h(
        "div.field.upload",
        { dataset: { field: `upload:${f.name}` } },
        h("label", { for: input.id }, `${f.name} (optional upload)`),
        input,
        help,
        err,
      );
    }),
  );
  if (el.rawToggle.checked) el.raw.value = JSON.stringify(state.form.value(), null, 2);
}

// --- the image and its top-5 -----------------------------------------------------------------

function setImage(blob, name) {
  if (state.image?.url) URL.revokeObjectURL(state.image.url);
  if (!blob) {
    state.image = null;
    el.preview.hidden = true;
    el.imageClear.hidden = true;
    el.file.value = "";
    return;
  }
  state.image = { blob, name, url: URL.createObjectURL(blob) };
  el.previewImg.src = state.image.url;
  el.previewName.textContent = `${name} (${Math.round(blob.size / 102.4) / 10} KB)`;
  el.preview.hidden = false;
  el.imageClear.hidden = false;
  predict();
}

async function predict() {
  const m = currentModel();
  state.predict?.abort();
  clear(el.top5);
  say(el.imageError, "");
  if (!state.image || !m) return;
  const ctrl = new AbortController();
  state.predict = ctrl;
  const body = new FormData();
  body.append("image", state.image.blob, state.image.name);
  body.append("top_k", "5");
  el.top5.append(h("p.help", {}, "predicting…"));
  try {
    const res = await getJSON(`/v1/models/${encodeURIComponent(m.id)}/predict`, {
      method: "POST",
      body,
      signal: ctrl.signal,
    });
    const top = res.predictions[0].top;
    el.top5.replaceChildren(
      h("h3", {}, `Top-5 of ${m.id}`),
      h(
        "ol.top5",
        {},
        top.map((c) =>
          h(
            "li",
            { dataset: { index: String(c.index) } },
            h("span.label", {}, c.label),
            h("meter", { min: "0", max: "1", value: String(c.probability), "aria-label": `probability of ${c.label}` }),
            h("span.prob", {}, `${(100 * c.probability).toFixed(1)}%`),
          ),
        ),
      ),
    );
  } catch (err) {
    if (err.name === "AbortError") return;
    clear(el.top5);
    showError(err, el.imageError);
  }
}

function imageFromTransfer(list) {
  const file = [...(list || [])].find((f) => f.kind === undefined || f.kind === "file");
  const blob = file?.getAsFile ? file.getAsFile() : file;
  if (blob) setImage(blob, blob.name || "pasted image");
}

// --- raw JSON ----------------------------------------------------------------------------------

function parseRaw() {
  try {
    const v = JSON.parse(el.raw.value || "{}");
    if (!v || typeof v !== "object" || Array.isArray(v)) throw new Error("params must be a JSON object");
    return v;
  } catch (e) {
    say(el.rawError, `Not valid params JSON: ${e.message}`);
    return null;
  }
}

function setRaw(on) {
  say(el.rawError, "");
  if (on) {
    el.raw.value = JSON.stringify(state.form.value(), null, 2);
  } else {
    const v = parseRaw();
    if (v === null) {
      el.rawToggle.checked = true;
      return;
    }
    state.form.set(v);
  }
  el.rawToggle.checked = on;
  el.rawBox.hidden = !on;
  el.fields.hidden = on;
}

// --- submit, follow, cancel --------------------------------------------------------------------

async function submit(event) {
  event.preventDefault();
  clearErrors();
  const kind = currentKind();
  const model = currentModel();
  if (!kind || !model) return;
  let params;
  const raw = el.rawToggle.checked;
  if (raw) {
    params = parseRaw();
    if (params === null) return;
  } else {
    const errors = state.form.validate();
    if (errors.length) {
      for (const { node, message } of errors) node.showError(message);
      say(el.formError, `${errors.length} field(s) to fix before running`);
      errors[0].node.el.querySelector("input, select, textarea")?.focus();
      return;
    }
    params = state.form.value();
  }
  if (kind.min_images > 0 && !state.image) {
    say(el.imageError, "Choose an image first (file, drop, paste or a sample).");
    el.file.focus();
    return;
  }
  const body = new FormData();
  if (state.image) body.append("image", state.image.blob, state.image.name);
  body.append("model_id", model.id);
  body.append("params", JSON.stringify(params));
  for (const input of el.uploads.querySelectorAll("input[type=file]")) {
    if (input.files[0]) body.append(input.name, input.files[0], input.files[0].name);
  }
  el.submit.disabled = true;
  const t0 = performance.now();
  try {
    const view = await getJSON(`/v1/jobs/${encodeURIComponent(kind.kind)}`, { method: "POST", body });
    document.body.dataset.submitted = String(t0);
    history.remember(view);
    state.jobId = view.id; // before the hash changes: hashchange then sees the job is already open
    location.hash = `job=${encodeURIComponent(view.id)}`;
    openJob(view);
  } catch (err) {
    if (raw && err instanceof ApiError && err.status === 422) {
      setRaw(false); // the fields take the sent JSON, so each error lands next to its field
    }
    showError(err);
  } finally {
    el.submit.disabled = state.waiting;
  }
}

function progressText(v) {
  const p = v.progress || {};
  const count = p.total ? ` ${p.done}/${p.total}` : "";
  return `${v.status}: ${p.stage || ""}${count}`;
}

function showProgress(v) {
  const p = v.progress || {};
  el.progressBox.hidden = false;
  if (p.total) {
    el.progress.max = p.total;
    el.progress.value = Math.min(p.done, p.total);
  } else if (v.status === "finished") {
    el.progress.max = 1;
    el.progress.value = 1;
  } else {
    el.progress.removeAttribute("value"); // indeterminate
  }
  const text = progressText(v);
  if (el.progressText.textContent !== text) el.progressText.textContent = text;
  el.cancel.hidden = isTerminal(v.status);
  renderHead(v);
}

function renderHead(v, note = "") {
  const times = [];
  if (v.created_at && v.ended_at) times.push(`took ${fmt((Date.parse(v.ended_at) - Date.parse(v.created_at)) / 1000)} s`);
  el.jobHead.replaceChildren(
    h(
      "p.job",
      { dataset: { status: v.status } },
      h("strong", {}, v.kind),
      ` on ${v.model_id} · `,
      h("span.status", {}, v.status),
      times.length ? ` · ${times.join(", ")}` : "",
      v.deduplicated ? " · reused an identical earlier job" : "",
      " · ",
      h("a", { href: `#job=${encodeURIComponent(v.id)}` }, "link to this result"),
    ),
    note ? h("p", {}, note) : "",
    v.error ? h("p.field-error", { role: "alert" }, `${v.error.type}: ${v.error.message}`) : "",
  );
}

/** Shows a job (a view, or an id to fetch) and follows it until it ends. */
async function openJob(viewOrId) {
  state.follow?.abort();
  const ctrl = new AbortController();
  state.follow = ctrl;
  const id = typeof viewOrId === "string" ? viewOrId : viewOrId.id;
  state.jobId = id;
  forgetBlobs(id);
  clear(el.result);
  delete el.result.dataset.job;
  el.progressBox.hidden = true;
  el.cancel.hidden = true;
  history.render(el.history, id);
  let view = typeof viewOrId === "string" ? null : viewOrId;
  try {
    if (!view) view = await getJSON(jobPath(id), { signal: ctrl.signal });
    showProgress(view);
    if (!isTerminal(view.status)) {
      view = await follow(id, (v) => ctrl.signal.aborted || showProgress({ ...view, ...v }), ctrl.signal);
    }
    if (ctrl.signal.aborted) return;
    showProgress(view);
    history.remember(view);
    history.render(el.history, id);
    el.cancel.hidden = true;
    if (view.status === "finished") {
      await renderResult(view, el.result);
    } else if (view.status === "canceled") {
      el.result.append(h("p", {}, "The job was canceled."));
    }
    if (!ctrl.signal.aborted) {
      el.result.dataset.drawnAt = String(performance.now()); // what benchmarks/ui.py reads
      el.result.dataset.job = id; // drawn
    }
  } catch (err) {
    if (err.name === "AbortError" || ctrl.signal.aborted) return;
    el.progressBox.hidden = true;
    if (err instanceof ApiError && err.status === 404) {
      el.jobHead.replaceChildren(h("p.field-error", { role: "alert" }, `Job ${id}: not found or expired.`));
    } else {
      el.jobHead.replaceChildren();
      showError(err, el.jobHead.appendChild(h("p.field-error", { role: "alert" })));
    }
  }
}

async function cancel() {
  if (!state.jobId) return;
  el.cancel.disabled = true;
  try {
    const view = await getJSON(jobPath(state.jobId), { method: "DELETE" });
    showProgress(view);
  } catch (err) {
    showError(err);
  } finally {
    el.cancel.disabled = false;
  }
}

function openFromHash() {
  const m = location.hash.match(/^#job=([^&]+)/);
  if (!m) return;
  const id = decodeURIComponent(m[1]);
  if (id !== state.jobId || !state.follow) openJob(id);
}

// --- wiring ------------------------------------------------------------------------------------

async function useKey(event) {
  event?.preventDefault();
  apiKey.set(el.key.value.trim());
  say(el.keyError, "");
  banner("");
  if (await loadCatalog()) {
    state.jobId = null;
    openFromHash();
  }
}

function wire() {
  el.key.value = apiKey.get();
  $("#key-form").addEventListener("submit", useKey);
  $("#key-forget").addEventListener("click", () => {
    el.key.value = "";
    apiKey.set("");
  });
  el.model.addEventListener("change", () => modelChanged());
  el.kind.addEventListener("change", kindChanged);
  el.file.addEventListener("change", () => el.file.files[0] && setImage(el.file.files[0], el.file.files[0].name));
  el.drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    el.drop.classList.add("over");
  });
  el.drop.addEventListener("dragleave", () => el.drop.classList.remove("over"));
  el.drop.addEventListener("drop", (e) => {
    e.preventDefault();
    el.drop.classList.remove("over");
    imageFromTransfer(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => {
    if (e.target.closest?.("input[type=text], input[type=search], input[type=number], textarea")) return;
    const files = [...(e.clipboardData?.items || [])].filter((i) => i.kind === "file");
    if (files.length) imageFromTransfer(files);
  });
  for (const b of document.querySelectorAll(".samples button[data-src]")) {
    b.addEventListener("click", async () => {
      const res = await fetch(b.dataset.src);
      setImage(await res.blob(), b.dataset.name);
    });
  }
  el.imageClear.addEventListener("click", () => setImage(null));
  el.rawToggle.addEventListener("change", () => setRaw(el.rawToggle.checked));
  el.form.addEventListener("submit", submit);
  el.cancel.addEventListener("click", cancel);
  $("#history-clear").addEventListener("click", () => {
    history.clearAll();
    history.render(el.history, state.jobId);
  });
  window.addEventListener("hashchange", openFromHash);
  history.render(el.history, null);
}

wire();
loadCatalog().then((ok) => ok && openFromHash());
