// agent-orchestrator dashboard: the task list and the task page. It talks to the REST
// API with the session cookie (and the session's CSRF token in X-AO-CSRF on changes) and
// builds every element with textContent: repository names, prompts and agent output are
// hostile input and are never parsed as HTML.
'use strict';

const STATUSES = ['queued', 'awaiting_approval', 'running', 'succeeded', 'failed', 'cancelled', 'pending', 'skipped'];
const TERMINAL = ['succeeded', 'failed', 'cancelled'];
const TOOL_RESULT_LINES = 12;
const TEXT_LIMIT = 20000;
const MAX_EVENTS_SHOWN = 5000;

// ---- helpers ------------------------------------------------------------------------

function el(tag, props, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'text') e.textContent = String(v);
    else if (k === 'href') e.setAttribute('href', safeHref(v));
    else if (k === 'title') e.title = String(v);
    else e.setAttribute(k, String(v));
  }
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

// Only http(s) and same-origin paths become links.
function safeHref(url) {
  const s = String(url);
  if (s.startsWith('/') && !s.startsWith('//')) return s;
  try {
    const u = new URL(s);
    if (u.protocol === 'https:' || u.protocol === 'http:') return u.href;
  } catch (_) { /* not a URL */ }
  return '#';
}

function cookie(name) {
  for (const part of document.cookie.split(';')) {
    const [k, ...v] = part.trim().split('=');
    if (k === name) return v.join('=');
  }
  return '';
}

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.code = body && body.code;
  }
}

