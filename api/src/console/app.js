// The gateway console: one page, views routed by the URL's hash, built on the public API.
// The token lives in this tab's sessionStorage only and travels in the Authorization header,
// also for the event stream (a streamed fetch: EventSource cannot send headers). No inline
// script, no innerHTML with data: the DOM is built with createElement and text nodes.
'use strict';

const TOKEN_KEY = 'gw.console.token';
const main = document.getElementById('main');
const nav = document.getElementById('nav');
let page = null; // the current view's AbortController: navigating away ends its streams

// ---------------------------------------------------------------- helpers

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

/** Calls the API; answers parsed JSON (or a Blob); throws ApiError with the envelope's message. */
async function api(method, path, body, opts = {}) {
  const headers = { Authorization: 'Bearer ' + (opts.token || token() || '') };
  if (opts.accept) headers.Accept = opts.accept;
  // A File or Blob goes as it is, with its own type (an upload); anything else as JSON.
  const raw = body instanceof Blob;
  if (body !== undefined) headers['Content-Type'] = raw ? (body.type || 'application/octet-stream') : 'application/json';
  let r;
  try {
    r = await fetch('/api/v1' + path, {
      method, headers, cache: 'no-store', signal: opts.signal,
      body: body === undefined ? undefined : raw ? body : JSON.stringify(body),
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, 'network', 'The API cannot be reached (' + e.message + ')');
  }
  if (!r.ok) throw await envelope(r);
  if (r.status === 204) return null;
  return opts.blob ? r.blob() : r.json();
}

async function envelope(r) {
  let err = null;
  try { err = (await r.json()).error; } catch (_) { /* not the envelope */ }
  return new ApiError(r.status, err ? err.code : 'http_' + r.status,
    err && err.message ? err.message : 'HTTP ' + r.status);
}

/** createElement with attributes (on* are listeners) and children (strings become text). */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'value') el.value = v;
    else if (k === 'checked') el.checked = !!v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c != null && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function show(...nodes) { main.replaceChildren(...nodes); }

function time(ms) {
  if (ms == null) return '—';
  const d = new Date(ms);
  return h('time', { datetime: d.toISOString(), title: d.toISOString() }, d.toLocaleString());
}

function clock(ms) { return new Date(ms).toLocaleTimeString(); }

function statusBadge(status, reason, id) {
  return h('span', { class: 'status-wrap', id },
    h('span', { class: 'status ' + status, 'data-status': status }, status),
    reason ? h('span', { class: 'reason' }, reason.replace(/_/g, ' ')) : null);
}

function errorBox(e) {
  return h('div', { class: 'error', role: 'alert' }, e instanceof Error ? e.message : String(e));
}

/** Shows an API error in `slot` (an element whose content it replaces); 401 signs out. */
function fail(slot, e) {
  if (e && e.name === 'AbortError') return;
  if (e instanceof ApiError && e.status === 401) { signOut(e.message); return; }
  if (slot) slot.replaceChildren(errorBox(e));
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    if (signal) signal.addEventListener('abort', () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

/** The in-page confirmation for destructive actions; resolves true when confirmed. */
function confirmAction(text, verb) {
  const dialog = document.getElementById('confirm');
  document.getElementById('confirm-text').textContent = text;
  document.getElementById('confirm-yes').textContent = verb;
  dialog.returnValue = '';
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener('close', () => resolve(dialog.returnValue === 'yes'), { once: true });
  });
}

const sessionPath = (id) => '/sessions/' + encodeURIComponent(id);

// ---------------------------------------------------------------- the event stream

/**
 * Follows GET /events (optionally one session's) with a streamed fetch, parsing Server-Sent
 * Events, until `signal` aborts. Reconnects with Last-Event-ID after a drop, so nothing is
 * missed or repeated. `from` is the event id to resume after (null: from now).
 */
