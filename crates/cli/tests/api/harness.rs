//! The harness's own promise: a server that dies with sandboxes running
//! leaves nothing behind once its guard is dropped.

use anyhow::{ensure, Result};

use crate::support::{docker_containers_of, Server};

/// Processes whose command line names `needle` (a sandbox id).
fn processes_naming(needle: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_servers_sandboxes_are_removed_by_the_guard() -> Result<()> {
    let mut server = Server::start_default()?;
    let admin = server.admin();
    admin.import_busybox().await?;
    let proot = admin.sandbox("proot").await?;
    let docker = admin.sandbox("docker").await?;
    ensure!(
        !processes_naming(&proot).is_empty(),
        "the PRoot sandbox runs"
    );
    ensure!(
        docker_containers_of(&docker)?.len() == 1,
        "the Docker sandbox runs"
    );
    // The API is gone: only the fallback can clean up now.
    server.kill9()?;
    drop(server);
    ensure!(
        processes_naming(&proot).is_empty(),
        "PRoot processes outlived the guard: {:?}",
        processes_naming(&proot)
    );
    ensure!(
        docker_containers_of(&docker)?.is_empty(),
        "the container outlived the guard"
    );
    Ok(())
}
