// The unmodified E2B JavaScript SDK (npm `e2b`, pinned in package-lock.json)
// against StacyVM's E2B-compatible API: create, commands (streamed, exit
// codes, background with stdin), files (text, binary, listing and
// management), a directory watch, lifecycle (timeout, info, list, connect, kill). Run by
// tests/e2b/test_e2b_js.py, which starts the server and passes E2B_API_KEY,
// E2B_API_URL and E2B_SANDBOX_URL; run alone, it fails without them.
import { test, after } from 'node:test'
import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { Sandbox, CommandExitError } from 'e2b'

for (const name of ['E2B_API_KEY', 'E2B_API_URL', 'E2B_SANDBOX_URL']) {
  assert.ok(process.env[name], `${name} must point at a StacyVM server`)
}

const run = randomBytes(4).toString('hex')
const sbx = await Sandbox.create({ metadata: { suite: 'e2b-js', run } })
after(async () => {
  await sbx.kill()
})

test('commands stream their output and report exit codes', async () => {
  const out = []
  const err = []
  const r = await sbx.commands.run('echo out; echo err >&2; pwd', {
    onStdout: (d) => out.push(d),
    onStderr: (d) => err.push(d),
  })
  assert.equal(r.exitCode, 0)
  assert.equal(r.stdout, 'out\n/home/user\n')
  assert.equal(r.stderr, 'err\n')
  assert.equal(out.join(''), 'out\n/home/user\n')
  assert.equal(err.join(''), 'err\n')
  await assert.rejects(sbx.commands.run('echo partial; exit 3'), (e) => {
    assert.ok(e instanceof CommandExitError, `got ${e}`)
    assert.equal(e.exitCode, 3)
    assert.equal(e.stdout, 'partial\n')
    return true
  })
  const env = await sbx.commands.run('echo $GREETING-$HOME', { envs: { GREETING: 'hi' }, cwd: '/tmp' })
  assert.equal(env.stdout, 'hi-/home/user\n')
})

test('a background command takes stdin and is waited for', async () => {
  const h = await sbx.commands.run('read line; echo got:$line', { background: true, stdin: true })
  await sbx.commands.sendStdin(h.pid, 'hello\n')
  const r = await h.wait()
  assert.equal(r.stdout, 'got:hello\n')
  const sleeper = await sbx.commands.run('sleep 600', { background: true })
  assert.equal(await sbx.commands.kill(sleeper.pid), true)
  await assert.rejects(sleeper.wait())
})

test('files round trip, list and are managed', async () => {
  const w = await sbx.files.write('notes/a.txt', 'alpha')
  assert.equal(w.path, '/home/user/notes/a.txt')
  assert.equal(await sbx.files.read('notes/a.txt'), 'alpha')
  const big = randomBytes(3 * 1024 * 1024 + 17)
  await sbx.files.write('/tmp/blob.bin', new Blob([big]))
  const back = await sbx.files.read('/tmp/blob.bin', { format: 'bytes' })
  assert.ok(Buffer.from(back).equals(big), 'binary file differs after the round trip')
  assert.equal(await sbx.files.makeDir('/tmp/d'), true)
  assert.equal(await sbx.files.exists('/tmp/d'), true)
  const names = (await sbx.files.list('/home/user/notes')).map((e) => e.name)
  assert.deepEqual(names, ['a.txt'])
  const moved = await sbx.files.rename('/home/user/notes/a.txt', '/tmp/d/b.txt')
  assert.equal(moved.path, '/tmp/d/b.txt')
  const info = await sbx.files.getInfo('/tmp/d/b.txt')
  assert.equal(info.size, 5)
  await sbx.files.remove('/tmp/d')
  assert.equal(await sbx.files.exists('/tmp/d'), false)
})

test('a directory watch streams what a command makes until stopped', async () => {
  await sbx.files.makeDir('watched-js/sub')
  let seen
  const made = new Promise((resolve) => {
    seen = resolve
  })
  const handle = await sbx.files.watchDir(
    'watched-js',
    (e) => {
      if (e.name === 'sub/made.txt' && e.type === 'create') seen(e)
    },
    { recursive: true, timeoutMs: 0 },
  )
  await sbx.commands.run('echo hi > watched-js/sub/made.txt')
  let timer
  const limit = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error('no create event within a minute')), 60_000)
  })
  try {
    await Promise.race([made, limit])
  } finally {
    clearTimeout(timer)
  }
  await handle.stop()
})

test('lifecycle: timeout, info, list by metadata, connect and kill', async () => {
  await sbx.setTimeout(120_000)
  const info = await sbx.getInfo()
  assert.equal(info.sandboxId, sbx.sandboxId)
  assert.equal(info.metadata.run, run)
  const page = await Sandbox.list({ query: { metadata: { run } } }).nextItems()
  assert.deepEqual(page.map((s) => s.sandboxId), [sbx.sandboxId])
  const again = await Sandbox.connect(sbx.sandboxId)
  assert.equal((await again.commands.run('echo same')).stdout, 'same\n')
  const other = await Sandbox.create({ metadata: { suite: 'e2b-js', run: `${run}-2` } })
  assert.equal(await Sandbox.kill(other.sandboxId), true)
  assert.equal(await Sandbox.kill(other.sandboxId), false)
})
