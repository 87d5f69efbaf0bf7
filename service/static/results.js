// Result views: one per kind where the kind has a natural layout, a generic one otherwise
// (PNG inline, CSV as sortable tables, JSON as a tree). Every artifact is downloadable.
// Artifacts are fetched with the key into blob URLs; nothing from the job is parsed as HTML.

import { artifactText, blobURL } from "./api.js";
import { fmt, h } from "./dom.js";

const MAP_KINDS = new Set(["saliency", "attribution", "occlusion_map"]);

/** Draws the terminal job `view` into `box`; resolves when every image and table is in place. */
export async function renderResult(view, box) {
  const names = new Set(view.artifacts.map((a) => a.name));
  const parts = [];
  const art = (name, caption, alt) => (names.has(name) ? image(view.id, name, caption, alt) : null);
  const table = (name, caption) => (names.has(name) ? csvTable(view.id, name, caption) : null);
  const shown = new Set();
  const use = (...ns) => ns.forEach((n) => shown.add(n));
  const r = view.result || {};

  if (MAP_KINDS.has(view.kind)) {
    (r.images || []).forEach((img, i) => {
      use(`${i}-input.png`, `${i}-heatmap.png`, `${i}-overlay.png`);
      parts.push(mapView(view, i, img, names));
    });
  } else if (view.kind === "compare") {
    use("compare-grid.png", "compare.csv");
    parts.push(art("compare-grid.png", "Attribution maps per method", "grid of attribution maps"));
    parts.push(table("compare.csv", "Methods compared (click a column to sort)"));
  } else if (view.kind === "u_analysis") {
    (r.images || []).forEach((img, i) => {
      use(`${i}-curve.png`, `${i}-strip.png`, `${i}-regions.png`);
      parts.push(uView(art, i, img));
    });
  } else if (view.kind === "u_sweep") {
    for (const a of view.artifacts) {
      if (/^u_occurrence_.+\.png$/.test(a.name)) {
        use(a.name);
        parts.push(art(a.name, `U occurrence by ${a.name.slice(12, -4)}`, a.name));
      }
    }
    use("by_hyperparameter.csv");
    parts.push(table("by_hyperparameter.csv", "U occurrence by hyperparameter value"));
  } else if (view.kind === "influence") {
    parts.push(warnings(r.warnings));
    for (const a of view.artifacts) {
      const m = a.name.match(/^(top|layers)_(\d+)\.png$/);
      if (m) {
        use(a.name);
        const what = m[1] === "top" ? "Most influential training images" : "Influence per layer";
        parts.push(art(a.name, `${what}, test image ${m[2]}`, a.name));
      }
    }
  } else if (view.kind === "influence_groups") {
    parts.push(warnings(r.warnings));
    use("curves.png", "groups_clustering.png");
    parts.push(art("curves.png", "Influence per layer, by group", "influence curves"));
    parts.push(art("groups_clustering.png", "Groups clustered by their layer profile", "clustering"));
  }
  // Whatever the kind-specific view did not show: PNGs inline, CSVs as tables.
  for (const a of view.artifacts) {
    if (shown.has(a.name)) continue;
    if (a.media_type === "image/png") parts.push(art(a.name, a.name, a.name));
    else if (a.media_type.startsWith("text/csv")) parts.push(table(a.name, a.name));
  }
  parts.push(h("details.json", {}, h("summary", {}, "Result (JSON)"), jsonTree(r)));
  parts.push(downloads(view));
  const els = await Promise.all(parts.filter(Boolean));
  box.append(...els.filter(Boolean));
}

function warnings(list) {
  if (!Array.isArray(list) || !list.length) return null;
  return h("div.warnings", { role: "note" }, h("h4", {}, "Warnings"), h("ul", {}, list.map((w) => h("li", {}, typeof w === "string" ? w : JSON.stringify(w)))));
}

/** Input, heatmap and overlay side by side, then the heatmap over the input with an opacity slider. */
async function mapView(view, i, img, names) {
  const [input, heat, over] = await Promise.all(
    [`${i}-input.png`, `${i}-heatmap.png`, `${i}-overlay.png`].map((n) => (names.has(n) ? blobURL(view.id, n) : null)),
  );
  const fig = (url, caption, alt) => (url ? h("figure", {}, h("img", { src: url, alt }), h("figcaption", {}, caption)) : null);
  const slider = h("input", { type: "range", min: "0", max: "100", value: "60", id: `opacity-${i}` });
  const layer = heat ? h("img.layer", { src: heat, alt: "heatmap layer" }) : null;
  const setOpacity = () => layer && (layer.style.opacity = String(Number(slider.value) / 100));
  slider.addEventListener("input", setOpacity);
  setOpacity();
  const blend =
    input && heat
      ? h(
          "figure.blend",
          {},
          h("div.stack", {}, h("img.base", { src: input, alt: "input under the heatmap layer" }), layer),
          h("figcaption", {}, h("label", { for: slider.id }, "Heatmap opacity "), slider),
        )
      : null;
  const label = img.label !== undefined ? `${img.label} (class ${img.target})` : "";
  const prob = typeof img.probability === "number" ? `, p = ${fmt(img.probability)}` : "";
  return h(
    "section.image-result",
    {},
    h("h4", {}, `Image ${i}: ${label}${prob}`),
    h(
      "div.side",
      {},
      fig(input, "Input (model size)", "input at model size"),
      fig(heat, "Heatmap", "heatmap"),
      fig(over, "Overlay", "heatmap over the input"),
      blend,
    ),
  );
}

