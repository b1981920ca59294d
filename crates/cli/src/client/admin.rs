//! Operator commands: `image`, `tenant`, `key`, `quota`, `audit`,
//! `status`, `workers`, `health`.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use stacyvm_sdk::{AuditFilter, CreateKey, Image, Page, Quota, Role, Worker};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::output::{self, Counting, Format};
use super::{usage, Conn};

#[derive(Args)]
pub struct ImageArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: ImageCmd,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Import a root filesystem tar as NAME (admin only), streamed.
    Import {
        name: String,
        tar: std::path::PathBuf,
    },
    /// List the catalog.
    Ls,
    /// Show one image.
    Get { name: String },
    /// Remove an image from the catalog.
    Rm { name: String },
}

#[derive(Args)]
pub struct TenantArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: TenantCmd,
}

#[derive(Subcommand)]
enum TenantCmd {
    Create { name: String },
    Ls,
}

#[derive(Args)]
pub struct KeyArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: KeyCmd,
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Create a key; its secret is printed this once.
    Create {
        #[arg(long)]
        tenant: String,
        /// `admin` is global and only for the operator's own tenant; `owner`
        /// manages one tenant's keys.
        #[arg(long, value_parser = ["admin", "owner", "member", "viewer"], default_value = "member")]
        role: String,
        #[arg(long)]
        name: String,
        /// Print only the key's E2B spelling (`e2b_…`, for `E2B_API_KEY`).
        #[arg(long)]
        e2b: bool,
    },
    Ls,
    /// Revoke a key; it is refused from then on.
    Revoke {
        id: String,
    },
}

#[derive(Args)]
pub struct QuotaArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: QuotaCmd,
}

// Parsed once per process: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum QuotaCmd {
    Get {
        tenant: String,
    },
    /// Change limits; each takes a number or `unlimited`, the rest stay as they are.
    Set {
        tenant: String,
        #[arg(long)]
        max_sandboxes: Option<String>,
        #[arg(long)]
        max_cpu: Option<String>,
        #[arg(long)]
        max_memory_mb: Option<String>,
        #[arg(long)]
        max_timeout_s: Option<String>,
        #[arg(long)]
        max_exec_per_minute: Option<String>,
        #[arg(long)]
        max_concurrent_execs: Option<String>,
        #[arg(long)]
        max_volumes: Option<String>,
        #[arg(long)]
        max_volume_mb: Option<String>,
        /// Named templates the tenant may keep (a number or `unlimited`).
        #[arg(long)]
        max_templates: Option<String>,
        /// Comma-separated providers the tenant may use (e.g. docker,proot),
        /// or `default` for the server's default set.
        #[arg(long)]
        allowed_providers: Option<String>,
    },
}

#[derive(Args)]
pub struct AuditArgs {
    #[command(flatten)]
    conn: Conn,
    #[arg(long)]
    sandbox: Option<String>,
    /// e.g. sandbox.create
    #[arg(long)]
    action: Option<String>,
    #[arg(long, value_parser = ["ok", "denied", "error"])]
    outcome: Option<String>,
    /// RFC 3339 time.
    #[arg(long)]
    since: Option<String>,
    #[arg(long, default_value_t = 100)]
    limit: u32,
}

#[derive(Args)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: Conn,
}

#[derive(Args)]
pub struct WorkersArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: WorkersCmd,
}

#[derive(Subcommand)]
enum WorkersCmd {
    Ls,
    Get {
        id: String,
    },
    /// Send no new sandboxes to the worker (it keeps the ones it has).
    Drain {
        id: String,
    },
    /// Let a drained worker take new sandboxes again.
    Undrain {
        id: String,
    },
    /// Worker tokens: what `stacyvm worker` registers with.
    #[command(subcommand)]
    Token(WorkerTokenCmd),
}

#[derive(Subcommand)]
enum WorkerTokenCmd {
    /// Makes a token; its secret is printed this once.
    Create {
        name: String,
    },
    Ls,
    /// Revokes a token: workers using it are refused and marked down.
    Rm {
        id: String,
    },
}

#[derive(Args)]
pub struct HealthArgs {
    #[command(flatten)]
    conn: Conn,
}

pub(super) fn images(fmt: Format, list: &[Image]) -> Result<()> {
    if fmt == Format::Json {
        return output::json(list);
    }
    let rows = list
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                output::size(i.size),
                i.digest.clone(),
                output::time(i.created_at),
            ]
        })
        .collect();
    output::table(&["NAME", "SIZE", "DIGEST", "CREATED"], rows);
    Ok(())
}