async function api(method, path, body) {
  const headers = { Accept: 'application/json' };
  if (method !== 'GET') headers['X-AO-CSRF'] = cookie('ao_csrf');
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(path, {
    method,
    headers,
    credentials: 'same-origin',
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (r.status === 401) {
    toLogin();
    throw new ApiError(401, { error: 'logged out' });
  }
  let json = null;
  try { json = await r.json(); } catch (_) { json = null; }
  if (!r.ok) throw new ApiError(r.status, json);
  return json;
}

function statusClass(status) {
  return STATUSES.includes(status) ? `status st-${status}` : 'status';
}

function statusBadge(status) {
  return el('span', { class: statusClass(status), text: String(status || '?').replace('_', ' ') });
}

function money(usd) {
  const n = Number(usd) || 0;
  if (n === 0) return '—';
  return n < 0.01 ? `$${n.toFixed(4)}` : `$${n.toFixed(2)}`;
}

function seconds(ms) {
  if (!Number.isFinite(ms) || ms < 0) return '—';
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${s % 60}s`;
  return `${Math.floor(m / 60)}h ${m % 60}m`;
}

function taskDuration(task) {
  const start = Date.parse(task.created_at);
  const end = TERMINAL.includes(task.status) ? Date.parse(task.updated_at) : Date.now();
  return seconds(end - start);
}

function subtaskDuration(sub) {
  if (!sub.started_at) return '—';
  const end = sub.finished_at ? Date.parse(sub.finished_at) : Date.now();
  return seconds(end - Date.parse(sub.started_at));
}

function clock(ts) {
  const d = new Date(ts);
  return Number.isNaN(d.getTime()) ? '' : d.toLocaleTimeString([], { hour12: false });
}

function when(ts) {
  const d = new Date(ts);
  return Number.isNaN(d.getTime()) ? '' : d.toLocaleString([], { hour12: false });
}

function githubWeb() {
  const m = document.querySelector('meta[name="ao-github-web"]');
  return m ? m.content.replace(/\/+$/, '') : 'https://github.com';
}

// Issue and pull-request links of a task that came from GitHub.
function githubLinks(task) {
  const src = task.source || {};
  if (src.kind !== 'github' || typeof src.repo !== 'string' || !/^[\w.-]+\/[\w.-]+$/.test(src.repo)) {
    return {};
  }
  const base = `${githubWeb()}/${src.repo.split('/').map(encodeURIComponent).join('/')}`;
  const links = {};
  if (Number.isInteger(src.issue)) {
    links.issue = { href: `${base}/issues/${src.issue}`, label: `${src.repo}#${src.issue}` };
  }
  if (Number.isInteger(src.pull_request)) {
    links.pr = { href: `${base}/pull/${src.pull_request}`, label: `PR #${src.pull_request}` };
  }
  return links;
}

function oneLine(value, limit) {
  let s;
  try { s = typeof value === 'string' ? value : JSON.stringify(value); } catch (_) { s = String(value); }
  s = (s || '').replace(/\s+/g, ' ').trim();
  return s.length > limit ? `${s.slice(0, limit)}…` : s;
}

function clip(text, limit) {
  const s = String(text == null ? '' : text);
  return s.length > limit ? `${s.slice(0, limit)}\n… (${s.length - limit} more characters)` : s;
}

function show(node, visible) { if (node) node.hidden = !visible; }

function setError(node, err) {
  if (!node) return;
  node.textContent = err ? (err.message || String(err)) : '';
  node.hidden = !err;
}

function setLive(state) {
  const n = document.getElementById('live');
  if (!n) return;
  n.textContent = state;
  n.className = `live live-${state.replace(/[^a-z]/g, '')}`;
}

// Once: a request that meets 401 while the logout is under way must not start a second
// navigation to the login page, which would abort the first.
let leaving = false;
function toLogin() {
  if (leaving) return;
  leaving = true;
  window.location.assign('/login');
}

function setupLogout() {
  const b = document.getElementById('logout');
  if (!b) return;
  b.addEventListener('click', async () => {
    try {
      await fetch('/logout', { method: 'POST', credentials: 'same-origin', headers: { 'X-AO-CSRF': cookie('ao_csrf') } });
    } finally {
      toLogin();
    }
  });
}

// ---- task list ----------------------------------------------------------------------

function listPage() {
  const tasks = new Map();
  const tbody = document.getElementById('tasks');
  const more = document.getElementById('more');
  let nextCursor = null;
  let pollTimer = null;

  function row(task) {
    const links = githubLinks(task);
    const tr = el('tr', { 'data-id': task.id, 'data-status': task.status },
      el('td', {}, statusBadge(task.status)),
      el('td', { class: 'title' },
        el('a', { href: `/tasks/${encodeURIComponent(task.id)}`, text: task.title || task.id }),
        el('div', { class: 'muted small', text: task.branch })),
      el('td', { class: 'repo', text: task.repository }),
      el('td', {}, links.issue ? el('a', { href: links.issue.href, rel: 'noopener noreferrer', target: '_blank', text: links.issue.label }) : '—',
        links.pr ? ' · ' : null,
        links.pr ? el('a', { href: links.pr.href, rel: 'noopener noreferrer', target: '_blank', text: links.pr.label }) : null),
      el('td', { class: 'num', text: money(task.cost_usd) }),
      el('td', { class: 'num duration', text: taskDuration(task) }),
      el('td', { class: 'muted', text: when(task.updated_at) }));
    return tr;
  }

  function render() {
    const sorted = [...tasks.values()].sort((a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : 0));
    tbody.replaceChildren(...sorted.map(row));
    show(document.getElementById('empty'), sorted.length === 0);
    show(more, !!nextCursor);
  }

  function upsert(task) {
    if (!task || typeof task.id !== 'string') return;
    const old = tasks.get(task.id);
    if (old && old.version > task.version) return;
    tasks.set(task.id, task);
  }

  async function load() {
    try {
      const page = await api('GET', '/api/v1/tasks?limit=100');
      const fresh = new Set(page.tasks.map((t) => t.id));
      for (const id of [...tasks.keys()]) if (!fresh.has(id) && !nextCursor) tasks.delete(id);
      page.tasks.forEach(upsert);
      if (nextCursor === null) nextCursor = page.next_cursor;
      setError(document.getElementById('list-error'), null);
      render();
    } catch (e) {
      setError(document.getElementById('list-error'), e);
    }
  }

  more.addEventListener('click', async () => {
    if (!nextCursor) return;
    try {
      const page = await api('GET', `/api/v1/tasks?limit=100&cursor=${encodeURIComponent(nextCursor)}`);
      page.tasks.forEach(upsert);
      nextCursor = page.next_cursor || '';
      render();
    } catch (e) {
      setError(document.getElementById('list-error'), e);
    }
  });

  function startPolling() {
    if (pollTimer) return;
    setLive('polling');
    pollTimer = setInterval(load, 2000);
    load();
  }

  function connect() {
    if (typeof EventSource === 'undefined') { startPolling(); return; }
    const es = new EventSource('/api/v1/task-updates');
    es.addEventListener('ready', () => { setLive('live'); load(); });
    es.addEventListener('task', (ev) => {
      try { upsert(JSON.parse(ev.data)); render(); } catch (_) { /* ignore a bad event */ }
    });
    es.addEventListener('resync', load);
    es.addEventListener('error', () => {
      if (es.readyState === EventSource.CLOSED) startPolling();
      else setLive('reconnecting');
    });
  }

  const form = document.getElementById('new-task');
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const err = document.getElementById('new-task-error');
    const body = {
      repository: form.elements.repository.value.trim(),
      prompt: form.elements.prompt.value,
    };
    const pipeline = form.elements.pipeline.value.trim();
    if (pipeline) body.pipeline = pipeline.includes(',') ? pipeline.split(',').map((s) => s.trim()).filter(Boolean) : pipeline;
    try {
      const task = await api('POST', '/api/v1/tasks', body);
      upsert(task);
      render();
      form.elements.prompt.value = '';
      setError(err, null);
    } catch (e) {
      setError(err, e);
    }
  });

  setInterval(() => {
    for (const tr of tbody.querySelectorAll('tr')) {
      const t = tasks.get(tr.dataset.id);
      if (t && !TERMINAL.includes(t.status)) tr.querySelector('.duration').textContent = taskDuration(t);
    }
  }, 1000);
  // A safety net for changes applied by another coordinator replica.
  setInterval(() => { if (!pollTimer) load(); }, 30000);
  connect();
}

