// skysnap's profiling page: plain functions over /api/v1, d3-flame-graph for the graphs.
const $ = (sel) => document.querySelector(sel);
const state = {
  tasks: [], task: null, filter: null, charts: {}, timer: null,
  // The open segment, the span whose time range its analysis covers (null: the whole
  // segment), whether its trace segment was kept (null while asked) and a counter that
  // lets only the newest analysis request draw.
  segment: null, spanRange: null, spansKept: null, segmentLoad: 0,
};

// ---- helpers -------------------------------------------------------------------------

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells, cls) {
  const tr = el('tr', null, cls);
  for (const c of cells) {
    const td = c instanceof Node ? c : el('td', c);
    tr.append(td);
  }
  return tr;
}

function td(text, cls, title) {
  const e = el('td', text, cls);
  if (title) e.title = title;
  return e;
}

// For the only HTML strings (the library's tooltips).
function esc(s) {
  return String(s).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const pad = (n, w = 2) => String(n).padStart(w, '0');
function fmtTime(ms, withMs) {
  if (!ms) return '';
  const d = new Date(ms);
  const s = `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return withMs ? `${s}.${pad(d.getMilliseconds(), 3)}` : s;
}
// The time of day with ms, for rows whose date is the task's.
const fmtClock = (ms) => fmtTime(ms, true).slice(11);
const int = (n) => String(Math.round(n));
const pct = (a, b) => (b ? (100 * a / b).toFixed(1) : '0.0') + '%';
// datetime-local value <-> epoch ms (local time).
const fromLocal = (v) => (v ? new Date(v).getTime() : null);

function taskState(t, now = Date.now()) {
  if (now < t.start_time) return 'waiting';
  if (now < t.start_time + t.duration * 60000) return 'running';
  return 'finished';
}

function setStatus(text) {
  $('#status').textContent = text || '';
  $('#status').classList.toggle('shown', !!text);
}

// ---- the API ---------------------------------------------------------------------------

const token = () => sessionStorage.getItem('skysnap-token') || '';
const authHeaders = () => (token() ? { Authorization: `Bearer ${token()}` } : {});

// Calls /api/v1 + path; answers the JSON. A 401 opens the token dialog, any other failure
// shows its reason in #status (unless quiet) and throws an Error with .status.
async function api(path, init = {}, quiet = false) {
  let resp;
  try {
    resp = await fetch('/api/v1' + path, { ...init, headers: { ...authHeaders(), ...(init.headers || {}) } });
  } catch (e) {
    setStatus(`skysnap unreachable: ${e.message}`);
    throw e;
  }
  if (resp.ok) return resp.json();
  let reason = `${resp.status} ${resp.statusText}`;
  try { reason = (await resp.json()).error || reason; } catch (_) { /* not JSON */ }
  const err = Object.assign(new Error(reason), { status: resp.status });
  if (resp.status === 401) showTokenDialog();
  else if (!quiet) setStatus(reason);
  throw err;
}

const ignore = () => {}; // errors already shown by api()

function showTokenDialog() {
  const d = $('#token-dialog');
  if (d.hidden) { d.hidden = false; $('#token-input').focus(); }
}

async function submitToken(ev) {
  ev.preventDefault();
  const entered = $('#token-input').value.trim();
  const resp = await fetch('/api/v1/tasks', { headers: { Authorization: `Bearer ${entered}` } });
  if (resp.status === 401) {
    $('#token-error').textContent = 'wrong or missing admin token';
    return;
  }
  sessionStorage.setItem('skysnap-token', entered);
  $('#token-error').textContent = '';
  $('#token-dialog').hidden = true;
  setStatus('');
  loadAll();
}

// ---- flame graphs ------------------------------------------------------------------------

// One chart per element: the first draw binds the data, later draws update it.
function draw(id, data, setup) {
  let chart = state.charts[id];
  if (!chart) {
    const box = document.getElementById(id);
    chart = flamegraph.default()
      .width(Math.max(300, box.clientWidth || 800))
      .cellHeight(18)
      .transitionDuration(250)
      .minFrameSize(1)
      // Recompute the height on every update: a graph first drawn empty (a new task)
      // would otherwise keep that height and draw deeper frames outside its box.
      .resetHeightOnZoom(true);
    setup(chart);
    state.charts[id] = chart;
    d3.select(box).datum(data).call(chart);
  } else {
    chart.update(data);
  }
  return chart;
}

function sampleTooltip(getTotal, getPeriod) {
  return flamegraph.tooltip.defaultFlamegraphTooltip().html((d) => {
    const v = d.data.value;
    return `<div class="tip-name">${esc(d.data.name)}</div>` +
      `<div>${int(v)} samples · ${pct(v, getTotal())} of total · ${int(v * getPeriod())} ms sampled</div>`;
  });
}

const substring = (d, term) => !!term && String(d.data.name).toLowerCase().includes(term.toLowerCase());

function setupTaskChart(chart) {
  chart.setSearchMatch(substring)
    .setSearchHandler((results, sum, total) => {
      $('#flame-search-result').textContent = $('#flame-search').value
        ? `${sum} of ${total} snapshots (${pct(sum, total)}) match` : '';
    })
    .tooltip(sampleTooltip(() => state.flameTotal || 0, () => state.task?.dump_period || 0));
}

function applySearch() {
  const chart = state.charts.flame;
  if (!chart) return;
  const term = $('#flame-search').value;
  if (term) chart.search(term);
  else { chart.clear(); $('#flame-search-result').textContent = ''; }
}

function flameQuery(format) {
  const q = new URLSearchParams({ format });
  if (state.filter) { q.set('start', state.filter.start); q.set('end', state.filter.end); }
  return `/tasks/${encodeURIComponent(state.task.id)}/flamegraph?${q}`;
}

// What the page itself adds to a task flame graph, for measuring: window.skysnapTimings =
// {flame_fetch_ms: request to parsed JSON, flame_draw_ms: parsed JSON to the frames drawn
// (the first task after the next animation frame, i.e. after that frame's style, layout and
// paint; d3's width transitions run on after it), flame_nodes}. Replaced at every draw.
function countNodes(root) {
  let n = 0;
  for (const pending = [root]; pending.length;) { const x = pending.pop(); n++; if (x.children) pending.push(...x.children); }
  return n;
}
const ms1 = (x) => Math.round(x * 10) / 10;

async function loadFlame() {
  const id = state.task.id;
  const asked = performance.now();
  const data = await api(flameQuery('json'));
  if (state.task?.id !== id) return;
  const parsed = performance.now();
  state.flameTotal = data.value;
  $('#flame-total').textContent = `${data.value} snapshots`;
  $('#flame-extra').textContent = `· ${int(data.wall_ms)} ms sampled` +
    (data.truncated_samples ? ` · ${int(data.truncated_samples)} samples cut (too many frames)` : '') +
    (data.value ? '' : ' · nothing sampled yet');
  draw('flame', data, setupTaskChart);
  applySearch();
  for (const [aid, fmt] of [['download-collapsed', 'collapsed'], ['download-pprof', 'pprof']]) {
    $('#' + aid).href = '/api/v1' + flameQuery(fmt);
    $('#' + aid).download = `${state.task.service}-${id.slice(0, 8)}.${fmt === 'pprof' ? 'pb.gz' : 'folded'}`;
  }
  requestAnimationFrame(() => setTimeout(() => {
    window.skysnapTimings = { flame_fetch_ms: ms1(parsed - asked), flame_draw_ms: ms1(performance.now() - parsed),
      flame_nodes: countNodes(data) };
  }, 0));
}

// With a token the Bearer header must go along, which a plain link cannot do.
async function download(ev) {
  if (!token()) return;
  ev.preventDefault();
  const a = ev.currentTarget;
  const resp = await fetch(a.href, { headers: authHeaders() });
  if (!resp.ok) { setStatus(`download failed: ${resp.status}`); return; }
  const url = URL.createObjectURL(await resp.blob());
  const tmp = Object.assign(document.createElement('a'), { href: url, download: a.download });
  document.body.append(tmp); tmp.click(); tmp.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

function applyRange() {
  const t = state.task;
  const s = fromLocal($('#flame-start').value), e = fromLocal($('#flame-end').value);
  if (s === null && e === null) state.filter = null;
  else {
    const start = s ?? t.start_time;
    const end = e !== null ? e + 999 : t.start_time + t.duration * 60000;
    if (end < start) { setStatus('time range: the end is before the start'); return; }
    state.filter = { start, end };
  }
  setStatus('');
  loadFlame().catch(ignore);
}

// ---- services and tasks -----------------------------------------------------------------

async function loadServices() {
  const services = await api('/services');
  const box = $('#services');
  box.replaceChildren();
  if (!services.length) box.append(el('p', 'No agent has reported yet.', 'hint'));
  for (const s of services) {
    const div = el('div', null, 'service');
    div.dataset.service = s.service;
    const name = el('div', s.service, 'service-name');
    name.title = 'use in the new task form';
    name.addEventListener('click', () => { $('#task-form').elements.service.value = s.service; });
    div.append(name);
    for (const i of s.instances) {
      const lang = (i.properties || []).find(([k]) => k === 'language');
      const inst = el('div', i.name + (lang ? ` · ${lang[1]}` : ''), 'instance');
      inst.title = `${i.name}\nlast seen ${fmtTime(i.last_seen)}\n` +
        (i.properties || []).map(([k, v]) => `${k}: ${v}`).join('\n');
      div.append(inst);
    }
    box.append(div);
  }
}

async function loadTasks() {
  state.tasks = await api('/tasks');
  const body = $('#tasks tbody');
  body.replaceChildren();
  const now = Date.now();
  for (const t of state.tasks) {
    const st = taskState(t, now);
    const tr = row([td(t.service, 'ellipsis', t.service), td(t.endpoint_name, 'ellipsis', t.endpoint_name),
      td(fmtTime(t.start_time).slice(5, 16), 'nowrap', fmtTime(t.start_time)), td(t.duration, 'num'), td(null)], 'task');
    tr.lastChild.append(el('span', st, `task-state badge ${st}`));
    tr.dataset.taskId = t.id;
    tr.classList.toggle('selected', state.task?.id === t.id);
    tr.addEventListener('click', () => pickTask(t.id));
    body.append(tr);
  }
  if (!state.tasks.length) body.append(row([el('td', 'No task yet.')], 'hint'));
  fillCompare();
}

function pickTask(id) {
  if (location.hash === `#task=${id}`) openTask(id).catch(ignore);
  else location.hash = `task=${id}`;
}

// The target: "this task" (its own id; compare two of its time ranges) and the other tasks.
// Without an earlier choice the newest other task is picked, else this task.
function fillCompare() {
  const sel = $('#compare-task');
  const keep = sel.value;
  sel.replaceChildren();
  if (state.task) sel.append(new Option('this task', state.task.id));
  for (const t of state.tasks) {
    if (t.id === state.task?.id) continue;
    sel.append(new Option(`${t.service} ${t.endpoint_name} · ${fmtTime(t.start_time)}`, t.id));
  }
  const values = [...sel.options].map((o) => o.value);
  sel.value = values.includes(keep) ? keep : (values[1] ?? values[0] ?? '');
  $('#compare-go').disabled = !sel.options.length;
}

async function createTask(ev) {
  ev.preventDefault();
  const f = ev.target.elements;
  const num = (name) => (f[name].value.trim() === '' ? 0 : Number(f[name].value));
  const body = {
    service: f.service.value.trim(),
    endpoint_name: f.endpoint_name.value.trim(),
    duration: num('duration'),
    min_duration_threshold: num('min_duration_threshold'),
    dump_period: num('dump_period'),
    max_sampling_count: num('max_sampling_count'),
  };
  if (f.start_time.value) body.start_time = fromLocal(f.start_time.value);
  $('#task-form-error').textContent = '';
  try {
    const task = await api('/tasks', {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body),
    }, true);
    await loadTasks();
    pickTask(task.id);
  } catch (e) {
    if (e.status !== 401) $('#task-form-error').textContent = e.message;
  }
}

