//! Host setup shared by `stacyvm serve` and `stacyvm worker`: the data dir,
//! the identifiers persisted in it, and the providers named on the command
//! line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::docker::{DockerConfig, DockerProvider};
use crate::images::ImageCatalog;
use crate::namespaces::{NamespacesConfig, NamespacesProvider};
use crate::plugin::{self, PluginConfig, PluginProvider, PluginTiming};
use crate::proot::{ProotConfig, ProotProvider};
use crate::{DynProvider, Error, Result};

/// What the providers of a host are built with besides their names.
#[derive(Clone, Debug)]
pub struct HostOptions {
    pub data_dir: PathBuf,
    /// Docker sandboxes with egress may reach this host's own addresses.
    pub egress_host_access: bool,
    /// Where the DNS filter of Docker and namespaces sandboxes with an
    /// allow list forwards listed names; empty: the host's resolvers (`/etc/resolv.conf`).
    pub egress_dns_upstreams: Vec<std::net::SocketAddr>,
    /// Plugin executables by name (`--plugin NAME=PATH`); a `plugin:NAME`
    /// provider not named here runs `DATA_DIR/plugins/NAME`.
    pub plugins: BTreeMap<String, PathBuf>,
    /// The firecracker binary (`--firecracker-bin`); unset:
    /// [`crate::firecracker::default_binary`].
    pub firecracker_bin: Option<PathBuf>,
}

/// A short identifier persisted in the data dir: it names this host's
/// runtimes (Docker labels) and its worker, across restarts.
pub fn persistent_id(dir: &Path, file: &str, make: impl FnOnce() -> String) -> Result<String> {
    let path = dir.join(file);
    if let Ok(s) = std::fs::read_to_string(&path) {
        let s = s.trim();
        if !s.is_empty() {
            return Ok(s.to_owned());
        }
    }
    let id = make();
    std::fs::write(&path, format!("{id}\n"))
        .map_err(|e| Error::internal(format!("writing {}", path.display()), e))?;
    Ok(id)
}

/// Creates the data dir readable by the server alone (it holds the
/// database with every sandbox's env, `admin.key` and the images), and
/// narrows an existing one that others could read.
pub fn prepare_data_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::internal(format!("creating the data dir {}", dir.display()), e))?;
    let meta = std::fs::metadata(dir)
        .map_err(|e| Error::internal(format!("reading the data dir {}", dir.display()), e))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 == 0 {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me || mode & 0o1000 != 0 {
        return Err(Error::InvalidRequest(format!(
            "the data dir {} is shared (mode {mode:o}, owner {}): give StacyVM a directory of \
             its own (--data-dir)",
            dir.display(),
            meta.uid()
        )));
    }
    tracing::warn!(dir = %dir.display(), mode = %format!("{mode:o}"), "narrowing the data dir to mode 0700");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| Error::internal(format!("narrowing the data dir {}", dir.display()), e))
}