async function followEvents({ session, from, signal, onEvent, onLive }) {
  let last = from;
  let delay = 500;
  while (!signal.aborted) {
    try {
      const headers = { Authorization: 'Bearer ' + token(), Accept: 'text/event-stream' };
      if (last != null) headers['Last-Event-ID'] = String(last);
      const query = session ? '?session=' + encodeURIComponent(session) : '';
      const r = await fetch('/api/v1/events' + query, { headers, signal, cache: 'no-store' });
      if (!r.ok) throw await envelope(r);
      onLive(true);
      delay = 500;
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = '';
      let ev = { data: [] };
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let nl;
        while ((nl = buf.indexOf('\n')) >= 0) {
          let line = buf.slice(0, nl);
          buf = buf.slice(nl + 1);
          if (line.endsWith('\r')) line = line.slice(0, -1);
          if (line === '') {
            if (ev.data.length) {
              if (ev.id) last = ev.id;
              try { onEvent(JSON.parse(ev.data.join('\n'))); } catch (e) { console.error(e); }
            }
            ev = { data: [] };
          } else if (!line.startsWith(':')) {
            const i = line.indexOf(':');
            const field = i < 0 ? line : line.slice(0, i);
            let val = i < 0 ? '' : line.slice(i + 1);
            if (val.startsWith(' ')) val = val.slice(1);
            if (field === 'data') ev.data.push(val);
            else if (field === 'id') ev.id = val;
            else if (field === 'event') ev.type = val;
          }
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof ApiError && e.status === 401) { signOut(e.message); return; }
      if (e instanceof ApiError && e.status === 404) { onLive(false, e.message); return; }
    }
    if (signal.aborted) return;
    onLive(false);
    await sleep(delay, signal);
    delay = Math.min(delay * 2, 10000);
  }
}

function liveBadge() {
  const el = h('span', { class: 'live off', id: 'live' }, 'connecting');
  el.set = (on, why) => {
    el.className = 'live ' + (on ? 'on' : 'off');
    el.textContent = on ? 'live' : (why || 'reconnecting');
  };
  return el;
}

// What a message says, in a line: its text, or its type and the gist of its content.
function summary(m) {
  switch (m.type) {
    case 'location': return '📍 ' + [m.location.name, m.location.address].filter(Boolean).join(', ') +
      ' (' + m.location.latitude + ', ' + m.location.longitude + ')';
    case 'contact': return '👤 ' + (m.contact.name || 'contact card');
    case 'reaction': return (m.reaction.emoji || 'reaction removed') + ' on ' + m.reaction.messageId;
    case 'poll': return '📊 ' + m.poll.name + ' (' + m.poll.options.join(' / ') + ')';
    case 'poll_vote': return '🗳 ' + (m.poll_vote.options.join(', ') || 'vote taken back') + ' on ' + m.poll_vote.messageId;
    case 'edit': return '✎ ' + m.edit.messageId + ' → ' + m.edit.text;
    case 'revoke': return '🗑 deleted ' + m.revoke.messageId + ' for everyone';
    case 'image': case 'video': case 'audio': case 'voice': case 'document': case 'sticker': {
      const f = m[m.type];
      return '📎 ' + m.type + ' ' + [f.fileName, f.caption].filter(Boolean).join(': ') +
        (f.size ? ' (' + Math.ceil(f.size / 1024) + ' KB)' : '') + (m.revokedAt ? ' (deleted for everyone)' : '');
    }
    default: return m.text + (m.revokedAt ? ' (deleted for everyone)' : m.editedAt ? ' (edited)' : '');
  }
}

function describe(ev) {
  switch (ev.type) {
    case 'auth.qr': return 'new QR code, valid until ' + clock(ev.expiresAt);
    case 'auth.pair_code': return 'pairing code ' + ev.code;
    case 'session.status':
      return 'status ' + ev.status + (ev.statusReason ? ' (' + ev.statusReason.replace(/_/g, ' ') + ')' : '');
    case 'session.deleted': return 'session deleted';
    case 'message.status': return 'message ' + ev.messageId + ' ' + ev.status + (ev.error ? ': ' + ev.error : '');
    case 'message.received': return 'message from ' + ev.from + ': ' + summary(ev.content || ev);
    case 'message.reaction': return ev.from + ' reacted ' + (ev.emoji || '(removed)') + ' to ' + ev.messageId;
    case 'message.poll_vote':
      return ev.from + ' voted ' + (ev.options.length ? ev.options.join(', ') : '(vote taken back)') + ' on ' + ev.messageId;
    case 'message.edited': return ev.from + ' edited ' + ev.messageId + ': ' + ev.text;
    case 'message.revoked': return ev.from + ' deleted ' + ev.messageId + ' for everyone';
    default: return ev.type;
  }
}

// ---------------------------------------------------------------- sign in / out

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  if (page) page.abort();
  if (location.hash !== '#/sign-in') history.replaceState(null, '', '#/sign-in');
  signInPage(message);
}