// ---- task page ----------------------------------------------------------------------

// One line of the activity log for an event of the task; kinds described in docs/api.md.
function renderEvent(ev, subtasks) {
  const data = ev.data || {};
  const sub = ev.subtask_id ? subtasks.get(ev.subtask_id) : null;
  const who = sub ? sub.capability : (ev.subtask_id ? 'subtask' : 'task');
  const head = [el('span', { class: 'ev-time', text: clock(ev.at) }), el('span', { class: 'ev-who', text: who })];
  const line = (kind, ...body) => el('div', { class: `ev ev-${kind}`, 'data-kind': kind, 'data-seq': ev.seq }, ...head, el('div', { class: 'ev-main' }, ...body));

  if (ev.kind === 'state') {
    if (data.type === 'task_status') {
      return line('state', 'task is now ', statusBadge(data.status),
        data.error ? el('span', { class: 'error', text: ` ${oneLine(data.error, 300)}` }) : null);
    }
    if (data.type === 'subtask_status') {
      const outcome = data.outcome || {};
      return line('state', `${data.capability || 'subtask'} attempt ${data.attempt ?? '?'} is now `, statusBadge(data.status),
        data.worker ? el('span', { class: 'muted', text: ` on ${data.worker}` }) : null,
        outcome.kind && outcome.kind !== 'succeeded' ? el('span', { class: 'error', text: ` ${outcome.kind}: ${oneLine(outcome.error || outcome.summary || '', 300)}` }) : null);
    }
    return line('unknown', el('code', { text: oneLine(data, 500) }));
  }

  const kind = typeof data.type === 'string' ? data.type : '';
  const e = data.event && typeof data.event === 'object' ? data.event : {};
  switch (kind) {
    case 'log':
      return line('log', el('span', { class: 'ev-body', text: clip(e.message, TEXT_LIMIT) }));
    case 'branch_diff':
    case 'diff': {
      const files = Array.isArray(e.files) ? e.files : [];
      const total = Number(e.files_total) || files.length;
      const names = files.slice(0, 3).map((f) => String(f.path)).join(', ');
      const what = kind === 'diff' ? 'changed' : 'the branch now differs from its base in';
      return line(kind, el('span', { class: 'ev-body', text: `${what} ${total} file${total === 1 ? '' : 's'}${names ? `: ${names}${total > 3 ? ', …' : ''}` : ''}` }));
    }
    case 'init': {
      const tools = Array.isArray(e.tools) ? `${e.tools.length} tools` : '';
      return line('init', el('span', { class: 'ev-body', text: ['agent started', e.model, tools].filter(Boolean).join(' · ') }));
    }
    case 'text':
      return line('text', el('div', { class: 'ev-body', text: clip(e.text, TEXT_LIMIT) }));
    case 'thinking': {
      const text = String(e.text || '');
      return line('thinking', el('details', {},
        el('summary', { text: `thinking: ${oneLine(text.split('\n')[0], 120)}` }),
        el('div', { class: 'ev-body', text: clip(text, TEXT_LIMIT) })));
    }
    case 'tool_use':
      return line('tool_use', el('span', { class: 'tool', text: String(e.name || 'tool') }),
        el('code', { class: 'ev-body', text: toolSummary(e.name, e.input) }));
    case 'tool_result': {
      const text = toolResultText(e.content);
      const lines = text.split('\n');
      const first = lines.slice(0, TOOL_RESULT_LINES).join('\n');
      const rest = lines.length > TOOL_RESULT_LINES ? `\n… ${lines.length - TOOL_RESULT_LINES} more lines` : '';
      return line(e.is_error ? 'tool_error' : 'tool_result', el('details', {},
        el('summary', { text: `${e.is_error ? 'error' : 'result'}: ${oneLine(lines[0] || '(empty)', 120)}` }),
        el('pre', { class: 'ev-body', text: clip(first + rest, TEXT_LIMIT) })));
    }
    case 'result': {
      const usage = e.usage || {};
      const parts = [
        e.subtype || (e.is_error ? 'error' : 'done'),
        e.num_turns != null ? `${e.num_turns} turns` : null,
        e.total_cost_usd != null ? money(e.total_cost_usd) : null,
        e.duration_ms != null ? seconds(e.duration_ms) : null,
        tokens(usage),
      ].filter(Boolean);
      const summary = `agent finished: ${parts.join(' · ')}`;
      const kind = e.is_error ? 'result_error' : 'result';
      if (typeof e.result !== 'string' || !e.result) return line(kind, el('span', { class: 'ev-body', text: summary }));
      return line(kind, el('details', {},
        el('summary', { class: 'ev-body', text: summary }),
        el('div', { class: 'ev-final', text: clip(e.result, TEXT_LIMIT) })));
    }
    case 'system': {
      const detail = [e.attempt != null ? `attempt ${e.attempt}${e.max_retries != null ? ` of ${e.max_retries}` : ''}` : null,
        e.error_status != null ? `status ${e.error_status}` : null,
        e.error != null ? oneLine(e.error, 200) : null].filter(Boolean).join(' · ');
      return line('system', el('span', { class: 'ev-body', text: `${e.subtype || 'system'}${detail ? `: ${detail}` : ''}` }));
    }
    case 'network_denied':
      // The sandbox's network proxy refused a destination off the run's allow-list.
      return line('network_denied', el('span', { class: 'error', text: `network refused: ${oneLine(e.method || 'CONNECT', 20)} ${oneLine(e.host, 260)}:${Number(e.port) || '?'}` }));
    case 'network_refused': {
      // Every destination the proxy refused in the run, with its count (sent at its end).
      const refused = Array.isArray(e.refused) ? e.refused : [];
      const total = Number(e.total) || refused.reduce((n, r) => n + (Number(r.count) || 0), 0);
      const listed = refused.slice(0, 10).map((r) => `${oneLine(r.host, 260)}:${Number(r.port) || '?'} (${Number(r.count) || 1}×)`).join(', ');
      const more = refused.length - Math.min(refused.length, 10) + (Number(e.unlisted) || 0);
      return line('network_refused', el('span', { class: 'error', text: `network refused ${total} request${total === 1 ? '' : 's'} to ${refused.length + (Number(e.unlisted) || 0)} destination${refused.length === 1 && !e.unlisted ? '' : 's'}${listed ? `: ${listed}` : ''}${more > 0 ? `, and ${more} more` : ''}` }));
    }
    default:
      return line('unknown', el('code', { class: 'ev-body', text: oneLine(kind ? { type: kind, ...e } : data, 500) }));
  }
}

