#!/usr/bin/env python3
"""A STAND-IN for the firecracker binary, for StacyVM's tests only.

It is not a VMM and boots nothing. It exists to test StacyVM's side of
the Firecracker protocol on hosts with no firecracker binary and no
hardware KVM: it serves the subset of Firecracker's HTTP API that the
firecracker provider uses on `--api-sock`, records every call (one JSON
line a call in `calls.jsonl` beside the socket), and on InstanceStart runs
the real StacyVM agent as a host process (`--listen` on a Unix socket, with
`--root` a directory beside the socket) behind a hybrid-vsock socket at
the configured `uds_path` that speaks `CONNECT <port>` / `OK <port>` and
then relays bytes, as Firecracker's vsock device does.

What it fakes: `PATCH /vm` stops and continues the agent process (SIGSTOP
and SIGCONT); `PUT /snapshot/create` writes small marker files at the
requested paths; `PUT /snapshot/load` checks them and starts a new agent
on the same root directory (files survive, process memory does not). The
agent dies with the stand-in (PR_SET_PDEATHSIG), like a guest dies with
its VMM.

usage: firecracker-standin.py --api-sock PATH
"""

import ctypes
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

api_sock = None
args = sys.argv[1:]
while args:
    a = args.pop(0)
    if a == "--api-sock" and args:
        api_sock = args.pop(0)
if not api_sock:
    sys.exit("usage: firecracker-standin.py --api-sock PATH")

base = os.path.dirname(os.path.abspath(api_sock))
calls_log = os.path.join(base, "calls.jsonl")
agent_sock = os.path.join(base, "standin-agent.sock")
agent_root = os.path.join(base, "standin-root")
agent_bin = os.environ.get("STACYVM_AGENT_BIN")
state = {"vsock": None, "agent": None, "started": False, "paused": False}
lock = threading.Lock()


def log(msg):
    print(f"firecracker stand-in: {msg}", flush=True)


def die_with_parent():
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# PR_SET_PDEATHSIG fires when the thread that forked ends, so agents are
# forked by one thread that lives as long as the process.
spawn_requests = queue.Queue()


def spawner():
    while True:
        argv, done = spawn_requests.get()
        done.put(subprocess.Popen(argv, stdin=subprocess.DEVNULL, preexec_fn=die_with_parent))


def start_agent():
    os.makedirs(agent_root, exist_ok=True)
    try:
        os.unlink(agent_sock)
    except FileNotFoundError:
        pass
    done = queue.Queue()
    spawn_requests.put(([agent_bin, "--listen", agent_sock, "--root", agent_root], done))
    state["agent"] = done.get()
    log("starting the agent")


def relay(src, dst):
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(data)
    except OSError:
        pass
    for s in (src, dst):
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def vsock_conn(conn):
    line = b""
    while not line.endswith(b"\n") and len(line) < 64:
        b = conn.recv(1)
        if not b:
            conn.close()
            return
        line += b
    parts = line.decode(errors="replace").split()
    if len(parts) != 2 or parts[0] != "CONNECT" or parts[1] != "1024":
        conn.close()
        return
    agent = socket.socket(socket.AF_UNIX)
    try:
        agent.connect(agent_sock)
    except OSError:
        # Like a guest port nothing listens on: the connection closes.
        conn.close()
        return
    conn.sendall(b"OK 1073741824\n")
    threading.Thread(target=relay, args=(conn, agent), daemon=True).start()
    threading.Thread(target=relay, args=(agent, conn), daemon=True).start()


def serve_vsock(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.listen(16)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=vsock_conn, args=(conn,), daemon=True).start()


def start_guest():
    start_agent()
    threading.Thread(target=serve_vsock, args=(state["vsock"],), daemon=True).start()
    state["started"] = True