function signInPage(message) {
  nav.hidden = true;
  const slot = h('div', { id: 'error-slot' }, message ? errorBox(message) : null);
  const input = h('input', {
    id: 'token', type: 'password', autocomplete: 'off', spellcheck: 'false', required: true,
    placeholder: 'gwk_… or a login token',
  });
  const form = h('form', { class: 'stack', id: 'sign-in-form' },
    h('label', {}, 'API key or login token', input),
    slot,
    h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'sign-in' }, 'Sign in')));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const candidate = input.value.trim();
    slot.replaceChildren();
    try {
      await api('GET', '/sessions?pageSize=1', undefined, { token: candidate });
      sessionStorage.setItem(TOKEN_KEY, candidate);
      if (location.hash === '#/sessions') route(); else location.hash = '#/sessions';
    } catch (err) {
      slot.replaceChildren(errorBox(err));
    }
  });
  show(h('div', { class: 'card signin' },
    h('h1', {}, 'Sign in'),
    h('p', { class: 'muted' },
      'Paste an API key with the read capability (manage to act on sessions), or a login token. ',
      'It is kept in this tab only and forgotten when the tab closes.'),
    form));
  input.focus();
}

// ---------------------------------------------------------------- sessions

async function sessionsPage(signal) {
  const live = liveBadge();
  const slot = h('div');
  const body = h('tbody', { id: 'sessions' });
  const more = h('button', { type: 'button', class: 'secondary', id: 'more', hidden: true }, 'Load more');
  let next = null;
  let loaded = false;
  const rows = new Map();

  function row(s) {
    const tr = h('tr', { 'data-session': s.id },
      h('td', {}, h('a', { href: '#' + sessionPath(s.id) }, s.label || s.id)),
      h('td', {}, statusBadge(s.status, s.statusReason)),
      h('td', {}, s.phoneNumber || '—'),
      h('td', { class: 'wide' }, s.gatewayId),
      h('td', { class: 'wide' }, time(s.lastConnectedAt)),
      h('td', { class: 'wide' }, s.desiredState || '—'));
    const old = rows.get(s.id);
    if (old) old.replaceWith(tr);
    rows.set(s.id, tr);
    return tr;
  }

  async function load(reset) {
    try {
      const q = '/sessions?pageSize=50' + (!reset && next ? '&pageToken=' + encodeURIComponent(next) : '');
      const pg = await api('GET', q, undefined, { signal });
      if (reset) { rows.clear(); body.replaceChildren(); }
      for (const s of pg.sessions) body.append(row(s));
      next = pg.nextPageToken || null;
      loaded = true;
      more.hidden = !next;
      slot.replaceChildren(rows.size ? '' : h('p', { class: 'muted', id: 'empty' }, 'No sessions yet.'));
    } catch (e) { fail(slot, e); }
  }

  async function refreshOne(id) {
    try {
      const s = await api('GET', sessionPath(id), undefined, { signal });
      if (rows.has(id)) row(s); else { body.prepend(row(s)); slot.replaceChildren(); }
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) { rows.get(id)?.remove(); rows.delete(id); } else fail(slot, e);
    }
  }

  more.addEventListener('click', () => load(false));
  show(
    h('h1', {}, 'Sessions', live),
    h('div', { class: 'actions' }, h('a', { class: 'button', href: '#/sessions/new', id: 'new-session' }, 'New session')),
    slot,
    h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, 'Label'), h('th', {}, 'Status'), h('th', {}, 'Phone'),
        h('th', { class: 'wide' }, 'Gateway'), h('th', { class: 'wide' }, 'Last connected'),
        h('th', { class: 'wide' }, 'Desired'))),
      body)),
    h('div', { class: 'actions' }, more));

  // The list is (re)loaded each time the stream is (re)connected: what changed while it was
  // down is in the fresh list, and what changes after arrives as events.
  followEvents({
    signal, from: null,
    onLive: (on, why) => { live.set(on, why); if (on || !loaded) load(true); },
    onEvent: (ev) => {
      if (ev.type === 'session.deleted') { rows.get(ev.sessionId)?.remove(); rows.delete(ev.sessionId); }
      else if (ev.type === 'session.status') {
        const tr = rows.get(ev.sessionId);
        if (tr) tr.children[1].replaceChildren(statusBadge(ev.status, ev.statusReason));
        refreshOne(ev.sessionId);
      }
    },
  });
}

