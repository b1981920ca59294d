//! The Rust SDK against a real server: every call at least once, output
//! streamed while the command still runs, and the server's errors as
//! typed errors.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use stacyvm_sdk::{
    AuditFilter, Client, CreateKey, CreateSandbox, Error, ExecEvent, ExecRequest, FileType, Page,
    Quota, Role, SandboxFilter, SandboxState,
};

use crate::support::{test_image_tar, Server, TempPath, IMAGE};

#[tokio::test]
async fn every_sdk_call_works_against_the_server() -> Result<()> {
    let server = Server::start("proot")?;
    // from_env reads STACYVM_URL and STACYVM_API_KEY (each test is its own process).
    std::env::set_var("STACYVM_URL", &server.url);
    std::env::set_var("STACYVM_API_KEY", &server.admin_key);
    let c = Client::from_env()?;
    assert_eq!(c.base_url().as_str().trim_end_matches('/'), server.url);

    assert_eq!(c.healthz().await?.status, "ok");
    assert_eq!(c.readyz().await?.status, "ready");
    let st = c.status().await?;
    assert!(st.store.ok && st.providers.iter().any(|p| p.name == "proot" && p.healthy));

    let img = c.image_import_path(IMAGE, test_image_tar()?).await?;
    assert!(img.digest.starts_with("sha256:") && img.size > 0);
    let tar = tokio::fs::File::open(test_image_tar()?).await?;
    assert_eq!(c.image_import("second", tar).await?.digest, img.digest);
    assert_eq!(c.image_list().await?.len(), 2);
    assert_eq!(c.image_get("second").await?.name, "second");
    c.image_delete("second").await?;

    // Create with an idempotency key twice: one sandbox.
    let spec = CreateSandbox {
        labels: BTreeMap::from([("suite".to_owned(), "sdk".to_owned())]),
        env: BTreeMap::from([("GREETING".to_owned(), "hello".to_owned())]),
        timeout_s: Some(600),
        idempotency_key: Some(crate::support::unique("idem")),
        ..CreateSandbox::image(IMAGE)
    };
    let sbx = c.sandbox_create(&spec).await?;
    assert_eq!(sbx.state, SandboxState::Running);
    assert_eq!(c.sandbox_create(&spec).await?.id, sbx.id);
    let id = sbx.id.as_str();
    let filter = SandboxFilter {
        state: Some(SandboxState::Running),
        labels: vec![("suite".into(), "sdk".into())],
        limit: Some(1),
        cursor: None,
    };
    assert_eq!(c.sandbox_list(&filter).await?.sandboxes.len(), 1);
    assert_eq!(
        c.sandbox_list_all(&SandboxFilter::default()).await?.len(),
        1
    );
    assert_eq!(
        c.sandbox_get(id)
            .await?
            .labels
            .get("suite")
            .map(String::as_str),
        Some("sdk")
    );
    assert!(c.sandbox_set_timeout(id, 900).await?.expires_at.is_some());
    assert_eq!(c.sandbox_pause(id).await?.state, SandboxState::Paused);
    assert_eq!(c.sandbox_resume(id).await?.state, SandboxState::Running);
    assert!(!c.sandbox_logs(id).await?.is_empty());
    let mut follow = c.sandbox_logs_follow(id).await?;
    let first = follow.next().await.context("a first log line")??;
    assert_eq!(first.source, "lifecycle");
    drop(follow);

    let out = c
        .exec(
            id,
            &ExecRequest::shell("echo $GREETING; printf '\\377' >&2; exit 3"),
        )
        .await?;
    assert_eq!(
        (out.status.exit_code, out.stdout_text().as_str()),
        (Some(3), "hello\n")
    );
    assert_eq!(&out.stderr[..], b"\xff");
    let out = c
        .exec(
            id,
            &ExecRequest {
                cwd: Some("/tmp".into()),
                stdin: Some("piped".into()),
                ..ExecRequest::new(["sh", "-c", "cat; pwd"])
            },
        )
        .await?;
    assert_eq!(out.stdout_text(), "piped/tmp\n");
    let mut events = c
        .exec_stream(id, &ExecRequest::shell("echo a; echo b >&2; exit 2"))
        .await?;
    let (mut so, mut se, mut exit) = (Vec::new(), Vec::new(), None);
    while let Some(ev) = events.next().await {
        match ev? {
            ExecEvent::Stdout(b) => so.extend_from_slice(&b),
            ExecEvent::Stderr(b) => se.extend_from_slice(&b),
            ExecEvent::Exit(st) => exit = Some(st),
        }
    }
    assert_eq!((so.as_slice(), se.as_slice()), (&b"a\n"[..], &b"b\n"[..]));
    assert_eq!(exit.map(|e| e.shell_code()), Some(2));

    // Files, streamed in and out every way the SDK offers.
    let e = c
        .file_write(id, "/work/r.txt", &b"from a reader"[..], Some("0640"))
        .await?;
    assert_eq!(
        (e.size, e.mode.as_str(), e.file_type),
        (13, "0640", FileType::File)
    );
    c.file_write_bytes(id, "/work/deep/b.bin", vec![0u8, 1, 2, 255], None)
        .await?;
    let local = TempPath::new("svm-sdk-up");
    tokio::fs::write(&local.0, vec![7u8; 300_000]).await?;
    assert_eq!(
        c.file_write_path(id, "/work/p.bin", &local.0, None)
            .await?
            .size,
        300_000
    );
    // A tree as one tar; a body that is no tar is refused as invalid.
    let tree = {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o600);
        h.set_size(5);
        b.append_data(&mut h, "conf/app.toml", &b"a = 1"[..])?;
        b.into_inner()?
    };
    let summary = c
        .file_write_archive(id, "/srv/app", std::io::Cursor::new(tree))
        .await?;
    assert_eq!(
        (summary.path.as_str(), summary.files, summary.bytes),
        ("/srv/app", 1, 5)
    );
    assert_eq!(
        c.file_stat(id, "/srv/app/conf/app.toml").await?.mode,
        "0600"
    );
    let refused = c
        .file_write_archive(id, "/srv/junk", std::io::Cursor::new(vec![b'z'; 2048]))
        .await
        .expect_err("a non-tar body was unpacked");
    assert_eq!(refused.code(), Some("invalid_request"), "{refused}");

    let mut stream = c.file_read(id, "/work/p.bin").await?;
    let mut n = 0;
    while let Some(chunk) = stream.next().await {
        n += chunk?.len();
    }
    assert_eq!(n, 300_000);
    let mut sink = Vec::new();
    assert_eq!(c.file_read_to(id, "/work/r.txt", &mut sink).await?, 13);
    assert_eq!(sink, b"from a reader");
    let down = TempPath::new("svm-sdk-down");
    assert_eq!(
        c.file_read_to_path(id, "/work/p.bin", &down.0).await?,
        300_000
    );
    assert_eq!(tokio::fs::read(&down.0).await?, vec![7u8; 300_000]);
    assert_eq!(
        &c.file_read_bytes(id, "/work/deep/b.bin").await?[..],
        &[0u8, 1, 2, 255]
    );
    assert_eq!(
        c.file_stat(id, "/work/deep").await?.file_type,
        FileType::Dir
    );
    let names: Vec<String> = c
        .file_list(id, "/work", false)
        .await?
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["deep", "p.bin", "r.txt"]);
    assert_eq!(c.file_list(id, "/work", true).await?.len(), 4);
    assert_eq!(
        c.file_glob(id, "/work/**/*.bin").await?,
        ["/work/deep/b.bin", "/work/p.bin"]
    );
    assert_eq!(
        c.file_move(id, "/work/r.txt", "/work/s.txt", false)
            .await?
            .path,
        "/work/s.txt"
    );
    assert_eq!(c.file_chmod(id, "/work/s.txt", "0755").await?.mode, "0755");
    assert_eq!(
        c.file_mkdir(id, "/work/x/y", true).await?.file_type,
        FileType::Dir
    );
    c.file_delete(id, "/work/x", true).await?;
    assert_eq!(
        c.file_stat(id, "/work/x")
            .await
            .err()
            .and_then(|e| e.status()),
        Some(404)
    );

    // Tenants, quotas, keys, audit, workers.
    let t = c.tenant_create("sdk-tenant").await?;
    assert!(c
        .tenant_list(&Page::default())
        .await?
        .tenants
        .iter()
        .any(|x| x.id == t.id));
    let want = Quota {
        max_sandboxes: Some(5),
        max_cpu: Some(4.0),
        ..Quota::default()
    };
    assert_eq!(c.quota_set(&t.id, &want).await?, want);
    assert_eq!(c.quota_get(&t.id).await?, want);
    let k = c
        .key_create(&CreateKey {
            tenant_id: t.id.clone(),
            role: Role::Viewer,
            name: "ro".into(),
        })
        .await?;
    let secret = k
        .key
        .clone()
        .context("the create answer carries the secret")?;
    assert!(c
        .key_list(&Page {
            limit: Some(1000),
            cursor: None
        })
        .await?
        .keys
        .iter()
        .any(|x| x.id == k.id && x.key.is_none()));
    let viewer = Client::builder()
        .url(&server.url)
        .api_key(&secret)
        .build()?;
    let refused = viewer
        .sandbox_create(&CreateSandbox::image(IMAGE))
        .await
        .err()
        .context("a viewer cannot create")?;
    assert_eq!(
        (refused.status(), refused.code()),
        (Some(403), Some("forbidden"))
    );
    c.key_revoke(&k.id).await?;
    let gone = viewer
        .sandbox_list(&SandboxFilter::default())
        .await
        .err()
        .context("a revoked key is refused")?;
    assert_eq!(gone.code(), Some("unauthenticated"));
    let audit = c
        .audit_list(&AuditFilter {
            sandbox_id: Some(sbx.id.clone()),
            ..AuditFilter::default()
        })
        .await?;
    assert!(audit
        .events
        .iter()
        .any(|e| e.action == "sandbox.create" && e.outcome == "ok"));
    let denied = c
        .audit_list(&AuditFilter {
            outcome: Some("denied".into()),
            since: Some(time::OffsetDateTime::UNIX_EPOCH),
            limit: Some(10),
            ..AuditFilter::default()
        })
        .await?;
    assert!(denied.events.iter().all(|e| e.outcome == "denied") && !denied.events.is_empty());
    let workers = c.worker_list().await?;
    assert_eq!(workers.len(), 1);
    c.sandbox_destroy(id).await?;
    c.sandbox_destroy(id).await?;
    assert_eq!(c.sandbox_get(id).await?.state, SandboxState::Destroyed);
    assert_eq!(c.worker_drain(&workers[0].id).await?.state, "draining");
    Ok(())
}

