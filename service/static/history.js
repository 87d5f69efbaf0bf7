// The browser's last 50 jobs (localStorage), each a deep link #job=<id>.

import { h } from "./dom.js";

const KEY = "inspector.history";
const MAX = 50;

export function load() {
  try {
    const list = JSON.parse(localStorage.getItem(KEY) || "[]");
    return Array.isArray(list) ? list : [];
  } catch {
    return [];
  }
}

function save(list) {
  localStorage.setItem(KEY, JSON.stringify(list.slice(0, MAX)));
}

/** Adds or updates a job (newest first). */
export function remember(view) {
  const list = load();
  const i = list.findIndex((e) => e.id === view.id);
  const entry = {
    id: view.id,
    kind: view.kind,
    model_id: view.model_id,
    status: view.status,
    created_at: view.created_at || (i >= 0 ? list[i].created_at : new Date().toISOString()),
  };
  if (i >= 0) list[i] = entry;
  else list.unshift(entry);
  save(list);
}

export function clearAll() {
  save([]);
}

export function render(ol, currentId) {
  ol.replaceChildren(
    ...load().map((e) => {
      const when = e.created_at ? new Date(e.created_at).toLocaleString() : "";
      const link = h("a", { href: `#job=${encodeURIComponent(e.id)}` }, `${e.kind} on ${e.model_id}`);
      if (e.id === currentId) link.setAttribute("aria-current", "true");
      return h("li", { dataset: { job: e.id } }, link, " ", h(`span.status.s-${e.status}`, {}, e.status), " ", h("time", { datetime: e.created_at || "" }, when));
    }),
  );
}