async function sessionPage(signal, id) {
  const live = liveBadge();
  const slot = h('div', { id: 'error-slot' });
  const title = h('span', {}, id);
  const status = h('span', { id: 'status' });
  const facts = h('dl', { class: 'facts' });
  const events = h('ol', { class: 'events', id: 'events' });
  const commands = h('tbody', { id: 'commands' });
  const qrImg = h('img', { id: 'qr', alt: 'QR code to scan with WhatsApp', hidden: true });
  const qrState = h('p', { id: 'qr-state', class: 'muted' });
  const showQr = h('button', { type: 'button', id: 'show-qr' }, 'Show QR code');
  const pairPhone = h('input', { id: 'pair-phone', inputmode: 'tel', placeholder: '6281234567890', required: true });
  const pairCode = h('p', { id: 'pair-code', class: 'code' });
  const linkCard = h('section', { class: 'card', id: 'link' },
    h('h2', {}, 'Link a number'),
    h('div', { class: 'grid' },
      h('div', { class: 'qr-box' }, qrImg, qrState, showQr),
      h('div', {},
        h('p', { class: 'muted' }, 'Or link with a pairing code: enter the number, then type the code on the phone under Linked devices → Link with phone number.'),
        h('form', { class: 'inline', id: 'pair-form', onsubmit: requestCode },
          h('label', {}, 'Phone number', pairPhone),
          h('button', { type: 'submit', id: 'pair' }, 'Get pairing code')),
        pairCode)));
  let session = null;
  let qrUrl = null;
  let qrBusy = false;
  let qrAgain = false;
  let qrExpiresAt = null;
  let commandsTimer = null;
  let reloadTimer = null;

  function setQr(blob) {
    if (qrUrl) URL.revokeObjectURL(qrUrl);
    qrUrl = blob ? URL.createObjectURL(blob) : null;
    if (qrUrl) {
      qrImg.src = qrUrl;
      qrImg.dataset.rotations = String(Number(qrImg.dataset.rotations || 0) + 1);
    } else qrImg.removeAttribute('src');
    qrImg.hidden = !qrUrl;
    showQr.hidden = !!qrUrl;
  }

  /** Fetches the current code as a PNG (with the token: an <img src> could not send it). */
  async function refreshQr() {
    if (qrBusy) { qrAgain = true; return; }
    qrBusy = true;
    try {
      const blob = await api('GET', sessionPath(id) + '/qr?format=png', undefined, { blob: true, signal });
      setQr(blob);
      qrState.textContent = 'Scan it on the phone: WhatsApp → Settings → Linked devices → Link a device.'
        + (qrExpiresAt ? ' It changes at ' + clock(qrExpiresAt) + '.' : '');
    } catch (e) {
      if (e instanceof ApiError && e.status === 404) {
        qrState.textContent = 'Pairing is starting: the first code appears here in a moment…';
      } else if (e instanceof ApiError && e.status === 409) {
        setQr(null);
        qrState.textContent = e.message;
      } else fail(slot, e);
    } finally {
      qrBusy = false;
      if (qrAgain && !signal.aborted) { qrAgain = false; refreshQr(); }
    }
  }

  async function requestCode(e) {
    e.preventDefault();
    pairCode.textContent = '';
    try {
      const r = await api('POST', sessionPath(id) + ':requestPairingCode', { phoneNumber: pairPhone.value.trim() }, { signal });
      pairCode.textContent = r.code;
    } catch (err) { fail(slot, err); }
  }

  function render(s) {
    session = s;
    title.textContent = s.label || s.id;
    status.replaceChildren(statusBadge(s.status, s.statusReason));
    const fact = (k, v) => [h('dt', {}, k), h('dd', {}, v == null || v === '' ? '—' : v)];
    facts.replaceChildren(
      ...fact('Id', h('span', { class: 'mono' }, s.id)),
      ...fact('Phone number', s.phoneNumber),
      ...fact('WhatsApp JID', s.waJid),
      ...fact('Gateway', s.gatewayId),
      ...fact('Desired state', s.desiredState),
      ...fact('Last connected', time(s.lastConnectedAt)),
      ...fact('Settings', 'auto-read ' + (s.autoRead ? 'on' : 'off') + ', typing ' + (s.presenceTyping ? 'on' : 'off')
        + ', ' + s.ratePerMin + '/min, ' + s.ratePerHour + '/hour'),
      ...fact('Created', time(s.createdAt)),
      ...fact('Updated', time(s.updatedAt)));
    const paired = s.status === 'working' || !!s.phoneNumber;
    linkCard.hidden = paired && s.status !== 'scan_qr_code';
    if (s.status === 'scan_qr_code') { if (!qrUrl) refreshQr(); } else if (qrUrl) {
      setQr(null);
      qrState.textContent = '';
    }
  }

  async function reload() {
    try { render(await api('GET', sessionPath(id), undefined, { signal })); } catch (e) { fail(slot, e); }
  }

  async function loadCommands() {
    try {
      const r = await api('GET', sessionPath(id) + '/commands?pageSize=15', undefined, { signal });
      commands.replaceChildren(...r.commands.map((c) => h('tr', {},
        h('td', {}, c.kind), h('td', {}, h('span', { class: 'status ' + c.status }, c.status),
          c.error ? h('span', { class: 'reason' }, c.error.message) : null),
        h('td', { class: 'wide mono' }, c.requestedBy), h('td', {}, time(c.createdAt)))));
    } catch (e) { fail(slot, e); }
  }

  function soonCommands() {
    clearTimeout(commandsTimer);
    commandsTimer = setTimeout(loadCommands, 300);
  }

  async function act(action, label, confirmText) {
    if (confirmText && !await confirmAction(confirmText, label)) return;
    slot.replaceChildren();
    try {
      if (action === 'delete') {
        await api('DELETE', sessionPath(id), undefined, { signal });
        location.hash = '#/sessions';
        return;
      }
      render(await api('POST', sessionPath(id) + ':' + action, undefined, { signal }));
    } catch (e) { fail(slot, e); }
    soonCommands();
  }

  showQr.addEventListener('click', () => { qrState.textContent = ''; refreshQr(); soonCommands(); });
  const button = (action, label, cls, confirmText) => h('button', {
    type: 'button', id: 'action-' + action, class: cls, onclick: () => act(action, label, confirmText),
  }, label);
  show(
    h('p', {}, h('a', { href: '#/sessions' }, '← Sessions')),
    h('h1', {}, title, status, live),
    slot,
    h('div', { class: 'actions' },
      button('start', 'Start'), button('stop', 'Stop', 'secondary'), button('restart', 'Restart', 'secondary'),
      button('logout', 'Log out', 'danger',
        'Log this number out? The device is unlinked: using the number again needs a new QR scan or pairing code.'),
      button('delete', 'Delete', 'danger',
        'Delete this session? It is stopped, its device unlinked and the session removed for good.'),
      h('a', { class: 'button secondary', href: '#' + sessionPath(id) + '/edit', id: 'edit' }, 'Edit'),
      h('a', { class: 'button secondary', href: '#' + sessionPath(id) + '/messages', id: 'messages' }, 'Messages')),
    linkCard,
    h('section', { class: 'card' }, facts),
    h('div', { class: 'grid' },
      h('section', {}, h('h2', {}, 'Recent events'), h('div', { class: 'card' }, events)),
      h('section', {}, h('h2', {}, 'Recent commands'), h('div', { class: 'table-wrap' }, h('table', {},
        h('thead', {}, h('tr', {}, h('th', {}, 'Command'), h('th', {}, 'Outcome'), h('th', { class: 'wide' }, 'By'), h('th', {}, 'When'))),
        commands)))));

  await reload();
  if (!session) return;
  loadCommands();
  // The session's stream from its first event: the history fills "Recent events", then live
  // events move the page. Only a code that is still valid is worth fetching as an image.
  followEvents({
    signal, session: id, from: 0,
    onLive: (on, why) => live.set(on, why),
    onEvent: (ev) => {
      events.prepend(h('li', { 'data-type': ev.type }, h('time', {}, clock(ev.at)), describe(ev)));
      while (events.children.length > 50) events.lastChild.remove();
      if (ev.type === 'auth.qr' && ev.expiresAt > Date.now()) {
        qrExpiresAt = ev.expiresAt;
        refreshQr();
      } else if (ev.type === 'session.status') {
        // The row says more than the event (phone number, times): read it, once per burst.
        clearTimeout(reloadTimer);
        reloadTimer = setTimeout(reload, 150);
        soonCommands();
      } else if (ev.type === 'auth.pair_code') {
        pairCode.textContent = ev.code;
      } else if (ev.type === 'session.deleted') {
        slot.replaceChildren(errorBox('This session was deleted.'));
      }
    },
  });
}

