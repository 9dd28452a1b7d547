// The pbxgate dashboard: reads /admin/api/*, updated live from /admin/events (Server-Sent
// Events). Plain JavaScript, no build step.
'use strict';

const $ = (id) => document.getElementById(id);
const HEADERS = { 'X-Pbxgate-Admin': '1' };
let last = null;
let source = null;

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function time(ms) {
  if (!ms) return '—';
  const d = new Date(ms);
  return d.toLocaleTimeString() + (Date.now() - ms > 86400000 ? ' ' + d.toLocaleDateString() : '');
}

function seconds(s) {
  if (s === null || s === undefined) return '—';
  s = Math.max(0, Math.floor(s));
  const m = Math.floor(s / 60), r = s % 60;
  return m ? `${m}m ${String(r).padStart(2, '0')}s` : `${r}s`;
}

function ago(s) {
  return s === null || s === undefined ? '' : `for ${seconds(s)}`;
}

function show(which) {
  for (const id of ['login', 'refused', 'dashboard']) $(id).hidden = id !== which;
}

function notice(text, cls) {
  const n = $('notice');
  n.hidden = !text;
  n.textContent = text || '';
  n.className = 'message ' + (cls || '');
}

async function post(url, json) {
  const init = { method: 'POST', headers: HEADERS, credentials: 'same-origin' };
  if (json !== undefined) {
    init.headers = Object.assign({ 'Content-Type': 'application/json' }, HEADERS);
    init.body = JSON.stringify(json);
  }
  const r = await fetch(url, init);
  let body = {};
  try { body = await r.json(); } catch (_) { /* empty */ }
  if (r.status === 401) { start(); }
  return { ok: r.ok, status: r.status, body };
}

// ---- links: coloured by meaning ----
function card(name, level, state, detail) {
  const c = el('div', null, 'card ' + level);
  c.dataset.link = name;
  c.append(el('div', name, 'name'), el('div', state, 'state ' + level));
  if (detail) c.append(el('div', detail, 'detail'));
  return c;
}

function links(s) {
  const out = [];
  const ami = s.ami || {};
  if (ami.connected) {
    out.push(card('AMI', 'ok', 'connected ' + ago(ami.connectedSeconds), ami.banner || ''));
  } else {
    out.push(card('AMI', 'bad', 'down' + (ami.reconnectAttempt ? ` (attempt ${ami.reconnectAttempt})` : ''), ami.lastError || ''));
  }
  const crm = s.crm || {};
  let level = 'ok', state = crm.registration, detail = crm.url || '';
  if (!crm.configured) { level = 'warn'; state = 'not configured'; detail = crm.unconfigured || 'crm.api_key is empty'; }
  else if (crm.refused) { level = 'bad'; state = 'credentials refused'; detail = crm.refused; }
  else if (crm.registration === 'failed') { level = 'bad'; detail = crm.registrationError || ''; }
  else if (crm.registration === 'pending') { level = 'warn'; }
  else if (crm.registration === 'disabled') { detail = crm.registrationError || detail; }
  if (crm.configured && crm.active === false) { level = level === 'bad' ? 'bad' : 'warn'; state += ', module inactive'; }
  if (crm.freeze === true) { level = level === 'bad' ? 'bad' : 'warn'; state += ', frozen'; }
  out.push(card('CRM', level, state, detail));
  const h = s.history || {};
  let hl = 'ok', hs = `${h.pending || 0} pending, ${h.dead || 0} dead`;
  if (h.blocked) hl = 'bad';
  else if ((h.dead || 0) > 0 || (h.oldestPendingAgeSeconds || 0) > 600 || h.lastError) hl = 'warn';
  out.push(card('History upload', hl, hs, h.blocked || h.lastError || ''));
  const agi = s.routing && s.routing.fastAgi;
  out.push(card('FastAGI', agi ? 'ok' : 'off', agi ? 'listening ' + agi : 'off', ''));
  out.push(card('Store', s.store && s.store.ok ? 'ok' : 'bad', s.store && s.store.ok ? 'ok' : 'unreadable', ''));
  $('links').replaceChildren(...out);
}

