//! The provider conformance suite: every case is written once and run
//! against every provider (`mod docker`, `mod proot`, `mod namespaces` below), on the
//! real runtime, through the `Provider` trait.

use std::collections::BTreeMap;

use anyhow::{bail, ensure, Context};
use futures_util::StreamExt;
use stacyvm_core::{Error, ExecEvent, FileType, SandboxId};

use crate::support::AgentCalls;
use crate::support::{self, body, exec_req, leftovers, random_bytes, read_all, Harness};

/// Generates one `#[tokio::test]` per case for the provider built by `$ctor`
/// (an `async fn(&TestEnv) -> anyhow::Result<DynProvider>`, which fails
/// the test when its runtime is absent from this host).
macro_rules! conformance {
    ($ctor:path) => {
        conformance!(@cases $ctor;
            spawn_and_exit_code,
            stdout_and_stderr_are_kept_apart,
            stdin_is_delivered,
            env_and_cwd_are_applied,
            timeout_kills_the_command_and_its_children,
            stream_delivers_the_first_chunk_before_the_end,
            binary_file_round_trips_byte_identical,
            file_operations_follow_the_api,
            paths_and_symlinks_never_reach_the_host,
            destroy_is_idempotent_and_leaves_nothing,
            unknown_sandboxes_and_images_are_reported,
        );
    };
    (@cases $ctor:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() -> anyhow::Result<()> {
                let env = crate::support::TestEnv::new().await?;
                let provider = $ctor(&env).await?;
                let h = crate::support::Harness::new(env, provider);
                crate::conformance::$case(&h).await
            }
        )*
    };
}

mod docker {
    conformance!(crate::support::docker_provider);
}

mod proot {
    conformance!(crate::support::proot_provider);
}