function sessionForm(signal, id) {
  const slot = h('div', { id: 'error-slot' });
  const f = {
    label: h('input', { id: 'f-label', required: true, maxlength: 200 }),
    gateway: h('input', { id: 'f-gateway', placeholder: 'chosen by placement' }),
    region: h('input', { id: 'f-region', placeholder: 'e.g. sg' }),
    autoRead: h('input', { id: 'f-auto-read', type: 'checkbox' }),
    typing: h('input', { id: 'f-typing', type: 'checkbox' }),
    perMin: h('input', { id: 'f-rate-min', type: 'number', min: 1 }),
    perHour: h('input', { id: 'f-rate-hour', type: 'number', min: 1 }),
  };
  const num = (el) => (el.value === '' ? undefined : Number(el.value));
  const form = h('form', { class: 'stack', id: 'session-form' },
    h('label', {}, 'Label', f.label),
    id ? null : h('label', {}, 'Gateway id (optional)', f.gateway),
    id ? null : h('label', {}, 'Region (optional, when no gateway is given)', f.region),
    h('label', { class: 'check' }, f.autoRead, 'Mark incoming messages read'),
    h('label', { class: 'check' }, f.typing, 'Show typing before sending'),
    h('label', {}, 'Messages per minute', f.perMin),
    h('label', {}, 'Messages per hour', f.perHour),
    slot,
    h('div', { class: 'actions' },
      h('button', { type: 'submit', id: 'save' }, id ? 'Save' : 'Create'),
      h('a', { class: 'button secondary', href: id ? '#' + sessionPath(id) : '#/sessions' }, 'Cancel')));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = {
      label: f.label.value.trim(), autoRead: f.autoRead.checked, presenceTyping: f.typing.checked,
      ratePerMin: num(f.perMin), ratePerHour: num(f.perHour),
    };
    if (!id) {
      if (f.gateway.value.trim()) body.gatewayId = f.gateway.value.trim();
      if (f.region.value.trim()) body.region = f.region.value.trim();
    }
    try {
      const s = id ? await api('PATCH', sessionPath(id), body, { signal }) : await api('POST', '/sessions', body, { signal });
      location.hash = '#' + sessionPath(s.id);
    } catch (err) { fail(slot, err); }
  });
  show(h('p', {}, h('a', { href: id ? '#' + sessionPath(id) : '#/sessions' }, '← Back')),
    h('h1', {}, id ? 'Edit session' : 'New session'), h('div', { class: 'card' }, form));
  if (id) {
    api('GET', sessionPath(id), undefined, { signal }).then((s) => {
      f.label.value = s.label; f.autoRead.checked = s.autoRead; f.typing.checked = s.presenceTyping;
      f.perMin.value = s.ratePerMin; f.perHour.value = s.ratePerHour;
    }).catch((e) => fail(slot, e));
  }
  f.label.focus();
}