// ---- the open task ----------------------------------------------------------------------

async function openTask(id) {
  if (!id) return;
  const task = await api(`/tasks/${encodeURIComponent(id)}`);
  const changed = state.task?.id !== task.id;
  state.task = task;
  if (changed) {
    state.filter = null; state.segment = null; state.spanRange = null; state.spansKept = null;
    $('#flame-start').value = ''; $('#flame-end').value = '';
    $('#segment-view').hidden = true; $('#diff-view').hidden = true;
    for (const i of ['base-start', 'base-end', 'target-start', 'target-end']) $(`#compare-${i}`).value = '';
    $('#compare-task').value = ''; // fillCompare picks the default for the new task
  }
  $('#empty-hint').hidden = true;
  $('#task-view').hidden = false;
  for (const tr of document.querySelectorAll('tr.task')) tr.classList.toggle('selected', tr.dataset.taskId === id);
  renderTitle();
  fillCompare();
  await Promise.all([loadLogs(), loadFlame(), loadSegments()]);
}

function renderTitle() {
  const t = state.task, st = taskState(t);
  const box = $('#task-title');
  box.replaceChildren();
  const h = el('h2');
  h.append(el('span', t.service, 'svc'), el('span', t.endpoint_name, 'endpoint'), el('span', st, `task-state badge ${st}`));
  const meta = el('div', `started ${fmtTime(t.start_time)} · ${t.duration} min · dump every ${t.dump_period} ms · ` +
    `slower than ${t.min_duration_threshold} ms · at most ${t.max_sampling_count} per instance · id ${t.id}`, 'muted');
  box.append(h, meta);
}

