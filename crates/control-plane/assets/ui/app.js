// The console's entry: login with an API key, the key's role (from
// GET /v1/whoami) and the hash router. Pages are modules that draw into
// <main> and return a function that stops their timers.

import { h, fill, errorBox } from './dom.js';
import { apiKey, setApiKey, forgetApiKey, get, ApiError } from './api.js';
import { sandboxesPage } from './sandboxes.js';
import { sandboxPage } from './sandbox.js';
import { statusPage, tenantsPage, keysPage, auditPage } from './admin.js';
import { volumesPage } from './volumes.js';

/** What the signed-in key may do, from its role. */
export const session = { who: null, can: {} };

function capabilities(role) {
  return {
    write: role !== 'viewer',
    manageKeys: role === 'admin' || role === 'owner',
    admin: role === 'admin',
  };
}

const main = () => document.getElementById('main');
let stopPage = null;

function loginPage(message) {
  document.getElementById('nav').replaceChildren();
  document.getElementById('who').replaceChildren();
  const input = h('input', { id: 'login-key', type: 'password', name: 'key', autocomplete: 'off',
    placeholder: 'svm_…', required: true });
  const form = h('form', { id: 'login-form', class: 'login', onsubmit: async (ev) => {
    ev.preventDefault();
    setApiKey(input.value.trim());
    await start();
  } },
  h('h1', null, 'Sign in to StacyVM'),
  h('p', { class: 'muted' }, 'Paste an API key. It is kept in this tab only (sessionStorage) and sent to this server alone.'),
  message ? errorBox(message) : null,
  h('p', null, input),
  h('button', { class: 'primary', type: 'submit' }, 'Sign in'));
  fill(main(), form);
  input.focus();
}

function drawChrome() {
  const links = [['#/sandboxes', 'Sandboxes'], ['#/volumes', 'Volumes'], ['#/status', 'Status'],
    ['#/tenants', 'Tenants'], ['#/keys', 'Keys'], ['#/audit', 'Audit']];
  fill(document.getElementById('nav'), links.map(([href, text]) =>
    h('a', { href, 'data-nav': href.slice(2) }, text)));
  const w = session.who;
  fill(document.getElementById('who'),
    h('span', { id: 'who-role', 'data-role': w.role }, `${w.role} · ${w.tenant_id}`),
    h('button', { id: 'logout', onclick: () => { forgetApiKey(); session.who = null; location.hash = ''; loginPage(); } }, 'Sign out'));
}

function route() {
  if (stopPage) { stopPage(); stopPage = null; }
  if (!session.who) return;
  const parts = (location.hash.replace(/^#\/?/, '') || 'sandboxes').split('/').map(decodeURIComponent);
  for (const a of document.querySelectorAll('#nav a')) {
    a.classList.toggle('active', a.dataset.nav === parts[0]);
  }
  const el = main();
  el.replaceChildren();
  const pages = {
    sandboxes: () => (parts[1] ? sandboxPage(el, parts[1]) : sandboxesPage(el)),
    volumes: () => volumesPage(el),
    status: () => statusPage(el),
    tenants: () => tenantsPage(el),
    keys: () => keysPage(el),
    audit: () => auditPage(el),
  };
  const page = pages[parts[0]];
  stopPage = page ? page() : (fill(el, errorBox(`no page ${parts[0]}`)), null);
}

async function start() {
  if (!apiKey()) { loginPage(); return; }
  try {
    session.who = await get('/v1/whoami');
  } catch (e) {
    forgetApiKey();
    loginPage(e instanceof ApiError && e.status === 401 ? 'That key was not accepted.' : e);
    return;
  }
  session.can = capabilities(session.who.role);
  drawChrome();
  route();
}

window.addEventListener('hashchange', route);
start();
