//! Applying an nftables script with the `nft` tool, on the host or inside
//! a sandbox's network namespace: shared by Docker's egress network, the
//! egress allow lists and the microVM guests' network.

use std::io;
use std::os::fd::RawFd;
use std::process::Stdio;
use std::time::Duration;

/// How long `nft` may take to load a script.
const NFT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where `nft` may live: the `PATH` of a service can lack the sbin
/// directories.
const NFT_CANDIDATES: [&str; 3] = ["nft", "/usr/sbin/nft", "/sbin/nft"];

/// Loads `script` (`nft -f -`), in the network namespace `netns` when
/// given (a descriptor of `/proc/PID/ns/net`, open for the call). The error
/// says why in words; callers put it in their own context.
pub async fn apply(script: &str, netns: Option<RawFd>) -> Result<(), String> {
    let mut last = String::from("nft was not found");
    for nft in NFT_CANDIDATES {
        let mut cmd = tokio::process::Command::new(nft);
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(fd) = netns {
            // SAFETY: between fork and exec the closure makes one system
            // call (async-signal-safe) on a descriptor the child inherited.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => {
                last = format!("running {nft}: {e}");
                continue;
            }
        };
        let script = script.to_owned();
        let run = async move {
            use tokio::io::AsyncWriteExt;
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(script.as_bytes()).await?;
            }
            child.wait_with_output().await
        };
        return match tokio::time::timeout(NFT_TIMEOUT, run).await {
            Ok(Ok(out)) if out.status.success() => Ok(()),
            Ok(Ok(out)) => Err(format!(
                "{nft} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Ok(Err(e)) => Err(format!("running {nft}: {e}")),
            Err(_) => Err(format!(
                "{nft} did not finish within {} s",
                NFT_TIMEOUT.as_secs()
            )),
        };
    }
    Err(last)
}