// Token counts as the runner reports them ({input, output, …}) or as the CLI does.
function tokens(usage) {
  const input = usage.input ?? usage.input_tokens;
  const output = usage.output ?? usage.output_tokens;
  if (input == null && output == null) return null;
  return `${input ?? 0} in / ${output ?? 0} out tokens`;
}

function toolSummary(name, input) {
  const i = input && typeof input === 'object' ? input : {};
  const pick = {
    Bash: 'command', Write: 'file_path', Edit: 'file_path', MultiEdit: 'file_path', Read: 'file_path',
    NotebookEdit: 'notebook_path', Grep: 'pattern', Glob: 'pattern', WebFetch: 'url', WebSearch: 'query', Task: 'description',
  }[name];
  if (pick && typeof i[pick] === 'string') return oneLine(i[pick], 300);
  return oneLine(i, 300);
}

function toolResultText(content) {
  if (typeof content === 'string') return content;
  if (Array.isArray(content)) {
    return content.map((c) => (c && typeof c.text === 'string' ? c.text : oneLine(c, 300))).join('\n');
  }
  return content == null ? '' : oneLine(content, 2000);
}

// The plan as a graph: one node per subtask, an edge from each step to the steps that
// wait for it. A plan step waits for the steps it names (or, naming none, for the
// planner before it); a merge of step branches waits for those steps; a subtask outside a
// plan waits for the one before it. Built as SVG nodes with textContent only.
const SVG_NS = 'http://www.w3.org/2000/svg';
const NODE_W = 176;
const NODE_H = 42;
const GAP_X = 40;
const GAP_Y = 14;

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function planEdges(subs) {
  const byPlanId = new Map();
  const deps = subs.map(() => []);
  subs.forEach((s, i) => {
    const step = s.step || null;
    if (step && step.kind === 'plan') {
      const named = Array.isArray(step.depends_on) ? step.depends_on : [];
      for (const d of named) if (byPlanId.has(d)) deps[i].push(byPlanId.get(d));
      if (!named.length) {
        for (let j = i - 1; j >= 0; j--) {
          if (!subs[j].step) { deps[i].push(j); break; }
        }
      }
      byPlanId.set(step.id, i);
    } else if (step && step.kind === 'pick') {
      // The attempts it compares; it stands for the step from then on.
      const candidates = Array.isArray(step.candidates) ? step.candidates : [];
      subs.forEach((o, j) => {
        if (j < i && o.step && o.step.kind === 'plan' && candidates.includes(o.step.branch)) deps[i].push(j);
      });
      byPlanId.set(step.id, i);
    } else if (step && step.kind === 'integrate') {
      const branches = Array.isArray(step.branches) ? step.branches : [];
      subs.forEach((o, j) => {
        const kind = o.step ? o.step.kind : '';
        if (j < i && (kind === 'plan' || kind === 'pick') && branches.includes(o.step.branch)) deps[i].push(j);
      });
    } else if (i > 0) {
      deps[i].push(i - 1);
    }
  });
  return deps;
}

