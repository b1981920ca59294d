// End-to-end test of the web console (/ui) and the API reference (/docs)
// in headless Chromium, driven by playwright-core, against a real
// `stacyvm serve` with the Docker provider and the busybox test image.
//
// Needs: STACYVM_BIN (the stacyvm binary), STACYVM_AGENT_BIN,
// STACYVM_TEST_IMAGE_TAR (see scripts/lib.sh prepare_test_env), and
// Chromium at /usr/bin/chromium (or STACYVM_CHROMIUM). A missing piece is
// a failure, never a silent pass. Screenshots of each page go to
// target/ui-screenshots/ (scripts/test.sh keeps them as CI artifacts).

import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const SHOTS = path.join(ROOT, 'target', 'ui-screenshots');
const ADMIN_KEY = 'svm_uitest_uitest_uitest_uitest_uitest_uitest';
const CHROMIUM = process.env.STACYVM_CHROMIUM || '/usr/bin/chromium';

function need(name) {
  const v = process.env[name];
  if (!v || !fs.existsSync(v)) {
    throw new Error(`${name} must name an existing file (got ${JSON.stringify(v)}); run scripts/test.sh or prepare_test_env from scripts/lib.sh`);
  }
  return v;
}

/** Starts `stacyvm serve` on a free port; resolves once it is ready. */
async function startServer(dir) {
  const bin = need('STACYVM_BIN');
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith('STACYVM_')));
  Object.assign(env, { STACYVM_ADMIN_KEY: ADMIN_KEY, STACYVM_AGENT_BIN: need('STACYVM_AGENT_BIN'), NO_COLOR: '1' });
  const log = path.join(dir, 'server.log');
  const out = fs.openSync(log, 'w');
  const proc = spawn(bin, ['serve', '--data-dir', path.join(dir, 'data'), '--listen', '127.0.0.1:0',
    '--providers', 'docker'], { env, stdio: ['ignore', out, out] });
  const tail = () => fs.readFileSync(log, 'utf8').slice(-4000);
  const deadline = Date.now() + 120_000;
  let url = null;
  while (!url) {
    if (proc.exitCode !== null) throw new Error(`stacyvm serve exited with ${proc.exitCode}:\n${tail()}`);
    if (Date.now() > deadline) throw new Error(`stacyvm serve did not report its address:\n${tail()}`);
    const m = fs.readFileSync(log, 'utf8').replace(/\x1b\[[0-9;]*m/g, '').match(/StacyVM is serving\s+addr=(\S+)/);
    if (m) url = `http://${m[1]}`;
    else await sleep(50);
  }
  for (;;) {
    const r = await fetch(`${url}/readyz`).catch(() => null);
    if (r && r.ok) break;
    if (Date.now() > deadline) throw new Error(`the server never became ready:\n${tail()}`);
    await sleep(100);
  }
  return { url, proc, tail };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function api(url, key, method, p, body, raw) {
  const headers = { Authorization: `Bearer ${key}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const r = await fetch(url + p, { method, headers, body: raw ?? (body === undefined ? undefined : JSON.stringify(body)) });
  const text = await r.text();
  if (!r.ok) throw new Error(`${method} ${p}: ${r.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

async function destroyAll(url) {
  const page = await api(url, ADMIN_KEY, 'GET', '/v1/sandboxes?limit=1000');
  for (const s of page.sandboxes) {
    if (!['destroyed', 'failed', 'lost'].includes(s.state)) {
      await api(url, ADMIN_KEY, 'DELETE', `/v1/sandboxes/${s.id}`);
    }
  }
}

/** Deletes every volume of the admin's tenant (the only tenant the test gives volumes). */
async function deleteVolumes(url) {
  const { volumes } = await api(url, ADMIN_KEY, 'GET', '/v1/volumes');
  for (const v of volumes) await api(url, ADMIN_KEY, 'DELETE', `/v1/volumes/${encodeURIComponent(v.name)}`);
}

/**
 * Unmounts what is mounted at or below `dir`, deepest first: a server's
 * volumes stay mounted when it stops (they outlive it by design), so the
 * data dir must be unmounted before it is removed.
 */
function unmountUnder(dir) {
  const targets = execFileSync('findmnt', ['-rn', '-o', 'TARGET'], { encoding: 'utf8' }).split('\n')
    .filter((t) => t === dir || t.startsWith(`${dir}/`)).sort().reverse();
  for (const t of targets) execFileSync('umount', [t]);
}

/** Starts busybox httpd on the sandbox's loopback port 8080, serving "served\n". */
async function startHttpd(url, id) {
  const up = await api(url, ADMIN_KEY, 'POST', `/v1/sandboxes/${id}/exec`, { cmd: ['sh', '-c',
    'mkdir -p /www && echo served > /www/index.html && ' +
    'setsid busybox httpd -f -p 127.0.0.1:8080 -h /www </dev/null >/dev/null 2>&1 & ' +
    'i=0; while ! nc -z 127.0.0.1 8080 2>/dev/null && [ $i -lt 100 ]; do i=$((i+1)); sleep 0.1; done; echo up'] });
  assert.equal(up.stdout.trim(), 'up', up.stderr);
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
}

/** Fails the test on any console error or CSP violation of a page. */
function watchConsole(page, problems) {
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`${page.url()}: ${m.text()}`); });
  page.on('pageerror', (e) => problems.push(`${page.url()}: ${e.message}`));
}

async function checkHeaders(url) {
  for (const [p, type] of [['/ui/', 'text/html'], ['/ui/app.js', 'text/javascript'], ['/ui/console.css', 'text/css'],
    ['/docs', 'text/html'], ['/docs/swagger-ui-bundle.js', 'text/javascript'], ['/docs/swagger-ui.css', 'text/css']]) {
    const r = await fetch(url + p);
    assert.equal(r.status, 200, p);
    assert.ok(r.headers.get('content-type').startsWith(type), `${p}: ${r.headers.get('content-type')}`);
    const csp = r.headers.get('content-security-policy') || '';
    assert.match(csp, /script-src 'self'(;|$)/, `${p}: CSP ${csp}`);
    assert.doesNotMatch(csp, /unsafe-inline|unsafe-eval|\*/, `${p}: CSP ${csp}`);
    assert.equal(r.headers.get('x-content-type-options'), 'nosniff', p);
    await r.arrayBuffer();
  }
  const missing = await fetch(`${url}/ui/nope.js`);
  assert.equal(missing.status, 404);
}

async function consoleAsAdmin(browser, url, tmp) {
  const problems = [];
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 }, acceptDownloads: true });
  const page = await context.newPage();
  watchConsole(page, problems);
  page.on('dialog', (d) => d.accept());

  await page.goto(`${url}/ui/`);
  await page.waitForSelector('#login-form');
  await shot(page, '01-login');
  // A wrong key is refused and the login stays.
  await page.fill('#login-key', 'svm_not_a_key');
  await page.click('#login-form button[type=submit]');
  await page.waitForSelector('#login-form .error');
  problems.length = 0; // the refused whoami logs a 401 in the console
  await page.fill('#login-key', ADMIN_KEY);
  await page.click('#login-form button[type=submit]');
  await page.waitForSelector('#who-role[data-role=admin]');
  assert.equal(await page.evaluate(() => sessionStorage.getItem('stacyvm.key')), ADMIN_KEY);
  assert.equal(await page.evaluate(() => localStorage.length), 0, 'nothing goes to localStorage');

  // A volume, made on the Volumes page and mounted by the sandbox below.
  await page.click('a[data-nav=volumes]');
  await page.waitForSelector('#volume-list >> text=No volumes.');
  await page.fill('#volume-form input[name=name]', 'ui-vol');
  await page.fill('#volume-form input[name=size_mb]', '16');
  await page.click('#volume-form button[type=submit]');
  await page.waitForSelector('#volume-created');
  await page.waitForSelector('#volumes-table [data-volume="ui-vol"]');
  assert.equal((await api(url, ADMIN_KEY, 'GET', '/v1/volumes/ui-vol')).size_mb, 16);
  await shot(page, '02-volumes');

  // Create a sandbox with a label and the volume, and see it in the filtered list.
  await page.click('a[data-nav=sandboxes]');
  await page.waitForSelector('#create-form');
  await page.fill('#create-form input[name=labels]', 'suite=ui');
  await page.fill('#create-form input[name=volumes]', 'ui-vol:/data');
  await page.click('#create-form button[type=submit]');
  const created = await page.waitForSelector('#created a', { timeout: 120_000 });
  const id = (await created.textContent()).trim();
  assert.match(id, /^sbx_/);
  await page.fill('#label-filter', 'suite=ui');
  await page.waitForSelector(`#sandboxes-table a[data-sandbox="${id}"]`);
  await page.waitForSelector(`#sandboxes-table tr:has(a[data-sandbox="${id}"]) [data-state=running]`);
  await page.fill('#label-filter', 'suite=other');
  await page.waitForSelector('#sandbox-list >> text=No sandboxes.');
  await page.fill('#label-filter', 'suite=ui');
  await page.waitForSelector(`#sandboxes-table a[data-sandbox="${id}"]`);
  await shot(page, '03-sandboxes');
  const mounted = await api(url, ADMIN_KEY, 'POST', `/v1/sandboxes/${id}/exec`, { cmd: ['sh', '-c', 'echo on-volume > /data/v.txt && grep -c " /data " /proc/mounts'] });
  assert.equal(mounted.stdout.trim(), '1', `the volume is not mounted at /data: ${mounted.stderr}`);

  // The sandbox page: details, a command with streamed output.
  await page.click(`a[data-sandbox="${id}"]`);
  await page.waitForSelector('#sandbox-details [data-state=running]');
  await page.fill('#exec-cmd', 'echo hello-from-the-console; echo oops >&2; exit 3');
  await page.click('#exec-run');
  await page.waitForSelector('#exec-exit');
  const out = await page.textContent('#exec-output');
  assert.match(out, /hello-from-the-console/);
  assert.match(out, /oops/);
  assert.equal(await page.getAttribute('#exec-exit', 'data-exit-code'), '3');
  assert.match(await page.textContent('#exec-output .stderr'), /oops/);
  // Output shows while the command still runs: it waits for a file that
  // is only made once the first line is on the page.
  await page.fill('#exec-cmd', 'echo first; while [ ! -e /tmp/go ]; do sleep 0.1; done; echo second');
  await page.click('#exec-run');
  await page.waitForSelector('#exec-output >> text=first');
  assert.equal(await page.$('#exec-exit'), null, 'the command ended before it was let go');
  await api(url, ADMIN_KEY, 'POST', `/v1/sandboxes/${id}/exec`, { cmd: ['touch', '/tmp/go'] });
  await page.waitForSelector('#exec-exit[data-exit-code="0"]');
  assert.match(await page.textContent('#exec-output'), /first\s+second/);

  // Upload a file into /tmp, see it listed, download it back.
  const content = `bytes from the browser test ${Date.now()}\n`;
  const local = path.join(tmp, 'upload.txt');
  fs.writeFileSync(local, content);
  await page.fill('#file-path', '/tmp');
  await page.press('#file-path', 'Enter');
  await page.setInputFiles('#upload-input', local);
  await page.click('#upload-form button[type=submit]');
  await page.waitForSelector('[data-uploaded="/tmp/upload.txt"]');
  await page.waitForSelector('[data-file="/tmp/upload.txt"]');
  const inSandbox = await api(url, ADMIN_KEY, 'POST', `/v1/sandboxes/${id}/exec`, { cmd: ['cat', '/tmp/upload.txt'] });
  assert.equal(inSandbox.stdout, content);
  const [download] = await Promise.all([
    page.waitForEvent('download'),
    page.click('[data-download="/tmp/upload.txt"]'),
  ]);
  assert.equal(download.suggestedFilename(), 'upload.txt');
  assert.equal(fs.readFileSync(await download.path(), 'utf8'), content);
  await page.click('text=Refresh logs');
  await page.waitForFunction(() => /\[lifecycle\]/.test(document.getElementById('logs').textContent));

  // Expose a port of the sandbox's web server; a signed link opens it without a key.
  await startHttpd(url, id);
  await page.waitForSelector('#port-list >> text=No exposed ports.');
  await page.fill('#expose-form input[name=port]', '8080');
  await page.click('#expose-form button[type=submit]');
  await page.waitForSelector('#ports-table [data-port-url="8080"]');
  const portUrl = new URL(await page.getAttribute('#ports-table [data-port-url="8080"]', 'href'), url);
  assert.equal(portUrl.pathname, `/v1/sandboxes/${id}/ports/8080/`);
  assert.equal((await fetch(new URL('index.html', portUrl))).status, 401, 'a private port opens without a key');
  await page.click('[data-port-token="8080"]');
  const signed = new URL(await page.getAttribute('#port-signed-link', 'href'), url);
  signed.pathname += 'index.html';
  const viaLink = await fetch(signed);
  assert.equal(viaLink.status, 200);
  assert.equal(await viaLink.text(), 'served\n');
  await shot(page, '04-sandbox');
  await page.click('[data-unexpose="8080"]');
  await page.waitForSelector('#port-list >> text=No exposed ports.');

  // The other pages render with data.
  await page.click('a[data-nav=status]');
  await page.waitForSelector('#providers-table tr:has-text("docker") .state.ok');
  await page.waitForSelector('#workers-table tr:has-text("local") [data-state=ready]');
  await shot(page, '05-status');
  await page.click('a[data-nav=tenants]');
  await page.waitForSelector('#tenants-table');
  await page.fill('#tenant-form input[name=name]', 'ui-test');
  await page.click('#tenant-form button[type=submit]');
  await page.waitForSelector('#tenants-table >> text=ui-test');
  // Set a quota: the table shows it, and the server keeps it.
  await page.click('#tenants-table tr:has-text("ui-test") button:has-text("Edit quota")');
  await page.fill('input[name=max_sandboxes]', '3');
  await page.click('button:has-text("Save")');
  await page.waitForSelector('#tenants-table tr:has-text("ui-test") >> text=Sandboxes: 3');
  const tenant = (await api(url, ADMIN_KEY, 'GET', '/v1/tenants?limit=1000')).tenants.find((t) => t.name === 'ui-test');
  assert.equal((await api(url, ADMIN_KEY, 'GET', `/v1/tenants/${tenant.id}/quota`)).max_sandboxes, 3);
  await shot(page, '06-tenants');
  // A key for that tenant: its secret is shown once and works.
  await page.click('a[data-nav=keys]');
  await page.waitForSelector('#keys-table');
  await page.fill('#key-form input[name=tenant_id]', tenant.id);
  await page.selectOption('#key-form select[name=role]', 'member');
  await page.fill('#key-form input[name=name]', 'ui-made');
  await page.click('#key-form button[type=submit]');
  const secret = (await (await page.waitForSelector('#new-key')).textContent()).trim();
  assert.deepEqual(await api(url, secret, 'GET', '/v1/whoami').then((w) => [w.tenant_id, w.role]), [tenant.id, 'member']);
  await page.waitForSelector('#keys-table >> text=ui-made');
  await shot(page, '07-keys');
  await page.click('a[data-nav=audit]');
  await page.waitForSelector('#audit-table >> text=sandbox.create');
  await page.fill('#audit-form input[name=sandbox_id]', id);
  await page.selectOption('#audit-form select[name=outcome]', 'ok');
  await page.click('#audit-form button[type=submit]');
  await page.waitForSelector(`#audit-list[data-sandbox="${id}"] >> text=sandbox.exec`);
  // The filters hold: this sandbox's events only, and only those that succeeded.
  const rows = await page.$$eval('#audit-table tbody tr', (trs) => trs.map((tr) =>
    [...tr.querySelectorAll('td')].map((td) => td.textContent)));
  const actions = new Set(rows.map((r) => r[1]));
  for (const a of ['sandbox.create', 'sandbox.exec_stream', 'file.write']) assert.ok(actions.has(a), [...actions].join(','));
  assert.ok(rows.every((r) => r[2].startsWith('ok ') && r[3] === id), JSON.stringify(rows));
  await shot(page, '08-audit');

  // Destroy it from its page.
  await page.goto(`${url}/ui/#/sandboxes/${id}`);
  await page.click('#destroy');
  await page.waitForSelector('#sandbox-details [data-state=destroyed]', { timeout: 60_000 });
  assert.equal((await api(url, ADMIN_KEY, 'GET', `/v1/sandboxes/${id}`)).state, 'destroyed');

  // The volume outlived the sandbox; deleting it from its page removes it.
  const later = await api(url, ADMIN_KEY, 'POST', '/v1/sandboxes', { image: 'busybox', volumes: [{ volume: 'ui-vol', path: '/v', read_only: true }] });
  const kept = await api(url, ADMIN_KEY, 'POST', `/v1/sandboxes/${later.id}/exec`, { cmd: ['cat', '/v/v.txt'] });
  assert.equal(kept.stdout, 'on-volume\n');
  await api(url, ADMIN_KEY, 'DELETE', `/v1/sandboxes/${later.id}`);
  await page.click('a[data-nav=volumes]');
  await page.click('[data-delete-volume="ui-vol"]');
  await page.waitForSelector('#volume-list >> text=No volumes.');
  assert.deepEqual((await api(url, ADMIN_KEY, 'GET', '/v1/volumes')).volumes, []);
  await context.close();
  return problems;
}