def handle(method, path, body):
    """Returns (status, answer body or None)."""
    with open(calls_log, "a") as f:
        f.write(json.dumps({"method": method, "path": path, "body": body}) + "\n")
    bad = lambda why: (400, {"fault_message": why})
    if method == "GET" and path == "/":
        st = "Paused" if state["paused"] else ("Running" if state["started"] else "Not started")
        return 200, {"id": "stand-in", "state": st, "vmm_version": "stand-in"}
    if method == "PUT" and path in ("/boot-source", "/machine-config") or (
        method == "PUT" and (path.startswith("/drives/") or path.startswith("/network-interfaces/"))
    ):
        if state["started"]:
            return bad("The requested operation is not supported after starting the microVM.")
        for key in ("kernel_image_path", "path_on_host"):
            if key in (body or {}) and not os.path.isfile(body[key]):
                return bad(f"no file at {body[key]}")
        return 204, None
    if method == "PUT" and path == "/vsock":
        state["vsock"] = body["uds_path"]
        return 204, None
    if method == "PUT" and path == "/actions":
        if body.get("action_type") != "InstanceStart":
            return bad("unsupported action")
        if state["vsock"] is None:
            return bad("the stand-in needs a vsock device")
        start_guest()
        return 204, None
    if method == "PATCH" and path == "/vm":
        agent = state["agent"]
        if body.get("state") == "Paused":
            agent.send_signal(signal.SIGSTOP)
            state["paused"] = True
        elif body.get("state") == "Resumed":
            agent.send_signal(signal.SIGCONT)
            state["paused"] = False
        else:
            return bad("bad state")
        return 204, None
    if method == "PUT" and path == "/snapshot/create":
        if not state["paused"]:
            return bad("Cannot create a snapshot of a running microVM.")
        for key in ("snapshot_path", "mem_file_path"):
            with open(body[key], "w") as f:
                json.dump({"stand-in": key, "vsock": state["vsock"]}, f)
        return 204, None
    if method == "PUT" and path == "/snapshot/load":
        if state["started"]:
            return bad("Loading a snapshot is only allowed before boot.")
        try:
            with open(body["snapshot_path"]) as f:
                saved = json.load(f)
            if not os.path.isfile(body["mem_backend"]["backend_path"]):
                return bad("no memory file")
        except (OSError, KeyError, ValueError) as e:
            return bad(f"cannot load the snapshot: {e}")
        state["vsock"] = saved["vsock"]
        start_guest()
        if not body.get("resume_vm"):
            state["agent"].send_signal(signal.SIGSTOP)
            state["paused"] = True
        return 204, None
    return bad(f"the stand-in does not serve {method} {path}")


def serve_api(conn):
    f = conn.makefile("rwb")
    while True:
        line = f.readline()
        if not line:
            break
        method, path, _ = line.decode().split(" ", 2)
        length = 0
        while True:
            h = f.readline().decode()
            if h in ("\r\n", "\n", ""):
                break
            k, _, v = h.partition(":")
            if k.strip().lower() == "content-length":
                length = int(v.strip())
        raw = f.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with lock:
            try:
                status, answer = handle(method, path, body)
            except Exception as e:  # an answer, never a dead server
                status, answer = 400, {"fault_message": f"stand-in error: {e}"}
        data = json.dumps(answer).encode() if answer is not None else b""
        reason = {200: "OK", 204: "No Content", 400: "Bad Request"}[status]
        head = f"HTTP/1.1 {status} {reason}\r\nServer: Firecracker API stand-in\r\n"
        if data:
            head += "Content-Type: application/json\r\n"
        head += f"Content-Length: {len(data)}\r\n\r\n"
        f.write(head.encode() + data)
        f.flush()
    conn.close()


def main():
    if not agent_bin or not os.path.isfile(agent_bin):
        sys.exit("firecracker stand-in: set STACYVM_AGENT_BIN to the agent binary")
    try:
        os.unlink(api_sock)
    except FileNotFoundError:
        pass
    s = socket.socket(socket.AF_UNIX)
    s.bind(api_sock)
    s.listen(16)
    threading.Thread(target=spawner, daemon=True).start()
    log(f"serving the API on {api_sock}")
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve_api, args=(conn,), daemon=True).start()


main()
