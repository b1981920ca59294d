//! A member's interactive terminal is held to the sandbox like an exec: it
//! cannot read the server's data dir or secrets, nor see host processes,
//! and another tenant's sandbox is not there for it (404).

use std::time::Duration;

use anyhow::{bail, ensure, Result};
use stacyvm_sdk::{Client, Error, PtyEvent, PtyOptions};

use crate::support::{Server, ServerOptions, StoreKind};

/// Types `script` into a shell and returns what the terminal printed up to
/// the shell's exit.
async fn typed(c: &Client, id: &str, script: &str) -> Result<(String, i32)> {
    let mut pty = c.pty(id, &PtyOptions::new(["sh"]).size(200, 50)).await?;
    pty.send(format!("{script}; exit 0\r").into_bytes()).await?;
    let mut out = Vec::new();
    let code = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(ev) = pty.recv().await {
            match ev? {
                PtyEvent::Output(b) => out.extend_from_slice(&b),
                PtyEvent::Exit(code) => return Ok(code),
            }
        }
        bail!("the terminal ended without an exit")
    })
    .await??;
    Ok((String::from_utf8_lossy(&out).into_owned(), code))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_members_terminal_cannot_reach_the_data_dir_the_host_or_other_tenants() -> Result<()> {
    let data = tempfile::Builder::new().prefix("svm-pty-").tempdir()?;
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,namespaces")
            .data_dir(data.path()),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let (_, other) = admin.tenant_with("member").await?;
    let me = Client::new(&member.base, member.key_secret())?;
    let dir = data.path().display().to_string();
    let script = format!(
        "cat {dir}/admin.key; ls {dir}; cat /proc/*/environ; \
         ps -o pid,args 2>/dev/null || ls /proc; echo E$((1+1))ND"
    );
    for provider in ["docker", "namespaces"] {
        let id = member.sandbox(provider).await?;
        let (text, code) = typed(&me, &id, &script).await?;
        ensure!(
            code == 0 && text.contains("E2ND"),
            "{provider}: {code} {text}"
        );
        ensure!(
            !text.contains(&server.admin_key),
            "{provider}: the admin key leaked into a terminal"
        );
        ensure!(
            !text.contains("stacyvm.db") && !text.contains("STACYVM_ADMIN_KEY"),
            "{provider}: the data dir or the server's env is visible: {text}"
        );
        ensure!(
            !text.contains("stacyvm serve") && !text.contains("dockerd"),
            "{provider}: host processes are visible: {text}"
        );

        // Another tenant's member key does not find the sandbox.
        let theirs = Client::new(&other.base, other.key_secret())?;
        match theirs.pty(&id, &PtyOptions::new(["sh"])).await {
            Err(Error::Api(e)) if e.status == 404 => {}
            Err(e) => bail!("{provider}: another tenant's terminal: {e:?}"),
            Ok(_) => bail!("{provider}: another tenant opened a terminal in this sandbox"),
        }
        member.destroy(&id).await?;
    }
    Ok(())
}