// ---------------------------------------------------------------- messages

const FILE_KINDS = ['image', 'video', 'audio', 'voice', 'document', 'sticker'];

/** A message's file: shown (an image) or saved (anything else), read with the caller's token. */
function fileButton(signal, id, m, slot) {
  if (!FILE_KINDS.includes(m.type)) return null;
  const f = m[m.type];
  const holder = h('span', { class: 'file' });
  const open = h('button', { type: 'button', class: 'secondary small', 'data-message': m.id, onclick: async () => {
    try {
      const blob = await api('GET', sessionPath(id) + '/messages/' + m.id + '/media', undefined, { signal, blob: true });
      const url = URL.createObjectURL(blob);
      if (m.type === 'image' || m.type === 'sticker') {
        holder.replaceChildren(h('img', { class: 'thumb', src: url, alt: f.caption || m.type }));
      } else {
        const a = h('a', { href: url, download: f.fileName || m.type });
        a.click();
      }
    } catch (e) { fail(slot, e); }
  } }, m.type === 'image' || m.type === 'sticker' ? 'Show' : 'Download');
  holder.append(open);
  return holder;
}

/** What the file picked goes out as: an image when WhatsApp shows it as one, else a document. */
function fileKind(file) {
  return ['image/jpeg', 'image/png'].includes(file.type) ? 'image' : 'document';
}

async function messagesPage(signal, id) {
  const slot = h('div', { id: 'error-slot' });
  const list = h('tbody', { id: 'message-list' });
  const received = h('tbody', { id: 'received-list' });
  const to = h('input', { id: 'm-to', inputmode: 'tel', required: true, placeholder: '6281234567890' });
  const text = h('textarea', { id: 'm-text', rows: 3 });
  const file = h('input', { id: 'm-file', type: 'file' });
  const row = (m, who) => h('tr', {},
    h('td', {}, who), h('td', {}, summary(m), ' ', fileButton(signal, id, m, slot)),
    h('td', {}, h('span', { class: 'status ' + m.status }, m.status), m.error ? h('span', { class: 'reason' }, m.error) : null),
    h('td', { class: 'wide' }, time(m.createdAt)));
  async function load() {
    try {
      const [out, inbound] = await Promise.all([
        api('GET', sessionPath(id) + '/messages?pageSize=50', undefined, { signal }),
        api('GET', sessionPath(id) + '/messages?direction=in&pageSize=50', undefined, { signal }),
      ]);
      list.replaceChildren(...out.messages.map((m) => row(m, m.to)));
      received.replaceChildren(...inbound.messages.map((m) => row(m, m.from)));
    } catch (e) { fail(slot, e); }
  }
  const form = h('form', { class: 'stack', id: 'message-form' },
    h('label', {}, 'To (phone number)', to), h('label', {}, 'Text (the caption, with a file)', text),
    h('label', {}, 'File (a JPEG or PNG goes as an image, anything else as a document)', file),
    h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'send' }, 'Send')));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    slot.replaceChildren();
    const picked = file.files[0];
    if (!picked && !text.value.trim()) { fail(slot, new Error('Write a text or pick a file.')); return; }
    try {
      let body = { to: to.value.trim(), text: text.value };
      if (picked) {
        const stored = await api('POST', '/media', picked, { signal });
        const kind = fileKind(picked);
        const content = { mediaId: stored.id };
        if (text.value.trim()) content.caption = text.value;
        if (kind === 'document') content.fileName = picked.name;
        body = { to: to.value.trim(), type: kind, [kind]: content };
      }
      await api('POST', sessionPath(id) + '/messages', body, { signal });
      text.value = '';
      file.value = '';
      load();
    } catch (err) { fail(slot, err); }
  });
  const table = (who, rows) => h('div', { class: 'table-wrap' }, h('table', {},
    h('thead', {}, h('tr', {}, h('th', {}, who), h('th', {}, 'Message'), h('th', {}, 'Status'), h('th', { class: 'wide' }, 'At'))),
    rows));
  show(h('p', {}, h('a', { href: '#' + sessionPath(id) }, '← Session')),
    h('h1', {}, 'Messages'), slot,
    h('div', { class: 'card' }, form),
    h('h2', {}, 'Sent'), table('To', list),
    h('h2', {}, 'Received'), table('From', received));
  await load();
  followEvents({
    signal, session: id, from: null, onLive: () => {},
    onEvent: (ev) => { if (ev.type.startsWith('message.')) load(); },
  });
}

