#!/usr/bin/env python3
"""Runs a plugin written like examples/plugins/docker_cli.py (a Python file with OPS, CFG and
main()) and makes it misbehave once, for the tests of StacyVM's plugin supervision:

  misbehave.py PLUGIN [--crash-on OP] [--hang-on OP] [--hold FILE] [-- PLUGIN ARGS...]

  --crash-on OP  the first OP request kills the plugin (exit status 7)
  --hang-on OP   the first OP request is never answered
  --hold FILE    while FILE exists, the plugin exits as soon as it starts (status 3)

"First" counts across restarts (a marker in the state dir, the plugin's working directory),
and every start appends a line to `starts` there.
"""
import importlib.util
import os
import sys
import time


def first_time(op):
    try:
        os.close(os.open(f"once-{op}", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False


def crashing(op, orig):
    def run(params):
        if first_time(op):
            os._exit(7)
        return orig(params)
    return run


def hanging(op, orig):
    def run(params):
        if first_time(op):
            time.sleep(3600)
        return orig(params)
    return run


def main():
    plugin, args = sys.argv[1], sys.argv[2:]
    crash = hang = hold = None
    plugin_args = []
    while args:
        a = args.pop(0)
        if a == "--crash-on":
            crash = args.pop(0)
        elif a == "--hang-on":
            hang = args.pop(0)
        elif a == "--hold":
            hold = args.pop(0)
        elif a == "--":
            plugin_args, args = args, []
        else:
            sys.exit(f"misbehave: unknown argument {a!r}")
    with open("starts", "a") as f:
        f.write(f"{os.getpid()}\n")
    if hold and os.path.exists(hold):
        print("misbehave: held down", file=sys.stderr, flush=True)
        sys.exit(3)
    spec = importlib.util.spec_from_file_location("plugin_under_test", plugin)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if crash:
        mod.OPS[crash] = crashing(crash, mod.OPS[crash])
    if hang:
        mod.OPS[hang] = hanging(hang, mod.OPS[hang])
    sys.argv = [plugin, *plugin_args]
    mod.main()


if __name__ == "__main__":
    main()
