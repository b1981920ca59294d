//! A member's background process is held to the sandbox like an exec: it
//! cannot read the server's data dir or secrets, nor see host processes.

use std::time::Duration;

use anyhow::{anyhow, ensure, Result};
use reqwest::Method;
use serde_json::json;

use crate::support::{Server, ServerOptions, Sse, StoreKind};

#[tokio::test(flavor = "multi_thread")]
async fn a_background_process_cannot_reach_the_data_dir_or_the_host() -> Result<()> {
    let data = tempfile::Builder::new().prefix("svm-procs-").tempdir()?;
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,namespaces")
            .data_dir(data.path()),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let (_, member) = admin.tenant_with("member").await?;
    let dir = data.path().display().to_string();
    let script = format!(
        "cat {dir}/admin.key; ls {dir}; cat /proc/*/environ; \
         ps -o pid,args 2>/dev/null || ls /proc; echo end"
    );
    for provider in ["docker", "namespaces"] {
        let id = member.sandbox(provider).await?;
        let p = member
            .post(
                &format!("/v1/sandboxes/{id}/processes"),
                json!({"cmd": ["sh", "-c", script]}),
            )
            .await?
            .ok(201)?;
        let pid = p["pid"].as_u64().ok_or_else(|| anyhow!("no pid: {p}"))?;
        let resp = tokio::time::timeout(
            Duration::from_secs(60),
            member
                .request(
                    Method::GET,
                    &format!("/v1/sandboxes/{id}/processes/{pid}/output"),
                )
                .send(),
        )
        .await??;
        let events = Sse::from_response(resp).collect().await?;
        let text: String = events
            .iter()
            .filter_map(|e| e.data["data"].as_str())
            .collect();
        ensure!(
            events.last().is_some_and(|e| e.event == "exit"),
            "{provider}: {events:?}"
        );
        ensure!(text.contains("end\n"), "{provider}: {text}");
        ensure!(
            !text.contains(&server.admin_key),
            "{provider}: the admin key leaked into a background process"
        );
        ensure!(
            !text.contains("stacyvm.db") && !text.contains("STACYVM_ADMIN_KEY"),
            "{provider}: the data dir or the server's env is visible: {text}"
        );
        ensure!(
            !text.contains("stacyvm serve") && !text.contains("dockerd"),
            "{provider}: host processes are visible: {text}"
        );
        member.destroy(&id).await?;
    }
    Ok(())
}