async function loadLogs() {
  const id = state.task.id;
  const logs = await api(`/tasks/${encodeURIComponent(id)}/logs`);
  if (state.task?.id !== id) return;
  logs.sort((a, b) => a.instance.localeCompare(b.instance) || a.operation_time - b.operation_time);
  const body = $('#task-logs tbody');
  body.replaceChildren(...logs.map((l) => row([td(l.instance, 'ellipsis', l.instance), td(l.operation),
    td(fmtTime(l.operation_time, true))], 'log')));
  if (!logs.length) body.append(row([el('td', 'No agent instance has taken this task yet.')], 'hint'));
}

const NOT_KEPT = 'no trace segment kept for this segment — it did not pass through this skysnap replica';

async function loadSegments() {
  const id = state.task.id;
  const segs = await api(`/tasks/${encodeURIComponent(id)}/segments`);
  if (state.task?.id !== id) return;
  const body = $('#segments tbody');
  body.replaceChildren();
  for (const s of segs) {
    // trace_id and the rest are null until the trace segment passed through skysnap
    // (the agent sends it when the request ends).
    const known = s.trace_id !== null && s.trace_id !== undefined;
    const endpoint = el('td', null, 'endpoint ellipsis');
    if (known) {
      endpoint.append(el('span', s.endpoint));
      if (s.is_error) endpoint.append(el('span', 'error', 'badge error'));
      endpoint.title = s.endpoint;
    } else {
      endpoint.append(el('span', '—', 'muted'));
      endpoint.title = 'no trace segment kept for this segment (yet): it arrives when the request ends, ' +
        'through the skysnap replica the agent reports to';
    }
    const tr = row([endpoint,
      td(known ? int(s.duration) : '', 'num seg-duration', known ? `started ${fmtTime(s.start_time, true)}` : ''),
      td(known ? s.trace_id : '', 'trace ellipsis mono', known ? s.trace_id : ''),
      td(s.segment_id, 'ellipsis mono', s.segment_id), td(int(s.snapshot_count), 'num'),
      td(fmtClock(s.first_dump_time), 'nowrap', fmtTime(s.first_dump_time, true)),
      td(fmtClock(s.last_dump_time), 'nowrap', fmtTime(s.last_dump_time, true)),
      td(int(s.last_dump_time - s.first_dump_time), 'num')], 'segment');
    tr.dataset.segmentId = s.segment_id;
    tr.classList.toggle('selected', s.segment_id === state.segment);
    tr.addEventListener('click', () => openSegment(s.segment_id).catch(ignore));
    body.append(tr);
    // The open segment's trace segment came after it was opened: show its spans now.
    if (known && s.segment_id === state.segment && state.spansKept === false) {
      state.spansKept = null; // asked again; one request at a time
      loadSpans(s.segment_id).catch((e) => setStatus(e.message));
    }
  }
  if (!segs.length) body.append(row([el('td', 'No profiled segment yet.')], 'hint'));
}

