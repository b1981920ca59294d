//! `stacyvm template build|ls|get|rm|logs`. A build reads a TOML file that
//! mirrors the JSON body of `POST /v1/templates`; its `upload` steps name a
//! local directory (`dir`, relative to the file) that is sent as a tar.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use clap::{Args, Subcommand};
use futures_util::StreamExt;
use stacyvm_sdk::{Client, CreateTemplate, Template, TemplateLogEvent, TemplateState};

use super::output::{self, Format};
use super::Conn;

#[derive(Args)]
pub struct TemplateArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: TemplateCmd,
}

#[derive(Subcommand)]
enum TemplateCmd {
    /// Build a new version of template NAME from a TOML file; shows the
    /// build's log and exits non-zero with the failing step's output.
    Build {
        name: String,
        /// The template file (`from`, `steps`, `env`, `workdir`, `start`, `ready`, …).
        #[arg(short = 'f', long = "file", default_value = "template.toml")]
        file: PathBuf,
        /// Return once the build has started instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// List the templates this key sees (the newest version of each).
    Ls,
    /// Show a template's newest version, or VERSION.
    Get {
        name: String,
        #[arg(long)]
        version: Option<i64>,
        /// Every version instead.
        #[arg(long, conflicts_with = "version")]
        all: bool,
    },
    /// Delete a template (sandboxes running from it keep running).
    Rm { name: String },
    /// Show a build's log, following it while the build runs.
    Logs {
        name: String,
        #[arg(long)]
        version: Option<i64>,
    },
}

fn state(s: TemplateState) -> &'static str {
    match s {
        TemplateState::Building => "building",
        TemplateState::Ready => "ready",
        TemplateState::Failed => "failed",
        TemplateState::Unknown => "unknown",
    }
}

fn templates(fmt: Format, list: &[Template]) -> Result<()> {
    if fmt == Format::Json {
        return output::json(list);
    }
    let rows = list
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.version.to_string(),
                state(t.state).to_owned(),
                t.from.clone(),
                t.image.clone().unwrap_or_else(|| "-".into()),
                output::time(t.created_at),
            ]
        })
        .collect();
    output::table(
        &["NAME", "VERSION", "STATE", "FROM", "IMAGE", "CREATED"],
        rows,
    );
    Ok(())
}

/// The build body from the TOML file: its tables as JSON, `upload` steps'
/// local `dir` packed into a base64 tar, the name from the command line.
pub fn read_template_file(path: &Path, name: &str) -> Result<CreateTemplate> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let table: toml::Table =
        toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    let mut body =
        serde_json::to_value(&table).context("turning the template file into a request")?;
    let base = path.parent().unwrap_or(Path::new("."));
    if let Some(steps) = body.get_mut("steps").and_then(|s| s.as_array_mut()) {
        for (i, step) in steps.iter_mut().enumerate() {
            let Some(upload) = step.get_mut("upload").and_then(|u| u.as_object_mut()) else {
                continue;
            };
            let dir = upload
                .remove("dir")
                .and_then(|d| d.as_str().map(str::to_owned))
                .ok_or_else(|| {
                    anyhow!(
                        "step {}: an upload needs dir = \"LOCAL DIRECTORY\" and path = \"/IN/THE/SANDBOX\"",
                        i + 1
                    )
                })?;
            let tar = pack_dir(&base.join(&dir))
                .with_context(|| format!("step {}: packing {dir}", i + 1))?;
            upload.insert(
                "tar".into(),
                base64::engine::general_purpose::STANDARD.encode(tar).into(),
            );
        }
    }
    match body.as_object_mut() {
        Some(o) => {
            o.insert("name".into(), name.into());
        }
        None => bail!("{} must be a TOML table", path.display()),
    }
    serde_json::from_value(body).with_context(|| format!("{}", path.display()))
}

/// A local directory as a tar archive, its contents at the archive's root.
fn pack_dir(dir: &Path) -> Result<Vec<u8>> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(false);
    b.append_dir_all(".", dir)?;
    Ok(b.into_inner()?)
}

/// Prints a build's log to stderr as it comes; the version's end state.
async fn follow(client: &Client, name: &str, version: Option<i64>) -> Result<Template> {
    let mut events = client.template_logs(name, version).await?;
    let mut err = std::io::stderr();
    while let Some(ev) = events.next().await {
        match ev? {
            TemplateLogEvent::Log(text) => {
                let _ = err.write_all(text.as_bytes());
                let _ = err.flush();
            }
            TemplateLogEvent::End { .. } => break,
        }
    }
    Ok(client.template_get(name, version).await?)
}

pub async fn run(a: TemplateArgs) -> Result<ExitCode> {
    let client = a.conn.client()?;
    let fmt = a.conn.output;
    match a.cmd {
        TemplateCmd::Build {
            name,
            file,
            no_wait,
        } => {
            let body = read_template_file(&file, &name)?;
            let started = client.template_build(&body).await?;
            if no_wait {
                templates(fmt, &[started])?;
                return Ok(ExitCode::SUCCESS);
            }
            let done = follow(&client, &name, Some(started.version)).await?;
            templates(fmt, std::slice::from_ref(&done))?;
            if done.state != TemplateState::Ready {
                eprintln!(
                    "stacyvm: the build of {name} version {} failed: {}",
                    done.version,
                    done.failure.as_deref().unwrap_or("no reason given")
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        TemplateCmd::Ls => templates(fmt, &client.template_list().await?)?,
        TemplateCmd::Get { name, version, all } => {
            if all {
                templates(fmt, &client.template_versions(&name).await?)?
            } else {
                templates(fmt, &[client.template_get(&name, version).await?])?
            }
        }
        TemplateCmd::Rm { name } => {
            client.template_delete(&name).await?;
            println!("{name}");
        }
        TemplateCmd::Logs { name, version } => {
            let mut events = client.template_logs(&name, version).await?;
            let mut out = std::io::stdout();
            while let Some(ev) = events.next().await {
                match ev? {
                    TemplateLogEvent::Log(text) => {
                        out.write_all(text.as_bytes())?;
                        out.flush()?;
                    }
                    TemplateLogEvent::End { state: s, .. } if s != TemplateState::Ready => {
                        return Ok(ExitCode::FAILURE);
                    }
                    TemplateLogEvent::End { .. } => {}
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
