"""Makes the objects StacyVM's API fuzzing runs against, through the API
itself, and prints them as shell assignments for scripts/fuzz-api.sh.

The operator's admin key (STACYVM_ADMIN_KEY) imports the busybox image and
makes two tenants:

- `api-fuzz`, whose quota the admin run fuzzes;
- `api-fuzz-members`, with a member and a viewer key of its own and PRoot
  in its quota's `allowed_providers` (PRoot is opt-in per tenant).

Each acting tenant (the operator's own for the admin key, `api-fuzz-members`
for the member and viewer keys) gets, on every provider fuzzed, a sandbox
holding files and a symlink to /etc (for exec, files, logs, pause/resume),
one for timeout changes and one to destroy, plus a key that the key-revoke
operation may revoke. Sandboxes are made in parallel: each one takes a second
or two to start.

Usage: prepare.py URL PROVIDERS IMAGE_TAR   (PROVIDERS: comma-separated)
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import shlex
import sys
from typing import Any, Dict, List

import requests

TIMEOUT = 180


class Api:
    def __init__(self, url: str, key: str) -> None:
        self.url = url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {key}"

    def call(self, method: str, path: str, want: int, **kwargs: Any) -> Any:
        r = self.session.request(method, self.url + path, timeout=TIMEOUT, **kwargs)
        if r.status_code != want:
            raise SystemExit(f"prepare: {method} {path} answered {r.status_code} (wanted {want}): {r.text[:500]}")
        return r.json() if r.content else None


def sandbox_with_files(api: Api, provider: str) -> str:
    sb = api.call("POST", "/v1/sandboxes", 201, json={"image": "busybox", "provider": provider, "timeout_s": 3600})
    sid = sb["id"]
    api.call("POST", f"/v1/sandboxes/{sid}/files/mkdir", 201, json={"path": "/work/src", "parents": True})
    api.call("PUT", f"/v1/sandboxes/{sid}/files", 201, params={"path": "/work/src/main.py"}, data=b'print("hi")\n')
    out = api.call("POST", f"/v1/sandboxes/{sid}/exec", 200, json={"cmd": ["ln", "-s", "/etc", "/work/etc-link"]})
    if out["exit_code"] != 0:
        raise SystemExit(f"prepare: ln -s in {sid} failed: {out}")
    return sid


def plain_sandbox(api: Api, provider: str) -> str:
    return api.call("POST", "/v1/sandboxes", 201, json={"image": "busybox", "provider": provider, "timeout_s": 3600})["id"]


def make_sandboxes(
    api: Api, providers: List[str], pool: concurrent.futures.Executor
) -> Dict[str, List["concurrent.futures.Future[str]"]]:
    """One sandbox per purpose and provider, started in `pool`; each list is
    in `providers` order."""
    return {
        "main": [pool.submit(sandbox_with_files, api, p) for p in providers],
        "timeout": [pool.submit(plain_sandbox, api, p) for p in providers],
        "destroy": [pool.submit(plain_sandbox, api, p) for p in providers],
    }


def main() -> None:
    url, providers_arg, image_tar = sys.argv[1:4]
    providers = [p for p in providers_arg.split(",") if p]
    admin = Api(url, os.environ["STACYVM_ADMIN_KEY"])

    with open(image_tar, "rb") as f:
        admin.call("POST", "/v1/images", 201, params={"name": "busybox"}, data=f, headers={"Content-Type": "application/x-tar"})
    quota_tenant = admin.call("POST", "/v1/tenants", 201, json={"name": "api-fuzz"})["id"]
    members = admin.call("POST", "/v1/tenants", 201, json={"name": "api-fuzz-members"})["id"]
    quota = dict(admin.call("GET", f"/v1/tenants/{members}/quota", 200))
    quota["allowed_providers"] = providers
    # Room for the fixtures below and for the sandboxes the fuzzer's own
    # valid creates start.
    quota["max_sandboxes"] = 32
    admin.call("PUT", f"/v1/tenants/{members}/quota", 200, json=quota)

    def key(tenant: str, role: str, name: str) -> Dict[str, str]:
        return admin.call("POST", "/v1/keys", 201, json={"tenant_id": tenant, "role": role, "name": name})

    member = key(members, "member", "api-fuzz-member")
    viewer = key(members, "viewer", "api-fuzz-viewer")
    member_spare = key(members, "viewer", "api-fuzz-revocable")["id"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        admin_jobs = make_sandboxes(admin, providers, pool)
        member_jobs = make_sandboxes(Api(url, member["key"]), providers, pool)
        admin_sb = {purpose: [f.result() for f in fs] for purpose, fs in admin_jobs.items()}
        member_sb = {purpose: [f.result() for f in fs] for purpose, fs in member_jobs.items()}

    # The operator's own tenant is the one the admin's sandboxes belong to.
    system_tenant = admin.call("GET", f"/v1/sandboxes/{admin_sb['main'][0]}", 200)["tenant_id"]
    admin_spare = key(system_tenant, "viewer", "api-fuzz-revocable")["id"]

    # Each `{id}` the fuzzer is given stands for all the sandboxes of its
    # purpose (hooks.py turns it into each of them in turn); the member and
    # viewer runs are also sent to the admin tenant's sandboxes, which they
    # must not see (404).
    foreign = admin_sb["main"][0]

    def rotation(own: Dict[str, List[str]], strangers: List[str]) -> Dict[str, List[str]]:
        return {ids[0]: ids + strangers for ids in own.values()}

    out = {
        "SVM_FUZZ_PROVIDERS": ",".join(providers),
        "SVM_FUZZ_QUOTA_TENANT": quota_tenant,
        "SVM_FUZZ_MEMBERS_TENANT": members,
        "SVM_FUZZ_MEMBER_KEY": member["key"],
        "SVM_FUZZ_VIEWER_KEY": viewer["key"],
        "SVM_FUZZ_ADMIN_SANDBOX": admin_sb["main"][0],
        "SVM_FUZZ_ADMIN_SANDBOX_TIMEOUT": admin_sb["timeout"][0],
        "SVM_FUZZ_ADMIN_SANDBOX_DESTROY": admin_sb["destroy"][0],
        "SVM_FUZZ_ADMIN_REVOCABLE_KEY": admin_spare,
        "SVM_FUZZ_MEMBER_SANDBOX": member_sb["main"][0],
        "SVM_FUZZ_MEMBER_SANDBOX_TIMEOUT": member_sb["timeout"][0],
        "SVM_FUZZ_MEMBER_SANDBOX_DESTROY": member_sb["destroy"][0],
        "SVM_FUZZ_MEMBER_REVOCABLE_KEY": member_spare,
        "SVM_FUZZ_ADMIN_ROTATION": json.dumps(rotation(admin_sb, [])),
        "SVM_FUZZ_MEMBER_ROTATION": json.dumps(rotation(member_sb, [foreign])),
    }
    for name, value in out.items():
        print(f"{name}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
