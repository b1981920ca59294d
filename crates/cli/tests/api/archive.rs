//! `PUT /v1/sandboxes/{id}/files/archive`: a tar of a tree unpacked in one
//! request, on both providers, and the entries it must refuse.

use anyhow::{ensure, Result};
use serde_json::json;

use crate::support::{Server, ServerOptions, StoreKind};

/// A tar with nested directories, files with their modes, and a symlink.
fn project_tar(files: usize) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o750);
    dir.set_size(0);
    b.append_data(&mut dir, "src/", std::io::empty())?;
    for i in 0..files {
        let body = format!("file {i}\n");
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        b.append_data(&mut h, format!("src/pkg/f{i}.txt"), body.as_bytes())?;
    }
    let script = b"#!/bin/sh\necho ran\n";
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o755);
    h.set_size(script.len() as u64);
    b.append_data(&mut h, "./bin/run.sh", &script[..])?;
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    b.append_link(&mut link, "latest", "src/pkg/f0.txt")?;
    let mut hard = tar::Header::new_gnu();
    hard.set_entry_type(tar::EntryType::Link);
    hard.set_size(0);
    b.append_link(&mut hard, "src/hard.txt", "src/pkg/f1.txt")?;
    // A read-only directory that still gets filled, and a pax global
    // header (as `git archive` writes) that is metadata, not a file.
    let mut ro = tar::Header::new_gnu();
    ro.set_entry_type(tar::EntryType::Directory);
    ro.set_mode(0o555);
    ro.set_size(0);
    b.append_data(&mut ro, "ro/", std::io::empty())?;
    let mut inside = tar::Header::new_gnu();
    inside.set_mode(0o644);
    inside.set_size(2);
    b.append_data(&mut inside, "ro/in", &b"ok"[..])?;
    let pax = b"52 comment=0123456789012345678901234567890123456789\n";
    let mut global = tar::Header::new_ustar();
    global.set_entry_type(tar::EntryType::XGlobalHeader);
    global.set_path("pax_global_header")?;
    global.set_size(pax.len() as u64);
    global.set_cksum();
    b.append(&global, &pax[..])?;
    Ok(b.into_inner()?)
}

/// An archive of symlinks and entries after them, for the escape tests.
fn links_then(entries: &[(&str, Option<&str>, &[u8])]) -> Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, link, body) in entries {
        let mut h = tar::Header::new_gnu();
        match (link, *body) {
            (Some(target), _) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, name, target)?;
            }
            (None, b"/") => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o777);
                h.set_size(0);
                b.append_data(&mut h, name, std::io::empty())?;
            }
            (None, data) => {
                h.set_mode(0o644);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, data)?;
            }
        }
    }
    Ok(b.into_inner()?)
}

