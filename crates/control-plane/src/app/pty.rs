//! Interactive terminals: admitting a command run on a pseudo-terminal (the
//! same role, state, rate and slot checks as exec) and starting it through
//! the sandbox's agent.

use stacyvm_api as api;
use stacyvm_core::{Result, SandboxId};
use stacyvm_provider::agent_client::{PtyInput, PtySize};
use stacyvm_provider::ExecStream;
use tokio::sync::mpsc;

use super::exec_slots::ExecSlot;
use super::{App, Principal};

/// The command a terminal runs when none is given.
pub const DEFAULT_SHELL: &str = "/bin/sh";

/// Largest window size accepted, in columns or rows.
pub const MAX_DIMENSION: u16 = 4096;

/// A command running on a terminal: its output (all of it as `Stdout`),
/// where its input goes, and its exec slot (freed when dropped). Dropping
/// `events` kills the command's process group.
pub struct RunningPty {
    pub sandbox: SandboxId,
    pub events: ExecStream,
    pub input: mpsc::Sender<PtyInput>,
    pub slot: ExecSlot,
}

impl App {
    /// `GET /v1/sandboxes/{id}/pty`: starts `cmd` (the image's shell when
    /// empty) on a terminal of `cols` × `rows`.
    pub async fn sandbox_pty(
        &self,
        who: &Principal,
        id: &str,
        mut cmd: Vec<String>,
        cols: u16,
        rows: u16,
    ) -> Result<RunningPty> {
        for (name, v) in [("cols", cols), ("rows", rows)] {
            if v == 0 || v > MAX_DIMENSION {
                return Err(super::sandboxes::invalid(format!(
                    "{name} must be between 1 and {MAX_DIMENSION}"
                )));
            }
        }
        if cmd.is_empty() {
            cmd.push(DEFAULT_SHELL.into());
        }
        let (rec, worker, lease, slot) = self.exec_admit(who, id).await?;
        let req = self.exec_request(
            &rec,
            api::ExecRequest {
                cmd,
                env: Default::default(),
                cwd: None,
                stdin: None,
                timeout_s: None,
                user: None,
            },
        )?;
        // A few keystrokes' worth: a client that types faster than the
        // agent takes them waits.
        let (tx, mut rx) = mpsc::channel::<PtyInput>(64);
        let input = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let events = super::sandboxes::agent(&worker, &lease)
            .await?
            .pty(req, PtySize { cols, rows }, input)
            .await?;
        Ok(RunningPty {
            sandbox: rec.id,
            events,
            input: tx,
            slot,
        })
    }
}
