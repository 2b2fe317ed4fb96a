// reeltag serve's page: search, a grid of moments, a player that starts at the moment, more like this, a video's
// timeline (the report's own), the videos and errors tables. Plain DOM, no build step, no external resource.
"use strict";

const token = new URLSearchParams(location.search).get("token");
const $ = (id) => document.getElementById(id);
let archive = null;

function url(path, params = {}) {
  const u = new URL(path, location.origin);
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== "") u.searchParams.set(k, v);
  if (archive) u.searchParams.set("archive", archive);
  if (token) u.searchParams.set("token", token);
  return u.toString();
}

async function api(path, params, init) {
  const response = await fetch(url(path, params), init);
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function filters() {
  return { video: $("f-video").value, tag: $("f-tag").value, region: $("f-region").value,
           min_confidence: $("f-min").value, after: $("f-after").value, before: $("f-before").value,
           top_k: $("f-topk").value || 12 };
}

const fmt = (s) => `${Math.floor(s / 60)}:${(s % 60).toFixed(1).padStart(4, "0")}`;

function status(text) { $("status").textContent = text; }

async function run(query, describe) {
  status(`searching ${describe}…`);
  try {
    const found = await query();
    show(found);
    status(`${found.results.length} moments for ${describe} (${found.took_ms.toFixed(1)} ms)`);
  } catch (e) { status(`error: ${e.message}`); }
}

function show(found) {
  const list = $("results");
  list.replaceChildren();
  for (const [i, r] of found.results.entries()) {
    const li = document.createElement("li");
    li.className = "card";
    li.tabIndex = 0;
    li.dataset.videoId = r.video_id;
    li.dataset.start = r.start_s;
    li.setAttribute("aria-label", `result ${i + 1}: ${r.uri} from ${fmt(r.start_s)} to ${fmt(r.end_s)}`);
    const img = document.createElement("img");
    img.alt = `${r.uri.split("/").pop()} at ${fmt(r.start_s)}`;
    img.loading = "lazy";
    img.src = url(`/media/${encodeURIComponent(r.video_id)}/thumbnail.jpg`, { t: (r.start_s + r.end_s) / 2 });
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.innerHTML = `<b></b><br><span class="muted"></span><div class="tags"></div>`;
    meta.querySelector("b").textContent = r.uri.split("/").pop();
    meta.querySelector("span").textContent = `${fmt(r.start_s)}–${fmt(r.end_s)} · score ${r.score.toFixed(3)}`;
    const actions = document.createElement("div");
    actions.className = "actions";
    const like = document.createElement("button");
    like.type = "button";
    like.textContent = "More like this";
    like.addEventListener("click", (event) => {
      event.stopPropagation();
      const ref = `${r.video_id}:${r.segment_id}`;
      run(() => api("/api/search", { like: ref, ...filters() }), `moments like ${ref}`);
    });
    actions.append(like);
    li.append(img, meta, actions);
    li.addEventListener("click", () => play(r));
    li.addEventListener("keydown", (event) => { if (event.key === "Enter" || event.key === " ") {
      event.preventDefault(); play(r); } });
    list.append(li);
    tags(r, meta.querySelector(".tags"));
  }
}

async function tags(r, into) {
  try {
    const video = await api(`/api/videos/${encodeURIComponent(r.video_id)}`);
    const segment = video.segments.find((s) => s.segment_id === r.segment_id);
    into.textContent = segment ? segment.tags.slice(0, 3).map((t) => t.label).join(" · ") : "";
  } catch (e) { into.textContent = ""; }
}

async function play(r) {
  const video = await api(`/api/videos/${encodeURIComponent(r.video_id)}`);
  const player = $("player"), element = $("video");
  player.hidden = false;
  $("player-title").textContent = `${video.name} · ${fmt(r.start_s)}–${fmt(r.end_s)}`;
  if (video.playable) {  // the file itself, with range requests; the moment by seeking
    element.src = url(`/media/${encodeURIComponent(r.video_id)}`);
    element.dataset.offset = 0;
    $("player-note").textContent = "";
  } else {  // a short H.264 preview of the moment, made on the server
    element.src = url(`/media/${encodeURIComponent(r.video_id)}/preview.mp4`, { start: r.start_s, end: r.end_s });
    element.dataset.offset = r.start_s;
    $("player-note").textContent = "This file's format does not play in browsers: a preview of the moment.";
  }
  const start = video.playable ? r.start_s : 0;
  element.addEventListener("loadedmetadata", () => {
    element.currentTime = start;
    element.play().catch(() => {});
  }, { once: true });
  player.scrollIntoView({ block: "start" });
  element.focus();
  const html = await fetch(url(`/api/videos/${encodeURIComponent(r.video_id)}/timeline`)).then((x) => x.text());
  $("timeline").innerHTML = html;  // the report's timeline, escaped by the server
}

async function table(section, path, key, cells) {
  for (const id of ["videos", "errors"]) $(id).hidden = id !== section;
  try {
    const body = await api(path);
    const tbody = $(section).querySelector("tbody");
    tbody.replaceChildren(...body[key].map((row) => {
      const tr = document.createElement("tr");
      for (const value of cells(row)) { const td = document.createElement("td"); td.textContent = value;
        tr.append(td); }
      return tr;
    }));
    status(`${body[key].length} ${section}`);
  } catch (e) { status(`error: ${e.message}`); }
}

$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = $("q").value.trim();
  if (q) run(() => api("/api/search", { q, ...filters() }), `“${q}”`);
});
$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (file) run(() => api("/api/search/image", filters(), { method: "POST", body: file }), file.name);
});
$("show-videos").addEventListener("click", (event) => { event.preventDefault();
  table("videos", "/api/videos", "videos", (v) => [v.name, v.status, v.segments,
    v.errors.map((e) => `${e.error_type}: ${e.message}`).join("; ")]); });
$("show-errors").addEventListener("click", (event) => { event.preventDefault();
  table("errors", "/api/errors", "errors", (e) => [e.uri.split("/").pop(), e.stage, e.error_type, e.message]); });
$("archive").addEventListener("change", () => { archive = $("archive").value; });

api("/api/archives").then((body) => {
  for (const a of body.archives) { const o = document.createElement("option"); o.value = a.name;
    o.textContent = a.name; $("archive").append(o); }
  archive = body.archives.length ? body.archives[0].name : null;
  $("archive").hidden = body.archives.length < 2;
}).catch((e) => status(`error: ${e.message}`));