/** A viewer key sees sandboxes but no control it may not use. */
async function consoleAsViewer(browser, url) {
  const problems = [];
  const who = await api(url, ADMIN_KEY, 'GET', '/v1/whoami');
  const viewer = await api(url, ADMIN_KEY, 'POST', '/v1/keys', { tenant_id: who.tenant_id, role: 'viewer', name: 'ui-viewer' });
  const sb = await api(url, ADMIN_KEY, 'POST', '/v1/sandboxes', { image: 'busybox', labels: { suite: 'ui-viewer' } });
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await context.newPage();
  watchConsole(page, problems);
  await page.goto(`${url}/ui/`);
  await page.fill('#login-key', viewer.key);
  await page.click('#login-form button[type=submit]');
  await page.waitForSelector('#who-role[data-role=viewer]');
  await page.waitForSelector(`#sandboxes-table a[data-sandbox="${sb.id}"]`);
  assert.equal(await page.$('#create-form'), null, 'a viewer sees no create form');
  assert.equal(await page.$('[data-destroy]'), null, 'a viewer sees no destroy button');
  await shot(page, '09-viewer-sandboxes');
  await page.click(`a[data-sandbox="${sb.id}"]`);
  await page.waitForSelector('#sandbox-details [data-state=running]');
  await page.waitForSelector('#files-table');
  await page.waitForSelector('#port-list >> text=No exposed ports.');
  for (const sel of ['#destroy', '#exec-form', '#upload-form', '#expose-form', '[data-unexpose]']) {
    assert.equal(await page.$(sel), null, `a viewer sees no ${sel}`);
  }
  await page.click('a[data-nav=volumes]');
  await page.waitForSelector('#volume-list >> text=No volumes.');
  assert.equal(await page.$('#volume-form'), null, 'a viewer sees no volume form');
  await page.click('a[data-nav=status]');
  await page.waitForSelector('#providers-table >> text=docker');
  assert.equal(await page.$('#workers-table'), null, 'a viewer sees no workers');
  await page.click('a[data-nav=keys]');
  await page.waitForSelector('#keys-table');
  assert.equal(await page.$('#key-form'), null, 'a viewer sees no key form');
  await page.click('a[data-nav=tenants]');
  await page.waitForSelector('#tenants-table');
  assert.equal(await page.$('#tenant-form'), null, 'a viewer sees no tenant form');
  await context.close();
  await api(url, ADMIN_KEY, 'DELETE', `/v1/sandboxes/${sb.id}`);
  return problems;
}