function planGraph(subs) {
  const deps = planEdges(subs);
  const layer = [];
  subs.forEach((_, i) => { layer[i] = deps[i].reduce((m, d) => Math.max(m, layer[d] + 1), 0); });
  const rows = new Map();
  const pos = subs.map((_, i) => {
    const row = rows.get(layer[i]) || 0;
    rows.set(layer[i], row + 1);
    return { x: layer[i] * (NODE_W + GAP_X) + 2, y: row * (NODE_H + GAP_Y) + 2 };
  });
  const width = Math.max(0, ...layer) * (NODE_W + GAP_X) + NODE_W + 4;
  const height = Math.max(1, ...rows.values()) * (NODE_H + GAP_Y) + 4;
  const root = svg('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': 'plan' });
  subs.forEach((_, i) => {
    for (const d of deps[i]) {
      const a = pos[d];
      const b = pos[i];
      root.append(svg('path', {
        class: 'edge',
        'data-from': subs[d].id,
        'data-to': subs[i].id,
        d: `M${a.x + NODE_W},${a.y + NODE_H / 2} C${a.x + NODE_W + GAP_X / 2},${a.y + NODE_H / 2} ${b.x - GAP_X / 2},${b.y + NODE_H / 2} ${b.x},${b.y + NODE_H / 2}`,
      }));
    }
  });
  subs.forEach((s, i) => {
    const { x, y } = pos[i];
    const g = svg('g', { class: `node st-${String(s.status)}`, 'data-id': s.id, 'data-status': s.status, transform: `translate(${x},${y})` });
    g.append(svg('rect', { width: NODE_W, height: NODE_H, rx: 6 }));
    const step = s.step || null;
    const kind = step ? step.kind : '';
    const label = kind === 'plan' ? `${s.capability} · ${step.id}${step.candidate ? ` #${step.candidate}` : ''}`
      : kind === 'pick' ? `pick · ${step.id}` : kind === 'integrate' ? 'merge steps' : s.capability;
    g.append(svg('text', { x: 8, y: 17, class: 'node-title' }, oneLine(label, 26)));
    g.append(svg('text', { x: 8, y: 33, class: 'node-state' }, `${String(s.status).replace('_', ' ')}${s.attempt > 1 ? ` · attempt ${s.attempt}` : ''}`));
    g.append(svg('title', {}, step && step.title ? step.title : s.capability));
    root.append(g);
  });
  return root;
}