// ---------------------------------------------------------------- gateways

async function gatewaysPage(signal) {
  const slot = h('div', { id: 'error-slot' });
  const body = h('tbody', { id: 'gateways' });
  show(h('h1', {}, 'Gateways'), slot,
    h('p', { class: 'muted' }, 'The gateways your sessions are on (read-only; SREs see and drain the whole fleet with gatewayctl).'),
    h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, 'Gateway'), h('th', {}, 'Region'), h('th', {}, 'State'),
        h('th', {}, 'Your sessions'), h('th', { class: 'wide' }, 'Heartbeat'))),
      body)));
  async function load() {
    try {
      const r = await api('GET', '/gateways', undefined, { signal });
      body.replaceChildren(...r.gateways.map((g) => h('tr', {},
        h('td', { class: 'mono' }, g.id), h('td', {}, g.region),
        h('td', {}, h('span', { class: 'status ' + (g.live ? g.state : 'dead') }, g.live ? g.state : 'not live')),
        h('td', {}, String(g.sessionCount)),
        h('td', { class: 'wide' }, Math.round(g.heartbeatAgeMs / 100) / 10 + ' s ago'))));
      if (!r.gateways.length) slot.replaceChildren(h('p', { class: 'muted' }, 'None of your sessions is on a gateway yet.'));
    } catch (e) { fail(slot, e); }
  }
  while (!signal.aborted) { await load(); await sleep(5000, signal); }
}

// ---------------------------------------------------------------- webhooks

const EVENT_TYPES = ['session.status', 'auth.qr', 'auth.pair_code', 'session.deleted',
  'message.status', 'message.received', 'message.reaction', 'message.poll_vote', 'message.edited',
  'message.revoked', 'webhook.disabled'];