pub async fn image(a: ImageArgs) -> Result<ExitCode> {
    let client = a.conn.client()?;
    let fmt = a.conn.output;
    match a.cmd {
        ImageCmd::Import { name, tar } => {
            let file = tokio::fs::File::open(&tar)
                .await
                .with_context(|| format!("cannot open {}", tar.display()))?;
            let len = file.metadata().await.ok().map(|m| m.len());
            let bar = output::progress(len, &format!("importing {name}"));
            let img = client
                .image_import(&name, Counting::new(file, bar.clone()))
                .await;
            bar.finish_and_clear();
            images(fmt, &[img?])?;
        }
        ImageCmd::Ls => images(fmt, &client.image_list().await?)?,
        ImageCmd::Get { name } => images(fmt, &[client.image_get(&name).await?])?,
        ImageCmd::Rm { name } => {
            client.image_delete(&name).await?;
            println!("{name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn quota_cell<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string())
        .unwrap_or_else(|| "unlimited".into())
}

pub async fn tenant(a: TenantArgs) -> Result<ExitCode> {
    let client = a.conn.client()?;
    let list = match a.cmd {
        TenantCmd::Create { name } => vec![client.tenant_create(&name).await?],
        TenantCmd::Ls => {
            let mut all = Vec::new();
            let mut page = Page::default();
            loop {
                let p = client.tenant_list(&page).await?;
                all.extend(p.tenants);
                match p.next_cursor {
                    Some(c) => page.cursor = Some(c),
                    None => break,
                }
            }
            all
        }
    };
    if a.conn.output == Format::Json {
        output::json(&list)?;
    } else {
        let rows = list
            .iter()
            .map(|t| {
                vec![
                    t.id.clone(),
                    t.name.clone(),
                    quota_cell(t.quota.max_sandboxes),
                    output::time_opt(t.created_at),
                ]
            })
            .collect();
        output::table(&["ID", "NAME", "MAX SANDBOXES", "CREATED"], rows);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn key(a: KeyArgs) -> Result<ExitCode> {
    let client = a.conn.client()?;
    let fmt = a.conn.output;
    match a.cmd {
        KeyCmd::Create {
            tenant,
            role,
            name,
            e2b,
        } => {
            let role = Role::parse(&role).unwrap_or(Role::Member);
            let k = client
                .key_create(&CreateKey {
                    tenant_id: tenant,
                    role,
                    name,
                })
                .await?;
            if e2b {
                let Some(spelled) = k.key_e2b.clone() else {
                    anyhow::bail!("the server did not return the key's E2B spelling");
                };
                println!("{spelled}");
                eprintln!(
                    "Key {} created; this E2B_API_KEY is shown only this once.",
                    k.id
                );
            } else if fmt == Format::Json {
                output::json(&k)?;
            } else {
                output::fields(vec![
                    ("id", k.id.clone()),
                    ("tenant", k.tenant_id.clone()),
                    ("role", k.role.clone()),
                    ("name", k.name.clone()),
                    ("key", k.key.clone().unwrap_or_default()),
                    ("key_e2b", k.key_e2b.clone().unwrap_or_default()),
                ]);
                eprintln!("The key is shown only this once; store it now.");
            }
        }
        KeyCmd::Ls => {
            let mut all = Vec::new();
            let mut page = Page::default();
            loop {
                let p = client.key_list(&page).await?;
                all.extend(p.keys);
                match p.next_cursor {
                    Some(c) => page.cursor = Some(c),
                    None => break,
                }
            }
            if fmt == Format::Json {
                output::json(&all)?;
            } else {
                let rows = all
                    .iter()
                    .map(|k| {
                        vec![
                            k.id.clone(),
                            k.tenant_id.clone(),
                            k.role.clone(),
                            k.name.clone(),
                            output::time(k.created_at),
                            output::time_opt(k.revoked_at),
                        ]
                    })
                    .collect();
                output::table(
                    &["ID", "TENANT", "ROLE", "NAME", "CREATED", "REVOKED"],
                    rows,
                );
            }
        }
        KeyCmd::Revoke { id } => {
            client.key_revoke(&id).await?;
            println!("{id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A quota flag: `None` keeps the current limit, `Some(None)` lifts it.
fn limit<T: std::str::FromStr>(flag: &str, v: Option<String>, current: Option<T>) -> Option<T> {
    match v.as_deref() {
        None => current,
        Some("unlimited" | "none" | "null") => None,
        Some(s) => match s.parse() {
            Ok(n) => Some(n),
            Err(_) => usage(format!("--{flag} {s:?} must be a number or `unlimited`")),
        },
    }
}

pub async fn quota(a: QuotaArgs) -> Result<ExitCode> {
    let client = a.conn.client()?;
    let q = match a.cmd {
        QuotaCmd::Get { tenant } => client.quota_get(&tenant).await?,
        QuotaCmd::Set {
            tenant,
            max_sandboxes,
            max_cpu,
            max_memory_mb,
            max_timeout_s,
            max_exec_per_minute,
            max_concurrent_execs,
            allowed_providers,
            max_volumes,
            max_volume_mb,
            max_templates,
        } => {
            let cur = client.quota_get(&tenant).await?;
            let q = Quota {
                max_sandboxes: limit("max-sandboxes", max_sandboxes, cur.max_sandboxes),
                max_cpu: limit("max-cpu", max_cpu, cur.max_cpu),
                max_memory_mb: limit("max-memory-mb", max_memory_mb, cur.max_memory_mb),
                max_timeout_s: limit("max-timeout-s", max_timeout_s, cur.max_timeout_s),
                max_exec_per_minute: limit(
                    "max-exec-per-minute",
                    max_exec_per_minute,
                    cur.max_exec_per_minute,
                ),
                max_concurrent_execs: limit(
                    "max-concurrent-execs",
                    max_concurrent_execs,
                    cur.max_concurrent_execs,
                ),
                max_volumes: limit("max-volumes", max_volumes, cur.max_volumes),
                max_volume_mb: limit("max-volume-mb", max_volume_mb, cur.max_volume_mb),
                max_templates: limit("max-templates", max_templates, cur.max_templates),
                allowed_providers: match allowed_providers.as_deref() {
                    None => cur.allowed_providers,
                    Some("default") => None,
                    Some(list) => Some(
                        list.split(',')
                            .map(str::trim)
                            .filter(|p| !p.is_empty())
                            .map(str::to_owned)
                            .collect(),
                    ),
                },
            };
            client.quota_set(&tenant, &q).await?
        }
    };
    if a.conn.output == Format::Json {
        output::json(&q)?;
    } else {
        output::fields(vec![
            ("max_sandboxes", quota_cell(q.max_sandboxes)),
            ("max_cpu", quota_cell(q.max_cpu)),
            ("max_memory_mb", quota_cell(q.max_memory_mb)),
            ("max_timeout_s", quota_cell(q.max_timeout_s)),
            ("max_exec_per_minute", quota_cell(q.max_exec_per_minute)),
            ("max_concurrent_execs", quota_cell(q.max_concurrent_execs)),
            ("max_volumes", quota_cell(q.max_volumes)),
            ("max_volume_mb", quota_cell(q.max_volume_mb)),
            ("max_templates", quota_cell(q.max_templates)),
            (
                "allowed_providers",
                match &q.allowed_providers {
                    Some(list) => list.join(","),
                    None => "default".into(),
                },
            ),
        ]);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn audit(a: AuditArgs) -> Result<ExitCode> {
    let client = a.conn.client()?;
    let since = match a.since.as_deref() {
        None => None,
        Some(s) => match OffsetDateTime::parse(s, &Rfc3339) {
            Ok(t) => Some(t),
            Err(_) => usage(format!(
                "--since {s:?} must be an RFC 3339 time, e.g. 2026-01-02T15:04:05Z"
            )),
        },
    };
    let filter = AuditFilter {
        sandbox_id: a.sandbox,
        action: a.action,
        outcome: a.outcome,
        since,
        limit: Some(a.limit),
        cursor: None,
    };
    let list = client.audit_list(&filter).await?;
    if a.conn.output == Format::Json {
        output::json(&list)?;
    } else {
        let rows = list
            .events
            .iter()
            .map(|e| {
                vec![
                    output::time(e.ts),
                    e.action.clone(),
                    e.outcome.clone(),
                    e.status.to_string(),
                    output::opt(e.target.as_ref()),
                    output::opt(e.actor.key_id.as_ref()),
                    e.request_id.clone(),
                ]
            })
            .collect();
        output::table(
            &[
                "TIME", "ACTION", "OUTCOME", "STATUS", "TARGET", "KEY", "REQUEST",
            ],
            rows,
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn workers_table(list: &[Worker]) {
    let rows = list
        .iter()
        .map(|w| {
            // An unhealthy provider is marked `!`.
            let providers: Vec<String> = w
                .providers
                .iter()
                .map(|p| {
                    if p.healthy {
                        p.name.clone()
                    } else {
                        format!("{}!", p.name)
                    }
                })
                .collect();
            let labels: Vec<String> = w.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            vec![
                w.id.clone(),
                w.name.clone(),
                w.state.clone(),
                w.address.clone(),
                providers.join(","),
                labels.join(","),
                format!("{}/{}", w.sandboxes, w.capacity.sandboxes),
                output::time(w.last_heartbeat),
            ]
        })
        .collect();
    output::table(
        &[
            "ID",
            "NAME",
            "STATE",
            "ADDRESS",
            "PROVIDERS",
            "LABELS",
            "SANDBOXES",
            "HEARTBEAT",
        ],
        rows,
    );
}

pub async fn status(a: StatusArgs) -> Result<ExitCode> {
    let client = a.conn.client()?;
    let st = client.status().await?;
    if a.conn.output == Format::Json {
        output::json(&st)?;
        return Ok(ExitCode::SUCCESS);
    }
    let counts = st
        .sandboxes
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(s, n)| format!("{s}={n}"))
        .collect::<Vec<_>>();
    output::fields(vec![
        ("version", st.version.clone()),
        ("mode", st.mode.clone()),
        ("uptime", format!("{} s", st.uptime_s)),
        (
            "store",
            format!(
                "{} ({})",
                st.store.kind,
                if st.store.ok { "ok" } else { "unavailable" }
            ),
        ),
        (
            "sandboxes",
            if counts.is_empty() {
                "none".into()
            } else {
                counts.join(" ")
            },
        ),
    ]);
    println!();
    let rows = st
        .providers
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                if p.healthy { "yes" } else { "no" }.to_owned(),
                p.detail.clone(),
            ]
        })
        .collect();
    output::table(&["PROVIDER", "HEALTHY", "DETAIL"], rows);
    if !st.workers.is_empty() {
        println!();
        workers_table(&st.workers);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn workers(a: WorkersArgs) -> Result<ExitCode> {
    let client = a.conn.client()?;
    let fmt = a.conn.output;
    let list = match a.cmd {
        WorkersCmd::Ls => client.worker_list().await?,
        WorkersCmd::Get { id } => vec![client.worker_get(&id).await?],
        WorkersCmd::Drain { id } => vec![client.worker_drain(&id).await?],
        WorkersCmd::Undrain { id } => vec![client.worker_undrain(&id).await?],
        WorkersCmd::Token(cmd) => return worker_tokens(&client, fmt, cmd).await,
    };
    if a.conn.output == Format::Json {
        output::json(&list)?;
    } else {
        workers_table(&list);
    }
    Ok(ExitCode::SUCCESS)
}

async fn worker_tokens(
    client: &stacyvm_sdk::Client,
    fmt: Format,
    cmd: WorkerTokenCmd,
) -> Result<ExitCode> {
    let list = match cmd {
        WorkerTokenCmd::Create { name } => {
            let t = client.worker_token_create(&name).await?;
            if fmt != Format::Json {
                eprintln!(
                    "worker token {} created; its secret is shown this once. Start a worker with:\n  \
                     STACYVM_WORKER_TOKEN=<token> stacyvm worker --control-plane URL --listen ADDR",
                    t.id
                );
            }
            vec![t]
        }
        WorkerTokenCmd::Ls => client.worker_token_list().await?,
        WorkerTokenCmd::Rm { id } => {
            client.worker_token_revoke(&id).await?;
            if fmt == Format::Json {
                output::json(&serde_json::json!({"revoked": id}))?;
            } else {
                println!("revoked {id}");
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    if fmt == Format::Json {
        output::json(&list)?;
        return Ok(ExitCode::SUCCESS);
    }
    let rows = list
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.name.clone(),
                output::time(t.created_at),
                t.revoked_at.map(output::time).unwrap_or_else(|| "-".into()),
                t.token.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    output::table(&["ID", "NAME", "CREATED", "REVOKED", "TOKEN"], rows);
    Ok(ExitCode::SUCCESS)
}

/// Exits 0 when the server is live and ready; otherwise says why and exits 1.
pub async fn health(a: HealthArgs) -> Result<ExitCode> {
    let client = a.conn.client()?;
    let live = client.healthz().await?;
    let ready = client.readyz().await;
    let (ready_text, ok) = match &ready {
        Ok(h) => (h.status.clone(), true),
        Err(e) => (format!("not ready: {}", e.message()), false),
    };
    if a.conn.output == Format::Json {
        output::json(&serde_json::json!({"live": live.status, "ready": ok, "detail": ready_text}))?;
    } else {
        output::fields(vec![("live", live.status), ("ready", ready_text)]);
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
