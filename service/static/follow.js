// Following a job until it ends: Server-Sent Events read with fetch streaming (EventSource
// cannot send the Authorization header), polling GET /v1/jobs/{id} every 0.5 s as the fallback.

import { ApiError, getJSON, jobPath, request } from "./api.js";

const TERMINAL = new Set(["finished", "failed", "canceled"]);
export const POLL_MS = 500;
export const isTerminal = (status) => TERMINAL.has(status);

/** Calls onUpdate(view) on every status/progress change; resolves to the terminal job view. */
export async function follow(id, onUpdate, signal) {
  try {
    return await viaEvents(id, onUpdate, signal);
  } catch (e) {
    if (e.name === "AbortError" || (e instanceof ApiError && e.status >= 400 && e.status < 500)) throw e;
    return poll(id, onUpdate, signal);
  }
}

async function viaEvents(id, onUpdate, signal) {
  const res = await request(`${jobPath(id)}/events`, { signal, headers: { Accept: "text/event-stream" } });
  if (!res.body) throw new Error("no streaming body");
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      // Line ends may be CRLF, LF or CR; a CR at the end may be half of a CRLF still to come.
      const keep = buf.endsWith("\r") ? "\r" : "";
      buf = buf.slice(0, buf.length - keep.length).replace(/\r\n?/g, "\n") + keep;
      let end;
      while ((end = buf.indexOf("\n\n")) >= 0) {
        const { event, data } = parseEvent(buf.slice(0, end));
        buf = buf.slice(end + 2);
        if (!data) continue;
        const view = JSON.parse(data);
        onUpdate(view);
        if (event === "end") return view;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
  throw new Error("the event stream closed before the job ended");
}

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // comment (keep-alive ping)
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const value = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return { event, data: data.join("\n") };
}

async function poll(id, onUpdate, signal) {
  for (;;) {
    const view = await getJSON(jobPath(id), { signal });
    onUpdate(view);
    if (isTerminal(view.status)) return view;
    await new Promise((resolve, reject) => {
      const t = setTimeout(resolve, POLL_MS);
      signal?.addEventListener("abort", () => {
        clearTimeout(t);
        reject(new DOMException("aborted", "AbortError"));
      });
    });
  }
}