/// A one-entry tar whose name is written raw, past the builder's checks.
fn raw_entry_tar(name: &str, kind: tar::EntryType, body: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(body.len() as u64);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(body);
    out.resize(out.len().div_ceil(512) * 512 + 1024, 0);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn an_archive_unpacks_a_tree_on_both_providers_and_refuses_escapes() -> Result<()> {
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker,proot"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let tar = project_tar(300)?;
    for provider in ["docker", "proot"] {
        let id = member.sandbox(provider).await?;
        let url = |path: &str| format!("/v1/sandboxes/{id}/files/archive?path={path}");

        let summary = member
            .send(
                member
                    .request(reqwest::Method::PUT, &url("/work/app"))
                    .header("content-type", "application/x-tar")
                    .body(tar.clone()),
            )
            .await?
            .ok(201)?;
        ensure!(
            summary
                == json!({"path": "/work/app", "files": 303, "dirs": 2, "symlinks": 1,
                    "bytes": summary["bytes"].clone()}),
            "{provider}: {summary}"
        );
        let expected_bytes: usize =
            (0..300).map(|i| format!("file {i}\n").len()).sum::<usize>() + 19 + 2;
        ensure!(summary["bytes"] == expected_bytes, "{provider}: {summary}");

        // No body is a forgotten archive (400); an empty archive, only its
        // two end blocks, unpacks nothing.
        let e = member
            .send(member.request(reqwest::Method::PUT, &url("/work/none")))
            .await?
            .err(400, "invalid_request")?;
        ensure!(e.message.contains("empty"), "{provider}: {}", e.message);
        let empty = member
            .send(
                member
                    .request(reqwest::Method::PUT, &url("/work/empty"))
                    .body(vec![0u8; 1024]),
            )
            .await?
            .ok(201)?;
        ensure!(
            empty["files"] == 0 && empty["dirs"] == 0,
            "{provider}: {empty}"
        );

        // What the sandbox sees: every file, the modes (the read-only
        // directory's set after it was filled), the links, and the script
        // runs.
        let seen = member
            .sh(
                &id,
                "cd /work/app && ls src/pkg | wc -l && cat src/pkg/f299.txt && \
                 stat -c %a src bin/run.sh ro && readlink latest && cat latest && \
                 cat src/hard.txt ro/in && echo && bin/run.sh && { [ -e pax_global_header ] || echo no-pax-file; }",
            )
            .await?;
        ensure!(
            seen == "300\nfile 299\n750\n755\n555\nsrc/pkg/f0.txt\nfile 0\nfile 1\nok\nran\nno-pax-file\n",
            "{provider}: {seen:?}"
        );

        // Nothing lands outside the directory through a symlink, whether
        // the archive brings the link or it was there already.
        member
            .sh(
                &id,
                "echo victim > /work/victim.txt; stat -c %a /usr > /work/usr.mode",
            )
            .await?;
        for (label, tar) in [
            (
                "through a link to /etc",
                links_then(&[("l", Some("/etc"), b""), ("l/escape", None, b"x")])?,
            ),
            (
                "through a link to ..",
                links_then(&[("up", Some(".."), b""), ("up/escape", None, b"x")])?,
            ),
            (
                "through a link to a sibling",
                links_then(&[("s", Some("../app"), b""), ("s/escape", None, b"x")])?,
            ),
        ] {
            let e = member
                .send(
                    member
                        .request(reqwest::Method::PUT, &url("/work/esc"))
                        .body(tar),
                )
                .await?
                .err(400, "invalid_request")?;
            ensure!(
                e.message.contains("outside"),
                "{provider}: {label}: {}",
                e.message
            );
        }
        // A file or directory entry at a link's path replaces the link.
        let replaced = links_then(&[
            ("x", Some("/work/victim.txt"), b""),
            ("x", None, b"replaced"),
            ("d", Some("/usr"), b""),
            ("d", None, b"/"),
        ])?;
        member
            .send(
                member
                    .request(reqwest::Method::PUT, &url("/work/rep"))
                    .body(replaced),
            )
            .await?
            .ok(201)?;
        let after = member
            .sh(
                &id,
                "cat /work/victim.txt /work/rep/x; echo; [ -L /work/rep/x ] || echo file; \
                 [ -L /work/rep/d ] || echo dir; [ \"$(stat -c %a /usr)\" = \"$(cat /work/usr.mode)\" ] && echo same; \
                 ls /work/escape /escape /etc/escape /work/app/escape 2>/dev/null | wc -l",
            )
            .await?;
        ensure!(
            after == "victim\nreplaced\nfile\ndir\nsame\n0\n",
            "{provider}: {after:?}"
        );

        // Entries that would leave the directory, or that a sandbox upload
        // has no use for, are refused by name with 400.
        for (name, kind) in [
            ("../escape.txt", tar::EntryType::Regular),
            ("/etc/escape.txt", tar::EntryType::Regular),
            ("a/../../escape.txt", tar::EntryType::Regular),
            ("dev-null", tar::EntryType::Char),
            ("fifo", tar::EntryType::Fifo),
        ] {
            let bad = raw_entry_tar(name, kind, b"x");
            let e = member
                .send(
                    member
                        .request(reqwest::Method::PUT, &url("/work/bad"))
                        .header("content-type", "application/x-tar")
                        .body(bad),
                )
                .await?
                .err(400, "invalid_request")?;
            ensure!(
                e.message.contains(name.trim_start_matches('/')),
                "{provider}: {name}: {}",
                e.message
            );
        }
        let leaked = member
            .sh(
                &id,
                "ls /work/escape.txt /escape.txt /etc/escape.txt 2>/dev/null | wc -l",
            )
            .await?;
        ensure!(
            leaked.trim() == "0",
            "{provider}: an escaping entry was written"
        );

        // Not a tar at all; a missing path; a file where the directory goes.
        let e = member
            .send(
                member
                    .request(reqwest::Method::PUT, &url("/work/junk"))
                    .body(vec![b'z'; 1500]),
            )
            .await?
            .err(400, "invalid_request")?;
        ensure!(e.message.contains("tar"), "{provider}: {}", e.message);
        member
            .send(
                member
                    .request(
                        reqwest::Method::PUT,
                        &format!("/v1/sandboxes/{id}/files/archive"),
                    )
                    .body(tar.clone()),
            )
            .await?
            .err(400, "invalid_request")?;
        member
            .send(
                member
                    .request(reqwest::Method::PUT, &url("/work/app/src/pkg/f1.txt"))
                    .body(tar.clone()),
            )
            .await?
            .err(409, "conflict")?;
        member.destroy(&id).await?;
    }

    // One audit event for the whole archive.
    let events = admin.get("/v1/audit?action=file.extract").await?.ok(200)?;
    ensure!(
        events["events"].as_array().map(Vec::len) == Some(2 * 15),
        "{events}"
    );
    Ok(())
}

/// What a downloaded archive holds: name → (kind, mode, link target or
/// contents).
fn entries_of(tar: &[u8]) -> Result<std::collections::BTreeMap<String, (char, u32, String)>> {
    use std::io::Read;
    let mut out = std::collections::BTreeMap::new();
    let mut a = tar::Archive::new(tar);
    for e in a.entries()? {
        let mut e = e?;
        let name = e.path()?.to_string_lossy().into_owned();
        let mode = e.header().mode()?;
        let (kind, what) = match e.header().entry_type() {
            tar::EntryType::Directory => ('d', String::new()),
            tar::EntryType::Symlink => (
                'l',
                e.link_name()?
                    .map(|l| l.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
            tar::EntryType::Regular => {
                let mut s = String::new();
                e.read_to_string(&mut s)?;
                ('f', s)
            }
            other => anyhow::bail!("unexpected entry {name}: {other:?}"),
        };
        out.insert(name, (kind, mode, what));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_directory_downloads_as_a_tar_that_unpacks_back_into_the_same_tree() -> Result<()> {
    let server =
        Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker,proot,namespaces"))?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let (_, other) = admin.tenant_with("member").await?;
    for provider in ["docker", "proot", "namespaces"] {
        let id = member.sandbox(provider).await?;
        // Links out of the tree are stored as links: the archive never
        // carries what they point at (the host's or the sandbox's).
        member
            .sh(
                &id,
                "mkdir -p /work/t/sub/deep /work/t/empty && echo one > /work/t/a.txt && \
                 printf 'two\\n' > /work/t/sub/deep/b.txt && chmod 600 /work/t/sub/deep/b.txt && \
                 ln -s /etc/shadow /work/t/shadow && ln -s ../../etc /work/t/up && \
                 ln -s / /work/t/root && mkfifo /work/t/fifo && head -c 300000 /dev/zero | tr '\\0' z > /work/t/big",
            )
            .await?;
        let url = |path: &str| format!("/v1/sandboxes/{id}/files/archive?path={path}");
        let got = member.get(&url("/work/t")).await?;
        ensure!(got.status == 200, "{provider}: {}", got.text());
        ensure!(
            got.headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                == Some("application/x-tar"),
            "{provider}: {:?}",
            got.headers
        );
        let seen = entries_of(&got.body)?;
        let names: Vec<&str> = seen.keys().map(String::as_str).collect();
        ensure!(
            names
                == [
                    "a.txt",
                    "big",
                    "empty/",
                    "root",
                    "shadow",
                    "sub/",
                    "sub/deep/",
                    "sub/deep/b.txt",
                    "up"
                ],
            "{provider}: {names:?}"
        );
        ensure!(
            seen["a.txt"] == ('f', 0o644, "one\n".into())
                && seen["sub/deep/b.txt"] == ('f', 0o600, "two\n".into())
                && seen["shadow"].0 == 'l'
                && seen["shadow"].2 == "/etc/shadow"
                && seen["up"].2 == "../../etc"
                && seen["root"].2 == "/"
                && seen["big"].2.len() == 300_000,
            "{provider}: {seen:?}"
        );

        // One file comes under its own name.
        let one = member.get(&url("/work/t/a.txt")).await?;
        ensure!(one.status == 200, "{provider}: {}", one.text());
        ensure!(
            entries_of(&one.body)?.into_keys().collect::<Vec<_>>() == ["a.txt"],
            "{provider}"
        );

        // Unpacked with PUT, the tree comes back the same.
        member
            .send(
                member
                    .request(reqwest::Method::PUT, &url("/work/copy"))
                    .header("content-type", "application/x-tar")
                    .body(got.body.clone()),
            )
            .await?
            .ok(201)?;
        let again = member.get(&url("/work/copy")).await?;
        ensure!(
            entries_of(&again.body)? == seen,
            "{provider}: the round trip changed the tree"
        );

        // Missing paths, another tenant's key, bad paths.
        member
            .get(&url("/work/nope"))
            .await?
            .err(404, "not_found")?;
        other.get(&url("/work/t")).await?.err(404, "not_found")?;
        member
            .get(&url("work"))
            .await?
            .err(400, "invalid_request")?;
        member
            .get(&format!("/v1/sandboxes/{id}/files/archive"))
            .await?
            .err(400, "invalid_request")?;
        member.destroy(&id).await?;
    }
    Ok(())
}
