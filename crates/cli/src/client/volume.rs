//! `stacyvm volume create|ls|get|rm`, and the `--volume NAME:/PATH[:ro]`
//! flag of `stacyvm sandbox create`.

use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand};
use stacyvm_sdk::{Volume, VolumeMount};

use super::output::{self, Format};
use super::{usage, Conn};

#[derive(Args)]
pub struct VolumeArgs {
    #[command(flatten)]
    conn: Conn,
    #[command(subcommand)]
    cmd: VolumeCmd,
}

#[derive(Subcommand)]
enum VolumeCmd {
    /// Create a volume of SIZE_MB MiB.
    Create {
        name: String,
        #[arg(long)]
        size_mb: i64,
    },
    /// List the tenant's volumes.
    Ls,
    /// Show one volume.
    Get { name: String },
    /// Delete a volume and its data (refused while a sandbox mounts it).
    Rm { name: String },
}

fn volumes(fmt: Format, list: &[Volume]) -> Result<()> {
    if fmt == Format::Json {
        return output::json(list);
    }
    let rows = list
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                format!("{} MiB", v.size_mb),
                v.id.clone(),
                output::time(v.created_at),
            ]
        })
        .collect();
    output::table(&["NAME", "SIZE", "ID", "CREATED"], rows);
    Ok(())
}

pub async fn run(a: VolumeArgs) -> Result<ExitCode> {
    let client = a.conn.client()?;
    let fmt = a.conn.output;
    match a.cmd {
        VolumeCmd::Create { name, size_mb } => {
            volumes(fmt, &[client.volume_create(&name, size_mb).await?])?
        }
        VolumeCmd::Ls => volumes(fmt, &client.volume_list().await?)?,
        VolumeCmd::Get { name } => volumes(fmt, &[client.volume_get(&name).await?])?,
        VolumeCmd::Rm { name } => {
            client.volume_delete(&name).await?;
            println!("{name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `NAME:/PATH` or `NAME:/PATH:ro`; the server checks the name and path.
pub fn parse_mounts(flags: &[String]) -> Vec<VolumeMount> {
    flags
        .iter()
        .map(|f| {
            let (spec, read_only) = match f.strip_suffix(":ro") {
                Some(rest) => (rest, true),
                None => (f.strip_suffix(":rw").unwrap_or(f), false),
            };
            match spec.split_once(':') {
                Some((volume, path)) if !volume.is_empty() && !path.is_empty() => VolumeMount {
                    volume: volume.to_owned(),
                    path: path.to_owned(),
                    read_only,
                },
                _ => usage(format!(
                    "--volume {f:?}: expected NAME:/PATH or NAME:/PATH:ro"
                )),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_flags_parse() {
        let m = parse_mounts(&["cache:/data".into(), "ref:/ref:ro".into()]);
        assert_eq!(m[0].volume, "cache");
        assert_eq!(m[0].path, "/data");
        assert!(!m[0].read_only);
        assert_eq!(
            (m[1].volume.as_str(), m[1].path.as_str(), m[1].read_only),
            ("ref", "/ref", true)
        );
    }
}
