// The latent workspace (docs/methods.md §11.5): a static page over table.js (every latent's row), and per-latent
// shards (latents/shard_NNNNN.js) and vocab.js loaded on demand with <script> tags, so it works from file://.
"use strict";
(function () {
  const state = { table: null, rows: [], sort: { col: "latent", dir: 1 }, page: 0, pageSize: 100, filters: {} };
  const shards = {};
  const loading = {};
  let vocab = null;

  window.workspaceTable = function (table) { state.table = table; init(); };
  window.workspaceShard = function (shard) { shards[shard.shard] = shard.latents; };
  window.workspaceVocab = function (tokens) { vocab = tokens; };

  function $(selector) { return document.querySelector(selector); }
  function esc(text) {
    return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  }
  function fmt(value) {
    if (value === null || value === undefined) return "";
    if (typeof value !== "number") return String(value);
    if (Number.isInteger(value)) return String(value);
    return Math.abs(value) >= 1e-3 || value === 0 ? value.toFixed(4) : value.toExponential(2);
  }
  function loadScript(src) {
    if (!loading[src]) {
      loading[src] = new Promise((resolve, reject) => {
        const script = document.createElement("script");
        script.src = src;
        script.onload = resolve;
        script.onerror = () => reject(new Error("cannot load " + src));
        document.head.appendChild(script);
      });
    }
    return loading[src];
  }

  // ---------------------------------------------------------------- the table
  function cell(column, latent) {
    if (column.name === "latent") return latent;
    const value = state.table.data[column.name][latent];
    if (column.kind === "category") return value === null ? null : column.labels[value];
    return value;
  }

  function init() {
    const table = state.table;
    document.title = table.title;
    $("#title").textContent = table.title;
    $("#summary").innerHTML = Object.entries(table.summary)
      .map(([key, value]) => `<li><b>${esc(key)}</b>: ${esc(typeof value === "object" ? JSON.stringify(value) : value)}</li>`)
      .join("");
    $("#images").innerHTML = table.images.map((src) => `<img alt="${esc(src)}" src="${esc(src)}">`).join("");
    $("#headers").innerHTML = table.columns
      .map((c) => `<th data-col="${c.name}" title="${esc(c.description || "")}">${esc(c.label)}</th>`)
      .join("");
    $("#filters").innerHTML = table.columns.map(filterCell).join("");
    document.querySelectorAll("#headers th").forEach((th) => th.addEventListener("click", () => sortBy(th.dataset.col)));
    document.querySelectorAll("#filters input, #filters select").forEach((input) => {
      input.addEventListener("input", readFilters);
      input.addEventListener("change", readFilters);
    });
    $("#prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); render(); });
    $("#next").addEventListener("click", () => { state.page = Math.min(lastPage(), state.page + 1); render(); });
    $("#page-size").addEventListener("change", (e) => { state.pageSize = Number(e.target.value); state.page = 0; render(); });
    $("#reset").addEventListener("click", () => {
      document.querySelectorAll("#filters input").forEach((input) => { input.value = ""; });
      document.querySelectorAll("#filters select").forEach((select) => { select.value = ""; });
      readFilters();
    });
    window.addEventListener("hashchange", route);
    applyFilters();
    route();
  }

  function filterCell(column) {
    const name = column.name;
    if (column.kind === "number") {
      return `<th><input class="min" data-col="${name}" placeholder="min"> <input class="max" data-col="${name}" placeholder="max"></th>`;
    }
    if (column.kind === "category") {
      const options = column.labels.map((label, i) => `<option value="${i}">${esc(label)}</option>`).join("");
      return `<th><select data-col="${name}"><option value="">all</option>${options}</select></th>`;
    }
    if (column.kind === "text") return `<th><input class="text" data-col="${name}" placeholder="search"></th>`;
    return "<th></th>";
  }

  function readFilters() {
    const filters = {};
    document.querySelectorAll("#filters input, #filters select").forEach((input) => {
      if (input.value === "") return;
      const entry = (filters[input.dataset.col] = filters[input.dataset.col] || {});
      if (input.classList.contains("min")) entry.min = Number(input.value);
      else if (input.classList.contains("max")) entry.max = Number(input.value);
      else if (input.tagName === "SELECT") entry.equals = Number(input.value);
      else entry.contains = input.value.toLowerCase();
    });
    state.filters = filters;
    state.page = 0;
    applyFilters();
  }

  function applyFilters() {
    const table = state.table;
    const tests = Object.entries(state.filters).map(([name, f]) => {
      const data = table.data[name];
      return (i) => {
        const v = data[i];
        if (f.equals !== undefined) return v === f.equals;
        if (f.contains !== undefined) return v !== null && v.toLowerCase().includes(f.contains);
        if (v === null) return false;
        return (f.min === undefined || v >= f.min) && (f.max === undefined || v <= f.max);
      };
    });
    const rows = [];
    for (let i = 0; i < table.n_latents; i++) if (tests.every((test) => test(i))) rows.push(i);
    state.rows = rows;
    sortRows();
    render();
  }

  function sortBy(name) {
    const numeric = state.table.columns.find((c) => c.name === name).kind === "number";
    if (state.sort.col === name) state.sort.dir = -state.sort.dir;
    else state.sort = { col: name, dir: numeric ? -1 : 1 };
    state.page = 0;
    sortRows();
    render();
  }

  function sortRows() {
    const column = state.table.columns.find((c) => c.name === state.sort.col);
    const dir = state.sort.dir;
    const key = (i) => (column.kind === "category" ? cell(column, i) : column.name === "latent" ? i : state.table.data[column.name][i]);
    state.rows.sort((a, b) => {
      const x = key(a), y = key(b);
      if (x === y) return a - b;
      if (x === null) return 1;  // missing values last in either direction
      if (y === null) return -1;
      return (x < y ? -1 : 1) * dir;
    });
  }

  function lastPage() { return Math.max(0, Math.ceil(state.rows.length / state.pageSize) - 1); }

  function render() {
    const columns = state.table.columns;
    const first = state.page * state.pageSize;
    const shown = state.rows.slice(first, first + state.pageSize);
    $("#latents tbody").innerHTML = shown
      .map((latent) => "<tr>" + columns.map((c) => {
        const value = cell(c, latent);
        if (c.name === "latent") return `<td class="latent"><a href="#latent=${latent}">${latent}</a></td>`;
        const kind = typeof value === "string" ? "text" : "";
        return `<td class="${kind}" data-col="${c.name}">${esc(fmt(value))}</td>`;
      }).join("") + "</tr>")
      .join("");
    const total = state.rows.length;
    $("#page-info").textContent = total ? `rows ${first + 1}–${first + shown.length} of ${total}` : "no latent matches";
    $("#prev").disabled = state.page === 0;
    $("#next").disabled = state.page >= lastPage();
    document.querySelectorAll("#headers th").forEach((th) => {
      th.className = th.dataset.col === state.sort.col ? (state.sort.dir > 0 ? "sorted-asc" : "sorted-desc") : "";
    });
  }

  // ---------------------------------------------------------------- a latent's page
  function route() {
    const match = /^#latent=(\d+)$/.exec(location.hash);
    $("#table-view").hidden = Boolean(match);
    $("#latent-view").hidden = !match;
    if (match) showLatent(Number(match[1]));
  }

  async function showLatent(latent) {
    const view = $("#latent-view");
    const table = state.table;
    if (latent >= table.n_latents) {
      view.innerHTML = `<p><a href="#">&larr; all latents</a></p><p>There is no latent ${latent}: the dictionary has ${table.n_latents}.</p>`;
      return;
    }
    view.innerHTML = `<p>loading latent ${latent}…</p>`;
    const shard = Math.floor(latent / table.shard_size);
    try {
      const waits = [loadScript(`latents/shard_${String(shard).padStart(5, "0")}.js`)];
      if (table.has_vocab) waits.push(loadScript("vocab.js"));
      await Promise.all(waits);
    } catch (error) {
      view.innerHTML = `<p>${esc(error.message)}</p>`;
      return;
    }
    if (location.hash !== `#latent=${latent}`) return;  // the user moved on while the shard loaded
    view.innerHTML = latentPage(latent, shards[shard][latent] || {});
  }

  function latentPage(latent, record) {
    const facts = state.table.columns.filter((c) => c.name !== "latent")
      .map((c) => `<tr><td>${esc(c.label)}</td><td>${esc(fmt(cell(c, latent)))}</td></tr>`).join("");
    const parts = [
      `<p><a href="#">&larr; all latents</a></p><h2>Latent ${latent}</h2>`,
      `<table class="facts">${facts}</table>`,
    ];
    if (record.histogram) parts.push("<h3>Activation histogram</h3>" + histogram(record.histogram));
    if (record.readout) parts.push("<h3>Decoder direction through each model's unembedding</h3>" + readout(record.readout));
    if (record.kl) parts.push(`<h3>Removing it from the patched chat model</h3><p>KL increase ${fmt(record.kl.kl_effect)} nats, ${fmt(record.kl.gap_share)} of the base→chat gap</p>`);
    if (record.top) parts.push("<h3>Top activations</h3>" + (record.top.map(example).join("") || "<p>never fired</p>"));
    if (record.quantiles && record.quantiles.length) {
      parts.push("<h3>Examples by activation quantile</h3>" + record.quantiles.map((bucket, i) =>
        `<div class="bucket"><h4>bucket ${i + 1}: ${fmt(bucket.low)} – ${fmt(bucket.high)}</h4>${bucket.examples.map(example).join("")}</div>`).join(""));
    }
    if (record.steering) parts.push(steering(record.steering));
    return parts.join("");
  }

  function token(id) {
    if (vocab && vocab[id] !== undefined) return vocab[id];
    return `⟨${id}⟩`;
  }

  function example(ex) {
    const pieces = ex.tokens.map((id, i) => {
      if (id < 0) return "";
      const level = ex.levels[i] / 255;
      const centre = i === ex.center ? " center" : "";
      const value = (level * ex.peak).toPrecision(3);
      return `<span class="token${centre}" style="background: rgba(255,120,0,${level.toFixed(2)})" title="${value}">${esc(token(id))}</span>`;
    });
    return `<div class="example">${pieces.join("")} <small>(${fmt(ex.activation)})</small></div>`;
  }

  function histogram(record) {
    const edges = state.table.histogram_edges;
    const bins = record.bins;
    if (!bins.length) return "<p>never fired</p>";
    const first = bins[0][0], last = bins[bins.length - 1][0];
    const width = 600, height = 120, count = last - first + 1, peak = Math.max(...bins.map((b) => b[1]));
    const bars = bins.map(([bin, n]) => {
      const h = Math.max(1, (Math.log1p(n) / Math.log1p(peak)) * height);
      const x = ((bin - first) / count) * width;
      return `<rect x="${x.toFixed(1)}" y="${(height - h).toFixed(1)}" width="${(width / count - 1).toFixed(1)}" height="${h.toFixed(1)}"><title>${fmt(edges[bin])}–${fmt(edges[bin + 1])}: ${n}</title></rect>`;
    }).join("");
    return `<svg class="histogram" width="${width}" height="${height + 16}">${bars}<text x="0" y="${height + 14}" font-size="11">${fmt(edges[first])}</text><text x="${width - 60}" y="${height + 14}" font-size="11">${fmt(edges[last + 1])}</text></svg>`;
  }

  function readout(models) {
    const list = (pairs) => `<ol>${pairs.map(([t, logit]) => `<li>${esc(JSON.stringify(t))} <small>${fmt(logit)}</small></li>`).join("")}</ol>`;
    return `<div class="readout">${Object.entries(models).map(([name, r]) =>
      `<div><h4>${esc(name)} promotes</h4>${list(r.promoted)}<h4>${esc(name)} suppresses</h4>${list(r.suppressed)}</div>`).join("")}</div>`;
  }

  function steering(record) {
    const rows = record.samples.map((s) => `<tr><td>${esc(s.prompt)}</td><td>${esc(s.unsteered)}</td><td>${esc(s.steered)}</td></tr>`).join("");
    return `<h3>Steering the chat model (${fmt(record.multiple)} × max activation)</h3><table class="steering"><tr><th>prompt</th><th>unsteered</th><th>steered</th></tr>${rows}</table>`;
  }
})();
