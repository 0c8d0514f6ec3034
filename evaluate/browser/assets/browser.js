// The jumpscope feature browser: runs from file:// with no server. Data arrive through <script> tags
// (data/index.js at load, data/vocab.js and data/shard_NNNNN.js on demand): browsers refuse the Fetch API
// on local files. The index renders only the rows in view, so 131k latents scroll and sort quickly.
// State lives in the URL hash (#latent=12&sort=-max&q=...), so a view can be linked and reloaded.
(function () {
  "use strict";
  const INDEX = window.JUMPSCOPE_INDEX;
  const $ = (id) => document.getElementById(id);
  if (!INDEX) {
    $("status").textContent = "data/index.js did not load: is this folder complete?";
    return;
  }
  const meta = INDEX.meta;
  const W = INDEX.count.length;
  const ROW_H = 24, OVERSCAN = 12;
  const columns = {
    id: Float64Array.from({ length: W }, (_, i) => i),
    frequency: Float64Array.from(INDEX.frequency),
    mean: Float64Array.from(INDEX.mean),
    max: Float64Array.from(INDEX.max),
  };
  const count = INDEX.count;
  const topToken = INDEX.top_token || null;
  const state = { sort: "id", desc: false, q: "", hideDead: true, denseOnly: false, latent: null };
  let vocab = null;
  let order = new Uint32Array(0);
  const shards = new Map();

  window.jumpscopeShard = function (k, latents) { shards.set(k, latents); };

  function loadScript(src) {
    return new Promise((resolve, reject) => {
      const s = document.createElement("script");
      s.src = src;
      s.onload = resolve;
      s.onerror = () => reject(new Error("cannot load " + src));
      document.head.appendChild(s);
    });
  }

  const vocabReady = meta.has_vocab
    ? loadScript("data/vocab.js").then(() => { vocab = window.JUMPSCOPE_VOCAB; })
    : Promise.resolve();

  function shard(k) {
    if (shards.has(k)) return Promise.resolve(shards.get(k));
    return loadScript("data/shard_" + String(k).padStart(5, "0") + ".js").then(() => shards.get(k));
  }

  // ---- formatting -------------------------------------------------------------------------------
  function fmt(v) {
    if (v === 0) return "0";
    const a = Math.abs(v);
    return a >= 1000 || a < 0.01 ? v.toExponential(2) : v.toPrecision(3);
  }
  function pct(f) { return f === 0 ? "0" : f >= 0.001 ? (100 * f).toPrecision(3) + "%" : (100 * f).toExponential(1) + "%"; }
  function tokenText(id) {
    const s = vocab ? vocab[id] : null;
    if (s === null || s === undefined) return "#" + id;
    if (s === "") return "\u2205";
    return s.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192").replace(/\r/g, "\u240d");
  }
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  const isDead = (i) => count[i] === 0;
  const isDense = (i) => INDEX.frequency[i] > meta.dense_threshold;

  // ---- URL state ----------------------------------------------------------------------------------
  function readHash() {
    const p = new URLSearchParams(location.hash.slice(1));
    const sort = p.get("sort") || "id";
    state.desc = sort.startsWith("-");
    state.sort = sort.replace(/^-/, "");
    if (!(state.sort in columns) && state.sort !== "token") state.sort = "id";
    state.q = p.get("q") || "";
    state.hideDead = p.get("dead") !== "show";
    state.denseOnly = p.get("dense") === "only";
    const l = p.get("latent");
    state.latent = l !== null && /^\d+$/.test(l) ? Number(l) : null;
  }
  function hashOf(s) {
    const p = new URLSearchParams();
    if (s.latent !== null) p.set("latent", s.latent);
    if (s.sort !== "id" || s.desc) p.set("sort", (s.desc ? "-" : "") + s.sort);
    if (s.q) p.set("q", s.q);
    if (!s.hideDead) p.set("dead", "show");
    if (s.denseOnly) p.set("dense", "only");
    if (new URLSearchParams(location.hash.slice(1)).has("bench")) p.set("bench", "1");
    return "#" + p.toString();
  }
  function writeHash(push) {
    const h = hashOf(state);
    if (h === location.hash) return;
    if (push) location.hash = h; else history.replaceState(null, "", h);
  }

  // ---- the index -------------------------------------------------------------------------------
  function computeOrder() {
    const q = state.q.trim().toLowerCase();
    const numeric = /^\d+$/.test(q);
    const keep = [];
    for (let i = 0; i < W; i++) {
      if (state.hideDead && isDead(i)) continue;
      if (state.denseOnly && !isDense(i)) continue;
      if (q) {
        if (numeric) { if (!String(i).startsWith(q)) continue; }
        else if (!topToken || !tokenText(topToken[i]).toLowerCase().includes(q)) continue;
      }
      keep.push(i);
    }
    const idx = Uint32Array.from(keep);
    const sign = state.desc ? -1 : 1;
    if (state.sort === "token") {
      const key = (i) => (topToken ? tokenText(topToken[i]) : "");
      const keys = new Map();
      idx.forEach((i) => keys.set(i, key(i)));
      idx.sort((a, b) => { const x = keys.get(a), y = keys.get(b); return x < y ? -sign : x > y ? sign : a - b; });
    } else if (state.sort !== "id" || state.desc) {
      const col = columns[state.sort];
      idx.sort((a, b) => sign * (col[a] - col[b]) || a - b);
    }
    order = idx;
    $("shown").textContent = order.length.toLocaleString() + " of " + W.toLocaleString() + " latents";
    $("spacer").style.height = order.length * ROW_H + "px";
    document.querySelectorAll("#table-head .c").forEach((c) => {
      c.classList.toggle("sorted", c.dataset.sort === state.sort);
      c.classList.toggle("desc", c.dataset.sort === state.sort && state.desc);
    });
  }

  const maxLogFreq = Math.log10(INDEX.frequency.reduce((m, f) => (f > m ? f : m), 1e-9));
  const minLogFreq = Math.log10(1 / Math.max(meta.n_tokens, 1));
  function freqBar(f) {
    if (f <= 0) return 0;
    const span = Math.max(maxLogFreq - minLogFreq, 1e-9);
    return Math.max(2, Math.round(60 * (Math.log10(f) - minLogFreq) / span));
  }

  let scheduled = false;
  function scheduleRows() {
    if (scheduled) return;
    scheduled = true;
    requestAnimationFrame(() => { scheduled = false; renderRows(); });
  }
  function renderRows() {
    const vp = $("viewport");
    const first = Math.max(0, Math.floor(vp.scrollTop / ROW_H) - OVERSCAN);
    const last = Math.min(order.length, Math.ceil((vp.scrollTop + vp.clientHeight) / ROW_H) + OVERSCAN);
    const frag = document.createDocumentFragment();
    for (let r = first; r < last; r++) {
      const i = order[r];
      const row = el("div", "row" + (i === state.latent ? " selected" : ""));
      row.style.top = r * ROW_H + "px";
      row.dataset.latent = i;
      row.appendChild(el("span", "c id", String(i)));
      const fc = el("span", "c freq");
      const bar = el("span", "freqbar");
      bar.style.width = freqBar(INDEX.frequency[i]) + "px";
      fc.appendChild(bar);
      fc.appendChild(document.createTextNode(pct(INDEX.frequency[i])));
      if (isDead(i)) fc.appendChild(el("span", "flag dead", "dead"));
      if (isDense(i)) fc.appendChild(el("span", "flag dense", "dense"));
      row.appendChild(fc);
      row.appendChild(el("span", "c num", fmt(INDEX.mean[i])));
      row.appendChild(el("span", "c num", fmt(INDEX.max[i])));
      row.appendChild(el("span", "c tok", topToken ? tokenText(topToken[i]) : ""));
      frag.appendChild(row);
    }
    const rows = $("rows");
    rows.replaceChildren(frag);
  }
  function scrollToSelected() {
    if (state.latent === null) return;
    const r = order.indexOf(state.latent);
    if (r < 0) return;
    const vp = $("viewport");
    if (r * ROW_H < vp.scrollTop || (r + 1) * ROW_H > vp.scrollTop + vp.clientHeight) {
      vp.scrollTop = Math.max(0, r * ROW_H - vp.clientHeight / 3);
    }
  }

  // ---- one latent --------------------------------------------------------------------------------
  function context(c, scale, cls) {
    const line = el("div", "ctx " + cls);
    line.dataset.seq = c.s;
    line.dataset.pos = c.p;
    line.dataset.act = c.a;
    line.appendChild(el("span", "a", fmt(c.a)));
    c.t.forEach((id, j) => {
      const pos = c.o + j;
      const v = c.v[j] / meta.quant;
      const span = el("span", "tok" + (pos === c.p ? " max" : ""), tokenText(id));
      if (v > 0) span.style.background = "rgba(235, 110, 20, " + Math.min(1, 0.08 + 0.92 * v).toFixed(3) + ")";
      span.dataset.act = (v * scale).toPrecision(4);
      span.title = "position " + pos + ", token " + id + ": activation " + (v * scale).toPrecision(4);
      line.appendChild(span);
    });
    line.title = "sequence " + c.s + ", position " + c.p;
    return line;
  }

  function histogram(hist) {
    const [hi, counts, bins] = hist;
    const w = 360, h = 110, pad = 18;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("width", w); svg.setAttribute("height", h);
    const peak = Math.max(...counts, 1);
    const shown = counts.length, bw = (w - 2 * pad) / shown;
    counts.forEach((n, j) => {
      if (!n) return;
      const bh = (h - 2 * pad) * Math.sqrt(n / peak);
      const r = document.createElementNS(ns, "rect");
      r.setAttribute("x", pad + j * bw); r.setAttribute("y", h - pad - bh);
      r.setAttribute("width", Math.max(1, bw - 0.5)); r.setAttribute("height", bh);
      r.setAttribute("fill", "#e07b24");
      const t = document.createElementNS(ns, "title");
      t.textContent = fmt((j * hi) / bins) + " to " + fmt(((j + 1) * hi) / bins) + ": " + n + " tokens";
      r.appendChild(t);
      svg.appendChild(r);
    });
    const label = (x, text, anchor) => {
      const t = document.createElementNS(ns, "text");
      t.setAttribute("x", x); t.setAttribute("y", h - 4); t.setAttribute("font-size", "10");
      t.setAttribute("text-anchor", anchor); t.textContent = text;
      svg.appendChild(t);
    };
    label(pad, "0", "start");
    label(w - pad, fmt((shown * hi) / bins), "end");
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", pad); t.setAttribute("y", 12); t.setAttribute("font-size", "10");
    t.textContent = "tokens per bin (sqrt scale), peak " + peak;
    svg.appendChild(t);
    return svg;
  }

  function lensTable(title, pair, cls) {
    const box = el("div", "lens");
    box.appendChild(el("h3", null, title));
    const table = el("table");
    pair[0].forEach((id, j) => {
      const tr = el("tr");
      const tok = el("td", "t", tokenText(id));
      tok.dataset.token = id;
      tr.appendChild(tok);
      tr.appendChild(el("td", cls, fmt(pair[1][j])));
      table.appendChild(tr);
    });
    box.appendChild(table);
    return box;
  }

  function renderLatent(entry) {
    const pane = $("latent");
    const i = entry.i;
    const kids = [];
    const h2 = el("h2", null, "Latent " + i);
    if (isDead(i)) h2.appendChild(el("span", "flag dead", "dead"));
    if (isDense(i)) h2.appendChild(el("span", "flag dense", "dense"));
    kids.push(h2);
    kids.push(el("div", "stats", "fires on " + pct(INDEX.frequency[i]) + " of " + meta.n_tokens.toLocaleString() +
      " held-out tokens (" + count[i].toLocaleString() + "); mean activation when firing " + fmt(INDEX.mean[i]) +
      ", max " + fmt(INDEX.max[i])));
    const panels = el("div", "panels");
    if (entry.hist) {
      const hb = el("div", "hist");
      hb.appendChild(el("h3", null, "Activation histogram"));
      hb.appendChild(histogram(entry.hist));
      panels.appendChild(hb);
    }
    if (entry.up) panels.appendChild(lensTable("Promotes (logit lens)", entry.up, "up"));
    if (entry.down) panels.appendChild(lensTable("Suppresses", entry.down, "down"));
    kids.push(panels);
    if (entry.top && entry.top.length) {
      kids.push(el("h3", null, "Top activations (one per held-out sequence; outlined: the peak)"));
      const box = el("div", "contexts top");
      entry.top.forEach((c) => box.appendChild(context(c, entry.scale, "top")));
      kids.push(box);
    } else {
      kids.push(el("p", "hint", "This latent never fired on the " + meta.n_tokens.toLocaleString() + " tokens scanned."));
    }
    (entry.bands || []).slice().reverse().forEach((b) => {
      const head = el("div", "band-head", "Quantiles " + b.q[0] + "\u2013" + b.q[1] + " of a random sample of its firings " +
        "(activations " + fmt(b.lo) + " to " + fmt(b.hi) + ")");
      kids.push(head);
      const box = el("div", "contexts band");
      b.x.forEach((c) => box.appendChild(context(c, entry.scale, "sample")));
      kids.push(box);
    });
    pane.replaceChildren(...kids);
    pane.dataset.latent = i;
    pane.dataset.state = "ready";
    document.title = "latent " + i + " \u00b7 " + meta.name;
  }

  function showLatent(i) {
    const pane = $("latent");
    if (i === null) return Promise.resolve();
    if (!(i >= 0 && i < W)) {
      pane.dataset.state = "error";
      pane.replaceChildren(el("p", "hint", "There is no latent " + i + " (this SAE has " + W + ")."));
      return Promise.resolve();
    }
    pane.dataset.state = "loading";
    const k = Math.floor(i / meta.shard_latents);
    return Promise.all([shard(k), vocabReady]).then(([latents]) => {
      if (state.latent !== i) return;
      renderLatent(latents[i - k * meta.shard_latents]);
    }).catch((e) => { pane.dataset.state = "error"; $("status").textContent = e.message; });
  }

  // ---- wiring -----------------------------------------------------------------------------------
  function apply(fromHash) {
    if (fromHash) readHash();
    $("query").value = state.q;
    $("hide-dead").checked = state.hideDead;
    $("dense-only").checked = state.denseOnly;
    computeOrder();
    renderRows();
    scrollToSelected();
    return showLatent(state.latent);
  }

  function select(i) {
    state.latent = i;
    writeHash(true);
  }

  function summary() {
    $("title").textContent = meta.name + " \u00b7 layer " + meta.layer + " " + meta.sublayer;
    $("summary").textContent = [meta.label, meta.d_in + " \u2192 " + meta.d_sae.toLocaleString() + " latents",
      meta.model ? "model " + meta.model : null, meta.n_tokens.toLocaleString() + " held-out tokens in " +
      meta.n_sequences.toLocaleString() + " sequences", meta.dead.toLocaleString() + " dead", meta.dense.toLocaleString() +
      " dense (> " + pct(meta.dense_threshold) + ")", meta.has_logit_lens ? null : "no logit lens (no model recorded)"]
      .filter(Boolean).join(" \u00b7 ");
  }

  function wire() {
    $("viewport").addEventListener("scroll", scheduleRows, { passive: true });
    window.addEventListener("resize", scheduleRows);
    $("rows").addEventListener("click", (e) => {
      const row = e.target.closest(".row");
      if (row) select(Number(row.dataset.latent));
    });
    document.querySelectorAll("#table-head .c").forEach((c) => c.addEventListener("click", () => {
      const col = c.dataset.sort;
      state.desc = state.sort === col ? !state.desc : col !== "id" && col !== "token";
      state.sort = col;
      writeHash(false); apply(false);
    }));
    let typing = null;
    $("query").addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(() => { state.q = $("query").value; writeHash(false); apply(false); }, 120);
    });
    $("hide-dead").addEventListener("change", () => { state.hideDead = $("hide-dead").checked; writeHash(false); apply(false); });
    $("dense-only").addEventListener("change", () => { state.denseOnly = $("dense-only").checked; writeHash(false); apply(false); });
    window.addEventListener("hashchange", () => apply(true));
    document.addEventListener("keydown", (e) => {
      if (e.target.tagName === "INPUT" || !order.length) return;
      if (e.key !== "ArrowDown" && e.key !== "ArrowUp") return;
      e.preventDefault();
      const r = state.latent === null ? -1 : order.indexOf(state.latent);
      const next = Math.min(order.length - 1, Math.max(0, r + (e.key === "ArrowDown" ? 1 : -1)));
      select(order[next]);
    });
  }

  // #bench=1: time filtering, sorting and rendering in this browser; results in <pre id="bench-result">.
  function bench() {
    const t = {}, time = (name, fn) => { const a = performance.now(); fn(); t[name] = +(performance.now() - a).toFixed(2); };
    t.latents = W;
    t.ready_ms = +performance.now().toFixed(1);
    for (const col of ["frequency", "mean", "max", "token"]) {
      time("sort_" + col + "_ms", () => { state.sort = col; state.desc = true; computeOrder(); renderRows(); });
    }
    time("filter_dense_ms", () => { state.denseOnly = true; computeOrder(); renderRows(); });
    state.denseOnly = false;
    time("filter_query_ms", () => { state.q = "12"; computeOrder(); renderRows(); });
    state.q = "";
    computeOrder();
    const vp = $("viewport");
    time("scroll_render_ms", () => { for (let s = 0; s < 50; s++) { vp.scrollTop = (s * order.length * ROW_H) / 50; renderRows(); } });
    t.scroll_render_ms = +(t.scroll_render_ms / 50).toFixed(3);
    t.rendered_rows = $("rows").children.length;
    const pre = el("pre", null, JSON.stringify(t));
    pre.id = "bench-result";
    document.body.appendChild(pre);
  }

  summary();
  wire();
  readHash();
  apply(false).then(() => {
    if (new URLSearchParams(location.hash.slice(1)).has("bench")) bench();
    document.body.dataset.ready = "1";
  });
})();