async function reference(browser, url) {
  const problems = [];
  const context = await browser.newContext({ viewport: { width: 1400, height: 900 } });
  const page = await context.newPage();
  watchConsole(page, problems);
  await page.goto(`${url}/docs`);
  // Swagger UI breaks paths with zero-width spaces: match its data-path.
  const opOf = (p) => page.locator(`.opblock:has(.opblock-summary-path[data-path="${p}"])`).first();
  const op = opOf('/v1/sandboxes/{id}/exec/stream');
  await op.waitFor({ timeout: 60_000 });
  assert.match(await op.textContent(), /Run a command and stream its output/);
  await op.locator('.opblock-summary').first().click();
  await op.locator('text=event: exit').first().waitFor();
  await op.locator('.responses-table >> text=409').first().waitFor();
  // "Try it out" with an API key: authorize, then call GET /v1/whoami.
  await page.click('button.authorize');
  await page.fill('.auth-container input', ADMIN_KEY);
  await page.click('.auth-container button[type=submit]');
  await page.click('.btn-done');
  const whoami = opOf('/v1/whoami');
  await whoami.locator('.opblock-summary').first().click();
  await whoami.locator('button.try-out__btn').click();
  await whoami.locator('button.execute').click();
  await whoami.locator('.live-responses-table').filter({ hasText: /"role":\s*"admin"/ }).first().waitFor();
  await shot(page, '10-docs');
  await context.close();
  return problems;
}

