//! The file endpoints end to end: a 5 MiB upload and download that come
//! back byte-identical, and stat, list, glob, move, chmod, mkdir and delete.

use anyhow::{anyhow, ensure, Result};
use serde_json::{json, Value};

use crate::per_store::noise;
use crate::support::{s, Server, ServerOptions, StoreKind};

fn paths(v: &Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|e| e.as_str().or_else(|| e["path"].as_str()).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn upload_download_and_file_operations() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let id = member.sandbox("proot").await?;
    let f = |rest: &str| format!("/v1/sandboxes/{id}/files{rest}");

    // 5 MiB, byte for byte, both ways; the sandbox sees the same bytes.
    let big = noise(5 * 1024 * 1024, 7);
    let entry = member
        .put_bytes(&f("?path=/work/big.bin"), big.clone())
        .await?
        .ok(201)?;
    ensure!(
        entry["size"] == big.len() && entry["mode"] == "0644" && entry["type"] == "file",
        "{entry}"
    );
    let back = member.get(&f("?path=/work/big.bin")).await?;
    ensure!(back.status == 200, "download: {}", back.status);
    ensure!(
        back.header("content-type")
            .is_some_and(|c| c.starts_with("application/octet-stream")),
        "content type {:?}",
        back.header("content-type")
    );
    ensure!(
        back.body.len() == big.len() && back.body == big,
        "the 5 MiB download differs from the upload"
    );
    let sum_inside = member
        .sh(&id, "md5sum /work/big.bin | cut -d' ' -f1")
        .await?;
    let copy = member
        .exec(
            &id,
            json!({"cmd": ["cp", "/work/big.bin", "/work/copy.bin"]}),
        )
        .await?;
    ensure!(copy["exit_code"] == 0, "{copy}");
    let copied = member.get(&f("?path=/work/copy.bin")).await?;
    ensure!(
        copied.body == big,
        "a copy made inside reads back identical (md5 inside {sum_inside})"
    );
    // Uploads are not JSON bodies: the 10 MiB JSON limit does not apply.
    let bigger = noise(12 * 1024 * 1024 + 3, 9);
    let entry = member
        .put_bytes(&f("?path=/work/bigger.bin"), bigger.clone())
        .await?
        .ok(201)?;
    ensure!(entry["size"] == bigger.len(), "{entry}");
    ensure!(
        member.get(&f("?path=/work/bigger.bin")).await?.body == bigger,
        "the 12 MiB download differs from the upload"
    );
    // Replace: a write over an existing file truncates it.
    member
        .put_bytes(&f("?path=/work/copy.bin"), b"short".to_vec())
        .await?
        .ok(201)?;
    ensure!(member.get(&f("?path=/work/copy.bin")).await?.body == b"short");

    // mkdir (with and without parents).
    let d = member
        .post(
            &f("/mkdir"),
            json!({"path": "/work/src/pkg/deep", "parents": true}),
        )
        .await?
        .ok(201)?;
    ensure!(
        d["type"] == "dir" && d["path"] == "/work/src/pkg/deep" && d["name"] == "deep",
        "{d}"
    );
    let r = member
        .post(
            &f("/mkdir"),
            json!({"path": "/work/nope/child", "parents": false}),
        )
        .await?;
    ensure!(
        r.status == 404 || r.status == 409 || r.status == 400,
        "mkdir without parents under a missing dir: {} {}",
        r.status,
        r.text()
    );

    // A small tree; writes make their parent directories.
    for (p, body) in [
        ("/work/src/main.py", "print('main')\n"),
        ("/work/src/pkg/util.py", "X = 1\n"),
        ("/work/src/pkg/deep/inner.py", "Y = 2\n"),
        ("/work/src/README.md", "# readme\n"),
        ("/work/other/new/file.txt", "made with parents\n"),
    ] {
        member
            .put_bytes(&f(&format!("?path={p}")), body.as_bytes().to_vec())
            .await?
            .ok(201)?;
    }

    // stat: file, dir, symlink (not followed).
    let st = member
        .get(&f("/stat?path=/work/src/main.py"))
        .await?
        .ok(200)?;
    ensure!(
        st["type"] == "file"
            && st["size"] == 14
            && st["name"] == "main.py"
            && st["mtime"].is_string(),
        "{st}"
    );
    ensure!(st["symlink_target"].is_null(), "{st}");
    let st = member.get(&f("/stat?path=/work/src")).await?.ok(200)?;
    ensure!(st["type"] == "dir", "{st}");
    member
        .sh(&id, "ln -s /work/src/main.py /work/link.py")
        .await?;
    let st = member.get(&f("/stat?path=/work/link.py")).await?.ok(200)?;
    ensure!(
        st["type"] == "symlink" && st["symlink_target"] == "/work/src/main.py",
        "{st}"
    );
    member
        .get(&f("/stat?path=/work/absent"))
        .await?
        .err(404, "not_found")?;

    // list: sorted by path; recursive goes down.
    let flat = member.get(&f("/list?path=/work/src")).await?.ok(200)?;
    ensure!(
        paths(&flat, "entries") == ["/work/src/README.md", "/work/src/main.py", "/work/src/pkg"],
        "list: {:?}",
        paths(&flat, "entries")
    );
    let deep = member
        .get(&f("/list?path=/work/src&recursive=true"))
        .await?
        .ok(200)?;
    let deep_paths = paths(&deep, "entries");
    let mut sorted = deep_paths.clone();
    sorted.sort();
    ensure!(
        deep_paths == sorted,
        "recursive list is sorted: {deep_paths:?}"
    );
    for p in [
        "/work/src/pkg/util.py",
        "/work/src/pkg/deep",
        "/work/src/pkg/deep/inner.py",
    ] {
        ensure!(
            deep_paths.iter().any(|x| x == p),
            "recursive list lacks {p}: {deep_paths:?}"
        );
    }
    let entry = deep["entries"]
        .as_array()
        .and_then(|l| l.iter().find(|e| e["path"] == "/work/src/pkg/util.py"))
        .cloned();
    let entry = entry.ok_or_else(|| anyhow!("no util.py entry"))?;
    for field in ["path", "name", "type", "size", "mode", "mtime"] {
        ensure!(!entry[field].is_null(), "entry lacks {field}: {entry}");
    }
    member
        .get(&f("/list?path=/work/absent"))
        .await?
        .err(404, "not_found")?;

    // glob: `**` crosses directories; sorted.
    let g = member
        .get(&f("/glob?pattern=/work/**/*.py"))
        .await?
        .ok(200)?;
    let got = paths(&g, "paths");
    let want = [
        "/work/link.py",
        "/work/src/main.py",
        "/work/src/pkg/deep/inner.py",
        "/work/src/pkg/util.py",
    ];
    ensure!(got == want, "glob **: {got:?}");
    let g = member
        .get(&f("/glob?pattern=/work/src/*.py"))
        .await?
        .ok(200)?;
    ensure!(paths(&g, "paths") == ["/work/src/main.py"], "glob *: {g}");
    let g = member
        .get(&f("/glob?pattern=/work/**/*.nothing"))
        .await?
        .ok(200)?;
    ensure!(paths(&g, "paths").is_empty(), "{g}");

    // move: the entry at its new place; the old one gone; content kept.
    let moved = member
        .post(
            &f("/move"),
            json!({"from": "/work/src/README.md", "to": "/work/other/README.md"}),
        )
        .await?
        .ok(200)?;
    ensure!(
        moved["path"] == "/work/other/README.md" && moved["type"] == "file",
        "{moved}"
    );
    member
        .get(&f("/stat?path=/work/src/README.md"))
        .await?
        .err(404, "not_found")?;
    ensure!(member.get(&f("?path=/work/other/README.md")).await?.body == b"# readme\n");
    member
        .post(
            &f("/move"),
            json!({"from": "/work/absent", "to": "/work/x"}),
        )
        .await?
        .err(404, "not_found")?;
    // A directory moves with its contents.
    member
        .post(
            &f("/move"),
            json!({"from": "/work/src/pkg", "to": "/work/pkg2"}),
        )
        .await?
        .ok(200)?;
    ensure!(member.get(&f("?path=/work/pkg2/deep/inner.py")).await?.body == b"Y = 2\n");

    // chmod, seen from inside too; the upload mode parameter.
    let ch = member
        .post(
            &f("/chmod"),
            json!({"path": "/work/src/main.py", "mode": "0755"}),
        )
        .await?
        .ok(200)?;
    ensure!(ch["mode"] == "0755", "{ch}");
    let inside = member.sh(&id, "stat -c %a /work/src/main.py").await?;
    ensure!(inside.trim() == "755", "mode inside: {inside:?}");
    let script = member
        .put_bytes(
            &f("?path=/work/run.sh&mode=0700"),
            b"#!/bin/sh\necho ran\n".to_vec(),
        )
        .await?
        .ok(201)?;
    ensure!(script["mode"] == "0700", "{script}");
    ensure!(member.sh(&id, "/work/run.sh").await? == "ran\n");
    member
        .post(
            &f("/chmod"),
            json!({"path": "/work/absent", "mode": "0600"}),
        )
        .await?
        .err(404, "not_found")?;

    // delete: file, empty dir, non-empty dir only recursively.
    member
        .delete(&f("?path=/work/src/main.py"))
        .await?
        .ok(204)?;
    member
        .get(&f("?path=/work/src/main.py"))
        .await?
        .err(404, "not_found")?;
    member
        .post(&f("/mkdir"), json!({"path": "/work/empty"}))
        .await?
        .ok(201)?;
    member.delete(&f("?path=/work/empty")).await?.ok(204)?;
    member
        .delete(&f("?path=/work/pkg2"))
        .await?
        .err(409, "conflict")?;
    member
        .delete(&f("?path=/work/pkg2&recursive=true"))
        .await?
        .ok(204)?;
    member
        .get(&f("/stat?path=/work/pkg2"))
        .await?
        .err(404, "not_found")?;
    member
        .delete(&f("?path=/work/pkg2"))
        .await?
        .err(404, "not_found")?;

    // `..` stays inside the sandbox's root.
    let hostname = member.get(&f("?path=/../../../../etc/hostname")).await?;
    ensure!(
        hostname.status == 200 && hostname.body == b"stacyvm\n",
        "{} {:?}",
        hostname.status,
        hostname.text()
    );
    let st = member
        .get(&f("/stat?path=/work/../work/../etc/hostname"))
        .await?
        .ok(200)?;
    ensure!(s(&st, "path")? == "/etc/hostname", "{st}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_mount_point_is_a_conflict_not_a_server_error() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let id = member.sandbox("docker").await?;
    // Docker bind-mounts the sandbox's /etc/hosts: removing it is EBUSY.
    let e = member
        .delete(&format!("/v1/sandboxes/{id}/files?path=/etc/hosts"))
        .await?
        .err(409, "conflict")?;
    ensure!(e.message.contains("/etc/hosts"), "{}", e.message);
    ensure!(member
        .sh(&id, "cat /etc/hosts")
        .await?
        .contains("localhost"));
    member.destroy(&id).await?;
    Ok(())
}