#[tokio::test]
async fn exec_stream_delivers_output_before_the_command_ends() -> Result<()> {
    let server = Server::with_image().await?;
    let c = server.admin();
    let id = c.sandbox_create(&CreateSandbox::image(IMAGE)).await?.id;
    // The command cannot end until the test creates /tmp/go, which it does
    // only after the first chunk arrived: so that chunk came while it ran.
    let script = "echo first; while [ ! -e /tmp/go ]; do sleep 0.05; done; echo second";
    let mut events = c.exec_stream(&id, &ExecRequest::shell(script)).await?;
    match events.next().await.context("a first event")?? {
        ExecEvent::Stdout(b) => assert_eq!(&b[..], b"first\n"),
        other => anyhow::bail!("expected stdout first, got {other:?}"),
    }
    c.file_write_bytes(&id, "/tmp/go", "", None).await?;
    let mut rest = Vec::new();
    let mut exit = None;
    while let Some(ev) = events.next().await {
        match ev? {
            ExecEvent::Stdout(b) => rest.extend_from_slice(&b),
            ExecEvent::Stderr(_) => {}
            ExecEvent::Exit(st) => exit = Some(st),
        }
    }
    assert_eq!(rest, b"second\n");
    assert_eq!(exit.and_then(|e| e.exit_code), Some(0));

    Ok(())
}