async function main() {
  need('STACYVM_TEST_IMAGE_TAR');
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`no Chromium at ${CHROMIUM}: install Debian's chromium (scripts/lib.sh ensure_packages chromium) or set STACYVM_CHROMIUM`);
  }
  fs.mkdirSync(SHOTS, { recursive: true });
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'stacyvm-ui-'));
  let server = null;
  let browser = null;
  try {
    server = await startServer(tmp);
    const { url } = server;
    const tar = fs.readFileSync(process.env.STACYVM_TEST_IMAGE_TAR);
    await api(url, ADMIN_KEY, 'POST', '/v1/images?name=busybox', undefined, tar);
    await checkHeaders(url);
    const args = process.getuid && process.getuid() === 0 ? ['--no-sandbox'] : [];
    browser = await chromium.launch({ executablePath: CHROMIUM, args, headless: true });
    const problems = [
      ...await consoleAsAdmin(browser, url, tmp),
      ...await consoleAsViewer(browser, url),
      ...await reference(browser, url),
    ];
    assert.deepEqual(problems, [], `console errors or CSP violations:\n${problems.join('\n')}`);
    console.log(`ui tests: passed; screenshots in ${SHOTS}`);
  } catch (e) {
    if (server) console.error(`server log (end):\n${server.tail()}`);
    throw e;
  } finally {
    if (browser) await browser.close();
    if (server) {
      await destroyAll(server.url).catch((e) => console.error(`cleanup: ${e.message}`));
      await deleteVolumes(server.url).catch((e) => console.error(`cleanup: ${e.message}`));
      server.proc.kill('SIGTERM');
      await new Promise((r) => { if (server.proc.exitCode !== null) r(); else server.proc.on('exit', r); });
    }
    unmountUnder(tmp);
    fs.rmSync(tmp, { recursive: true, force: true });
  }
}

main().catch((e) => {
  console.error(`ui tests FAILED: ${e.stack || e}`);
  process.exit(1);
});