// ---- a segment: span tree, stack tree and flame graph -----------------------------------

async function openSegment(seg) {
  state.segment = seg;
  state.spanRange = null; // a segment opens on its whole range
  state.spansKept = null;
  for (const tr of document.querySelectorAll('tr.segment')) tr.classList.toggle('selected', tr.dataset.segmentId === seg);
  $('#segment-view').hidden = false;
  $('#segment-name').textContent = seg;
  $('#segment-meta').replaceChildren();
  $('#span-tree tbody').replaceChildren();
  $('#span-tree-tip').textContent = '';
  await Promise.all([loadSpans(seg), loadSegmentAnalysis()]);
  if (state.segment !== seg) return;
  $('#segment-view').scrollIntoView({ behavior: 'smooth', block: 'start' });
}

// The kept trace segment's spans; a segment without one (404) keeps its snapshot analysis.
async function loadSpans(seg) {
  let answer;
  try {
    answer = await api(`/segments/${encodeURIComponent(seg)}`, {}, true);
  } catch (e) {
    if (state.segment !== seg) return;
    state.spansKept = false;
    $('#segment-meta').replaceChildren();
    $('#span-tree tbody').replaceChildren();
    $('#span-tree-box').hidden = true;
    $('#span-hint').hidden = true;
    $('#span-tree-tip').textContent = e.status === 404 ? NOT_KEPT : `no span tree: ${e.message}`;
    return;
  }
  if (state.segment !== seg) return;
  state.spansKept = true;
  $('#span-tree-tip').textContent = answer.spans.length ? '' : 'the trace segment has no span';
  $('#span-tree-box').hidden = !answer.spans.length;
  $('#span-hint').hidden = !answer.spans.length;
  renderSegmentMeta(answer.segment);
  renderSpanTree(answer.segment, answer.spans);
  markSpanSelection();
}