// diff2html's HTML as nodes of this page, parsed in an inert document (nothing runs or
// loads there) and kept to what a diff view is made of: these elements, with only these
// attributes, and links within the page. Everything else is dropped, its text kept.
const DIFF_TAGS = new Set(['div', 'span', 'table', 'thead', 'tbody', 'tr', 'td', 'th', 'ins', 'del',
  'a', 'ol', 'ul', 'li', 'label', 'svg', 'path', 'br', 'p', 'strong', 'em', 'code', 'pre']);
const DIFF_ATTRS = new Set(['class', 'id', 'd', 'viewbox', 'width', 'height', 'version', 'aria-hidden', 'colspan', 'title']);

function inertNodes(html) {
  const doc = new DOMParser().parseFromString(`<div>${html}</div>`, 'text/html');
  const root = doc.body.firstElementChild;
  if (!root) return [];
  for (const node of [...root.querySelectorAll('*')].reverse()) {
    if (!DIFF_TAGS.has(node.localName)) {
      node.replaceWith(doc.createTextNode(node.textContent));
      continue;
    }
    for (const attr of [...node.attributes]) {
      const name = attr.name.toLowerCase();
      const keep = DIFF_ATTRS.has(name) || (name === 'href' && attr.value.startsWith('#'));
      if (!keep) node.removeAttribute(attr.name);
    }
  }
  return [...root.childNodes].map((n) => document.importNode(n, true));
}

// A step's diff (the runner's `diff` event): diff2html's rendering of git's unified diff,
// which escapes the diff's text; plain text when the library is missing.
function diffView(sub, diff, title) {
  const files = Array.isArray(diff.files) ? diff.files : [];
  const added = files.reduce((n, f) => n + (Number(f.added) || 0), 0);
  const deleted = files.reduce((n, f) => n + (Number(f.deleted) || 0), 0);
  const total = Number(diff.files_total) || files.length;
  const step = sub && sub.step && sub.step.kind === 'plan' ? ` · ${sub.step.id}` : '';
  const head = `${title || (sub ? sub.capability : 'step')}${step}: ${total} file${total === 1 ? '' : 's'}, +${added} −${deleted}` +
    (diff.truncated ? ` (diff cut at ${String(diff.patch || '').length} of ${diff.patch_bytes} bytes)` : '');
  const body = el('div', { class: 'diff-body' });
  // Every file the event names, whatever the patch below shows: a change past the cut
  // of the patch is still named here.
  const list = el('ul', { class: 'diff-files' }, ...files.map((f) => el('li', {},
    el('code', { text: String(f.path) }),
    el('span', { class: 'muted', text: f.added == null ? ' binary' : ` +${Number(f.added) || 0} −${Number(f.deleted) || 0}` }))));
  if (total > files.length) list.append(el('li', { class: 'error', text: `… and ${total - files.length} more files, not listed` }));
  body.append(list);
  const patch = typeof diff.patch === 'string' ? diff.patch : '';
  if (window.Diff2Html && patch) {
    body.append(...inertNodes(window.Diff2Html.html(patch, { drawFileList: false, matching: 'lines', outputFormat: 'line-by-line' })));
  } else {
    body.append(el('pre', { class: 'ev-body', text: patch || '(no text diff)' }));
  }
  return el('details', { class: 'diff', 'data-subtask': sub ? sub.id : '' }, el('summary', { text: head }), body);
}

