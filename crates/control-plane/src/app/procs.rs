//! Background processes: commands the sandbox's agent starts and keeps in
//! its own table, so they outlive the client and the control plane that
//! started them. Starting one is admitted like an exec (role, state, rate).

use std::collections::BTreeMap;

use stacyvm_core::{validate_sandbox_path, ByteStream, Error, Result, SandboxId};
use stacyvm_provider::agent_client::{ProcInfo, ProcOutput};

use super::sandboxes::{check_env, invalid};
use super::{App, Principal};

/// The signals a client may send to a background process.
pub const SIGNALS: &[&str] = &["TERM", "KILL", "INT", "HUP", "USR1", "USR2", "STOP", "CONT"];

impl App {
    /// `POST /v1/sandboxes/{id}/processes`.
    pub async fn process_start(
        &self,
        who: &Principal,
        id: &str,
        cmd: Vec<String>,
        env: BTreeMap<String, String>,
        cwd: Option<String>,
        user: Option<String>,
    ) -> Result<(SandboxId, ProcInfo)> {
        who.require_write()?;
        super::exec::check_user(user.as_deref())?;
        if cmd.is_empty() || cmd[0].is_empty() {
            return Err(invalid("cmd must hold at least the program to run"));
        }
        if cmd.len() > 65536 || cmd.iter().any(|a| a.contains('\0')) {
            return Err(invalid(
                "cmd arguments must not contain NUL bytes (and at most 65536 of them)",
            ));
        }
        check_env(&env)?;
        let (rec, worker, lease) = self.running(who, id).await?;
        let quota = self.exec_quota(&rec.tenant_id).await?;
        self.exec_limiter
            .acquire(&rec.tenant_id, quota.max_exec_per_minute)?;
        let mut merged = rec.env.clone();
        merged.extend(env);
        let cwd = match cwd {
            Some(c) => Some(validate_sandbox_path(&c)?),
            None => rec.workdir.clone(),
        };
        let agent = super::sandboxes::agent(&worker, &lease).await?;
        let info = agent.proc_start(cmd, merged, cwd, user).await?;
        Ok((rec.id, info))
    }

    /// `GET /v1/sandboxes/{id}/processes`.
    pub async fn process_list(&self, who: &Principal, id: &str) -> Result<Vec<ProcInfo>> {
        self.agent_of(who, id).await?.proc_list().await
    }

    /// `GET /v1/sandboxes/{id}/processes/{pid}`.
    pub async fn process_get(&self, who: &Principal, id: &str, pid: u32) -> Result<ProcInfo> {
        self.agent_of(who, id).await?.proc_get(pid).await
    }

    /// `GET /v1/sandboxes/{id}/processes/{pid}/output`.
    pub async fn process_output(
        &self,
        who: &Principal,
        id: &str,
        pid: u32,
        follow: bool,
    ) -> Result<ProcOutput> {
        let agent = self.agent_of(who, id).await?;
        // An unknown pid is a 404 before the stream starts, not an error
        // event inside it.
        agent.proc_get(pid).await?;
        agent.proc_output(pid, follow).await
    }

    /// `POST /v1/sandboxes/{id}/processes/{pid}/stdin`.
    pub async fn process_stdin(
        &self,
        who: &Principal,
        id: &str,
        pid: u32,
        close: bool,
        body: ByteStream,
    ) -> Result<u64> {
        who.require_write()?;
        self.agent_of(who, id)
            .await?
            .proc_stdin(pid, close, body)
            .await
    }

    /// `POST /v1/sandboxes/{id}/processes/{pid}/signal`.
    pub async fn process_signal(
        &self,
        who: &Principal,
        id: &str,
        pid: u32,
        signal: &str,
    ) -> Result<ProcInfo> {
        who.require_write()?;
        let name = signal.strip_prefix("SIG").unwrap_or(signal);
        if !SIGNALS.contains(&name) {
            return Err(Error::InvalidRequest(format!(
                "signal {signal:?} is not one of {}",
                SIGNALS.join(", ")
            )));
        }
        self.agent_of(who, id).await?.proc_signal(pid, name).await
    }
}