mod namespaces {
    conformance!(crate::support::namespaces_provider);
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub async fn spawn_and_exit_code(h: &Harness) -> anyhow::Result<()> {
    let p = h.provider();
    let health = p.health().await;
    ensure!(
        health.healthy,
        "{} is unhealthy: {}",
        p.name(),
        health.detail
    );
    let id = h.spawn_default().await?;

    let listed = p.list().await?;
    let me = listed
        .iter()
        .find(|r| r.sandbox_id == id)
        .context("the new sandbox is listed")?;
    ensure!(
        me.running,
        "the new sandbox is listed as not running: {listed:?}"
    );

    let out = p.exec(&id, exec_req(&["sh", "-c", "exit 7"])).await?;
    assert_eq!(out.status.exit_code, Some(7), "{out:?}");
    assert_eq!(out.status.signal, None);
    assert!(!out.status.timed_out);

    let out = p.exec(&id, exec_req(&["true"])).await?;
    assert_eq!(out.status.exit_code, Some(0), "{out:?}");

    // A program that does not exist: 127 and the reason on stderr.
    let out = p.exec(&id, exec_req(&["/no/such/program"])).await?;
    assert_eq!(out.status.exit_code, Some(127), "{out:?}");
    ensure!(
        !out.stderr.is_empty(),
        "no reason given for a missing program"
    );

    let logs = p.logs(&id).await?;
    for l in &logs {
        ensure!(
            l.source == "provider" || l.source == "runtime",
            "unexpected log source {l:?}"
        );
    }
    Ok(())
}

pub async fn stdout_and_stderr_are_kept_apart(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;
    let out = h
        .sh(&id, "echo out1; echo err1 >&2; echo out2; echo err2 >&2")
        .await?;
    assert_eq!(out.status.exit_code, Some(0));
    assert_eq!(text(&out.stdout), "out1\nout2\n");
    assert_eq!(text(&out.stderr), "err1\nerr2\n");
    assert!(!out.stdout_truncated && !out.stderr_truncated);
    Ok(())
}

pub async fn stdin_is_delivered(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;
    let input: Vec<u8> = b"line one\nline two\n\x00\xffbinary tail".to_vec();
    let mut req = exec_req(&["cat"]);
    req.stdin = Some(input.clone());
    let out = h.provider().exec(&id, req).await?;
    assert_eq!(out.status.exit_code, Some(0), "{out:?}");
    assert_eq!(out.stdout, input);

    // Without stdin the command sees end-of-file at once rather than hanging.
    let out = h.provider().exec(&id, exec_req(&["cat"])).await?;
    assert_eq!(out.status.exit_code, Some(0));
    assert!(out.stdout.is_empty());
    Ok(())
}

pub async fn env_and_cwd_are_applied(h: &Harness) -> anyhow::Result<()> {
    let mut spec = support::spec();
    spec.env = BTreeMap::from([
        ("FROM_SPAWN".to_owned(), "spawn value".to_owned()),
        ("OVERRIDDEN".to_owned(), "spawn".to_owned()),
    ]);
    spec.workdir = Some("/work/app".into());
    let id = h.spawn(spec).await?;
    let p = h.provider();

    let script = r#"echo "$FROM_SPAWN|$FROM_REQ|$OVERRIDDEN"; pwd"#;
    let mut req = exec_req(&["sh", "-c", script]);
    req.env = BTreeMap::from([
        ("FROM_REQ".to_owned(), "req value".to_owned()),
        ("OVERRIDDEN".to_owned(), "request".to_owned()),
    ]);
    let out = p.exec(&id, req.clone()).await?;
    assert_eq!(out.status.exit_code, Some(0), "{out:?}");
    assert_eq!(
        text(&out.stdout),
        "spawn value|req value|request\n/work/app\n"
    );

    req.cwd = Some("/tmp".into());
    let out = p.exec(&id, req).await?;
    assert_eq!(text(&out.stdout), "spawn value|req value|request\n/tmp\n");

    // The spawn env is the sandbox's, not the server's.
    let out = h.sh(&id, "echo \"[$CARGO_MANIFEST_DIR]\"").await?;
    assert_eq!(text(&out.stdout), "[]\n");
    Ok(())
}

pub async fn timeout_kills_the_command_and_its_children(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;
    let mut req = exec_req(&[
        "sh",
        "-c",
        "sleep 1000 & echo $! > /tmp/child.pid; sleep 1000",
    ]);
    req.timeout_ms = 1_000;
    let out = h.provider().exec(&id, req).await?;
    assert!(out.status.timed_out, "{out:?}");
    assert_eq!(out.status.exit_code, None);
    assert_eq!(out.status.signal, Some(9));

    // The background child is gone too (a zombie awaiting its reaper counts
    // as gone: it runs no more). Polled, since death is asynchronous.
    let check = r#"
        p=$(cat /tmp/child.pid) || exit 3
        for i in $(seq 1 100); do
            if [ ! -e /proc/$p ] || grep -q '^State:.*Z' /proc/$p/status 2>/dev/null; then
                echo gone; exit 0
            fi
            sleep 0.1
        done
        echo alive; exit 1"#;
    let out = h.sh(&id, check).await?;
    assert_eq!(text(&out.stdout), "gone\n", "{out:?}");
    Ok(())
}

pub async fn stream_delivers_the_first_chunk_before_the_end(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;
    let p = h.provider();
    // The command cannot end before the test creates /tmp/go, which it does
    // only after it received `a`: a stream that held output back until the
    // end would never deliver it (caught by the generous bound below).
    let script = "echo a; until [ -e /tmp/go ]; do sleep 0.05; done; echo b; echo e >&2";
    let mut stream = p.exec_stream(&id, exec_req(&["sh", "-c", script])).await?;
    let mut stdout = Vec::new();
    let first = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Some(ev) = stream.next().await {
            match ev? {
                ExecEvent::Stdout(b) => {
                    stdout.extend_from_slice(&b);
                    if stdout.ends_with(b"a\n") {
                        return Ok::<_, anyhow::Error>(());
                    }
                }
                ExecEvent::Stderr(b) => bail!("unexpected stderr {:?}", text(&b)),
                ExecEvent::Exit(st) => bail!("exit before the command could end: {st:?}"),
            }
        }
        bail!("the stream ended without an exit event")
    })
    .await;
    first.context("the first chunk did not arrive while the command ran")??;
    assert_eq!(text(&stdout), "a\n");

    p.file_write(&id, "/tmp/go", None, body(Vec::new())).await?;
    let mut stderr = Vec::new();
    let mut exit = None;
    while let Some(ev) = stream.next().await {
        ensure!(exit.is_none(), "an event after the exit event");
        match ev? {
            ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
            ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
            ExecEvent::Exit(st) => exit = Some(st),
        }
    }
    let exit = exit.context("the stream ended without an exit event")?;
    assert_eq!(exit.exit_code, Some(0), "{exit:?}");
    assert_eq!(text(&stdout), "a\nb\n");
    assert_eq!(text(&stderr), "e\n");
    Ok(())
}