function taskPage() {
  const id = decodeURIComponent(window.location.pathname.split('/').filter(Boolean)[1] || '');
  const base = `/api/v1/tasks/${encodeURIComponent(id)}`;
  const events = document.getElementById('events');
  const follow = document.getElementById('follow');
  let task = null;
  let lastSeq = 0;
  let refreshTimer = null;
  let source = null;
  const subtasks = new Map();
  const diffs = new Map();
  let branchDiff = null;

  function renderDiffs() {
    const views = (task ? task.subtasks || [] : [])
      .filter((s) => diffs.has(s.id))
      .map((s) => diffView(s, diffs.get(s.id)));
    if (branchDiff) {
      const whole = diffView(null, branchDiff, `${task ? task.branch : 'task branch'} against its base`);
      whole.classList.add('diff-branch');
      whole.open = true;
      views.unshift(whole);
    } else if (views.length) views[views.length - 1].open = true;
    document.getElementById('diffs').replaceChildren(...views);
    show(document.getElementById('diffs-none'), views.length === 0);
  }

  function fact(dl, name, value) {
    if (value === null || value === undefined || value === '') return;
    dl.append(el('dt', { text: name }), el('dd', {}, value));
  }

  function renderTask() {
    document.title = `${task.title} · agent-orchestrator`;
    const st = document.getElementById('t-status');
    st.className = statusClass(task.status);
    st.textContent = String(task.status).replace('_', ' ');
    document.getElementById('t-title').textContent = task.title;
    document.getElementById('t-prompt').textContent = task.prompt;
    const links = githubLinks(task);
    const dl = document.getElementById('t-facts');
    dl.replaceChildren();
    fact(dl, 'Repository', task.repository);
    fact(dl, 'Branch', task.branch);
    fact(dl, 'Pipeline', task.pipeline);
    if (links.issue) fact(dl, 'Issue', el('a', { href: links.issue.href, rel: 'noopener noreferrer', target: '_blank', text: links.issue.label }));
    if (links.pr) fact(dl, 'Pull request', el('a', { href: links.pr.href, rel: 'noopener noreferrer', target: '_blank', text: links.pr.label }));
    fact(dl, 'Created', when(task.created_at));
    fact(dl, 'Duration', el('span', { id: 't-duration', text: taskDuration(task) }));
    fact(dl, 'Cost', money(task.cost_usd));
    const err = document.getElementById('t-error');
    err.textContent = task.error || '';
    err.hidden = !task.error;
    show(document.getElementById('act-cancel'), !TERMINAL.includes(task.status));
    show(document.getElementById('act-retry'), task.status === 'failed' || task.status === 'cancelled');
    show(document.getElementById('act-approve'), task.status === 'awaiting_approval');

    subtasks.clear();
    const rows = (task.subtasks || []).map((s) => {
      subtasks.set(s.id, s);
      const o = s.outcome || null;
      const outcome = o ? el('div', {},
        el('span', { class: o.kind === 'succeeded' ? 'ok' : 'error', text: o.kind }),
        o.commit ? el('code', { class: 'muted', text: ` ${String(o.commit).slice(0, 10)}` }) : null,
        (o.error || o.summary) ? el('div', { class: 'muted small', text: oneLine(o.error || o.summary, 240) }) : null) : '—';
      return el('tr', { 'data-id': s.id, 'data-status': s.status },
        el('td', { text: s.capability }),
        el('td', {}, statusBadge(s.status)),
        el('td', { class: 'num', text: s.attempt }),
        el('td', { class: 'muted', text: s.started_at ? when(s.started_at) : '—' }),
        el('td', { class: 'num', text: subtaskDuration(s) }),
        el('td', { class: 'num', text: money(s.cost_usd) }),
        el('td', {}, outcome));
    });
    document.getElementById('subtasks').replaceChildren(...rows);
    const subs = task.subtasks || [];
    document.getElementById('plan').replaceChildren(...(subs.length ? [planGraph(subs)] : []));
    renderDiffs();
  }

  async function refresh() {
    try {
      task = await api('GET', base);
      renderTask();
    } catch (e) {
      setError(document.getElementById('t-error'), e);
    }
  }

  function scheduleRefresh() {
    if (refreshTimer) return;
    refreshTimer = setTimeout(() => { refreshTimer = null; refresh(); }, 250);
  }

  function append(ev) {
    if (!ev || !Number.isFinite(ev.seq) || ev.seq <= lastSeq) return;
    lastSeq = ev.seq;
    const atBottom = events.scrollHeight - events.scrollTop - events.clientHeight < 40;
    events.append(renderEvent(ev, subtasks));
    while (events.childElementCount > MAX_EVENTS_SHOWN) events.firstElementChild.remove();
    if (follow.checked && atBottom) events.scrollTop = events.scrollHeight;
    if (ev.kind === 'state') scheduleRefresh();
    const data = ev.data || {};
    if (data.type === 'diff' && ev.subtask_id && data.event && typeof data.event === 'object') {
      diffs.set(ev.subtask_id, data.event);
      if (task) renderDiffs();
    }
    if (data.type === 'branch_diff' && data.event && typeof data.event === 'object') {
      branchDiff = data.event;
      if (task) renderDiffs();
    }
  }

  async function pollEvents() {
    try {
      const page = await api('GET', `${base}/events?after=${lastSeq}`);
      page.events.forEach(append);
    } catch (_) { /* shown by the next refresh */ }
    if (task && TERMINAL.includes(task.status)) { setLive('ended'); return; }
    setTimeout(pollEvents, 2000);
  }

  function connect() {
    if (typeof EventSource === 'undefined') { setLive('polling'); pollEvents(); return; }
    if (source) source.close();
    const es = new EventSource(`${base}/events`);
    source = es;
    es.addEventListener('open', () => setLive('live'));
    const onEvent = (msg) => { try { append(JSON.parse(msg.data)); } catch (_) { /* ignore */ } };
    es.addEventListener('state', onEvent);
    es.addEventListener('agent', onEvent);
    es.addEventListener('end', () => { es.close(); setLive('ended'); refresh(); });
    es.addEventListener('error', () => {
      if (es.readyState === EventSource.CLOSED) { setLive('polling'); pollEvents(); } else setLive('reconnecting');
    });
  }

  async function act(action) {
    const err = document.getElementById('act-error');
    try {
      task = await api('POST', `${base}/${action}`);
      setError(err, null);
      renderTask();
      if (action === 'retry') connect();
    } catch (e) {
      setError(err, e);
    }
  }
  for (const action of ['cancel', 'retry', 'approve']) {
    document.getElementById(`act-${action}`).addEventListener('click', () => act(action));
  }
  follow.addEventListener('change', () => { if (follow.checked) events.scrollTop = events.scrollHeight; });
  setInterval(() => {
    if (!task) return;
    const d = document.getElementById('t-duration');
    if (d && !TERMINAL.includes(task.status)) d.textContent = taskDuration(task);
  }, 1000);
  refresh().then(connect);
}

document.addEventListener('DOMContentLoaded', () => {
  setupLogout();
  const page = document.body.dataset.page;
  if (page === 'list') listPage();
  else if (page === 'task') taskPage();
});
