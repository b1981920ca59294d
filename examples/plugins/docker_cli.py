#!/usr/bin/env python3
"""StacyVM reference plugin: sandboxes as hardened Docker containers, driven by the docker CLI.

Speaks plugin protocol 1 (docs/PLUGIN-PROTOCOL.md): JSON lines on stdin/stdout, logs on stderr.
Each sandbox is a container whose only process is the static stacyvm-agent, listening on a Unix
socket in a host directory of this plugin's; StacyVM talks to that agent directly for exec,
streams and files. Standard library only.

    stacyvm serve --providers docker,plugin:ref --plugin ref=examples/plugins/docker_cli.py
"""
import hashlib, json, os, re, shutil, subprocess, sys, threading, time  # noqa: E401

# What Docker grants by default, less what a sandbox never needs (as StacyVM's docker provider).
CAPS = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "NET_BIND_SERVICE"]
SANDBOX_ID = re.compile(r"^sbx_[0-9a-z]{1,64}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
CFG, OUT, IMAGES = {}, threading.Lock(), threading.Lock()


class Fail(Exception):
    """An error answer: code is one of the protocol's error codes."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def log(message):
    print(f"docker-cli[{CFG.get('name', '?')}]: {message}", file=sys.stderr, flush=True)


def docker(*args, env=None, timeout=300):
    try:
        p = subprocess.run(["docker", *args], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, env=env, timeout=timeout)
    except FileNotFoundError:
        raise Fail("provider_unavailable", "the docker CLI is not installed")
    except subprocess.TimeoutExpired:
        raise Fail("timeout", f"docker {args[0]} did not finish within {timeout} s")
    if p.returncode != 0:
        err = p.stderr.strip()
        code = "not_found" if "no such container" in err.lower() else "internal"
        raise Fail(code, f"docker {args[0]}: {err}")
    return p.stdout


def sandbox_id(params):
    sid = params.get("sandbox_id", "")
    if not SANDBOX_ID.match(sid):
        raise Fail("invalid_request", f"not a sandbox id: {sid!r}")
    return sid


def container(sid):
    return f"stacyvm-{CFG['name']}-{CFG['instance']}-{sid}"


def run_dir(sid):
    return os.path.join(CFG["state"], "run", sid)


def endpoint(sid, pid):
    # The peer check: whatever serves the socket must be the container's init or below it.
    return {"transport": "unix", "path": os.path.join(run_dir(sid), "agent.sock"),
            "peer_ancestor": pid}


def image_ref(name, digest):
    tag = (digest.split(":")[-1] or "latest")[:16]
    return f"stacyvm-plugin-{CFG['name']}/{hashlib.sha256(name.encode()).hexdigest()[:12]}:{tag}"


def ensure_image(name, digest, tar):
    """The catalog image as a Docker image, imported from its tar once per digest."""
    ref = image_ref(name, digest)
    with IMAGES:
        found = subprocess.run(["docker", "image", "inspect", ref], capture_output=True)
        if found.returncode != 0:
            if not tar:
                raise Fail("image_not_found", f"no tar for image {name!r}")
            docker("import", tar, ref, timeout=1800)
            log(f"imported catalog image {name} as {ref}")
    return ref


def op_hello(p):
    if 1 not in p.get("versions", []):
        raise Fail("unsupported", "this plugin speaks protocol version 1 only")
    CFG.update(name=p["name"], instance=p["instance"], agent=p["agent_path"],
               state=p["state_dir"])
    os.makedirs(os.path.join(CFG["state"], "run"), mode=0o700, exist_ok=True)
    log(f"ready for instance {p['instance']}")
    return {"version": 1, "plugin_version": "0.1.0", "capabilities": {
        "security_boundary": True, "pause": True, "agent_transports": ["unix"],
        "image": "tar", "image_removed": True}}


def op_health(_):
    try:
        version = docker("version", "--format", "{{.Server.Version}}", timeout=20).strip()
    except Fail as e:
        return {"healthy": False, "detail": f"{e}; start dockerd"}
    return {"healthy": True, "detail": f"dockerd {version} through the docker CLI; containers "
            "drop capabilities, gain no privileges and have pids, memory and CPU limits"}


def op_spawn(p):
    sid = sandbox_id(p)
    if p.get("network") != "none":  # Docker's bridge reaches the host and other sandboxes
        raise Fail("unsupported", "this plugin runs sandboxes without a network only")
    env = p.get("env") or {}
    bad = [k for k in env if not ENV_NAME.match(k)]
    if bad:
        raise Fail("invalid_request", f"environment variable names must be identifiers: {bad}")
    image = ensure_image(p["image"], p.get("image_digest") or "", p.get("image_tar"))
    rd = run_dir(sid)
    sock = os.path.join(rd, "agent.sock")
    if len(sock) > 107:
        raise Fail("provider_unavailable", f"the socket path {sock} is too long for a Unix "
                   "socket: give StacyVM a shorter data dir")
    try:
        os.makedirs(rd, mode=0o700)
    except FileExistsError:
        raise Fail("conflict", f"sandbox {sid} already exists")
    try:
        if os.geteuid() == 0:
            # A small tmpfs: what the sandbox writes into its socket dir never fills the host.
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700,nosuid,nodev,noexec",
                            "stacyvm-run", rd], check=True, capture_output=True)
        mb, cpus = int(p["memory_mb"]), max(float(p["cpu"]), 0.01)
        args = ["run", "-d", "--name", container(sid),
                "--label", f"dev.stacyvm.instance={CFG['instance']}", "--label",
                f"dev.stacyvm.plugin={CFG['name']}", "--label", f"dev.stacyvm.sandbox={sid}",
                "--init", "--security-opt", "no-new-privileges", "--cap-drop", "ALL",
                *[a for c in CAPS for a in ("--cap-add", c)], "--pids-limit", "512",
                "--memory", f"{mb}m", "--memory-swap", f"{mb}m", "--cpus", f"{cpus:.2f}",
                "--network", "none", "--ipc", "private", "--log-opt", "max-size=10m",
                "--mount", f"type=bind,source={CFG['agent']},target=/.stacyvm/agent,readonly",
                "--mount", f"type=bind,source={rd},target=/.stacyvm/run",
                "--entrypoint", "/.stacyvm/agent"]
        if p.get("workdir"):
            args += ["--workdir", p["workdir"]]
        # Values travel in the CLI's environment, never on a command line others can read.
        for k in env:
            args += ["--env", k]
        docker(*args, image, "--listen", "/.stacyvm/run/agent.sock",
               env={**os.environ, **env})
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if time.monotonic() > deadline:
                raise Fail("timeout", "the agent did not create its socket within 30 s: "
                           + docker("logs", "--tail", "20", container(sid)))
            time.sleep(0.02)
        pid = int(docker("inspect", "-f", "{{.State.Pid}}", container(sid)).strip())
        return {"agent": endpoint(sid, pid)}
    except BaseException:
        op_destroy({"sandbox_id": sid})  # nothing of a failed spawn stays
        raise


def op_destroy(p):
    sid = sandbox_id(p)
    try:
        docker("rm", "-f", "--volumes", container(sid))
    except Fail as e:
        if e.code != "not_found":
            raise
    if os.path.ismount(run_dir(sid)):
        subprocess.run(["umount", "-l", run_dir(sid)], capture_output=True)
    shutil.rmtree(run_dir(sid), ignore_errors=True)


def op_list(_):
    out = docker("ps", "-a", "--filter", f"label=dev.stacyvm.instance={CFG['instance']}",
                 "--filter", f"label=dev.stacyvm.plugin={CFG['name']}",
                 "--format", '{{.Label "dev.stacyvm.sandbox"}}\t{{.State}}')
    found = {}
    for line in out.splitlines():
        sid, state = line.split("\t")
        if SANDBOX_ID.match(sid):
            found[sid] = {"sandbox_id": sid, "running": state in ("running", "paused"),
                          "paused": state == "paused"}
    up = [sid for sid, s in found.items() if s["running"]]
    if up:
        pids = docker("inspect", "-f", '{{index .Config.Labels "dev.stacyvm.sandbox"}} '
                      "{{.State.Pid}}", *[container(sid) for sid in up])
        for line in pids.splitlines():
            sid, pid = line.split()
            found[sid]["agent"] = endpoint(sid, int(pid))
    # A socket dir without its container (a spawn cut short) is listed so it gets destroyed.
    for sid in os.listdir(os.path.join(CFG["state"], "run")):
        if SANDBOX_ID.match(sid) and sid not in found:
            found[sid] = {"sandbox_id": sid, "running": False}
    return {"sandboxes": list(found.values())}


def op_logs(p):
    sid = sandbox_id(p)
    got = subprocess.run(["docker", "logs", "--timestamps", "--tail", "1000", container(sid)],
                         stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if got.returncode != 0:
        raise Fail("not_found", f"sandbox {sid} does not exist")
    lines = []
    for line in (got.stdout + got.stderr).splitlines():
        ts, _, message = line.partition(" ")
        lines.append({"ts": ts, "source": "runtime", "message": message})
    return {"lines": lines}


def op_image_removed(p):
    subprocess.run(["docker", "rmi", image_ref(p["image"], p.get("digest", ""))],
                   capture_output=True)


OPS = {"hello": op_hello, "health": op_health, "spawn": op_spawn, "destroy": op_destroy,
       "list": op_list, "logs": op_logs, "image_removed": op_image_removed,
       "pause": lambda p: docker("pause", container(sandbox_id(p))) and None,
       "resume": lambda p: docker("unpause", container(sandbox_id(p))) and None}


def answer(msg):
    reply = {"id": msg.get("id")}
    try:
        op = OPS.get(msg.get("op"))
        if op is None:
            raise Fail("unsupported", f"this plugin does not implement {msg.get('op')!r}")
        reply["result"] = op(msg.get("params") or {})
    except Fail as e:
        reply["error"] = {"code": e.code, "message": str(e)}
    except Exception as e:  # a bug here must not take the plugin down
        reply["error"] = {"code": "internal", "message": f"{type(e).__name__}: {e}"}
    with OUT:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


def main():
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("op") == "cancel":
            continue  # nothing here runs long enough to be worth stopping
        if msg.get("op") == "hello":
            answer(msg)
        else:
            threading.Thread(target=answer, args=(msg,), daemon=True).start()


if __name__ == "__main__":
    main()