pub async fn binary_file_round_trips_byte_identical(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;
    let p = h.provider();
    let data = random_bytes(1024 * 1024);
    let entry = p
        .file_write(&id, "/work/blob/data.bin", Some(0o600), body(data.clone()))
        .await?;
    assert_eq!(entry.path, "/work/blob/data.bin");
    assert_eq!(entry.name, "data.bin");
    assert_eq!(entry.file_type, FileType::File);
    assert_eq!(entry.size, data.len() as u64);
    assert_eq!(entry.mode, "0600");

    let back = read_all(p.file_read(&id, "/work/blob/data.bin").await?).await?;
    ensure!(
        back.len() == data.len(),
        "read {} bytes, wrote {}",
        back.len(),
        data.len()
    );
    ensure!(
        back == data,
        "the bytes read back differ from those written"
    );

    // The sandbox's own tools see the same file.
    let out = h.sh_ok(&id, "wc -c < /work/blob/data.bin").await?;
    assert_eq!(out.trim(), "1048576");

    // Replacing shrinks the file to the new content.
    p.file_write(&id, "/work/blob/data.bin", None, body(b"short".to_vec()))
        .await?;
    let back = read_all(p.file_read(&id, "/work/blob/data.bin").await?).await?;
    assert_eq!(back, b"short");
    Ok(())
}

fn paths(entries: &[stacyvm_core::FileEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.path.as_str()).collect()
}

fn is_code<T: std::fmt::Debug>(r: &stacyvm_core::Result<T>, code: &str) -> bool {
    matches!(r, Err(e) if e.code() == code)
}