function renderSegmentMeta(seg) {
  const box = $('#segment-meta');
  box.replaceChildren(el('span', seg.endpoint, 'seg-endpoint'), ` · ${int(seg.duration)} ms · started ${fmtTime(seg.start_time, true)} · `,
    el('span', `${seg.service} / ${seg.instance}`), ' · trace ', el('span', seg.trace_id, 'mono seg-trace'));
  if (seg.is_error) box.append(' ', el('span', 'error', 'badge error'));
}

const SPAN_TYPES = new Set(['Entry', 'Exit', 'Local']);

// Rows in tree order (children by start time, as the API sends them), each with a bar on
// the segment's time line.
function renderSpanTree(seg, roots) {
  const body = $('#span-tree tbody');
  body.replaceChildren();
  const origin = seg.start_time, length = Math.max(1, seg.end_time - seg.start_time);
  const share = (ms) => Math.min(100, Math.max(0, (100 * ms) / length));
  const MAX_INDENT = 12;
  // The API nests at most 50 levels; walk without recursion all the same.
  const pending = roots.slice().reverse().map((span) => [span, 0]);
  while (pending.length) {
    const [span, depth] = pending.pop();
    const children = span.children || [];
    const op = el('td', null, 'op');
    op.style.paddingLeft = `${0.3 + Math.min(depth, MAX_INDENT) * 1.1}em`;
    op.title = span.operation_name;
    const toggle = el('span', children.length ? '▾' : '', children.length ? 'toggle' : 'leaf');
    if (depth > MAX_INDENT) op.append(el('span', `${depth}› `, 'depth'));
    op.append(toggle, el('span', span.operation_name, 'op-name'));
    if (span.is_error) op.append(el('span', 'error', 'badge error'));
    const type = el('span', span.span_type, 'span-type' + (SPAN_TYPES.has(span.span_type) ? ` ${span.span_type.toLowerCase()}` : ''));
    const bar = el('div', null, 'bar' + (span.is_error ? ' error' : ''));
    bar.style.left = `${share(span.start_time - origin)}%`;
    bar.style.width = `${share(span.end_time - span.start_time)}%`;
    const track = el('div', null, 'track');
    track.append(bar);
    const kind = td(null, 'ellipsis', `${span.span_type} span, layer ${span.span_layer}, component id ${span.component_id}`);
    kind.append(type);
    if (span.span_layer && span.span_layer !== 'Unknown') kind.append(el('span', span.span_layer, 'layer muted'));
    const tr = row([op, kind, td(span.peer, 'peer ellipsis', span.peer), td(int(span.start_time - origin), 'num offset'),
      td(int(span.duration), 'num duration'), el('td')], 'span');
    tr.lastChild.append(track);
    tr.lastChild.title = `${fmtClock(span.start_time)} – ${fmtClock(span.end_time)}`;
    Object.assign(tr.dataset, { spanId: span.span_id, start: span.start_time, end: span.end_time, depth });
    tr.tabIndex = 0;
    tr.addEventListener('click', () => chooseSpan(span));
    tr.addEventListener('keydown', (ev) => {
      if (ev.key === 'Enter' || ev.key === ' ') { ev.preventDefault(); chooseSpan(span); }
    });
    if (children.length) {
      toggle.addEventListener('click', (ev) => { ev.stopPropagation(); toggleSpan(tr); });
    }
    body.append(tr);
    for (let i = children.length - 1; i >= 0; i--) pending.push([children[i], depth + 1]);
  }
}

