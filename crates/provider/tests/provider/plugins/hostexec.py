#!/usr/bin/env python3
"""A plugin for the tests of StacyVM's plugin provider.

Its "sandboxes" are directories in its state dir and it runs their commands on the host, as
itself: it is no security boundary, and says so unless told otherwise. By default it has no
agent and runs `exec` itself; flags change what it offers and how it misbehaves:

  --versions 1,2      the protocol versions it speaks (it picks the newest one offered)
  --answer-version N  answer hello with version N, whatever was offered
  --garbage-hello     answer hello with a line that is not JSON
  --boundary          declare itself a security boundary
  --files             offer file_read and file_write
  --pause             offer pause and resume
  --agent KIND        run a real stacyvm-agent (--root BOX) per sandbox instead, reached over
                      KIND: unix, tcp or vsock_uds (relayed by this plugin)
  --declare KINDS     the agent transports to declare (default: the one of --agent)
  --peer-uid N        name N as the agent socket's peer uid (a wrong one, for the checks)
  --symlink           answer with a symbolic link to the agent's socket
  --say TEXT          print TEXT on stderr once started
"""
import base64
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone

ARGS = {"versions": [1]}
CFG = {}
OUT = threading.Lock()
RUNNING = {}
RELAYS = {}
LOCAL = threading.local()


class Fail(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


def parse_args(argv):
    it = iter(argv)
    for a in it:
        if a == "--versions":
            ARGS["versions"] = [int(v) for v in next(it).split(",")]
        elif a in ("--answer-version", "--agent", "--declare", "--peer-uid", "--say"):
            ARGS[a[2:].replace("-", "_")] = next(it)
        elif a in ("--garbage-hello", "--boundary", "--files", "--pause", "--symlink"):
            ARGS[a[2:].replace("-", "_")] = True
        else:
            sys.exit(f"hostexec: unknown argument {a!r}")


def send(msg):
    with OUT:
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()


def b64(data):
    return base64.b64encode(data).decode()


def box(p, must_exist=True):
    sid = p.get("sandbox_id", "")
    if not sid.startswith("sbx_") or "/" in sid:
        raise Fail("invalid_request", f"not a sandbox id: {sid!r}")
    d = os.path.join(CFG["state"], "boxes", sid)
    if must_exist and not os.path.isdir(d):
        raise Fail("not_found", f"sandbox {sid} does not exist")
    return d


def meta(d):
    with open(os.path.join(d, ".meta.json")) as f:
        return json.load(f)


def inside(d, path):
    """`path` of the sandbox as a host path under its directory (kept inside it)."""
    full = os.path.realpath(os.path.join(d, path.lstrip("/")))
    if full != d and not full.startswith(d + "/"):
        raise Fail("invalid_request", f"{path} leaves the sandbox")
    return full


def alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


# ---- agents and relays ------------------------------------------------------------------------

def pump(a, b):
    try:
        while True:
            data = a.recv(65536)
            if not data:
                break
            b.sendall(data)
    except OSError:
        pass
    for s in (a, b):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def relay(listener, sock_path, hybrid):
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        if hybrid:
            line = b""
            while not line.endswith(b"\n") and len(line) < 64:
                got = conn.recv(1)
                if not got:
                    break
                line += got
            if not line.startswith(b"CONNECT "):
                conn.close()
                continue
            conn.sendall(b"OK 1073741824\n")
        agent = socket.socket(socket.AF_UNIX)
        try:
            agent.connect(sock_path)
        except OSError:
            conn.close()
            continue
        threading.Thread(target=pump, args=(conn, agent), daemon=True).start()
        threading.Thread(target=pump, args=(agent, conn), daemon=True).start()


def endpoint(d):
    """Where the agent of box `d` is reached (starting a relay in this process if needed)."""
    kind = ARGS["agent"]
    sock = os.path.join(d, ".s", "agent.sock")
    if kind == "unix":
        path = sock
        if ARGS.get("symlink"):
            path = os.path.join(d, ".s", "link.sock")
            if not os.path.lexists(path):
                os.symlink(sock, path)
        ep = {"transport": "unix", "path": path}
        if "peer_uid" in ARGS:
            ep["peer_uid"] = int(ARGS["peer_uid"])
        return ep
    if d not in RELAYS:
        if kind == "tcp":
            ls = socket.socket(socket.AF_INET)
            ls.bind(("127.0.0.1", 0))
        else:
            path = os.path.join(d, ".s", "v.sock")
            if os.path.lexists(path):
                os.unlink(path)
            ls = socket.socket(socket.AF_UNIX)
            ls.bind(path)
        ls.listen(16)
        threading.Thread(target=relay, args=(ls, sock, kind == "vsock_uds"), daemon=True).start()
        RELAYS[d] = ls
    ls = RELAYS[d]
    if kind == "tcp":
        return {"transport": "tcp", "address": "%s:%d" % ls.getsockname()}
    return {"transport": "vsock_uds", "path": ls.getsockname(), "port": 52}


# ---- operations -------------------------------------------------------------------------------

def op_hello(p):
    offered = [v for v in p.get("versions", []) if v in ARGS["versions"]]
    if "garbage_hello" in ARGS:
        with OUT:
            sys.stdout.write("this is not the protocol\n")
            sys.stdout.flush()
        time.sleep(3600)
    if "answer_version" in ARGS:
        version = int(ARGS["answer_version"])
    elif offered:
        version = max(offered)
    else:
        raise Fail("unsupported", f"hostexec speaks versions {ARGS['versions']} only")
    CFG.update(name=p["name"], agent=p["agent_path"], state=p["state_dir"])
    os.makedirs(os.path.join(CFG["state"], "boxes"), exist_ok=True)
    if "say" in ARGS:
        print(ARGS["say"], file=sys.stderr, flush=True)
    kinds = ARGS.get("declare", ARGS.get("agent", ""))
    return {"version": version, "plugin_version": "test", "capabilities": {
        "security_boundary": "boundary" in ARGS, "pause": "pause" in ARGS,
        "agent_transports": [k for k in kinds.split(",") if k],
        "exec": "agent" not in ARGS, "files": "files" in ARGS and "agent" not in ARGS,
        "image": "rootfs"}}


def op_health(_):
    return {"healthy": True, "detail": "commands run on the host"}


def op_spawn(p):
    d = box(p, must_exist=False)
    try:
        os.makedirs(d)
    except FileExistsError:
        raise Fail("conflict", f"sandbox {p['sandbox_id']} already exists")
    workdir = p.get("workdir") or "/"
    os.makedirs(inside(d, workdir), exist_ok=True)
    with open(os.path.join(d, ".meta.json"), "w") as f:
        json.dump({"env": p.get("env") or {}, "workdir": workdir}, f)
    with open(os.path.join(d, ".log"), "w") as f:
        f.write(f"spawned from {p.get('rootfs')}\n")
    if "agent" not in ARGS:
        return {}
    os.makedirs(os.path.join(d, ".s"))
    sock = os.path.join(d, ".s", "agent.sock")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **(p.get("env") or {})}
    agent = subprocess.Popen([CFG["agent"], "--listen", sock, "--root", d], env=env,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=open(os.path.join(d, ".log"), "a"), start_new_session=True)
    with open(os.path.join(d, ".agent.pid"), "w") as f:
        f.write(str(agent.pid))
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        if time.monotonic() > deadline:
            raise Fail("timeout", "the agent did not create its socket")
        time.sleep(0.01)
    return {"agent": endpoint(d)}


