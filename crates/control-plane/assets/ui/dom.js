// Small DOM helpers: every text goes in through textContent (never
// innerHTML), so nothing a sandbox or a user wrote can become markup.

/** h('tag', {attr: value, onclick: fn}, ...children) */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (k === 'value') el.value = v;
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
}

/** Replaces the children of `el`. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export function stateBadge(state) {
  return h('span', { class: `state state-${state}`, 'data-state': state }, state);
}

export function errorBox(err) {
  const rid = err && err.requestId ? ` (request ${err.requestId})` : '';
  return h('div', { class: 'error', role: 'alert' }, String((err && err.message) || err) + rid);
}

export function time(t) {
  if (!t) return '';
  const d = new Date(t);
  return Number.isNaN(d.getTime()) ? t : d.toLocaleString();
}

/** A table: columns are [header, row => cell]. */
export function table(columns, rows, attrs) {
  return h('table', attrs,
    h('thead', null, h('tr', null, columns.map(([name]) => h('th', null, name)))),
    h('tbody', null, rows.map((r) => h('tr', null, columns.map(([, cell]) => h('td', null, cell(r)))))));
}

/** Reads a form's named fields into an object of strings. */
export function formValues(form) {
  return Object.fromEntries(new FormData(form).entries());
}