// ---- calls ----
function liveRows(calls) {
  const rows = calls.filter((c) => c.state === 'live').map((c) => {
    const tr = el('tr');
    tr.dataset.id = c.external_id;
    const dur = el('td', seconds((Date.now() - c.started) / 1000), 'ticking');
    dur.dataset.since = c.started;
    tr.append(el('td', time(c.started)), dur, el('td', c.direction), el('td', c.phone, 'phone'),
      el('td', (c.ringing || []).join(', '), c.ringing && c.ringing.length ? 'warn' : ''),
      el('td', (c.talking || []).join(', '), c.talking && c.talking.length ? 'ok' : ''));
    return tr;
  });
  $('live-count').textContent = `(${rows.length})`;
  $('live').tBodies[0].replaceChildren(...rows);
}

function crmCell(c) {
  const crm = c.crm;
  if (c.ignored) return el('td', 'not sent (ignored)', 'warn');
  if (!crm) return el('td', '—');
  const cls = { done: 'ok', pending: 'warn', dead: 'bad', discarded: 'warn', none: '' }[crm.state] || '';
  const td = el('td', crm.state + (crm.reason ? ': ' + crm.reason : ''), cls);
  td.classList.add('crm');
  return td;
}

function recentRows() {
  if (!last) return;
  const f = $('filter').value.trim().toLowerCase();
  const calls = last.calls.filter((c) => c.state === 'finished').filter((c) => !f ||
    [c.phone, c.code, c.result, c.external_id, c.did].some((v) => v && String(v).toLowerCase().includes(f)));
  const rows = calls.map((c) => {
    const tr = el('tr');
    tr.dataset.id = c.external_id;
    const rec = el('td');
    if (c.recording) { const a = el('a', 'listen'); a.href = c.recording; a.target = '_blank'; rec.append(a); }
    const act = el('td');
    const b = el('button', 'Resend', 'resend');
    b.onclick = () => act_(`/admin/api/calls/${encodeURIComponent(c.external_id)}/resend`, `resent ${c.external_id}`);
    act.append(b);
    tr.append(el('td', time(c.started)), el('td', c.direction), el('td', c.phone, 'phone'), el('td', c.code || '—', 'code'),
      el('td', c.result, c.result === 'answered' ? 'ok' : 'warn'), el('td', seconds(c.duration)),
      el('td', c.registration || '—', c.ignored ? 'warn' : ''), crmCell(c), rec, act);
    return tr;
  });
  $('recent-count').textContent = `(${rows.length})`;
  $('recent').tBodies[0].replaceChildren(...rows);
}

function queueRows(q) {
  const items = (q && q.items) || [];
  const rows = items.map((i) => {
    const tr = el('tr');
    tr.dataset.id = i.external_id;
    const act = el('td');
    if (i.state === 'dead') {
      const r = el('button', 'Retry', 'retry');
      r.onclick = () => act_(`/admin/api/queue/${encodeURIComponent(i.external_id)}/retry`, `queued ${i.external_id} again`);
      act.append(r);
    }
    const d = el('button', 'Discard', 'discard');
    d.onclick = () => { if (confirm(`Discard ${i.external_id}? It will not reach the CRM.`)) act_(`/admin/api/queue/${encodeURIComponent(i.external_id)}/discard`, `discarded ${i.external_id}`); };
    act.append(d);
    tr.append(el('td', i.external_id), el('td', i.state + (i.held ? ' (held)' : ''), i.state === 'dead' ? 'bad' : 'warn'),
      el('td', time(i.enqueued_at)), el('td', i.attempts), el('td', i.reason || '', 'reason'), act);
    return tr;
  });
  const s = (q && q.status) || {};
  $('queue-count').textContent = `(${s.pending || 0} pending, ${s.inFlight || 0} in flight, ${s.dead || 0} dead)`;
  $('queue').tBodies[0].replaceChildren(...rows);
}

function hooks(h) {
  const rows = Object.entries(h || {}).map(([point, stats]) => {
    const tr = el('tr');
    tr.append(el('td', point), el('td', Object.entries(stats || {}).map(([k, v]) => `${k}: ${v}`).join(', ')));
    return tr;
  });
  if (!rows.length) rows.push(el('tr', 'no hooks configured'));
  $('hooks').tBodies[0].replaceChildren(...rows);
}

async function act_(url, done) {
  const r = await post(url);
  notice(r.ok ? done : (r.body.errorMsg || `failed (${r.status})`), r.ok ? 'ok' : 'bad');
}

