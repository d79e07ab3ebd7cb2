/* ranklens dashboard. Plain JavaScript, no dependencies, no network access except the page's own server.
 *
 * Data files (written by ranklens.dashboard.site_writer, contract in docs/dashboard.md) are scripts that call
 * window.RANKLENS.register(kind, key, payload), so the site also works when opened from disk (file://), where
 * browsers refuse fetch(). index.html shows one dictionary (#feature=ID opens a feature), compare.html two runs.
 * All text from the data is inserted with textContent, never as markup.
 */
"use strict";

(function () {
  const RL = (window.RANKLENS = window.RANKLENS || {});
  const SVG_NS = "http://www.w3.org/2000/svg";
  const store = { manifest: null, index: {}, chunks: new Map(), compare: null };
  const CHUNK_CACHE = 12;

  RL.register = function (kind, key, payload) {
    if (kind === "meta") store.manifest = payload;
    else if (kind === "index") store.index[key] = payload;
    else if (kind === "features") store.chunks.set(key, payload);
    else if (kind === "compare") store.compare = payload;
    else if (kind === "autointerp") store.autointerp = payload;
  };

  // ------------------------------------------------------------------ small helpers

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    if (attrs) {
      for (const [k, v] of Object.entries(attrs)) {
        if (v === null || v === undefined || v === false) continue;
        if (k === "class") el.className = v;
        else if (k === "text") el.textContent = v;
        else if (k === "style") el.style.cssText = v;
        else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
        else el.setAttribute(k, v === true ? "" : String(v));
      }
    }
    for (const c of children) append(el, c);
    return el;
  }

  function append(el, c) {
    if (c === null || c === undefined || c === false) return;
    if (Array.isArray(c)) c.forEach((x) => append(el, x));
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }

  function svg(tag, attrs, text) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
    if (text !== undefined) el.textContent = text;
    return el;
  }

  const $ = (id) => document.getElementById(id);
  const isNum = (x) => typeof x === "number" && Number.isFinite(x);

  function stripExp(s) {
    return s.replace(/\.?0+e/, "e").replace("e+", "e");
  }

  /** A number for people: ints with separators, floats with `digits` significant digits, "n/a" for null. */
  function fmt(x, digits) {
    digits = digits || 4;
    if (!isNum(x)) return "n/a";
    if (Number.isInteger(x) && Math.abs(x) < 1e15) return x.toLocaleString("en-US");
    const a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return stripExp(x.toExponential(digits - 1));
    return String(Number(x.toPrecision(digits)));
  }

  function fmtDensity(x) {
    if (!isNum(x)) return "n/a";
    if (x === 0) return "0";
    return stripExp(x.toExponential(2));
  }

  function fmtPct(x, digits) {
    if (!isNum(x)) return "n/a";
    return (x * 100).toFixed(digits === undefined ? 1 : digits) + "%";
  }

  const SUPERSCRIPT = { "-": "\u207b", 0: "\u2070", 1: "\u00b9", 2: "\u00b2", 3: "\u00b3", 4: "\u2074",
    5: "\u2075", 6: "\u2076", 7: "\u2077", 8: "\u2078", 9: "\u2079" };

  function fmtPow10(e) {
    if (!Number.isInteger(e)) return "10^" + fmt(e, 2);
    return "10" + String(e).split("").map((c) => SUPERSCRIPT[c]).join("");
  }

  // ------------------------------------------------------------------ tokens

  const WS_SYMBOL = { "\n": "\u21b5", "\t": "\u21e5", "\r": "\\r", "\f": "\\f", "\v": "\\v" };
  const INVISIBLE = /[\u0000-\u001f\u007f-\u009f\u00ad\u200b-\u200f\u2028\u2029\u2060\ufeff]/;

  /** Text of a token as nodes, whitespace and invisible characters drawn as visible symbols.
   *  chip: spaces drawn as a middle dot too (lists of tokens, where a leading space is otherwise lost). */
  function tokenNodes(tok, chip) {
    if (tok === null || tok === undefined) {
      return [h("span", { class: "ws", title: "outside the document", text: "\u2205" })];
    }
    if (tok === "") return [h("span", { class: "ws", title: "empty token", text: "\u2205" })];
    const onlySpaces = /^ +$/.test(tok);
    const out = [];
    let text = "";
    const flush = () => {
      if (text) out.push(document.createTextNode(text));
      text = "";
    };
    for (const ch of tok) {
      let sym = null;
      if (WS_SYMBOL[ch]) sym = WS_SYMBOL[ch];
      else if (ch === " " && (chip || onlySpaces)) sym = chip ? "\u00b7" : "\u2423";
      else if (INVISIBLE.test(ch)) sym = "\\u" + ch.codePointAt(0).toString(16).padStart(4, "0");
      if (sym) {
        flush();
        out.push(h("span", { class: "ws", text: sym }));
      } else text += ch;
    }
    flush();
    return out;
  }

  /** A token as plain text for titles, with escapes a person can read. */
  function tokenLabel(tok) {
    if (tok === null || tok === undefined) return "(outside the document)";
    return JSON.stringify(tok);
  }

  function tokenChip(tok) {
    return h("span", { class: "chip", title: tokenLabel(tok) }, tokenNodes(tok, true));
  }

  function actShade(t) {
    const x = Math.max(0, Math.min(1, t));
    return x <= 0 ? "" : `background-color: hsl(28 100% ${(100 - 50 * x).toFixed(1)}%)`;
  }

  function zShade(t) {
    const x = Math.max(0, Math.min(1, t));
    return x <= 0 ? "" : `background-color: hsl(205 100% ${(100 - 48 * x).toFixed(1)}%)`;
  }

  // ------------------------------------------------------------------ charts

  function niceStep(range, n) {
    const raw = range / Math.max(1, n);
    const p = Math.pow(10, Math.floor(Math.log10(raw)));
    const m = raw / p;
    return (m <= 1 ? 1 : m <= 2 ? 2 : m <= 5 ? 5 : 10) * p;
  }

  function ticks(lo, hi, n, minStep) {
    if (!(hi > lo)) return [lo];
    let step = niceStep(hi - lo, n);
    if (minStep && step < minStep) step = minStep;
    const out = [];
    for (let v = Math.ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step) {
      out.push(Math.abs(v) < step * 1e-9 ? 0 : Number(v.toPrecision(12)));
    }
    return out;
  }

  /** An SVG histogram of {edges, counts}. opts: xLabel, yLabel, fill, xDomain [lo, hi], yMax, xTick (formatter),
   *  logX (edges are log10 values: ticks at whole decades), label (accessible name), width, height. */
  function histogram(hist, opts) {
    opts = opts || {};
    const W = opts.width || 520;
    const H = opts.height || 200;
    const m = { l: 52, r: 14, t: 10, b: 40 };
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "hist", role: "img",
      "aria-label": opts.label || "histogram" });
    const edges = (hist && hist.edges) || [];
    const counts = (hist && hist.counts) || [];
    if (counts.length === 0) {
      root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "axis-label" }, "no data"));
      return root;
    }
    const lo = opts.xDomain ? opts.xDomain[0] : edges[0];
    const hi = opts.xDomain ? opts.xDomain[1] : edges[edges.length - 1];
    const yMax = Math.max(1, opts.yMax || Math.max(...counts.map((c) => (isNum(c) ? c : 0))));
    const sx = (v) => m.l + ((v - lo) / (hi - lo || 1)) * (W - m.l - m.r);
    const sy = (v) => H - m.b - (v / yMax) * (H - m.t - m.b);
    const xFmt = opts.xTick || (opts.logX ? fmtPow10 : (v) => fmt(v, 3));
    for (const t of ticks(0, yMax, 4, 1)) {
      root.append(svg("line", { x1: m.l, x2: W - m.r, y1: sy(t), y2: sy(t), class: "grid" }));
      root.append(svg("text", { x: m.l - 6, y: sy(t) + 4, "text-anchor": "end", class: "tick" }, fmt(t, 3)));
    }
    for (let i = 0; i < counts.length; i++) {
      const c = isNum(counts[i]) ? counts[i] : 0;
      const x0 = sx(edges[i]);
      const x1 = sx(edges[i + 1]);
      const rect = svg("rect", { x: Math.min(x0, x1), y: sy(c), width: Math.max(0.5, Math.abs(x1 - x0) - 0.5),
        height: Math.max(0, H - m.b - sy(c)), fill: opts.fill || "#4a5a6a", class: "bar" });
      const range = opts.logX
        ? `[${fmtDensity(Math.pow(10, edges[i]))}, ${fmtDensity(Math.pow(10, edges[i + 1]))})`
        : `[${fmt(edges[i])}, ${fmt(edges[i + 1])})`;
      rect.append(svg("title", {}, `${range}: ${fmt(c)}`));
      root.append(rect);
    }
    root.append(svg("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, class: "axis" }));
    root.append(svg("line", { x1: m.l, x2: m.l, y1: m.t, y2: H - m.b, class: "axis" }));
    for (const t of ticks(lo, hi, 6, opts.logX ? 1 : 0)) {
      root.append(svg("line", { x1: sx(t), x2: sx(t), y1: H - m.b, y2: H - m.b + 4, class: "axis" }));
      root.append(svg("text", { x: sx(t), y: H - m.b + 16, "text-anchor": "middle", class: "tick" }, xFmt(t)));
    }
    if (opts.xLabel) {
      root.append(svg("text", { x: (m.l + W - m.r) / 2, y: H - 4, "text-anchor": "middle", class: "axis-label" },
        opts.xLabel));
    }
    if (opts.yLabel) {
      root.append(svg("text", { x: 12, y: (m.t + H - m.b) / 2, "text-anchor": "middle", class: "axis-label",
        transform: `rotate(-90 12 ${(m.t + H - m.b) / 2})` }, opts.yLabel));
    }
    return root;
  }

  function histDomain(hists) {
    let lo = Infinity;
    let hi = -Infinity;
    let yMax = 1;
    for (const hh of hists) {
      if (!hh || !hh.edges || hh.edges.length < 2) continue;
      lo = Math.min(lo, hh.edges[0]);
      hi = Math.max(hi, hh.edges[hh.edges.length - 1]);
      for (const c of hh.counts) if (isNum(c)) yMax = Math.max(yMax, c);
    }
    return Number.isFinite(lo) ? { xDomain: [lo, hi], yMax } : { yMax };
  }

  // ------------------------------------------------------------------ script loading

  const loading = new Map();

  function loadScript(src) {
    if (loading.has(src)) return loading.get(src);
    const p = new Promise((resolve, reject) => {
      const el = document.createElement("script");
      el.src = src;
      el.async = true;
      el.onload = () => {
        el.remove();
        resolve();
      };
      el.onerror = () => {
        el.remove();
        loading.delete(src);
        reject(new Error(`could not load ${src}`));
      };
      document.head.append(el);
    });
    loading.set(src, p);
    return p;
  }

  // ------------------------------------------------------------------ virtualized table

  /** A grid that keeps only the visible rows in the DOM. columns: [{key, label, width, numeric, sortable}];
   *  cell(row, col) returns a Node or string; onOpen(row) on Enter or click; onSort(key) on a header click. */
  class VirtualTable {
    constructor(container, opts) {
      this.opts = opts;
      this.rowHeight = opts.rowHeight || 30;
      this.order = new Int32Array(0);
      this.active = 0;
      this.rendered = new Map();
      this.frame = 0;
      const template = opts.columns.map((c) => c.width).join(" ");
      this.root = h("div", { class: "vt", role: "grid", "aria-label": opts.label,
        "aria-colcount": opts.columns.length, style: `--vt-cols: ${template}` });
      this.scroller = h("div", { class: "vt-scroll", tabindex: "-1" });
      this.head = h("div", { class: "vt-row vt-head", role: "row", "aria-rowindex": 1 });
      this.headers = new Map();
      for (const col of opts.columns) {
        const cell = h("div", { class: "vt-cell" + (col.numeric ? " num" : ""), role: "columnheader" });
        if (col.sortable) {
          const btn = h("button", { type: "button", class: "sort", "data-sort": col.key,
            title: `Sort by ${col.label}`, onclick: () => opts.onSort(col.key) }, col.label,
          h("span", { class: "arrow", "aria-hidden": "true" }));
          cell.append(btn);
          cell.setAttribute("aria-sort", "none");
        } else cell.textContent = col.label;
        this.headers.set(col.key, cell);
        this.head.append(cell);
      }
      this.body = h("div", { class: "vt-body", role: "rowgroup" });
      this.empty = h("div", { class: "vt-empty", hidden: true, text: opts.emptyText || "No rows." });
      this.scroller.append(this.head, this.body, this.empty);
      this.root.append(this.scroller);
      container.replaceChildren(this.root);
      this.scroller.addEventListener("scroll", () => this.schedule());
      window.addEventListener("resize", () => this.schedule());
      this.scroller.addEventListener("keydown", (e) => this.onKey(e));
      this.body.addEventListener("click", (e) => {
        const row = e.target.closest(".vt-row");
        if (!row || e.target.closest("a, button")) return;
        this.active = Number(row.dataset.pos);
        this.opts.onOpen(this.order[this.active], e);
      });
      this.body.addEventListener("focusin", (e) => {
        const row = e.target.closest(".vt-row");
        if (row) this.setActive(Number(row.dataset.pos), false);
      });
    }

    setSort(key, dir) {
      for (const [k, cell] of this.headers) {
        if (!cell.hasAttribute("aria-sort")) continue;
        const on = k === key;
        cell.setAttribute("aria-sort", on ? (dir > 0 ? "ascending" : "descending") : "none");
        cell.querySelector(".arrow").textContent = on ? (dir > 0 ? " \u25b2" : " \u25bc") : "";
      }
    }

    setOrder(order) {
      const hadFocus = this.root.contains(document.activeElement) &&
        document.activeElement.classList.contains("vt-row");
      this.order = order;
      this.active = 0;
      for (const el of this.rendered.values()) el.remove();
      this.rendered.clear();
      this.body.style.height = `${order.length * this.rowHeight}px`;
      this.root.setAttribute("aria-rowcount", order.length + 1);
      this.empty.hidden = order.length > 0;
      this.scroller.scrollTop = 0;
      this.render();
      if (hadFocus) this.focusActive();
    }

    schedule() {
      if (this.frame) return;
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        this.render();
      });
    }

    visibleRows() {
      const headH = this.head.offsetHeight;
      return Math.max(1, Math.floor((this.scroller.clientHeight - headH) / this.rowHeight));
    }

    render() {
      const rh = this.rowHeight;
      const n = this.order.length;
      const view = this.scroller.clientHeight || 600;
      const top = Math.max(0, this.scroller.scrollTop);
      const first = Math.max(0, Math.floor(top / rh) - 6);
      const last = Math.min(n, Math.ceil((top + view) / rh) + 6);
      for (const [pos, el] of this.rendered) {
        if (pos < first || pos >= last) {
          if (el.contains(document.activeElement)) continue; // keep the focused row until focus moves
          el.remove();
          this.rendered.delete(pos);
        }
      }
      const frag = document.createDocumentFragment();
      for (let pos = first; pos < last; pos++) {
        if (this.rendered.has(pos)) continue;
        const row = this.order[pos];
        const el = h("div", { class: "vt-row", role: "row", tabindex: "-1", "aria-rowindex": pos + 2,
          "data-pos": pos, "data-row": row, style: `top: ${pos * rh}px` });
        const rid = this.opts.rowId ? this.opts.rowId(row) : null;
        if (rid !== null) el.dataset.id = rid;
        if (this.opts.rowClass) {
          const cls = this.opts.rowClass(row);
          if (cls) el.classList.add(cls);
        }
        for (const col of this.opts.columns) {
          const cell = h("div", { class: "vt-cell" + (col.numeric ? " num" : ""), role: "gridcell" });
          append(cell, this.opts.cell(row, col));
          el.append(cell);
        }
        this.rendered.set(pos, el);
        frag.append(el);
      }
      this.body.append(frag);
      this.updateTabStop();
    }

    updateTabStop() {
      let stop = this.rendered.get(this.active);
      if (!stop && this.rendered.size) stop = this.rendered.get(Math.min(...this.rendered.keys()));
      for (const el of this.rendered.values()) el.tabIndex = el === stop ? 0 : -1;
    }

    setActive(pos, focus) {
      const n = this.order.length;
      if (n === 0) return;
      this.active = Math.max(0, Math.min(n - 1, pos));
      if (focus) this.focusActive();
      else this.updateTabStop();
    }

    ensureVisible(pos) {
      const rh = this.rowHeight;
      const headH = this.head.offsetHeight;
      const rowTop = pos * rh;
      const viewTop = this.scroller.scrollTop;
      const viewH = this.scroller.clientHeight - headH;
      if (rowTop < viewTop) this.scroller.scrollTop = rowTop;
      else if (rowTop + rh > viewTop + viewH) this.scroller.scrollTop = rowTop + rh - viewH;
      this.render();
    }

    focusActive() {
      if (this.order.length === 0) {
        this.scroller.focus({ preventScroll: true });
        return;
      }
      this.ensureVisible(this.active);
      this.updateTabStop();
      const el = this.rendered.get(this.active);
      if (el) el.focus({ preventScroll: true });
    }

    focus() {
      this.focusActive();
    }

    onKey(e) {
      if (e.altKey || e.ctrlKey || e.metaKey) return;
      const n = this.order.length;
      if (n === 0 || !e.target.classList.contains("vt-row")) return;
      const page = this.visibleRows();
      const moves = { ArrowDown: 1, ArrowUp: -1, PageDown: page, PageUp: -page };
      if (e.key in moves) this.setActive(this.active + moves[e.key], true);
      else if (e.key === "Home") this.setActive(0, true);
      else if (e.key === "End") this.setActive(n - 1, true);
      else if (e.key === "Enter" || e.key === " ") this.opts.onOpen(this.order[this.active], e);
      else return;
      e.preventDefault();
    }
  }

  // ------------------------------------------------------------------ page chrome

  function showLoadError(message) {
    const status = $("load-status");
    status.textContent = message;
    status.className = "status error";
    status.setAttribute("role", "alert");
  }

  function kvTable(table, entries) {
    table.replaceChildren();
    const body = h("tbody");
    for (const [k, v] of entries) {
      const text = v === null || v === undefined ? "n/a" : typeof v === "number" ? fmt(v) : String(v);
      body.append(h("tr", null, h("th", { scope: "row", text: k }),
        h("td", { class: "num", title: v === null ? "not a finite number" : String(v), text })));
    }
    if (entries.length === 0) body.append(h("tr", null, h("td", { text: "none recorded" })));
    table.append(body);
  }

  function statBlock(label, value, hint) {
    return h("div", { class: "stat" }, h("dt", { text: label }),
      h("dd", { text: value, title: hint || null }));
  }

  // ================================================================== index page

  const state = {
    meta: null,
    files: null,
    idx: null,
    sortKey: "id",
    sortDir: 1,
    sorted: null,
    filtered: new Int32Array(0),
    table: null,
    view: null,
    nav: [],
    overviewScroll: 0,
    renderSeq: 0,
    prompt: null,
  };

  function buildIndex(parts, kind) {
    const n = parts.reduce((s, p) => s + p.n, 0);
    const idx = {
      n,
      id: new Float64Array(n),
      density: new Float64Array(n),
      mean_act: new Float64Array(n),
      max_act: new Float64Array(n),
      subspace_share: new Float64Array(n),
      alive: new Uint8Array(n),
      qk_group: kind === "lorsa" ? new Float64Array(n) : null,
      tops: new Array(n),
      search: new Array(n),
      rowOf: new Map(),
    };
    const num = (v) => (v === null || v === undefined ? NaN : v);
    let r = 0;
    for (const p of parts) {
      const c = p.columns;
      for (let i = 0; i < p.n; i++, r++) {
        idx.id[r] = c.id[i];
        idx.density[r] = num(c.density[i]);
        idx.mean_act[r] = num(c.mean_act[i]);
        idx.max_act[r] = num(c.max_act[i]);
        idx.subspace_share[r] = num(c.subspace_share[i]);
        idx.alive[r] = c.alive[i];
        if (idx.qk_group) idx.qk_group[r] = num(c.qk_group[i]);
        const tops = c.top_tokens[i].map((t) => p.vocab[t]);
        idx.tops[r] = tops;
        idx.search[r] = tops.join("\u0000").toLowerCase();
        idx.rowOf.set(c.id[i], r);
      }
    }
    return idx;
  }

  function renderHeader(meta, manifest) {
    document.title = `${meta.title} \u00b7 ranklens dashboard`;
    $("title").textContent = meta.title;
    const where = meta.kind === "lorsa" ? `Lorsa \u00b7 layer ${meta.layer}` : `SAE \u00b7 site ${meta.site}`;
    const header = $("site-header");
    const status = $("load-status");
    status.className = "subtitle";
    status.removeAttribute("role");
    status.textContent = `${where} \u00b7 model ${meta.model} \u00b7 corpus ${meta.corpus}`;
    const deadShare = meta.n_features ? meta.n_dead / meta.n_features : NaN;
    const stats = h("dl", { class: "stats", id: "header-stats" },
      statBlock(meta.kind === "lorsa" ? "Heads" : "Features", fmt(meta.n_features)),
      statBlock("Dead", `${fmt(meta.n_dead)} (${fmtPct(deadShare, 2)})`, meta.dead_definition),
      statBlock("Tokens scanned", fmt(meta.tokens), "held-out tokens over which the statistics were computed"),
      statBlock("d", fmt(meta.d), "dimension of the activations"),
      statBlock("Subspace dim", fmt(meta.subspace_dim), "dimension of the subspace behind the subspace share"));
    header.querySelectorAll(".stats, .dead-note, .missing-note").forEach((el) => el.remove());
    header.append(stats, h("p", { class: "caption dead-note" }, h("strong", { text: "Dead: " }),
      String(meta.dead_definition)));
    if (manifest.n_missing_records > 0) {
      header.append(h("p", { class: "note missing-note", text: `Detail records were written for ` +
        `${fmt(manifest.n_records)} of ${fmt(meta.n_features)} features; the others show their table row only.` }));
    }
    const metrics = Object.entries(meta.metrics || {});
    kvTable($("metrics"), metrics);
    $("site-footer").textContent = `Built ${meta.built} from ${meta.source} \u00b7 ${meta.format}`;
  }

  function renderDensity(meta) {
    const hist = meta.density_histogram;
    const box = $("density-histogram");
    box.replaceChildren(histogram(hist, { logX: true, xLabel: "density (fraction of tokens, log scale)",
      yLabel: "features", fill: "#5b6b7b", label: "Histogram of log10 feature densities" }));
    const idx = state.idx;
    let zero = 0;
    for (let i = 0; i < idx.n; i++) if (!(idx.density[i] > 0)) zero++;
    $("density-caption").textContent = `Density: the fraction of the ${fmt(meta.tokens)} held-out tokens on which ` +
      `a feature is active. ${fmt(zero)} features with density 0 (or none recorded) are not in the histogram.`;
  }

  function featureColumns(kind) {
    const cols = [
      { key: "id", label: "id", width: "80px", numeric: true, sortable: true },
      { key: "density", label: "density", width: "96px", numeric: true, sortable: true },
      { key: "mean_act", label: "mean act", width: "96px", numeric: true, sortable: true },
      { key: "max_act", label: "max act", width: "96px", numeric: true, sortable: true },
      { key: "alive", label: "status", width: "76px", sortable: true },
      { key: "subspace_share", label: "subspace", width: "92px", numeric: true, sortable: true },
    ];
    if (kind === "lorsa") cols.push({ key: "qk_group", label: "QK group", width: "92px", numeric: true, sortable: true });
    cols.push({ key: "top_tokens", label: "top tokens", width: "minmax(260px, 1fr)" });
    if (state.ai) {
      cols.push({ key: "ai_score", label: "sim score", width: "92px", numeric: true, sortable: true });
      cols.push({ key: "explanation", label: "explanation", width: "minmax(240px, 1.4fr)" });
    }
    return cols;
  }

  function featureCell(row, col) {
    const idx = state.idx;
    switch (col.key) {
      case "id": return String(idx.id[row]);
      case "density": return fmtDensity(idx.density[row]);
      case "mean_act": return fmt(idx.mean_act[row]);
      case "max_act": return fmt(idx.max_act[row]);
      case "alive": return idx.alive[row] ? h("span", { class: "badge alive", text: "alive" })
        : h("span", { class: "badge dead", text: "dead" });
      case "subspace_share": return fmt(idx.subspace_share[row], 3);
      case "qk_group": return isNum(idx.qk_group[row]) ? String(idx.qk_group[row]) : "n/a";
      case "top_tokens": return h("span", { class: "chips" }, idx.tops[row].map((t) => tokenChip(t)));
      case "ai_score": return fmt(idx.ai_score[row], 3);
      case "explanation": {
        const e = aiEntry(idx.id[row]);
        return e ? h("span", { class: "explanation", title: e.explanation, text: e.explanation }) : "";
      }
      default: return "";
    }
  }

  /** The autointerp result of a feature ({explanation, z_explanation?, scores?, floor?}), or null. */
  function aiEntry(id) {
    return state.ai ? state.ai.features[String(id)] || null : null;
  }

  /** Adds the autointerp columns (headline simulation score; explanation, searchable) to the index. */
  function attachAi(idx) {
    idx.ai_score = new Float64Array(idx.n).fill(NaN);
    for (let r = 0; r < idx.n; r++) {
      const e = aiEntry(idx.id[r]);
      if (!e) continue;
      const s = e.scores && e.scores.simulation;
      if (isNum(s)) idx.ai_score[r] = s;
      idx.search[r] += "\u0000" + String(e.explanation || "").toLowerCase();
    }
  }

  function aiSection(e) {
    const names = { simulation: "simulation (correlation)", simulation_z: "z-pattern simulation (correlation)",
      detection: "detection (balanced accuracy)", fuzzing: "fuzzing (balanced accuracy)" };
    const rows = Object.entries(e.scores || {}).map(([m, v]) => h("tr", null, h("td", { text: names[m] || m }),
      h("td", { class: "num", text: fmt(v, 3) }), h("td", { class: "num", text: fmt((e.floor || {})[m], 3) })));
    return h("section", { class: "card", id: "autointerp" },
      h("h3", { text: "Explanation (automated interpretability)" }),
      h("p", { class: "explanation-text", id: "explanation", text: e.explanation || "(none)" }),
      e.z_explanation ? h("p", { class: "explanation-text", id: "z-explanation" },
        h("span", { class: "muted", text: "z-pattern: " }), String(e.z_explanation)) : null,
      rows.length ? h("table", { class: "data", id: "autointerp-scores" },
        h("thead", null, h("tr", null, h("th", { text: "score" }), h("th", { class: "num", text: "this explanation" }),
          h("th", { class: "num", text: "random explanation (floor)" }))),
        h("tbody", null, rows)) : h("p", { class: "muted", text: "Not scored yet (ranklens autointerp score)." }),
      h("p", { class: "caption", text: `Judge: ${state.ai.judge}. Explained from the top activating contexts ` +
        "shown below; scored on held-out ones." }));
  }

  function sortIndex() {
    const idx = state.idx;
    const key = state.sortKey;
    const dir = state.sortDir;
    const col = key === "alive" ? idx.alive : idx[key];
    const ids = idx.id;
    const order = new Int32Array(idx.n);
    for (let i = 0; i < idx.n; i++) order[i] = i;
    order.sort((a, b) => {
      const x = col[a];
      const y = col[b];
      const xn = x !== x;
      const yn = y !== y;
      if (xn || yn) return xn === yn ? ids[a] - ids[b] : xn ? 1 : -1; // missing values last either way
      return (x - y) * dir || ids[a] - ids[b];
    });
    state.sorted = order;
  }

  function parseBound(input) {
    const s = input.value.trim();
    if (s === "") return { value: null };
    const v = Number(s);
    if (!Number.isFinite(v)) return { error: `"${s}" is not a number (write densities like 0.001 or 1e-5)` };
    return { value: v };
  }

  function applyFilters() {
    const idx = state.idx;
    const alive = $("filter-alive").value;
    const lo = parseBound($("filter-min"));
    const hi = parseBound($("filter-max"));
    const err = lo.error || hi.error;
    $("filter-error").hidden = !err;
    $("filter-error").textContent = err || "";
    let q = $("search").value.trim().toLowerCase().replace(/\\n/g, "\n").replace(/\\t/g, "\t");
    const idMatch = /^#?\d+$/.test(q) ? Number(q.replace("#", "")) : null;
    if (q === "") q = null;
    const src = state.sorted;
    const out = new Int32Array(src.length);
    let m = 0;
    const lov = err ? null : lo.value;
    const hiv = err ? null : hi.value;
    for (let i = 0; i < src.length; i++) {
      const r = src[i];
      if (alive === "alive" && !idx.alive[r]) continue;
      if (alive === "dead" && idx.alive[r]) continue;
      const d = idx.density[r];
      if (lov !== null && !(d >= lov)) continue;
      if (hiv !== null && !(d <= hiv)) continue;
      if (q !== null && idx.id[r] !== idMatch && !idx.search[r].includes(q)) continue;
      out[m++] = r;
    }
    state.filtered = out.slice(0, m);
    state.table.setOrder(state.filtered);
    $("table-count").textContent = `showing ${fmt(m)} of ${fmt(idx.n)}`;
  }

  function onSort(key) {
    if (state.sortKey === key) state.sortDir = -state.sortDir;
    else {
      state.sortKey = key;
      state.sortDir = key === "id" ? 1 : -1; // statistics: largest first on the first click
    }
    state.table.setSort(state.sortKey, state.sortDir);
    sortIndex();
    applyFilters();
  }

  function openFeature(id) {
    location.hash = `feature=${id}`;
  }

  function initTable() {
    const meta = state.meta;
    state.table = new VirtualTable($("feature-table"), {
      columns: featureColumns(meta.kind),
      label: meta.kind === "lorsa" ? "Lorsa heads" : "Features",
      rowHeight: 30,
      emptyText: "No feature matches the filters.",
      rowId: (row) => String(state.idx.id[row]),
      rowClass: (row) => (state.idx.alive[row] ? null : "is-dead"),
      cell: featureCell,
      onSort,
      onOpen: (row) => openFeature(state.idx.id[row]),
    });
    state.table.setSort(state.sortKey, state.sortDir);
    sortIndex();
    let timer = 0;
    const later = () => {
      clearTimeout(timer);
      timer = setTimeout(applyFilters, 120);
    };
    $("search").addEventListener("input", later);
    $("filter-min").addEventListener("input", later);
    $("filter-max").addEventListener("input", later);
    $("filter-alive").addEventListener("change", applyFilters);
    for (const id of ["filter-min", "filter-max"]) {
      $(id).addEventListener("keydown", (e) => {
        if (e.key === "Enter") {
          e.preventDefault();
          clearTimeout(timer);
          applyFilters();
        }
      });
    }
    $("search").addEventListener("keydown", (e) => {
      if (e.key === "Enter") {
        e.preventDefault();
        clearTimeout(timer);
        applyFilters();
        state.table.focus();
      } else if (e.key === "ArrowDown") {
        e.preventDefault();
        state.table.focus();
      }
    });
    applyFilters();
  }

  // ------------------------------------------------------------------ routing

  function currentRoute() {
    const m = /^#feature=(\d+)$/.exec(location.hash);
    return m ? { view: "feature", id: Number(m[1]) } : { view: "overview" };
  }

  function route() {
    const hash = location.hash;
    const nav = state.nav;
    if (nav.length >= 2 && nav[nav.length - 2] === hash) nav.pop();
    else if (nav[nav.length - 1] !== hash) nav.push(hash);
    const r = currentRoute();
    if (r.view === "feature") showFeature(r.id);
    else showOverview();
  }

  function goBack() {
    if (state.nav.length > 1) history.back();
    else location.hash = "";
  }

  function showOverview() {
    const wasFeature = state.view === "feature";
    state.view = "overview";
    document.body.dataset.view = "overview";
    document.title = `${state.meta.title} \u00b7 ranklens dashboard`;
    state.renderSeq++; // a feature still loading must not write into the view cleared here
    $("feature-view").hidden = true;
    $("feature-view").replaceChildren();
    $("overview-view").hidden = false;
    state.table.render();
    if (wasFeature) {
      window.scrollTo(0, state.overviewScroll);
      if (state.tableScroll !== undefined) state.table.scroller.scrollTop = state.tableScroll;
      state.table.render();
      if (state.returnFocus === "table") state.table.focus();
      else if (state.returnFocus === "search") focusSearch();
      state.returnFocus = null;
    }
  }

  function showFeature(id) {
    if (state.view !== "feature") {
      state.overviewScroll = window.scrollY;
      state.tableScroll = state.table.scroller.scrollTop;
      const a = document.activeElement;
      state.returnFocus = a && state.table.root.contains(a) ? "table" : null;
    }
    state.view = "feature";
    document.body.dataset.view = "feature";
    $("overview-view").hidden = true;
    const view = $("feature-view");
    view.hidden = false;
    window.scrollTo(0, 0);
    renderFeature(id);
  }

  // ------------------------------------------------------------------ feature page

  async function loadRecord(id) {
    const files = state.files;
    const k = Math.floor(id / files.feature_chunk_size);
    const src = files.features[String(k)];
    if (!src) return null;
    if (!store.chunks.has(k)) {
      await loadScript(src);
      if (!store.chunks.has(k)) throw new Error(`${src} loaded but held no data`);
    }
    const chunk = store.chunks.get(k);
    store.chunks.delete(k); // most recently used last
    store.chunks.set(k, chunk);
    while (store.chunks.size > CHUNK_CACHE) {
      const oldest = store.chunks.keys().next().value;
      store.chunks.delete(oldest);
      loading.delete(files.features[String(oldest)]);
    }
    if (!chunk.byId) {
      chunk.byId = new Map();
      for (const rec of chunk.features) chunk.byId.set(rec.id, rec);
    }
    const rec = chunk.byId.get(id);
    if (!rec) return null;
    if (!rec.decoded) decodeRecord(rec, chunk.vocab);
    return rec;
  }

  /** Contexts are stored as [token indices, acts, peak, doc, pos, z?]; the page works with the contract's
   *  objects {tokens, acts, peak, doc, pos, z}. */
  function decodeRecord(rec, vocab) {
    const dec = (c) => {
      const ctx = { tokens: c[0].map((t) => vocab[t]), acts: c[1], peak: c[2], doc: c[3], pos: c[4] };
      if (c.length > 5) ctx.z = c[5];
      return ctx;
    };
    rec.top = rec.top.map(dec);
    for (const q of rec.quantiles) q.examples = q.examples.map(dec);
    rec.decoded = true;
  }

  function card(title, ...children) {
    return h("section", { class: "card" }, h("h3", { text: title }), ...children);
  }

  function legend(maxAct, withZ) {
    return h("div", { class: "legend", "aria-label": "Colour legend" },
      h("span", { class: "legend-item" }, "activation ", h("span", { class: "ramp ramp-act" }),
        ` 0 \u2013 ${fmt(maxAct)}`),
      withZ ? h("span", { class: "legend-item" }, "z-pattern source ", h("span", { class: "ramp ramp-z" }),
        " 0 \u2013 max |z| of the context") : null,
      h("span", { class: "legend-item" }, h("span", { class: "tok peak legend-peak", text: "tok" }),
        " peak token"),
      h("span", { class: "legend-item muted", text: "hover a token for its exact value" }));
  }

  function tokenSpan(tok, value, scale, kind, isPeak) {
    const v = isNum(value) ? value : null;
    const name = kind === "z" ? "z" : "activation";
    const shade = kind === "z" ? zShade : actShade;
    const el = h("span", {
      class: "tok" + (isPeak ? " peak" : "") + (v !== null && v < 0 ? " neg" : ""),
      style: v === null || !(scale > 0) ? "" : shade(Math.abs(v) / scale),
      title: `${tokenLabel(tok)} \u00b7 ${name} ${v === null ? "n/a" : String(v)}` +
        (isPeak ? (kind === "z" ? " \u00b7 destination (peak)" : " \u00b7 peak") : ""),
    }, tokenNodes(tok, false));
    el.setAttribute(kind === "z" ? "data-z" : "data-act", v === null ? "null" : String(v));
    if (isPeak) el.dataset.peak = "1";
    return el;
  }

  function contextRow(ctx, scale) {
    const hasZ = Array.isArray(ctx.z);
    let zScale = 0;
    if (hasZ) for (const z of ctx.z) if (isNum(z)) zScale = Math.max(zScale, Math.abs(z));
    const toks = h("div", { class: "tokens" + (hasZ ? " with-z" : "") });
    ctx.tokens.forEach((tok, i) => {
      const a = tokenSpan(tok, ctx.acts[i], scale, "act", i === ctx.peak);
      if (hasZ) {
        toks.append(h("span", { class: "tk2" }, a, tokenSpan(tok, ctx.z[i], zScale, "z", i === ctx.peak)));
      } else toks.append(a);
    });
    const peakAct = ctx.acts[ctx.peak];
    return h("div", { class: "ctx", "data-doc": ctx.doc, "data-pos": ctx.pos },
      h("div", { class: "ctx-meta" },
        h("span", { class: "ctx-val", title: "activation at the peak token", text: fmt(peakAct) }),
        h("span", { class: "muted", text: `doc ${ctx.doc} \u00b7 pos ${ctx.pos}` }),
        hasZ ? h("span", { class: "muted rowlabels", text: "act / z" }) : null),
      toks);
  }

  /** The activation that shades fully: the feature's max activation, or a larger one shown in its contexts. */
  function contextScale(rec) {
    let m = isNum(rec.max_act) ? Math.abs(rec.max_act) : 0;
    for (const c of rec.top) for (const a of c.acts) if (isNum(a)) m = Math.max(m, Math.abs(a));
    return m;
  }

  function neighbourRow(pair) {
    const [nid, cos] = pair;
    const r = state.idx.rowOf.get(nid);
    return h("tr", null,
      h("td", { class: "num" }, h("a", { href: `#feature=${nid}`, class: "feature-link", "data-feature": nid,
        text: `#${nid}` })),
      h("td", { class: "num", text: fmt(cos, 3), "data-cos": String(cos) }),
      h("td", null, r === undefined ? "" : h("span", { class: "chips" }, state.idx.tops[r].map((t) => tokenChip(t)))));
  }

  function tokenValueTable(caption, pairs, cls) {
    return h("table", { class: "data tv " + cls },
      h("caption", { text: caption }),
      h("thead", null, h("tr", null, h("th", { text: "token" }), h("th", { class: "num", text: "effect" }))),
      h("tbody", null, pairs.length ? pairs.map(([tok, v]) => h("tr", null, h("td", null, tokenChip(tok)),
        h("td", { class: "num", text: fmt(v), title: String(v), "data-value": String(v) })))
        : h("tr", null, h("td", { colspan: 2, class: "muted", text: "none recorded" }))));
  }

  function attributionBlock(lorsa) {
    const rows = (lorsa.attribution || []).map(([label, share]) => h("div", { class: "bar-row",
      "data-head": label, "data-share": String(share) },
    h("span", { class: "bar-label", text: label }),
    h("span", { class: "bar-track" }, h("span", { class: "bar-fill",
      style: `width: ${(Math.max(0, Math.min(1, isNum(share) ? share : 0)) * 100).toFixed(2)}%` })),
    h("span", { class: "bar-val", text: fmtPct(share) })));
    return h("div", { class: "attribution" },
      h("p", null, `QK group `, h("strong", { id: "qk-group", text: String(lorsa.qk_group) }),
        " \u00b7 original heads needed for 90% of the attribution: ",
        h("strong", { id: "heads-90", text: lorsa.heads_for_90pct === null ? "n/a" : String(lorsa.heads_for_90pct) })),
      rows.length ? h("div", { class: "bars", role: "list", "aria-label": "Attribution to the original heads" },
        rows.map((r) => {
          r.setAttribute("role", "listitem");
          return r;
        })) : h("p", { class: "muted", text: "No attribution recorded." }),
      rows.length ? h("p", { class: "caption", text: "Attribution to the original attention heads: the share of " +
        "this head's output that each original head accounts for (largest first)." }) : null);
  }

  function navButtons(id) {
    const order = state.filtered;
    const r = state.idx.rowOf.get(id);
    let pos = -1;
    if (r !== undefined) for (let i = 0; i < order.length; i++) if (order[i] === r) { pos = i; break; }
    const prevId = pos > 0 ? state.idx.id[order[pos - 1]] : null;
    const nextId = pos >= 0 && pos < order.length - 1 ? state.idx.id[order[pos + 1]] : null;
    state.prevNext = [prevId, nextId];
    return h("div", { class: "feature-nav" },
      h("button", { type: "button", class: "back", id: "back-button", onclick: goBack, title: "Back (Esc)",
        text: "\u2190 Back" }),
      h("button", { type: "button", id: "prev-feature", disabled: prevId === null,
        title: "Previous in the table's order (\u2190)", onclick: () => openFeature(prevId),
        text: prevId === null ? "\u25c0 previous" : `\u25c0 #${prevId}` }),
      h("button", { type: "button", id: "next-feature", disabled: nextId === null,
        title: "Next in the table's order (\u2192)", onclick: () => openFeature(nextId),
        text: nextId === null ? "next \u25b6" : `#${nextId} \u25b6` }));
  }

  async function renderFeature(id) {
    const seq = ++state.renderSeq;
    const view = $("feature-view");
    const meta = state.meta;
    const noun = meta.kind === "lorsa" ? "Head" : "Feature";
    document.title = `${noun} ${id} \u00b7 ${meta.title}`;
    const row = state.idx.rowOf.get(id);
    view.replaceChildren(navButtons(id), h("h2", { id: "feature-title", text: `${noun} ${id}` }),
      h("p", { class: "status", id: "feature-status", text: "Loading\u2026" }));
    if (row === undefined) {
      $("feature-status").textContent = `There is no ${noun.toLowerCase()} ${id} in this dictionary ` +
        `(ids run from ${fmt(state.idx.id[0])} to ${fmt(state.idx.id[state.idx.n - 1])}).`;
      return;
    }
    let rec;
    try {
      rec = await loadRecord(id);
    } catch (err) {
      if (seq !== state.renderSeq) return;
      $("feature-status").textContent = `Could not load the data of ${noun.toLowerCase()} ${id}: ${err.message}.`;
      $("feature-status").className = "status error";
      return;
    }
    if (seq !== state.renderSeq) return;
    const idx = state.idx;
    const title = $("feature-title");
    title.append(" ", idx.alive[row] ? h("span", { class: "badge alive", text: "alive" })
      : h("span", { class: "badge dead", text: "dead" }));
    const value = (key) => (rec && isNum(rec[key]) ? rec[key] : idx[key][row]); // the record, else the table
    const stats = h("dl", { class: "stats", id: "feature-stats" },
      statBlock("Density", fmtDensity(value("density")), "fraction of held-out tokens"),
      statBlock("Mean act", fmt(value("mean_act")), "mean over the tokens where active"),
      statBlock("Max act", fmt(value("max_act"))),
      statBlock("Status", idx.alive[row] ? "alive" : "dead", meta.dead_definition),
      statBlock(`Subspace share (dim ${fmt(meta.subspace_dim)})`, fmt(value("subspace_share"), 3),
        `share of the decoder direction in the top-${meta.subspace_dim} subspace`));
    const topTokens = h("p", { class: "chips-line" }, h("span", { class: "muted", text: "Top tokens: " }),
      h("span", { class: "chips" }, idx.tops[row].map((t) => tokenChip(t))));
    $("feature-status").remove();
    view.append(stats, topTokens);
    const ai = aiEntry(id);
    if (ai) view.append(aiSection(ai));
    if (!rec) {
      view.append(h("p", { class: "note", id: "no-record",
        text: `No detail record was written for ${noun.toLowerCase()} ${id}; only its table row is known.` }));
      return;
    }
    const scale = contextScale(rec);
    const isLorsa = meta.kind === "lorsa";
    if (isLorsa) {
      view.append(card("Lorsa head", rec.lorsa ? attributionBlock(rec.lorsa)
        : h("p", { class: "muted", text: "No Lorsa attribution recorded." })));
    }
    const left = h("div", { class: "stack" });
    const right = h("div", { class: "stack" });
    left.append(card("Activation histogram",
      h("div", { class: "chart", id: "act-histogram" }, histogram(rec.act_histogram, {
        xLabel: "activation (non-zero)", yLabel: "tokens", fill: "#d66a00",
        label: "Histogram of the non-zero activations" })),
      h("p", { class: "caption", text: "Non-zero activations over the held-out tokens." })));
    const logits = rec.logits;
    right.append(card("Logit effects", logits ? h("div", { id: "logits" },
      h("div", { class: "tv-pair" }, tokenValueTable("promoted", logits.promoted, "promoted"),
        tokenValueTable("suppressed", logits.suppressed, "suppressed")),
      logits.histogram ? h("div", { class: "chart" }, histogram(logits.histogram, { xLabel: "logit effect",
        yLabel: "tokens", height: 160, label: "Histogram of the logit effects over the vocabulary" })) : null,
      h("p", { class: "caption logit-note", text: meta.logit_note }))
      : h("p", { class: "muted", text: "No logit effects recorded." })));
    left.append(card(`Nearest ${isLorsa ? "heads" : "features"} by decoder cosine`,
      rec.neighbours.length ? h("table", { class: "data", id: "neighbours" },
        h("thead", null, h("tr", null, h("th", { class: "num", text: "id" }), h("th", { class: "num", text: "cosine" }),
          h("th", { text: "top tokens" }))),
        h("tbody", null, rec.neighbours.map(neighbourRow)))
        : h("p", { class: "muted", text: "None recorded." })));
    view.append(h("div", { class: "overview-grid feature-grid" }, left, right));
    const hasZ = rec.top.some((c) => Array.isArray(c.z));
    view.append(h("section", { class: "card", id: "top-contexts" },
      h("h3", { text: `Top activating contexts (${rec.top.length})` }),
      hasZ ? h("p", { class: "caption", text: "Each token shows two rows: the head's activation (orange) and, " +
        "below it, the z-pattern of the peak token: how much each source position j contributed A_ij v_j to " +
        "the activation at the outlined peak (blue)." }) : null,
      legend(scale, hasZ),
      rec.top.length ? h("div", { class: "contexts" }, rec.top.map((c) => contextRow(c, scale)))
        : h("p", { class: "muted", text: "No activating context recorded (the feature never fired)." })));
    if (rec.quantiles.length) {
      view.append(h("section", { class: "card", id: "quantiles" },
        h("h3", { text: "Samples by activation interval" }),
        h("p", { class: "caption", text: "Random occurrences from intervals of the activation distribution, " +
          "shaded on the same scale as the top contexts." }),
        rec.quantiles.map((q) => h("div", { class: "quantile", "data-label": q.label },
          h("h4", null, q.label, h("span", { class: "muted",
            text: ` activation in [${fmt(q.range[0])}, ${fmt(q.range[1])}]` +
              (q.count === null ? "" : ` \u00b7 ${fmt(q.count)} occurrences`) })),
          q.examples.length ? h("div", { class: "contexts" }, q.examples.map((c) => contextRow(c, scale)))
            : h("p", { class: "muted", text: "no examples" })))));
    }
  }

  // ------------------------------------------------------------------ prompt box

  async function initPrompt() {
    const note = $("prompt-note");
    if (!/^https?:$/.test(location.protocol)) {
      note.append("Opened from disk: run ", h("code", { text: "ranklens serve DIR" }),
        " on this site's directory to analyse your own prompts here.");
      return;
    }
    let info;
    try {
      const resp = await fetch("api/info", { headers: { Accept: "application/json" } });
      if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
      info = await resp.json();
    } catch (err) {
      note.append("This server does not analyse prompts (api/info did not answer); ",
        h("code", { text: "ranklens serve DIR" }), " does.");
      return;
    }
    state.prompt = info;
    note.textContent = `Analysed by the server with the model of this ${info.kind === "lorsa" ? "Lorsa" : "SAE"} ` +
      `(${info.title}); at most ${fmt(info.max_chars)} characters.`;
    const form = $("prompt-form");
    const text = $("prompt-text");
    const count = $("prompt-count");
    form.hidden = false;
    const updateCount = () => {
      count.textContent = `${fmt(text.value.length)} / ${fmt(info.max_chars)} characters`;
      count.classList.toggle("over", text.value.length > info.max_chars);
    };
    text.addEventListener("input", updateCount);
    updateCount();
    text.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        form.requestSubmit();
      }
    });
    form.addEventListener("submit", (e) => {
      e.preventDefault();
      submitPrompt(text.value);
    });
  }

  async function submitPrompt(text) {
    const err = $("prompt-error");
    const out = $("prompt-result");
    const button = $("prompt-submit");
    err.hidden = true;
    button.disabled = true;
    out.setAttribute("aria-busy", "true");
    try {
      let resp;
      try {
        resp = await fetch("api/prompt", { method: "POST", body: JSON.stringify({ text }),
          headers: { "Content-Type": "application/json", Accept: "application/json" } });
      } catch (e) {
        throw new Error("could not reach the server");
      }
      let body = null;
      try {
        body = await resp.json();
      } catch (e) {
        body = null;
      }
      if (!resp.ok) {
        const msg = body && typeof body.error === "string" ? body.error : `HTTP ${resp.status}`;
        throw new Error(`The server refused the prompt (${resp.status}): ${msg}`);
      }
      if (!body || !Array.isArray(body.tokens) || !Array.isArray(body.features) ||
          body.features.length !== body.tokens.length) {
        throw new Error("The server's answer is not a prompt analysis (tokens and features per token).");
      }
      renderPromptResult(body);
    } catch (e) {
      err.textContent = e.message;
      err.hidden = false;
    } finally {
      button.disabled = false;
      out.removeAttribute("aria-busy");
    }
  }

  function renderPromptResult(res) {
    const out = $("prompt-result");
    const tokens = res.tokens;
    const heads = Array.isArray(res.heads) && res.heads.length === tokens.length ? res.heads : null;
    const strip = h("div", { class: "tokens prompt-strip", id: "prompt-strip" });
    const stripLabel = h("p", { class: "caption", id: "prompt-strip-label",
      text: "Point at a feature to shade its activation over the prompt" +
        (heads ? "; press a head's z button to draw its z-pattern." : ".") });
    const spans = tokens.map((tok, i) => h("span", { class: "tok", "data-i": i, title: tokenLabel(tok) },
      tokenNodes(tok, false)));
    strip.append(...spans);

    const clearStrip = () => spans.forEach((s, i) => {
      s.style.cssText = "";
      s.className = "tok";
      s.removeAttribute("data-act");
      s.removeAttribute("data-z");
      s.removeAttribute("data-peak");
      s.title = tokenLabel(tokens[i]);
    });
    const showFeature = (fid) => {
      clearStrip();
      out.querySelectorAll(".zbtn[aria-pressed='true']").forEach((b) => b.setAttribute("aria-pressed", "false"));
      const acts = res.features.map((list) => {
        const hit = (list || []).find((p) => p[0] === fid);
        return hit ? hit[1] : 0;
      });
      let mx = 0;
      for (const a of acts) if (isNum(a)) mx = Math.max(mx, Math.abs(a));
      spans.forEach((s, i) => {
        s.style.cssText = mx > 0 && isNum(acts[i]) ? actShade(Math.abs(acts[i]) / mx) : "";
        s.dataset.act = String(acts[i]);
        s.title = `${tokenLabel(tokens[i])} \u00b7 feature ${fid} activation ${acts[i]}`;
      });
      stripLabel.textContent = `Activation of feature #${fid} at each token (0 where it is not among the top).`;
    };
    const showHead = (hid, at, z) => {
      clearStrip();
      let mx = 0;
      for (const v of z) if (isNum(v)) mx = Math.max(mx, Math.abs(v));
      spans.forEach((s, i) => {
        const v = isNum(z[i]) ? z[i] : null;
        s.style.cssText = v !== null && mx > 0 ? zShade(Math.abs(v) / mx) : "";
        s.dataset.z = v === null ? "null" : String(v);
        s.title = `${tokenLabel(tokens[i])} \u00b7 z ${v === null ? "n/a" : v}`;
        if (i === at) {
          s.classList.add("peak");
          s.dataset.peak = "1";
        }
      });
      stripLabel.textContent = `z-pattern of head #${hid} at token ${at} (${tokenLabel(tokens[at])}, outlined): ` +
        "the contribution of each source position.";
    };

    const table = h("table", { class: "data prompt-table", id: "prompt-table" },
      h("thead", null, h("tr", null, h("th", { class: "num", text: "#" }), h("th", { text: "token" }),
        h("th", { text: "top features" }), heads ? h("th", { text: "top heads (z-pattern)" }) : null)));
    const body = h("tbody");
    tokens.forEach((tok, i) => {
      const feats = (res.features[i] || []).map(([fid, act]) => {
        const a = h("a", { href: `#feature=${fid}`, class: "fchip", "data-feature": fid, "data-act": String(act),
          title: `feature ${fid}: activation ${act}` }, `#${fid}`, h("span", { class: "fval", text: fmt(act, 3) }));
        a.addEventListener("mouseenter", () => showFeature(fid));
        a.addEventListener("focus", () => showFeature(fid));
        return a;
      });
      const headCells = heads ? (heads[i] || []).map((hd) => h("span", { class: "hchip" },
        h("a", { href: `#feature=${hd.id}`, class: "fchip", "data-feature": hd.id, "data-act": String(hd.act),
          title: `head ${hd.id}: activation ${hd.act}` }, `#${hd.id}`,
        h("span", { class: "fval", text: fmt(hd.act, 3) })),
        h("button", { type: "button", class: "zbtn", "data-head": hd.id, "data-token": i, "aria-pressed": "false",
          title: `Draw the z-pattern of head ${hd.id} at this token`, text: "z",
          onclick: (e) => {
            out.querySelectorAll(".zbtn[aria-pressed='true']").forEach((b) => b.setAttribute("aria-pressed", "false"));
            e.currentTarget.setAttribute("aria-pressed", "true");
            showHead(hd.id, i, Array.isArray(hd.z) ? hd.z : []);
          } }))) : null;
      body.append(h("tr", { "data-i": i },
        h("td", { class: "num", text: String(i) }), h("td", null, tokenChip(tok)),
        h("td", null, feats.length ? h("span", { class: "chips" }, feats) : h("span", { class: "muted", text: "none" })),
        heads ? h("td", null, headCells.length ? h("span", { class: "chips" }, headCells)
          : h("span", { class: "muted", text: "none" })) : null));
    });
    table.append(body);
    out.replaceChildren(h("h3", { text: `${fmt(tokens.length)} tokens` }), strip, stripLabel,
      h("div", { class: "table-scroll" }, table));
  }

  // ------------------------------------------------------------------ keyboard

  function isTyping(el) {
    return el && el.matches && el.matches("input, textarea, select, [contenteditable]");
  }

  function focusSearch() {
    const s = $("search");
    s.focus();
    s.select();
  }

  function onGlobalKey(e) {
    if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey) return;
    const typing = isTyping(e.target);
    if (e.key === "/" && !typing) {
      e.preventDefault();
      if (state.view === "feature") {
        state.returnFocus = "search"; // focused once the overview shows (after the hashchange)
        location.hash = "";
      } else focusSearch();
    } else if (e.key === "Escape") {
      if (state.view === "feature") {
        e.preventDefault();
        goBack();
      } else if (typing) {
        e.preventDefault();
        e.target.blur();
        if (e.target.id === "search") state.table.focus();
      }
    } else if (state.view === "feature" && !typing && state.prevNext &&
               (e.key === "ArrowLeft" || e.key === "ArrowRight")) {
      const target = state.prevNext[e.key === "ArrowLeft" ? 0 : 1];
      if (target !== null) {
        e.preventDefault();
        openFeature(target);
      }
    }
  }

  async function startIndex() {
    const manifest = store.manifest;
    if (!manifest || !manifest.meta) {
      showLoadError("data/meta.js did not load: this folder is not a complete ranklens dashboard. Rebuild it.");
      return;
    }
    const meta = manifest.meta;
    if (typeof meta.format !== "string" || !meta.format.startsWith("ranklens.dashboard/1")) {
      showLoadError(`This page reads ranklens.dashboard/1 data, the data says ${meta.format}. Rebuild the site.`);
      return;
    }
    state.meta = meta;
    state.files = manifest.files;
    try {
      await Promise.all(manifest.files.index.map(loadScript));
    } catch (err) {
      showLoadError(`The feature table did not load (${err.message}). Rebuild the site.`);
      return;
    }
    const parts = manifest.files.index.map((_, i) => store.index[i]);
    if (parts.some((p) => !p)) {
      showLoadError("A file of the feature table holds no data. Rebuild the site.");
      return;
    }
    if (manifest.files.autointerp) {
      try {
        await loadScript(manifest.files.autointerp);
        state.ai = store.autointerp || null;
      } catch (err) {
        state.ai = null; // the explanations are an extra: the table works without them
      }
    }
    state.idx = buildIndex(parts, meta.kind);
    if (state.ai) attachAi(state.idx);
    parts.forEach((_, i) => delete store.index[i]);
    renderHeader(meta, manifest);
    renderDensity(meta);
    if (meta.kind === "lorsa") $("table-heading").textContent = "Lorsa heads";
    $("overview-view").hidden = false;
    initTable();
    document.addEventListener("keydown", onGlobalKey);
    window.addEventListener("hashchange", route);
    state.nav = [];
    route();
    initPrompt();
    document.body.dataset.ready = "1";
  }

  // ================================================================== compare page

  function siteLink(href, id) {
    if (typeof href !== "string" || href === "") return null;
    if (/^[a-z][a-z0-9+.-]*:/i.test(href) && !/^(https?|file):/i.test(href)) return null; // no javascript: etc.
    let base = href;
    if (!/\.html?$/i.test(base)) base = base.replace(/\/?$/, "/") + "index.html";
    return `${base}#feature=${id}`;
  }

  function startCompare() {
    const data = store.compare;
    if (!data || !data.a || !data.b) {
      showLoadError("data/compare.js did not load: this folder is not a complete ranklens comparison. Rebuild it.");
      return;
    }
    document.title = `${data.title} \u00b7 ranklens comparison`;
    $("title").textContent = data.title;
    const status = $("load-status");
    status.className = "subtitle";
    status.textContent = `A: ${data.a.title} \u00b7 B: ${data.b.title}`;
    $("site-footer").textContent = `Built ${data.built} \u00b7 ${data.format}`;
    const runs = $("compare-runs");
    runs.append(h("thead", null, h("tr", null, h("th", { text: "run" }), h("th", { text: "title" }),
      h("th", { class: "num", text: "features" }), h("th", { class: "num", text: "dead" }),
      h("th", { class: "num", text: "dead share" }), h("th", { text: "site" }))));
    const tb = h("tbody");
    for (const side of ["a", "b"]) {
      const r = data[side];
      const link = siteLink(r.site_href, 0);
      tb.append(h("tr", { "data-run": side }, h("th", { scope: "row", text: side.toUpperCase() }),
        h("td", { text: r.title }), h("td", { class: "num", text: fmt(r.n_features) }),
        h("td", { class: "num", text: fmt(r.n_dead) }),
        h("td", { class: "num dead-share", text: fmtPct(r.n_features ? r.n_dead / r.n_features : NaN, 2) }),
        h("td", null, link ? h("a", { href: link.replace(/#.*$/, ""), text: r.site_href })
          : h("span", { class: "muted", text: "not given" }))));
    }
    runs.append(tb);
    const pair = (boxId, key, opts) => {
      const dom = histDomain([data.a[key], data.b[key]]);
      const box = $(boxId);
      for (const side of ["a", "b"]) {
        box.append(h("figure", { class: "chart", "data-run": side },
          h("figcaption", null, h("strong", { text: side.toUpperCase() + " " }), data[side].title),
          histogram(data[side][key], Object.assign({}, opts, dom, {
            label: `${opts.label} of run ${side.toUpperCase()}`, fill: side === "a" ? "#d66a00" : "#0072b2" }))));
      }
    };
    pair("compare-density", "density_histogram", { logX: true, xLabel: "density (log scale)", yLabel: "features",
      label: "Histogram of log10 feature densities" });
    pair("compare-subspace", "subspace_histogram", { xLabel: "subspace share", yLabel: "features",
      label: "Histogram of subspace shares" });
    $("compare-cosine").append(histogram(data.cosine_histogram, { xLabel: "best-match cosine", yLabel: "features of A",
      fill: "#5b6b7b", label: "Histogram of best-match decoder cosines" }));

    const pairs = data.pairs;
    const n = pairs.length;
    const colA = new Float64Array(n);
    const colB = new Float64Array(n);
    const colCos = new Float64Array(n);
    pairs.forEach((p, i) => {
      colA[i] = p[0];
      colB[i] = p[1] === null ? NaN : p[1];
      colCos[i] = p[2] === null ? NaN : p[2];
    });
    const cols = { a: colA, b: colB, cos: colCos };
    const sortState = { key: "a", dir: 1 };
    const linkCell = (side, id) => {
      if (!isNum(id)) return h("span", { class: "muted", text: "none" });
      const href = siteLink(data[side].site_href, id);
      return href ? h("a", { href, class: "feature-link", text: `#${id}` }) : `#${id}`;
    };
    const table = new VirtualTable($("pairs-table"), {
      columns: [
        { key: "a", label: "A id", width: "110px", numeric: true, sortable: true },
        { key: "b", label: "best B id", width: "110px", numeric: true, sortable: true },
        { key: "cos", label: "cosine", width: "110px", numeric: true, sortable: true },
        { key: "bar", label: "", width: "minmax(160px, 1fr)" },
      ],
      label: "Feature pairs",
      rowId: (row) => String(colA[row]),
      cell: (row, col) => {
        const c = colCos[row];
        if (col.key === "cos") return h("span", { "data-cos": String(c), text: fmt(c) });
        if (col.key === "bar") {
          return h("span", { class: "bar-track cos-bar", "aria-hidden": "true" }, h("span", { class: "bar-fill",
            style: `width: ${isNum(c) ? (Math.max(0, Math.min(1, Math.abs(c))) * 100).toFixed(1) : 0}%` }));
        }
        return linkCell(col.key, cols[col.key][row]);
      },
      onSort: (key) => {
        if (sortState.key === key) sortState.dir = -sortState.dir;
        else {
          sortState.key = key;
          sortState.dir = key === "cos" ? -1 : 1;
        }
        resort();
      },
      onOpen: (row) => {
        const href = siteLink(data.a.site_href, colA[row]);
        if (href) location.href = href;
      },
    });
    const resort = () => {
      const col = cols[sortState.key];
      const order = new Int32Array(n);
      for (let i = 0; i < n; i++) order[i] = i;
      order.sort((x, y) => {
        const u = col[x];
        const v = col[y];
        const un = u !== u;
        const vn = v !== v;
        if (un || vn) return un === vn ? colA[x] - colA[y] : un ? 1 : -1;
        return (u - v) * sortState.dir || colA[x] - colA[y];
      });
      table.setSort(sortState.key, sortState.dir);
      table.setOrder(order);
    };
    $("compare-view").hidden = false;
    resort();
    $("pairs-count").textContent = `${fmt(n)} pairs`;
    document.body.dataset.ready = "1";
  }

  document.addEventListener("DOMContentLoaded", () => {
    const page = document.body.dataset.page;
    if (page === "index") startIndex();
    else if (page === "compare") startCompare();
  });

})();