def agent_pid(d):
    try:
        with open(os.path.join(d, ".agent.pid")) as f:
            return int(f.read())
    except OSError:
        return None


def members(groups, d):
    """Processes of those groups still working in the box (a reused group id is not ours)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                pgid = int(f.read().rsplit(")", 1)[1].split()[2])
            cwd = os.readlink(f"/proc/{name}/cwd")
        except (OSError, ValueError, IndexError):
            continue
        if pgid in groups and (cwd == d or cwd.startswith(d + "/")):
            yield int(name)


def op_destroy(p):
    d = box(p, must_exist=False)
    pid = agent_pid(d)
    if pid and alive(pid):
        os.kill(pid, signal.SIGKILL)
    try:
        with open(os.path.join(d, ".groups")) as f:
            groups = [int(g) for g in f.read().split()]
    except OSError:
        groups = []
    for pid in members(groups, d):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    ls = RELAYS.pop(d, None)
    if ls:
        ls.close()
    shutil.rmtree(d, ignore_errors=True)


def op_list(_):
    out = []
    for sid in sorted(os.listdir(os.path.join(CFG["state"], "boxes"))):
        d = os.path.join(CFG["state"], "boxes", sid)
        entry = {"sandbox_id": sid, "running": True,
                 "paused": os.path.exists(os.path.join(d, ".paused"))}
        if "agent" in ARGS:
            pid = agent_pid(d)
            entry["running"] = bool(pid and alive(pid))
            if entry["running"]:
                entry["agent"] = endpoint(d)
        out.append(entry)
    return {"sandboxes": out}


def op_logs(p):
    with open(os.path.join(box(p), ".log")) as f:
        return {"lines": [{"source": "provider", "message": line.rstrip("\n")} for line in f]}


def op_pause(p):
    open(os.path.join(box(p), ".paused"), "w").close()


def op_resume(p):
    d = box(p)
    if os.path.exists(os.path.join(d, ".paused")):
        os.unlink(os.path.join(d, ".paused"))


def op_exec(p):
    d = box(p)
    m = meta(d)
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", **m["env"],
           **(p.get("env") or {})}
    cwd = inside(d, p.get("cwd") or m["workdir"])
    if not os.path.isdir(cwd):
        raise Fail("invalid_request", f"{p.get('cwd')} is not a directory")
    stream, cap = p.get("stream", False), p.get("output_cap") or 0
    started = time.monotonic()
    try:
        proc = subprocess.Popen(p["cmd"], cwd=cwd, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except (FileNotFoundError, PermissionError) as e:
        code = 127 if isinstance(e, FileNotFoundError) else 126
        return {"exit_code": code, "stderr": b64(f"{e}\n".encode()), "duration_ms": 0}
    rid = LOCAL.rid
    RUNNING[rid] = proc
    # What the command leaves running in its group goes with the sandbox.
    with open(os.path.join(d, ".groups"), "a") as f:
        f.write(f"{proc.pid}\n")
    kept = {"stdout": bytearray(), "stderr": bytearray()}
    truncated = {"stdout": False, "stderr": False}

    def read(name, pipe):
        for chunk in iter(lambda: pipe.read1(65536), b""):
            if stream:
                send({"id": rid, "event": name, "data": b64(chunk)})
            else:
                room = max(cap - len(kept[name]), 0)
                kept[name] += chunk[:room]
                truncated[name] |= len(chunk) > room

    readers = [threading.Thread(target=read, args=(n, pipe), daemon=True)
               for n, pipe in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for r in readers:
        r.start()
    stdin = base64.b64decode(p.get("stdin") or "")
    try:
        proc.stdin.write(stdin)
        proc.stdin.close()
    except OSError:
        pass
    timeout = (p.get("timeout_ms") or 0) / 1000 or None
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc, timed_out = proc.wait(), True
    for r in readers:
        r.join(timeout=2)
    RUNNING.pop(rid, None)
    return {"exit_code": rc if rc >= 0 else None, "signal": -rc if rc < 0 else None,
            "duration_ms": int((time.monotonic() - started) * 1000), "timed_out": timed_out,
            "stdout": b64(bytes(kept["stdout"])), "stderr": b64(bytes(kept["stderr"])),
            "stdout_truncated": truncated["stdout"], "stderr_truncated": truncated["stderr"]}


def entry(path, full):
    st = os.lstat(full)
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
    mtime = datetime.fromtimestamp(int(st.st_mtime), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"path": path, "name": os.path.basename(path) or "/", "type": kind,
            "size": st.st_size, "mode": "%04o" % (st.st_mode & 0o7777), "mtime": mtime,
            "symlink_target": None}


def op_file_read(p):
    full = inside(box(p), p["path"])
    if os.path.isdir(full):
        raise Fail("invalid_request", f"{p['path']} is a directory")
    try:
        with open(full, "rb") as f:
            return {"data": b64(f.read())}
    except FileNotFoundError:
        raise Fail("not_found", f"{p['path']} does not exist")


def op_file_write(p):
    full = inside(box(p), p["path"])
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, "wb") as f:
        f.write(base64.b64decode(p["data"]))
    os.chmod(full, p.get("mode") or 0o644)
    return entry(p["path"], full)


OPS = {"hello": op_hello, "health": op_health, "spawn": op_spawn, "destroy": op_destroy,
       "list": op_list, "logs": op_logs, "exec": op_exec}


def answer(msg):
    LOCAL.rid = msg.get("id")
    reply = {"id": msg.get("id")}
    try:
        op = OPS.get(msg.get("op"))
        if op is None:
            raise Fail("unsupported", f"hostexec does not implement {msg.get('op')!r}")
        reply["result"] = op(msg.get("params") or {})
    except Fail as e:
        reply["error"] = {"code": e.code, "message": str(e)}
    except Exception as e:
        reply["error"] = {"code": "internal", "message": f"{type(e).__name__}: {e}"}
    send(reply)


def main():
    parse_args(sys.argv[1:])
    if "files" in ARGS:
        OPS.update(file_read=op_file_read, file_write=op_file_write)
    if "pause" in ARGS:
        OPS.update(pause=op_pause, resume=op_resume)
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("op") == "cancel":
            proc = RUNNING.get(msg["params"]["request"])
            if proc:
                os.killpg(proc.pid, signal.SIGKILL)
        elif msg.get("op") == "hello":
            answer(msg)
        else:
            threading.Thread(target=answer, args=(msg,), daemon=True).start()


if __name__ == "__main__":
    main()
