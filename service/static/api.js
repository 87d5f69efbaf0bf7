// Talking to the API: every call carries the key as "Authorization: Bearer" (never in a URL),
// and every error becomes an ApiError with the API's {"error": {type, message, details}}.

const KEY = "inspector.apiKey";

export const apiKey = {
  get: () => localStorage.getItem(KEY) || "",
  set(value) {
    if (value) localStorage.setItem(KEY, value);
    else localStorage.removeItem(KEY);
  },
};

export class ApiError extends Error {
  constructor(status, type, message, details = null, retryAfter = null) {
    super(message);
    this.status = status;
    this.type = type;
    this.details = details;
    this.retryAfter = retryAfter;
  }

  static async from(res) {
    let body = null;
    try {
      body = await res.json();
    } catch {
      // not JSON: a proxy's page, say
    }
    const err = (body && body.error) || {};
    const retry = Number.parseInt(res.headers.get("Retry-After") || "", 10);
    return new ApiError(
      res.status,
      err.type || "http_error",
      err.message || `${res.status} ${res.statusText}`,
      err.details ?? null,
      Number.isFinite(retry) ? retry : null,
    );
  }
}

/** fetch(path) with the key; resolves to the Response when ok, throws ApiError otherwise. */
export async function request(path, { method = "GET", body, signal, headers = {} } = {}) {
  const key = apiKey.get();
  const all = { ...headers };
  if (key) all.Authorization = `Bearer ${key}`;
  let res;
  try {
    res = await fetch(path, { method, body, signal, headers: all, cache: "no-store" });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "network", "the API cannot be reached");
  }
  if (!res.ok) throw await ApiError.from(res);
  return res;
}

export const getJSON = async (path, opts) => (await request(path, opts)).json();

export const jobPath = (id) => `/v1/jobs/${encodeURIComponent(id)}`;
export const artifactPath = (id, name) => `${jobPath(id)}/artifacts/${encodeURIComponent(name)}`;

/** Artifacts as blob URLs (an <img src> cannot send the key), cached per job and name. */
const blobs = new Map();
export async function blobURL(id, name) {
  const k = `${id}/${name}`;
  if (!blobs.has(k)) {
    const p = request(artifactPath(id, name))
      .then((r) => r.blob())
      .then((b) => URL.createObjectURL(b));
    blobs.set(k, p);
    p.catch(() => blobs.delete(k));
  }
  return blobs.get(k);
}

/** Frees the blob URLs of every job but `keep` (the page shows one job at a time). */
export function forgetBlobs(keep) {
  for (const [k, p] of blobs) {
    if (k.startsWith(`${keep}/`)) continue;
    blobs.delete(k);
    p.then((url) => URL.revokeObjectURL(url)).catch(() => {});
  }
}

export async function artifactText(id, name) {
  return (await request(artifactPath(id, name))).text();
}
