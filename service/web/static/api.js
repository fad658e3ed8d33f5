// Calls to the service's HTTP API with the page's API key; non-2xx answers become ApiError
// carrying the service's JSON error ({"error": {"code", "message", "details"?}}).

export class ApiError extends Error {
  constructor(status, code, message, body) {
    super(message);
    this.status = status;  // 0: the request never got an answer
    this.code = code;
    this.body = body;  // the parsed JSON error, or the raw text of a non-JSON answer
  }
}

export async function call(path, { key = "", method = "POST", body, contentType, query = {}, json } = {}) {
  const url = new URL(path, document.baseURI);
  for (const [name, value] of Object.entries(query)) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(name, value);
  }
  const headers = {};
  if (key) headers.Authorization = `Bearer ${key}`;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (contentType) {
    headers["Content-Type"] = contentType;
  }
  let response;
  try {
    response = await fetch(url, { method, headers, body });
  } catch (error) {
    throw new ApiError(0, "network_error", `the request did not reach the service (${error.message})`, null);
  }
  if (response.ok) return response;
  const text = await response.text();
  let parsed = null;
  try {
    parsed = JSON.parse(text);
  } catch {
    // not JSON: a proxy's page, say; shown as text
  }
  const error = parsed && parsed.error;
  throw new ApiError(response.status, error ? error.code : `http_${response.status}`,
                     error ? error.message : text.slice(0, 500), parsed ?? text);
}

// The body of a timed call, with its wall time in milliseconds (upload, compute and download).
export async function timed(path, options) {
  const start = performance.now();
  const response = await call(path, options);
  const buffer = await response.arrayBuffer();
  return { response, buffer, ms: performance.now() - start };
}