async function webhooksPage(signal) {
  const slot = h('div', { id: 'error-slot' });
  const body = h('tbody', { id: 'webhooks' });
  const url = h('input', { id: 'w-url', type: 'url', required: true, placeholder: 'https://example.com/hooks/whatsapp' });
  const description = h('input', { id: 'w-description' });
  const boxes = EVENT_TYPES.map((t) => h('input', { type: 'checkbox', value: t, checked: t === 'session.status' }));
  const secret = h('div', { id: 'w-secret' });
  async function load() {
    try {
      const r = await api('GET', '/webhooks?pageSize=100', undefined, { signal });
      body.replaceChildren(...r.webhooks.map((w) => h('tr', {},
        h('td', {}, h('a', { href: '#/webhooks/' + encodeURIComponent(w.id), class: 'mono' }, w.url),
          w.description ? h('div', { class: 'muted' }, w.description) : null),
        h('td', { class: 'wide' }, w.events.join(', ')),
        h('td', {}, h('span', { class: 'status ' + (w.enabled ? 'active' : 'failed') }, w.enabled ? 'enabled' : 'disabled'),
          w.disabledReason ? h('span', { class: 'reason' }, w.disabledReason) : null),
        h('td', {}, h('div', { class: 'actions' },
          h('button', { type: 'button', class: 'secondary', onclick: () => toggle(w) }, w.enabled ? 'Disable' : 'Enable'),
          h('button', { type: 'button', class: 'danger', onclick: () => remove(w) }, 'Delete'))))));
    } catch (e) { fail(slot, e); }
  }
  async function toggle(w) {
    try { await api('PATCH', '/webhooks/' + encodeURIComponent(w.id), { enabled: !w.enabled }, { signal }); load(); } catch (e) { fail(slot, e); }
  }
  async function remove(w) {
    if (!await confirmAction('Delete the webhook to ' + w.url + '? Its deliveries stop.', 'Delete')) return;
    try { await api('DELETE', '/webhooks/' + encodeURIComponent(w.id), undefined, { signal }); load(); } catch (e) { fail(slot, e); }
  }
  const form = h('form', { class: 'stack', id: 'webhook-form' },
    h('label', {}, 'Endpoint URL', url),
    h('fieldset', {}, h('legend', {}, 'Events'),
      boxes.map((b) => h('label', { class: 'check' }, b, b.value))),
    h('label', {}, 'Description (optional)', description),
    h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'w-create' }, 'Add webhook')));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    slot.replaceChildren();
    try {
      const body = { url: url.value.trim(), events: boxes.filter((b) => b.checked).map((b) => b.value) };
      if (description.value.trim()) body.description = description.value.trim();
      const w = await api('POST', '/webhooks', body, { signal });
      secret.replaceChildren(h('div', { class: 'notice' },
        'Signing secret (shown once; verify deliveries with it): ', h('code', {}, w.secret)));
      url.value = ''; description.value = '';
      load();
    } catch (err) { fail(slot, err); }
  });
  show(h('h1', {}, 'Webhooks'), slot, secret,
    h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, 'Endpoint'), h('th', { class: 'wide' }, 'Events'), h('th', {}, 'State'), h('th', {}, ''))),
      body)),
    h('h2', {}, 'Add a webhook'), h('div', { class: 'card' }, form));
  await load();
}

async function deliveriesPage(signal, id) {
  const slot = h('div', { id: 'error-slot' });
  const body = h('tbody', { id: 'deliveries' });
  const path = '/webhooks/' + encodeURIComponent(id);
  show(h('p', {}, h('a', { href: '#/webhooks' }, '← Webhooks')), h('h1', {}, 'Deliveries'), slot,
    h('div', { class: 'actions' },
      h('button', { type: 'button', id: 'w-test', onclick: async () => {
        try { await api('POST', path + ':test', undefined, { signal }); load(); } catch (e) { fail(slot, e); }
      } }, 'Send a test event')),
    h('div', { class: 'table-wrap' }, h('table', {},
      h('thead', {}, h('tr', {}, h('th', {}, 'Event'), h('th', {}, 'Status'), h('th', {}, 'Attempts'),
        h('th', { class: 'wide' }, 'Last answer'), h('th', {}, 'Created'))),
      body)));
  async function load() {
    try {
      const r = await api('GET', path + '/deliveries?pageSize=50', undefined, { signal });
      body.replaceChildren(...r.deliveries.map((d) => h('tr', {},
        h('td', {}, d.eventType), h('td', {}, h('span', { class: 'status ' + d.status }, d.status)),
        h('td', {}, d.attempts),
        h('td', { class: 'wide' }, d.lastStatusCode != null ? 'HTTP ' + d.lastStatusCode : (d.lastError || '—')),
        h('td', {}, time(d.createdAt)))));
    } catch (e) { fail(slot, e); }
  }
  while (!signal.aborted) { await load(); await sleep(5000, signal); }
}

// ---------------------------------------------------------------- routing

const ROUTES = [
  [/^#\/sessions\/new$/, (s) => sessionForm(s, null)],
  [/^#\/sessions\/([^/]+)\/edit$/, (s, id) => sessionForm(s, id)],
  [/^#\/sessions\/([^/]+)\/messages$/, messagesPage],
  [/^#\/sessions\/([^/]+)$/, sessionPage],
  [/^#\/gateways$/, gatewaysPage],
  [/^#\/webhooks\/([^/]+)$/, deliveriesPage],
  [/^#\/webhooks$/, webhooksPage],
  [/^/, sessionsPage],
];

function route() {
  if (page) page.abort();
  page = new AbortController();
  document.getElementById('confirm').close?.();
  if (!token()) { signInPage(); return; }
  nav.hidden = false;
  const hash = location.hash || '#/sessions';
  for (const a of nav.querySelectorAll('a')) a.classList.toggle('current', hash.startsWith(a.getAttribute('href')));
  for (const [re, view] of ROUTES) {
    const m = hash.match(re);
    if (m) {
      Promise.resolve(view(page.signal, ...m.slice(1).map(decodeURIComponent)))
        .catch((e) => fail(main, e));
      return;
    }
  }
}

document.getElementById('sign-out').addEventListener('click', () => signOut());
window.addEventListener('hashchange', route);
route();