#[tokio::test]
async fn server_errors_surface_as_typed_errors() -> Result<()> {
    let server = Server::with_image().await?;
    let c = server.admin();
    let api = |e: Error| e.as_api().cloned().context("an API error");

    let e = api(c
        .sandbox_get("sbx_unknown")
        .await
        .err()
        .context("unknown sandbox")?)?;
    assert_eq!((e.status, e.code.as_str()), (404, "not_found"));
    assert!(e.message.contains("sbx_unknown"), "{}", e.message);
    assert!(e
        .request_id
        .as_deref()
        .is_some_and(|r| r.starts_with("req_")));

    let e = api(c
        .sandbox_create(&CreateSandbox::image("no-such-image"))
        .await
        .err()
        .context("missing image")?)?;
    assert_eq!((e.status, e.code.as_str()), (422, "image_not_found"));
    let e = api(c
        .sandbox_create(&CreateSandbox::default())
        .await
        .err()
        .context("no image")?)?;
    assert_eq!((e.status, e.code.as_str()), (400, "invalid_request"));

    let id = c.sandbox_create(&CreateSandbox::image(IMAGE)).await?.id;
    let e = api(c
        .file_stat(&id, "relative/path")
        .await
        .err()
        .context("relative path")?)?;
    assert_eq!(e.code, "invalid_request");
    c.file_write_bytes(&id, "/work/a", "1", None).await?;
    c.file_write_bytes(&id, "/work/b", "2", None).await?;
    let e = api(c
        .file_move(&id, "/work/a", "/work/b", false)
        .await
        .err()
        .context("move onto a file")?)?;
    assert_eq!((e.status, e.code.as_str()), (409, "conflict"));
    c.sandbox_destroy(&id).await?;
    let err = c
        .exec(&id, &ExecRequest::new(["true"]))
        .await
        .err()
        .context("exec on a destroyed sandbox")?;
    assert_eq!((err.status(), err.code()), (Some(409), Some("conflict")));
    assert!(
        err.to_string().contains("(conflict, request id req_"),
        "{err}"
    );
    let err = c
        .exec_stream(&id, &ExecRequest::new(["true"]))
        .await
        .err()
        .context("stream on a destroyed sandbox")?;
    assert_eq!(err.code(), Some("conflict"));

    let nobody = Client::new(&server.url, "svm_not_a_real_key_at_all_0000")?;
    let e = api(nobody.status().await.err().context("a bad key")?)?;
    assert_eq!((e.status, e.code.as_str()), (401, "unauthenticated"));

    // A quota refusal is not retried: it comes back at once as the server's error.
    let t = c.tenant_create("tight").await?;
    c.quota_set(
        &t.id,
        &Quota {
            max_sandboxes: Some(0),
            allowed_providers: Some(vec!["proot".into()]),
            ..Quota::default()
        },
    )
    .await?;
    let k = c
        .key_create(&CreateKey {
            tenant_id: t.id,
            role: Role::Member,
            name: "m".into(),
        })
        .await?;
    let member = Client::new(&server.url, k.key.context("secret")?)?;
    let e = api(member
        .sandbox_create(&CreateSandbox::image(IMAGE))
        .await
        .err()
        .context("over quota")?)?;
    assert_eq!((e.status, e.code.as_str()), (429, "quota_exceeded"));

    let unreachable = Client::builder()
        .url("http://127.0.0.1:9")
        .retry(stacyvm_sdk::RetryPolicy::none())
        .build()?;
    let err = unreachable
        .healthz()
        .await
        .err()
        .context("nothing listens on port 9")?;
    assert!(
        matches!(err, Error::Transport { .. }) && err.code().is_none(),
        "{err:?}"
    );
    Ok(())
}