/// Mount points at or under `dir` in this process's mount namespace, from
/// `/proc/self/mountinfo` (never by looking inside a directory, which a
/// sandbox may have filled), deepest first: the order to unmount them in.
pub fn mounts_under(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(unescape_mountinfo(m)))
        .filter(|m| m.starts_with(dir))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    found.dedup();
    Ok(found)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let parsed = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok());
            if let Some(v) = parsed {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The providers named in `names`, in that order, on this host. One that
/// may serve only once certified here ([`crate::certify::needs_certification`])
/// and has no passing record is built as an unhealthy stand-in saying so.
pub fn build_providers(
    names: &[String],
    options: &HostOptions,
    catalog: &Arc<ImageCatalog>,
    instance: &str,
) -> Result<Vec<DynProvider>> {
    build(names, options, catalog, instance, Gate::Records)
}

/// [`build_providers`] without the certification gate, for `stacyvm
/// certify`, which builds the providers the way `serve` does in order to
/// certify them.
pub fn build_providers_to_certify(
    names: &[String],
    options: &HostOptions,
    catalog: &Arc<ImageCatalog>,
    instance: &str,
) -> Result<Vec<DynProvider>> {
    build(names, options, catalog, instance, Gate::Off)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Gate {
    Records,
    Off,
}

fn build(
    names: &[String],
    options: &HostOptions,
    catalog: &Arc<ImageCatalog>,
    instance: &str,
    gate: Gate,
) -> Result<Vec<DynProvider>> {
    let mut out: Vec<DynProvider> = Vec::new();
    if names.is_empty() {
        return Ok(out);
    }
    let agent_bin = crate::agent_binary_path()?;
    for name in options.plugins.keys() {
        let enabled = format!("{}{name}", plugin::PREFIX);
        if !names.contains(&enabled) {
            tracing::warn!(plugin = %name, "a plugin is registered but not enabled: add {enabled} to --providers to use it");
        }
    }
    for name in names {
        if let Some(plugin_name) = plugin::plugin_name(name) {
            let executable = plugin::locate(
                &options.data_dir,
                plugin_name,
                options.plugins.get(plugin_name).map(|p| p.as_path()),
            )?;
            out.push(Arc::new(PluginProvider::new(PluginConfig {
                name: plugin_name.to_owned(),
                executable,
                args: Vec::new(),
                env: Vec::new(),
                data_dir: options.data_dir.clone(),
                agent_bin: agent_bin.clone(),
                catalog: catalog.clone(),
                instance: instance.to_owned(),
                timing: PluginTiming::default(),
            })?));
            continue;
        }
        match name.as_str() {
            "docker" => out.push(Arc::new(DockerProvider::new(DockerConfig {
                data_dir: options.data_dir.clone(),
                agent_bin: agent_bin.clone(),
                catalog: catalog.clone(),
                instance: instance.to_owned(),
                pids_limit: 512,
                egress_host_access: options.egress_host_access,
                egress_dns_upstreams: options.egress_dns_upstreams.clone(),
            })?)),
            "namespaces" => out.push(Arc::new(
                NamespacesProvider::new(NamespacesConfig {
                    data_dir: options.data_dir.clone(),
                    agent_bin: agent_bin.clone(),
                    catalog: catalog.clone(),
                    instance: instance.to_owned(),
                    egress_dns_upstreams: options.egress_dns_upstreams.clone(),
                })?
                // The operator accepts sandboxes whose limits the server
                // cannot enforce (rootless, or a controller missing).
                .allow_unenforced_limits(
                    std::env::var(crate::namespaces::UNENFORCED_LIMITS_ENV)
                        .is_ok_and(|v| v == "allow"),
                ),
            )),
            "qemu" => {
                let qemu: DynProvider =
                    Arc::new(crate::qemu::QemuProvider::new(crate::qemu::QemuConfig {
                        data_dir: options.data_dir.clone(),
                        agent_bin: agent_bin.clone(),
                        catalog: catalog.clone(),
                        instance: instance.to_owned(),
                        guest_dir: crate::microvm::GuestAssets::default_dir(),
                        egress_dns_upstreams: options.egress_dns_upstreams.clone(),
                    })?);
                // In KVM mode it serves only where it was certified.
                out.push(match gate {
                    Gate::Records => crate::certify::gated(qemu, &options.data_dir),
                    Gate::Off => qemu,
                })
            }
            "proot" => out.push(Arc::new(ProotProvider::new(ProotConfig {
                data_dir: options.data_dir.clone(),
                agent_bin: agent_bin.clone(),
                catalog: catalog.clone(),
                instance: instance.to_owned(),
            })?)),
            // Enabled only on a host where it passed `stacyvm certify`;
            // unhealthy with the reason otherwise.
            "firecracker" => {
                let fc: DynProvider = Arc::new(crate::firecracker::FirecrackerProvider::new(
                    crate::firecracker::FirecrackerConfig {
                        data_dir: options.data_dir.clone(),
                        agent_bin: agent_bin.clone(),
                        catalog: catalog.clone(),
                        instance: instance.to_owned(),
                        guest_dir: crate::microvm::GuestAssets::default_dir(),
                        firecracker_bin: options
                            .firecracker_bin
                            .clone()
                            .unwrap_or_else(crate::firecracker::default_binary),
                        egress_dns_upstreams: options.egress_dns_upstreams.clone(),
                    },
                )?);
                out.push(match gate {
                    Gate::Records => crate::certify::gated(fc, &options.data_dir),
                    Gate::Off => fc,
                })
            }
            other => {
                return Err(Error::InvalidRequest(format!(
                    "unknown provider {other:?}; available: docker, namespaces, proot, qemu, \
                     firecracker, plugin:NAME"
                )))
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod mount_tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\"), "/end\\");
    }

    #[test]
    fn mounts_under_the_root_include_it_and_come_deepest_first() {
        let all = mounts_under(Path::new("/")).expect("mountinfo");
        assert!(all.iter().any(|m| m == Path::new("/")), "{all:?}");
        let depths: Vec<usize> = all.iter().map(|m| m.components().count()).collect();
        assert!(depths.windows(2).all(|w| w[0] >= w[1]), "{all:?}");
        assert!(mounts_under(Path::new("/no/such/dir"))
            .expect("mountinfo")
            .is_empty());
    }
}