// Rows are in tree order: a row is hidden while it is deeper than a collapsed row above
// it that is itself shown.
function toggleSpan(tr) {
  tr.classList.toggle('collapsed');
  tr.querySelector('.toggle').textContent = tr.classList.contains('collapsed') ? '▸' : '▾';
  let cut = Infinity;
  for (const r of document.querySelectorAll('#span-tree tr.span')) {
    const depth = Number(r.dataset.depth);
    if (depth <= cut) cut = Infinity;
    r.hidden = depth > cut;
    if (!r.hidden && r.classList.contains('collapsed')) cut = depth;
  }
}

function chooseSpan(span) {
  if (span.end_time < span.start_time) {
    setStatus(`span ${span.span_id} ends before it starts; its range cannot be analysed`);
    return;
  }
  state.spanRange = { spanId: span.span_id, name: span.operation_name, type: span.span_type,
    start: span.start_time, end: span.end_time };
  markSpanSelection();
  loadSegmentAnalysis().catch(ignore);
}

function wholeSegment() {
  state.spanRange = null;
  markSpanSelection();
  loadSegmentAnalysis().catch(ignore);
}

function markSpanSelection() {
  const r = state.spanRange;
  for (const tr of document.querySelectorAll('#span-tree tr.span')) {
    tr.classList.toggle('selected', !!r && Number(tr.dataset.spanId) === r.spanId &&
      Number(tr.dataset.start) === r.start && Number(tr.dataset.end) === r.end);
  }
}

// Says which range the stack tree and the flame graph below cover.
function renderRange() {
  const r = state.spanRange, text = $('#segment-range-text');
  $('#segment-whole').hidden = !r;
  $('#segment-range').classList.toggle('span', !!r);
  if (!r) {
    text.replaceChildren(el('strong', 'Whole segment'), ' — every snapshot of the segment');
    $('#segment-flame-range').textContent = '· whole segment';
    return;
  }
  text.replaceChildren(el('strong', 'Span range'), ' — span ', el('span', r.name, 'mono range-op'),
    ` (#${r.spanId}, ${r.type}): ${fmtTime(r.start, true)} – ${fmtClock(r.end)} · ${int(r.end - r.start)} ms`);
  $('#segment-flame-range').textContent = `· span ${r.name}, ${int(r.end - r.start)} ms`;
}