pub async fn file_operations_follow_the_api(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;
    let p = h.provider();

    let d = p.file_mkdir(&id, "/work/d/sub/deeper", true).await?;
    assert_eq!(d.file_type, FileType::Dir);
    assert_eq!(d.path, "/work/d/sub/deeper");
    for f in [
        "/work/d/b.py",
        "/work/d/a.py",
        "/work/d/n.txt",
        "/work/d/sub/c.py",
        "/work/d/sub/deeper/e.py",
    ] {
        p.file_write(&id, f, None, body(f.as_bytes().to_vec()))
            .await?;
    }

    // list: sorted by path; recursive walks down.
    let flat = p.file_list(&id, "/work/d", false).await?;
    assert_eq!(
        paths(&flat),
        [
            "/work/d/a.py",
            "/work/d/b.py",
            "/work/d/n.txt",
            "/work/d/sub"
        ]
    );
    let a = &flat[0];
    assert_eq!(
        (a.name.as_str(), a.file_type, a.size),
        ("a.py", FileType::File, 12)
    );
    let deep = p.file_list(&id, "/work/d", true).await?;
    assert_eq!(
        paths(&deep),
        [
            "/work/d/a.py",
            "/work/d/b.py",
            "/work/d/n.txt",
            "/work/d/sub",
            "/work/d/sub/c.py",
            "/work/d/sub/deeper",
            "/work/d/sub/deeper/e.py",
        ]
    );
    ensure!(is_code(
        &p.file_list(&id, "/work/nope", false).await,
        "not_found"
    ));

    // glob: sorted, `*` stays in one directory, `**` crosses them.
    assert_eq!(
        p.file_glob(&id, "/work/d/*.py").await?,
        ["/work/d/a.py", "/work/d/b.py"]
    );
    assert_eq!(
        p.file_glob(&id, "/work/d/**/*.py").await?,
        [
            "/work/d/a.py",
            "/work/d/b.py",
            "/work/d/sub/c.py",
            "/work/d/sub/deeper/e.py"
        ]
    );
    assert!(p.file_glob(&id, "/work/d/*.none").await?.is_empty());

    // stat does not follow symlinks.
    h.sh_ok(&id, "ln -s /work/d/a.py /work/d/link").await?;
    let link = p.file_stat(&id, "/work/d/link").await?;
    assert_eq!(link.file_type, FileType::Symlink);
    assert_eq!(link.symlink_target.as_deref(), Some("/work/d/a.py"));
    let dir = p.file_stat(&id, "/work/d").await?;
    assert_eq!(dir.file_type, FileType::Dir);
    ensure!(is_code(
        &p.file_stat(&id, "/work/d/missing").await,
        "not_found"
    ));

    // move: the moved entry; onto an existing path only with overwrite.
    let moved = p
        .file_move(&id, "/work/d/a.py", "/work/d/moved.py", false)
        .await?;
    assert_eq!(moved.path, "/work/d/moved.py");
    assert_eq!(moved.size, 12);
    ensure!(is_code(
        &p.file_stat(&id, "/work/d/a.py").await,
        "not_found"
    ));
    let clash = p
        .file_move(&id, "/work/d/b.py", "/work/d/n.txt", false)
        .await;
    ensure!(
        is_code(&clash, "conflict"),
        "move onto an existing file without overwrite: {clash:?}"
    );
    assert_eq!(
        read_all(p.file_read(&id, "/work/d/n.txt").await?).await?,
        b"/work/d/n.txt"
    );
    p.file_move(&id, "/work/d/b.py", "/work/d/n.txt", true)
        .await?;
    assert_eq!(
        read_all(p.file_read(&id, "/work/d/n.txt").await?).await?,
        b"/work/d/b.py"
    );
    ensure!(is_code(
        &p.file_move(&id, "/work/d/gone", "/work/d/x", false).await,
        "not_found"
    ));

    // chmod: the entry with its new mode, as the sandbox sees it too.
    let ch = p.file_chmod(&id, "/work/d/moved.py", 0o755).await?;
    assert_eq!(ch.mode, "0755");
    assert_eq!(
        h.sh_ok(&id, "stat -c %a /work/d/moved.py").await?.trim(),
        "755"
    );
    ensure!(is_code(
        &p.file_chmod(&id, "/work/d/missing", 0o644).await,
        "not_found"
    ));

    // delete: missing → not_found; non-empty dir only with recursive.
    ensure!(is_code(
        &p.file_delete(&id, "/work/d/missing", false).await,
        "not_found"
    ));
    let nonempty = p.file_delete(&id, "/work/d", false).await;
    ensure!(
        is_code(&nonempty, "conflict"),
        "deleting a non-empty dir: {nonempty:?}"
    );
    p.file_delete(&id, "/work/d/moved.py", false).await?;
    ensure!(is_code(
        &p.file_stat(&id, "/work/d/moved.py").await,
        "not_found"
    ));
    p.file_mkdir(&id, "/work/empty", false).await?;
    p.file_delete(&id, "/work/empty", false).await?;
    p.file_delete(&id, "/work/d", true).await?;
    ensure!(is_code(&p.file_stat(&id, "/work/d").await, "not_found"));

    // Bad input.
    p.file_mkdir(&id, "/work/dir", true).await?;
    let r = p.file_read(&id, "/work/dir").await.map(|_| ());
    ensure!(is_code(&r, "invalid_request"), "reading a directory: {r:?}");
    let r = p.file_read(&id, "/work/missing").await.map(|_| ());
    ensure!(is_code(&r, "not_found"), "reading a missing file: {r:?}");
    let r = p.file_stat(&id, "relative/path").await;
    ensure!(is_code(&r, "invalid_request"), "a relative path: {r:?}");
    let r = p.file_stat(&id, "/work/a\0b").await;
    ensure!(is_code(&r, "invalid_request"), "a NUL byte: {r:?}");
    Ok(())
}