function render(snap) {
  last = snap;
  links(snap.status || {});
  liveRows(snap.calls || []);
  recentRows();
  queueRows(snap.queue);
  hooks((snap.status || {}).hooks);
}

setInterval(() => {
  for (const td of document.querySelectorAll('td.ticking')) {
    td.textContent = seconds((Date.now() - Number(td.dataset.since)) / 1000);
  }
}, 1000);

function listen() {
  if (source) source.close();
  source = new EventSource('/admin/events');
  source.addEventListener('snapshot', (e) => {
    $('conn').textContent = 'live';
    $('conn').className = 'badge ok';
    render(JSON.parse(e.data));
  });
  source.onerror = () => {
    $('conn').textContent = 'reconnecting…';
    $('conn').className = 'badge warn';
  };
}

async function start() {
  if (source) { source.close(); source = null; }
  let r;
  try {
    r = await fetch('/admin/api/status', { credentials: 'same-origin' });
  } catch (e) {
    $('conn').textContent = 'unreachable';
    $('conn').className = 'badge bad';
    setTimeout(start, 3000);
    return;
  }
  if (r.status === 401) { show('login'); $('conn').textContent = 'login required'; return; }
  if (r.status === 403) {
    const b = await r.json().catch(() => ({}));
    $('refused-reason').textContent = b.errorMsg || 'refused';
    show('refused');
    return;
  }
  show('dashboard');
  const c = await fetch('/admin/api/config', { credentials: 'same-origin' });
  if (c.ok) {
    const config = await c.json();
    $('config').textContent = JSON.stringify(config, null, 2);
    $('logout').hidden = !(config.admin && config.admin.token);
  }
  listen();
}

$('login-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const r = await fetch('/admin/login', {
    method: 'POST', credentials: 'same-origin',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ token: $('token').value }),
  });
  if (r.ok) { $('token').value = ''; $('login-error').textContent = ''; start(); }
  else { const b = await r.json().catch(() => ({})); $('login-error').textContent = b.errorMsg || 'login failed'; }
});
$('logout').onclick = async () => { await fetch('/admin/logout', { method: 'POST' }); start(); };
$('filter').addEventListener('input', recentRows);
$('register').onclick = () => act_('/admin/api/register', 'module registered');

// ---- the demo's sandbox CRM (only `pbxgate demo` serves it) ----
async function sandbox() {
  let r;
  try { r = await fetch('/sandbox/received', { credentials: 'same-origin' }); } catch (_) { return; }
  if (!r.ok) return; // not the demo: the section stays hidden, not asked again
  const got = await r.json();
  $('sandbox').hidden = false;
  const calls = (got.calls || []).slice(-20).reverse();
  $('sandbox-calls').tBodies[0].replaceChildren(...calls.map((c) => {
    const tr = el('tr');
    tr.dataset.id = c.externalId || '';
    const rec = el('td');
    if (c.recordUrl) { const a = el('a', 'play'); a.href = c.recordUrl; a.target = '_blank'; rec.append(a); }
    tr.append(el('td', c.externalId), el('td', c.date), el('td', c.type), el('td', c.phone, 'phone'),
      el('td', c.code || '—'), el('td', c.result), rec);
    return tr;
  }));
  const counts = got.counts || {};
  const events = Object.entries(counts).filter(([p]) => p.endsWith('/call/event')).reduce((n, [, v]) => n + v, 0);
  $('sandbox-count').textContent = `(${(got.calls || []).length} calls, ${events} live events)`;
  setTimeout(sandbox, 2000);
}
sandbox();
$('call-form').onsubmit = async (ev) => {
  ev.preventDefault();
  const code = $('call-code').value.trim();
  const r = await post('/admin/api/call', { code, phone: $('call-phone').value.trim() });
  notice(r.ok ? `calling: extension ${code} rings first` : (r.body.errorMsg || `failed (${r.status})`), r.ok ? 'ok' : 'bad');
};
$('run-check').onclick = async () => {
  $('check-lines').replaceChildren(el('li', 'checking…'));
  const r = await post('/admin/api/check');
  const lines = (r.body.lines || []).map((l) => el('li', (l.ok ? (l.warning ? '! ' : '✓ ') : '✗ ') + l.text, l.ok ? (l.warning ? 'warn' : 'ok') : 'bad'));
  $('check-lines').replaceChildren(...(lines.length ? lines : [el('li', r.body.errorMsg || 'failed', 'bad')]));
};

start();