// The stack tree and flame graph of the open segment over the chosen range.
async function loadSegmentAnalysis() {
  const seg = state.segment, range = state.spanRange, load = ++state.segmentLoad;
  renderRange();
  delete $('#segment-view').dataset.shown;
  const q = new URLSearchParams({ segment: seg });
  if (range) { q.set('start', range.start); q.set('end', range.end); }
  $('#segment-view').classList.add('loading');
  let analysis, flame;
  try {
    [analysis, flame] = await Promise.all([
      api(`/analysis?${q}`),
      api(`/tasks/${encodeURIComponent(state.task.id)}/flamegraph?${q}`),
    ]);
  } finally {
    if (load === state.segmentLoad) $('#segment-view').classList.remove('loading');
  }
  if (load !== state.segmentLoad) return;
  renderStackTree(analysis);
  state.segTotal = flame.value;
  draw('segment-flame', flame, (chart) => chart.tooltip(
    sampleTooltip(() => state.segTotal || 0, () => state.task?.dump_period || 0)));
  // What the stack tree and the flame graph now show: "whole" or "start-end" (epoch ms).
  $('#segment-view').dataset.shown = range ? `${range.start}-${range.end}` : 'whole';
}

function renderStackTree(analysis) {
  $('#stack-tree-tip').textContent = analysis.tip || '';
  const body = $('#stack-tree tbody');
  body.replaceChildren();
  analysis.trees.forEach((tree, ti) => {
    const kids = new Map();
    for (const e of tree.elements) {
      if (!kids.has(e.parent_id)) kids.set(e.parent_id, []);
      kids.get(e.parent_id).push(e);
    }
    // Hottest first; the stable sort keeps the API's order among equals.
    for (const list of kids.values()) list.sort((a, b) => b.count - a.count);
    const MAX_INDENT = 12;
    const walk = (e, depth) => {
      const children = kids.get(e.id) || [];
      const sig = el('td', null, 'sig');
      // Indent up to MAX_INDENT levels; deeper rows (200-deep Java stacks) say their depth
      // instead, so the signature stays on screen.
      sig.style.paddingLeft = `${0.3 + Math.min(depth, MAX_INDENT) * 1.1}em`;
      sig.title = e.code_signature;
      const toggle = el('span', children.length ? '▾' : '', children.length ? 'toggle' : 'leaf');
      if (depth > MAX_INDENT) sig.append(el('span', `${depth}› `, 'depth'));
      sig.append(toggle, el('span', e.code_signature));
      const tr = row([sig, td(int(e.count), 'num count'), td(int(e.duration), 'num duration'),
        td(int(e.duration_child_excluded), 'num self')], 'stack-node');
      Object.assign(tr.dataset, { id: e.id, parentId: e.parent_id, tree: ti });
      if (children.length) toggle.addEventListener('click', () => toggleNode(tr));
      body.append(tr);
      for (const c of children) walk(c, depth + 1);
    };
    for (const root of kids.get(0) || []) walk(root, 0);
  });
}

function toggleNode(tr) {
  tr.classList.toggle('collapsed');
  tr.querySelector('.toggle').textContent = tr.classList.contains('collapsed') ? '▸' : '▾';
  // A row is hidden when any ancestor in its tree is collapsed.
  const rows = [...document.querySelectorAll('#stack-tree tr.stack-node')];
  const byKey = new Map(rows.map((r) => [`${r.dataset.tree}:${r.dataset.id}`, r]));
  for (const r of rows) {
    let p = byKey.get(`${r.dataset.tree}:${r.dataset.parentId}`), hide = false;
    while (p && !hide) { hide = p.classList.contains('collapsed'); p = byKey.get(`${p.dataset.tree}:${p.dataset.parentId}`); }
    r.hidden = hide;
  }
}

// ---- compare ------------------------------------------------------------------------------

// Widths: the target's samples (the base's for frames gone from it). The library sums
// each node's own delta over its subtree (computeDelta) and colours by delta / value, so a
// node carries its own part of the change in share, in samples of the drawn scale.
function diffNode(n, scale) {
  const change = (x) => (x.target_share - x.base_share) * scale;
  const children = (n.children || []).map((c) => diffNode(c, scale));
  return {
    name: n.name, base: n.base, target: n.target, base_share: n.base_share, target_share: n.target_share,
    value: n.target || n.base,
    delta: change(n) - (n.children || []).reduce((s, c) => s + change(c), 0),
    children,
  };
}