pub async fn paths_and_symlinks_never_reach_the_host(h: &Harness) -> anyhow::Result<()> {
    let id = h.spawn_default().await?;
    let p = h.provider();
    let sandbox_hostname = h.sh_ok(&id, "cat /etc/hostname").await?;
    let host_hostname = std::fs::read_to_string("/etc/hostname").unwrap_or_default();

    h.sh_ok(&id, "ln -s /etc /work/etc-link && mkdir -p /work/a/b && ln -s ../../../../etc /work/a/b/rel-link")
        .await?;
    let marker = format!("stacyvm-escape-{}", SandboxId::generate().as_str());
    let via = [
        format!("/work/etc-link/{marker}-abs"),
        format!("/work/a/b/rel-link/{marker}-rel"),
        format!("/work/../../../etc/{marker}-dots"),
    ];
    for path in &via {
        // Each resolves inside the root, to the sandbox's own /etc, where
        // the write and the mkdir succeed; the host's /etc is checked below.
        p.file_write(&id, path, None, body(b"escaped?".to_vec()))
            .await
            .with_context(|| format!("writing {path}"))?;
        p.file_mkdir(&id, &format!("{path}.d"), true)
            .await
            .with_context(|| format!("making {path}.d"))?;
    }
    let mut on_host = Vec::new();
    for entry in std::fs::read_dir("/etc")?.flatten() {
        if entry.file_name().to_string_lossy().contains(&marker) {
            on_host.push(entry.path());
        }
    }
    ensure!(
        on_host.is_empty(),
        "writes escaped to the host: {on_host:?}"
    );

    for path in [
        "/work/etc-link/hostname",
        "/work/a/b/rel-link/hostname",
        "/work/../../etc/hostname",
    ] {
        let read = read_all(
            p.file_read(&id, path)
                .await
                .with_context(|| format!("reading {path}"))?,
        )
        .await?;
        assert_eq!(
            text(&read),
            sandbox_hostname,
            "{path} is not the sandbox's /etc/hostname"
        );
        if !host_hostname.is_empty() {
            assert_ne!(
                text(&read),
                host_hostname,
                "{path} read the host's /etc/hostname"
            );
        }
    }
    // The three files and three directories are in the sandbox's /etc.
    let listed = h
        .sh_ok(&id, &format!("ls /etc | grep -c {marker} || true"))
        .await?;
    ensure!(
        listed.trim() == "6",
        "the writes should all be in the sandbox's /etc: {listed:?} of 6 found"
    );
    Ok(())
}

pub async fn destroy_is_idempotent_and_leaves_nothing(h: &Harness) -> anyhow::Result<()> {
    let p = h.provider();
    let id = h.spawn_default().await?;
    // Give the sandbox something to kill: a background process.
    h.sh_ok(&id, "sleep 1000 >/dev/null 2>&1 </dev/null & echo started")
        .await?;
    h.sh_ok(&id, "echo data > /work/file").await?;

    p.destroy(&id).await?;
    p.destroy(&id).await.context("the second destroy")?;
    let listed = p.list().await?;
    ensure!(
        !listed.iter().any(|r| r.sandbox_id == id),
        "destroyed sandbox still listed: {listed:?}"
    );
    let r = p.exec(&id, exec_req(&["true"])).await;
    ensure!(
        is_code(&r, "not_found") || is_code(&r, "conflict"),
        "exec on a destroyed sandbox: {:?}",
        r.map(|o| o.status)
    );
    let left = leftovers(&id, &h.env.data_dir);
    ensure!(left.is_empty(), "left behind after destroy: {left:#?}");

    // A sandbox that never existed destroys fine too.
    p.destroy(&SandboxId::generate()).await?;
    Ok(())
}

pub async fn unknown_sandboxes_and_images_are_reported(h: &Harness) -> anyhow::Result<()> {
    let p = h.provider();
    let ghost = SandboxId::generate();
    let r = p.exec(&ghost, exec_req(&["true"])).await;
    ensure!(
        is_code(&r, "not_found"),
        "exec on an unknown sandbox: {:?}",
        r.map(|o| o.status)
    );
    let r = p.file_stat(&ghost, "/").await;
    ensure!(is_code(&r, "not_found"), "{r:?}");

    let mut spec = support::spec();
    spec.image = "no-such-image-anywhere".into();
    let r = h.spawn(spec.clone()).await;
    let err = r
        .err()
        .context("spawning from an unknown image succeeded")?;
    let code = err.downcast_ref::<Error>().map(|e| e.code());
    ensure!(
        code == Some("image_not_found"),
        "unknown image gave {err:#}"
    );
    let left = leftovers(&spec.sandbox_id, &h.env.data_dir);
    ensure!(left.is_empty(), "a failed spawn left: {left:#?}");
    ensure!(!p
        .list()
        .await?
        .iter()
        .any(|r| r.sandbox_id == spec.sandbox_id));
    Ok(())
}