async function uView(art, i, img) {
  const [curve, regions, strip] = await Promise.all([
    art(`${i}-curve.png`, "Target probability as regions are replaced", "U Analysis curve"),
    art(`${i}-regions.png`, "Region importance", "regions over the image"),
    art(`${i}-strip.png`, "U-triples: left, middle, right", "images of the U-triples"),
  ]);
  return h(
    "section.image-result",
    {},
    h("h4", {}, `Image ${i}: ${img.label ?? ""}`),
    h("div.side", {}, curve, regions),
    strip,
    triplesTable(img),
  );
}

function triplesTable(img) {
  const rows = (img.triples || []).map((t) => [t.left, t.middle, t.right, (t.suppressors || []).join(" "), (t.removed || []).join(" ")]);
  const note = img.has_u ? `${rows.length} U-triple(s)` : "no U-triple: the prediction never came back";
  return sortable(["left", "middle", "right", "suppressor regions", "removed regions"], rows, `U-triples of image (${note})`, "triples");
}

async function image(id, name, caption, alt) {
  const url = await blobURL(id, name);
  return h("figure", { dataset: { artifact: name } }, h("img", { src: url, alt }), h("figcaption", {}, caption));
}

async function csvTable(id, name, caption) {
  const rows = parseCSV(await artifactText(id, name)).filter((r) => r.length > 1 || r[0] !== "");
  const [head = [], ...body] = rows;
  return sortable(head, body, caption, name);
}

/** RFC 4180: quoted fields, doubled quotes, commas and newlines inside quotes. */
export function parseCSV(text) {
  const rows = [];
  let row = [];
  let field = "";
  let quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') {
        field += '"';
        i++;
      } else if (c === '"') quoted = false;
      else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") {
      row.push(field);
      field = "";
    } else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      row.push(field);
      rows.push(row);
      row = [];
      field = "";
    } else field += c;
  }
  if (field !== "" || row.length) rows.push([...row, field]);
  return rows;
}

/** A table whose column headers sort it (numbers as numbers), with aria-sort. */
function sortable(head, body, caption, name) {
  const tbody = h("tbody");
  const fill = (rows) => tbody.replaceChildren(...rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, fmtCell(c))))));
  fill(body);
  let state = { col: -1, dir: 1 };
  const ths = head.map((title, col) =>
    h(
      "th",
      { scope: "col", "aria-sort": "none" },
      h(
        "button",
        {
          type: "button",
          onclick: () => {
            state = { col, dir: state.col === col ? -state.dir : 1 };
            const sorted = [...body].sort((a, b) => state.dir * compare(a[col], b[col]));
            fill(sorted);
            ths.forEach((th, j) => th.setAttribute("aria-sort", j === col ? (state.dir > 0 ? "ascending" : "descending") : "none"));
          },
        },
        title,
      ),
    ),
  );
  return h(
    "div.table-wrap",
    { dataset: { table: name } },
    h("table", {}, h("caption", {}, caption), h("thead", {}, h("tr", {}, ths)), tbody),
  );
}

function fmtCell(c) {
  if (typeof c === "number") return fmt(c);
  const n = Number(c);
  return c !== "" && typeof c === "string" && Number.isFinite(n) && /\./.test(c) ? fmt(n) : String(c ?? "");
}

function compare(a, b) {
  const x = Number(a);
  const y = Number(b);
  if (a !== "" && b !== "" && Number.isFinite(x) && Number.isFinite(y)) return x - y;
  return String(a).localeCompare(String(b));
}

/** A collapsible tree of any JSON value (text only). */
export function jsonTree(v, key = null) {
  const k = key === null ? null : h("span.key", {}, `${key}: `);
  if (v && typeof v === "object") {
    const entries = Array.isArray(v) ? v.map((x, i) => [i, x]) : Object.entries(v);
    const summary = Array.isArray(v) ? `[${v.length}]` : `{${entries.length}}`;
    return h(
      "details.tree",
      { open: key === null },
      h("summary", {}, k, summary),
      h("ul", {}, entries.map(([ck, cv]) => h("li", {}, jsonTree(cv, ck)))),
    );
  }
  return h("span.leaf", {}, k, h("span.value", {}, typeof v === "string" ? JSON.stringify(v) : fmt(v)));
}

function downloads(view) {
  const items = view.artifacts.map((a) => {
    const link = h("a", { href: "#", download: a.name }, a.name);
    link.addEventListener("click", async (e) => {
      if (link.dataset.ready) return; // the blob URL is in place: let the browser download it
      e.preventDefault();
      link.href = await blobURL(view.id, a.name);
      link.dataset.ready = "1";
      link.click();
    });
    return h("li", {}, link, h("span.size", {}, ` ${a.media_type}, ${fmtBytes(a.size)}`));
  });
  return h("details.downloads", {}, h("summary", {}, `Download artifacts (${items.length})`), h("ul", {}, items));
}

const fmtBytes = (n) => (n < 1024 ? `${n} B` : n < 1 << 20 ? `${(n / 1024).toFixed(1)} KB` : `${(n / (1 << 20)).toFixed(1)} MB`);