// A side's range from its two datetime-local inputs: null when both are empty, an end
// covering its whole second, an empty end = open (the API wants both ends or neither).
const OPEN_END = 8.64e15; // the largest time a Date holds
function compareRange(side) {
  const s = fromLocal($(`#compare-${side}-start`).value), e = fromLocal($(`#compare-${side}-end`).value);
  if (s === null && e === null) return null;
  return { start: s ?? 0, end: e === null ? OPEN_END : e + 999 };
}

function describeSide(taskId, range) {
  const t = state.tasks.find((x) => x.id === taskId);
  const name = taskId === state.task.id ? 'this task' : t ? `${t.service} ${t.endpoint_name}` : taskId;
  if (!range) return `${name}, whole task`;
  const from = range.start ? fmtTime(range.start, true) : 'its start';
  const to = range.end < OPEN_END ? fmtTime(range.end, true) : 'its end';
  return `${name}, ${from} – ${to}`;
}

async function compare() {
  if (!state.task) return;
  const base = state.task.id, target = $('#compare-task').value || base;
  const ranges = { base: compareRange('base'), target: compareRange('target') };
  const q = new URLSearchParams({ base, target });
  for (const [side, r] of Object.entries(ranges)) {
    if (r) { q.set(`${side}_start`, r.start); q.set(`${side}_end`, r.end); }
  }
  setStatus('');
  let diff;
  try {
    diff = await api(`/flamegraph/diff?${q}`); // a 400's reason goes to #status
  } catch (e) {
    $('#diff-view').hidden = true; // no older diff under the new choice
    $('#diff-totals').textContent = ''; $('#diff-sides').textContent = '';
    throw e;
  }
  if (state.task?.id !== base) return;
  $('#diff-view').hidden = false;
  $('#diff-tip').textContent = diff.tip || '';
  $('#diff-totals').textContent = `base ${int(diff.base_total)} · target ${int(diff.target_total)} snapshots`;
  $('#diff-sides').textContent = `· base: ${describeSide(base, ranges.base)} · target: ${describeSide(target, ranges.target)}`;
  draw('diff-flame', diffNode(diff.tree, diff.target_total || diff.base_total), (chart) => chart
    .computeDelta(true)
    .getDelta((n) => n.data.delta || 0)
    .setColorMapper(flamegraph.colorMapper.differentialColorMapper)
    .tooltip(flamegraph.tooltip.defaultFlamegraphTooltip().html((d) => {
      const x = d.data, pp = ((x.target_share - x.base_share) * 100).toFixed(1);
      return `<div class="tip-name">${esc(x.name)}</div>` +
        `<div>base: ${int(x.base)} (${(100 * x.base_share).toFixed(1)}%) · target: ${int(x.target)} ` +
        `(${(100 * x.target_share).toFixed(1)}%) · ${pp > 0 ? '+' : ''}${pp} points</div>`;
    })));
}

// ---- wiring ---------------------------------------------------------------------------------

function loadAll() {
  loadServices().catch(ignore);
  loadTasks().then(() => openTask(hashTask())).catch(ignore);
}

// Task states move with the clock; a running task's graph, logs and segments refresh.
function tick() {
  if (!$('#token-dialog').hidden) return;
  loadTasks().catch(ignore);
  loadServices().catch(ignore);
  if (state.task) {
    renderTitle();
    if (taskState(state.task) === 'running') Promise.all([loadFlame(), loadLogs(), loadSegments()]).catch(ignore);
  }
}

$('#token-dialog').addEventListener('submit', (ev) => submitToken(ev).catch((e) => setStatus(e.message)));
$('#task-form').addEventListener('submit', createTask);
$('#flame-search').addEventListener('input', applySearch);
$('#flame-reset').addEventListener('click', () => state.charts.flame?.resetZoom());
$('#flame-apply').addEventListener('click', applyRange);
$('#download-collapsed').addEventListener('click', download);
$('#download-pprof').addEventListener('click', download);
$('#compare-go').addEventListener('click', () => compare().catch(ignore));
$('#segment-whole').addEventListener('click', wholeSegment);
window.addEventListener('hashchange', () => openTask(hashTask()).catch(ignore));
loadAll();
setInterval(tick, 5000);

function hashTask() {
  const m = location.hash.match(/^#task=(.+)$/);
  return m ? decodeURIComponent(m[1]) : null;
}
