// The LoRA check page: one /v1/generate request at a time (the page never floods the queue), a tile
// per answer as it arrives, and the contact sheet drawn on demand from the tiles.

const KEY_STORAGE = "sdxl-lora-api-key"; // sessionStorage only: the key leaves with the tab
const BUSY_RETRIES = 5; // a `busy` answer is retried after its Retry-After, this many times
const SHEET = { cell: 256, header: 28, label: 22, pad: 8 }; // contact sheet layout, in pixels

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

class RequestFailed extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

// -- talking to the service ---------------------------------------------------------------------

function authHeaders() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  return key ? { authorization: `Bearer ${key}` } : {};
}

/** The JSON answer of `path`; a failure throws RequestFailed with the service's {code, message}.
 *  With `onBusy`, a `busy` answer is waited out (its Retry-After) and asked again, a few times. */
async function callService(path, init = {}, onBusy = null) {
  for (let attempt = 0; ; attempt++) {
    let response;
    try {
      response = await fetch(path, { ...init, headers: { ...init.headers, ...authHeaders() } });
    } catch (err) {
      throw new RequestFailed("network", `the service did not answer (${err.message})`);
    }
    if (response.ok) return response.json();
    const body = await response.json().catch(() => ({}));
    const { code = `http_${response.status}`, message = response.statusText } = body.error || {};
    if (code !== "busy" || !onBusy || attempt >= BUSY_RETRIES) throw new RequestFailed(code, message);
    const seconds = Number(response.headers.get("retry-after")) || 1;
    onBusy(seconds);
    await new Promise((resolve) => setTimeout(resolve, seconds * 1000));
  }
}

function generate(body, onBusy) {
  const init = { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) };
  return callService("v1/generate", init, onBusy);
}

/** Fill the picker with the LoRAs the service has cached (resident or on disk), once per id and sha256. */
async function loadCachedLoras() {
  let adapters;
  try {
    adapters = await callService("v1/adapters");
  } catch {
    return; // no key yet, or the service is starting: the picker stays as it is
  }
  const picker = $("cached-loras");
  picker.replaceChildren(new Option("—", ""));
  const seen = new Set();
  for (const [where, list] of [["resident", adapters.resident], ["disk", adapters.disk]]) {
    for (const { id, sha256 } of list) {
      if (seen.has(`${id} ${sha256}`)) continue;
      seen.add(`${id} ${sha256}`);
      picker.add(new Option(`${id} · ${sha256.slice(0, 12)}… (${where})`, JSON.stringify({ id, sha256 })));
    }
  }
}

// -- reading the form ---------------------------------------------------------------------------

function numbers(testid) {
  const values = $(testid).value.split(",").map((s) => s.trim()).filter(Boolean).map(Number);
  if (!values.length || values.some(Number.isNaN)) {
    throw new RequestFailed("invalid_request", `${testid}: give a comma-separated list of numbers`);
  }
  return values;
}

function readFileAsDataUri(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new RequestFailed("image_invalid", `cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

/** The reference as the request's `image`: the uploaded file as a data: URI, else the URL, else null. */
async function readReference() {
  const [file] = $("reference").files;
  if (file) return readFileAsDataUri(file);
  return $("reference-url").value.trim() || null;
}

function idFromUrl(url) {
  let path;
  try {
    path = new URL(url).pathname;
  } catch {
    throw new RequestFailed("invalid_request", `lora-url: ${url} is not a URL`);
  }
  const name = path.split("/").filter(Boolean).pop() || "lora";
  return name.replace(/\.(safetensors|tar|tar\.gz)$/, "");
}

async function readSettings() {
  const prompts = $("prompts").value.split("\n").map((s) => s.trim()).filter(Boolean);
  if (!prompts.length) throw new RequestFailed("invalid_request", "prompts: give at least one prompt");
  const scales = numbers("scales");
  const url = $("lora-url").value.trim();
  if (!url && scales.some((scale) => scale !== 0)) {
    throw new RequestFailed("invalid_request", "lora-url: a scale above 0 needs the LoRA's URL");
  }
  const reference = await readReference();
  const strengths = reference ? numbers("strengths") : [null]; // txt2img has no strength
  const seed = $("seed").value.trim();
  return {
    prompts,
    reference,
    lora: url ? { id: $("lora-id").value.trim() || idFromUrl(url), url, sha256: $("lora-sha256").value.trim() || undefined } : null,
    seed: seed ? Number(seed) : null,
    steps: Number($("steps").value),
    size: Number($("size").value),
    variants: strengths.flatMap((strength) => scales.map((scale) => ({ scale, strength }))),
  };
}

/** The /v1/generate body of one tile; scale 0 is a request without the LoRA (the baseline). */
function requestBody(settings, prompt, { scale, strength }, seed) {
  const body = {
    prompt,
    num_inference_steps: settings.steps,
    width: settings.size,
    height: settings.size,
    loras: scale === 0 ? [] : [{ ...settings.lora, scale }],
  };
  if (seed !== null) body.seed = seed;
  if (settings.reference) Object.assign(body, { image: settings.reference, strength });
  return body;
}

// -- results ------------------------------------------------------------------------------------

function figure(testid, src, caption) {
  const fig = document.createElement("figure");
  fig.dataset.testid = testid;
  if (src) fig.append(Object.assign(document.createElement("img"), { src, alt: caption }));
  fig.append(Object.assign(document.createElement("figcaption"), { textContent: caption }));
  return fig;
}

function addRow(prompt, reference) {
  const row = Object.assign(document.createElement("section"), { className: "row" });
  row.dataset.prompt = prompt;
  row.append(Object.assign(document.createElement("h2"), { textContent: prompt }));
  row.append(reference ? figure("reference-tile", reference, "reference") : figure("reference-tile", null, "txt2img: no reference"));
  $("results").append(row);
  return row;
}

function tile(prompt, { scale, strength }, image) {
  const variantLabel = `scale ${scale} · ${strength === null ? "txt2img" : `strength ${strength}`}`;
  const resultLabel = [`seed ${image.seed}`];
  const fig = figure("tile", `data:${image.mime};base64,${image.base64}`, "");
  Object.assign(fig.dataset, { prompt, scale: String(scale), seed: String(image.seed) });
  if (strength !== null) fig.dataset.strength = String(strength);
  if (image.identity_score != null) {
    fig.dataset.identityScore = String(image.identity_score);
    resultLabel.push(`id ${image.identity_score.toFixed(3)}`);
  }
  fig.querySelector("img").alt = fig.querySelector("figcaption").textContent = `${variantLabel}\n${resultLabel.join(" · ")}`;
  return fig;
}

function showError(err) {
  const box = $("error");
  box.textContent = err instanceof RequestFailed ? `${err.code}: ${err.message}` : `internal: ${err.message || err}`;
  box.hidden = false;
}

async function run(event) {
  event.preventDefault();
  $("run").disabled = true; // at once, so a second press (or a test's click) sees the run under way
  $("error").hidden = true;
  if (!$("api-key").closest("label").hidden) sessionStorage.setItem(KEY_STORAGE, $("api-key").value);
  let settings;
  try {
    settings = await readSettings();
  } catch (err) {
    $("run").disabled = false;
    return showError(err);
  }
  $("results").replaceChildren();
  $("download-sheet").hidden = true;
  const total = settings.prompts.length * settings.variants.length;
  let done = 0;
  const progress = $("progress");
  progress.textContent = `${done}/${total}`;
  const onBusy = (seconds) => (progress.textContent = `${done}/${total} · busy, retrying in ${seconds} s`);
  let seed = settings.seed; // unset: the first image's seed, kept for every tile so they compare
  try {
    for (const prompt of settings.prompts) {
      const row = addRow(prompt, settings.reference);
      for (const variant of settings.variants) {
        const answer = await generate(requestBody(settings, prompt, variant, seed), onBusy);
        seed ??= answer.images[0].seed;
        row.append(tile(prompt, variant, answer.images[0]));
        progress.textContent = `${++done}/${total}`;
      }
    }
  } catch (err) {
    progress.textContent = `${done}/${total}`;
    showError(err);
  } finally {
    $("run").disabled = false;
    $("download-sheet").hidden = !document.querySelector('[data-testid="tile"]');
    loadCachedLoras();
  }
}

// -- contact sheet ------------------------------------------------------------------------------

/** Draw `img` centred in a square of side `side` at (x, y), keeping its aspect ratio. */
function drawFitted(ctx, img, x, y, side) {
  const scale = side / Math.max(img.naturalWidth, img.naturalHeight);
  const w = img.naturalWidth * scale;
  const h = img.naturalHeight * scale;
  ctx.drawImage(img, x + (side - w) / 2, y + (side - h) / 2, w, h);
}

/** The results as one PNG (a data: URI): a row per prompt, each tile with its label under it.
 *  Only data: images are drawn: a reference given by URL would taint the canvas, so it gets a frame. */
function contactSheet() {
  const { cell, header, label, pad } = SHEET;
  const rows = [...document.querySelectorAll("[data-testid=results] .row")];
  const columns = Math.max(...rows.map((row) => row.querySelectorAll("figure").length));
  const rowHeight = header + cell + label + pad;
  const canvas = document.createElement("canvas");
  canvas.width = pad + columns * (cell + pad);
  canvas.height = pad + rows.length * rowHeight;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.font = "13px sans-serif";
  rows.forEach((row, r) => {
    const top = pad + r * rowHeight;
    ctx.fillStyle = "#000";
    ctx.fillText(row.dataset.prompt, pad, top + header - 10, canvas.width - 2 * pad);
    row.querySelectorAll("figure").forEach((fig, c) => {
      const x = pad + c * (cell + pad);
      const img = fig.querySelector("img");
      if (img?.src.startsWith("data:")) drawFitted(ctx, img, x, top + header, cell);
      else ctx.strokeRect(x + 0.5, top + header + 0.5, cell - 1, cell - 1);
      ctx.fillStyle = "#000";
      ctx.fillText(fig.querySelector("figcaption").textContent.replace("\n", " · "), x, top + header + cell + 15, cell);
    });
  });
  return canvas.toDataURL("image/png");
}

// -- start --------------------------------------------------------------------------------------

/** Ask the service whether it wants a key: /v1/adapters without one answers 401 when it does. */
async function setUpKey() {
  const response = await fetch("v1/adapters").catch(() => null);
  if (response?.status !== 401) return;
  $("api-key").closest("label").hidden = false;
  $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
}

function pickCached() {
  const { id = "", sha256 = "" } = JSON.parse($("cached-loras").value || "{}");
  $("lora-id").value = id;
  $("lora-sha256").value = sha256;
}

document.querySelector("form").addEventListener("submit", run);
$("cached-loras").addEventListener("change", pickCached);
$("download-sheet").addEventListener("click", (event) => (event.currentTarget.href = contactSheet()));
await setUpKey();
await loadCachedLoras();
document.body.dataset.ready = "true"; // tests wait for this before they type
