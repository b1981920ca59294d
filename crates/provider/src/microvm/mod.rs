//! What every microVM launcher shares: the guest assets (kernel and
//! initramfs made by `scripts/build-guest.sh`), the ext4 root file system
//! made from a catalog image, the initramfs part that carries the agent,
//! the sandbox's settings disk, and the host side of the hybrid-vsock
//! handshake that reaches the agent inside the guest.
//!
//! The guest's init (in the initramfs) mounts the first disk as its root,
//! unpacks the second (a tar of [`settings_tar`]) into `/.stacyvm`, and
//! execs the agent there with `--init --vsock` [`AGENT_VSOCK_PORT`].

pub mod net;
pub mod vsock;

use std::io::Write;
use std::path::{Path, PathBuf};

use stacyvm_core::{validate_sandbox_path, Error, Result, SpawnSpec};

use crate::images::ImageCatalog;
use crate::sandboxing::short_hash;

/// The vsock port the agent listens on inside the guest.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Where the guest assets are unless `$STACYVM_GUEST_DIR` says otherwise.
pub const DEFAULT_GUEST_DIR: &str = "/var/lib/stacyvm/guest";
/// The environment variable naming the guest assets' directory.
pub const GUEST_DIR_ENV: &str = "STACYVM_GUEST_DIR";

/// The kernel and base initramfs a guest boots.
#[derive(Clone, Debug)]
pub struct GuestAssets {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

impl GuestAssets {
    /// The assets in `$STACYVM_GUEST_DIR`, or in [`DEFAULT_GUEST_DIR`].
    pub fn default_dir() -> PathBuf {
        std::env::var_os(GUEST_DIR_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_GUEST_DIR))
    }

    /// The assets in `dir`, or why they cannot be used.
    pub fn in_dir(dir: &Path) -> std::result::Result<GuestAssets, String> {
        let assets = GuestAssets {
            dir: dir.to_path_buf(),
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
        };
        for f in [&assets.kernel, &assets.initramfs] {
            if !f.is_file() {
                return Err(format!(
                    "the guest asset {} is missing; run scripts/build-guest.sh {}",
                    f.display(),
                    dir.display()
                ));
            }
        }
        Ok(assets)
    }
}

/// Finds an executable on `$PATH` or in `~/.cargo/bin` (where
/// `cargo install` puts vhost-device-vsock).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Where the ext4 image of the catalog image with `digest` is cached.
pub fn cached_rootfs(cache: &Path, digest: &str) -> PathBuf {
    let digest: String = digest
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    cache.join(format!("rootfs-{digest}.ext4"))
}

/// The backing file a qcow2 overlay names in its header, if any.
pub fn qcow2_backing(overlay: &Path) -> Option<PathBuf> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(overlay).ok()?;
    let mut head = [0u8; 20];
    f.read_exact(&mut head).ok()?;
    if &head[..4] != b"QFI\xfb" {
        return None;
    }
    let offset = u64::from_be_bytes(head[8..16].try_into().ok()?);
    let len = u32::from_be_bytes(head[16..20].try_into().ok()?);
    if offset == 0 || len == 0 || len > 4096 {
        return None;
    }
    let mut name = vec![0u8; len as usize];
    f.seek(SeekFrom::Start(offset)).ok()?;
    f.read_exact(&mut name).ok()?;
    Some(PathBuf::from(
        <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(name),
    ))
}

/// The ext4 image of catalog image `name`, built once per image digest
/// into `cache` and shared read-only by every sandbox (each writes to an
/// overlay of its own).
pub async fn ext4_rootfs(catalog: &ImageCatalog, name: &str, cache: &Path) -> Result<PathBuf> {
    // The rootfs first: its error for an unknown image is the API's.
    let rootfs = catalog.rootfs(name).await?;
    let info = catalog.get(name).await?;
    let out = cached_rootfs(cache, &info.digest);
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(cache)
        .map_err(|e| Error::internal(format!("creating {}", cache.display()), e))?;
    // Sparse: the size is room to write, not space taken.
    let size_mb = (info.size * 2 / (1024 * 1024)).max(1024) + 1024;
    let tmp = out.with_extension(format!("{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let output = tokio::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "stacyvm", "-E", "root_owner=0:0", "-d"])
        .arg(&rootfs)
        .arg(&tmp)
        .arg(format!("{size_mb}M"))
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            Error::ProviderUnavailable(format!(
                "cannot run mkfs.ext4 (install Debian's e2fsprogs): {e}"
            ))
        })?;
    if !output.status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Internal(format!(
            "mkfs.ext4 of image {name} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    std::fs::rename(&tmp, &out)
        .map_err(|e| Error::internal(format!("renaming {}", tmp.display()), e))?;
    Ok(out)
}

/// The initramfs a guest boots: an uncompressed part holding the agent,
/// then the base initramfs. The kernel unpacks concatenated archives in
/// order; the uncompressed one comes first because a part after a
/// compressed one must be compressed too. Cached per agent and base.
pub fn initrd_with_agent(assets: &GuestAssets, agent_bin: &Path, cache: &Path) -> Result<PathBuf> {
    let agent = std::fs::read(agent_bin)
        .map_err(|e| Error::internal(format!("reading {}", agent_bin.display()), e))?;
    let base = std::fs::read(&assets.initramfs)
        .map_err(|e| Error::internal(format!("reading {}", assets.initramfs.display()), e))?;
    let out = cache.join(format!(
        "initrd-{}-{}",
        &short_hash(&agent)[..12],
        &short_hash(&base)[..12]
    ));
    if out.is_file() {
        return Ok(out);
    }
    std::fs::create_dir_all(cache)
        .map_err(|e| Error::internal(format!("creating {}", cache.display()), e))?;
    let mut bytes = Vec::with_capacity(agent.len() + base.len() + 1024);
    cpio_entry(&mut bytes, "stacyvm-agent", 0o100555, &agent);
    cpio_entry(&mut bytes, "TRAILER!!!", 0, &[]);
    while !bytes.len().is_multiple_of(512) {
        bytes.push(0);
    }
    bytes.extend_from_slice(&base);
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, &bytes)
        .and_then(|()| std::fs::rename(&tmp, &out))
        .map_err(|e| Error::internal(format!("writing {}", out.display()), e))?;
    Ok(out)
}

/// Appends one entry of a `newc` cpio archive.
fn cpio_entry(out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]) {
    let fields = [
        0u32, // ino
        mode,
        0, // uid
        0, // gid
        1, // nlink
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        0, // rdevmajor
        0, // rdevminor
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
    out.extend_from_slice(data);
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The tag of a guest's `i`th shared directory (a volume), which its init
/// mounts by.
pub fn share_tag(i: usize) -> String {
    format!("stacyvm-vol{i}")
}

/// A guest NIC's settings: its lease, and what it resolves names with.
pub struct NicSettings<'a> {
    pub lease: &'a net::GuestNet,
    /// An address on the guest's link besides its gateway (the DNS filter
    /// of a guest with an allow list), reached through a host route.
    pub on_link: Option<std::net::Ipv4Addr>,
    /// The guest's `/etc/resolv.conf`.
    pub resolv_conf: String,
}

/// The sandbox's settings as a tar the guest's init unpacks into
/// `/.stacyvm`: `env` (the agent's `--env-file`: NAME=VALUE entries,
/// NUL-separated), `workdir`, `hostname` and, for a guest with a NIC,
/// `net` (its address and gateway, [`net::GuestNet::guest_config`], and
/// the on-link address if any) and `resolv.conf` (which the init puts in
/// place of the image's), and for a guest with volumes `volumes`: a line
/// `TAG ro|rw PATH` per `spec.mounts` entry, in order ([`share_tag`]). Bad
/// names are refused here, before anything boots.
pub fn settings_tar(spec: &SpawnSpec, nic: Option<&NicSettings>) -> Result<Vec<u8>> {
    let mut env = Vec::new();
    for (k, v) in &spec.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(Error::InvalidRequest(format!(
                "environment variable {k:?}: names must be non-empty without '=' or NUL, values \
                 without NUL"
            )));
        }
        env.extend_from_slice(k.as_bytes());
        env.push(b'=');
        env.extend_from_slice(v.as_bytes());
        env.push(0);
    }
    let workdir = match spec.workdir.as_deref() {
        Some(w) => {
            let w = validate_sandbox_path(w)?;
            if w.contains('\n') {
                return Err(Error::InvalidRequest("workdir holds a newline".into()));
            }
            w
        }
        None => String::new(),
    };
    let hostname = format!(
        "sbx-{}",
        &short_hash(spec.sandbox_id.as_str().as_bytes())[..8]
    );
    let net = nic.map(|n| {
        let mut line = n.lease.guest_config();
        if let Some(a) = n.on_link {
            line = format!("{} {a}\n", line.trim_end());
        }
        line
    });
    let mut volumes = String::new();
    for (i, m) in spec.mounts.iter().enumerate() {
        let path = validate_sandbox_path(&m.target)?;
        if path.contains('\n') {
            return Err(Error::InvalidRequest(format!(
                "mount path {path:?} holds a newline"
            )));
        }
        let mode = if m.read_only { "ro" } else { "rw" };
        volumes.push_str(&format!("{} {mode} {path}\n", share_tag(i)));
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut entries = vec![
        ("env", env.as_slice()),
        ("workdir", workdir.as_bytes()),
        ("hostname", hostname.as_bytes()),
    ];
    if !volumes.is_empty() {
        entries.push(("volumes", volumes.as_bytes()));
    }
    if let (Some(net), Some(nic)) = (&net, nic) {
        entries.push(("net", net.as_bytes()));
        entries.push(("resolv.conf", nic.resolv_conf.as_bytes()));
    }
    for (name, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o600);
        h.set_cksum();
        b.append_data(&mut h, name, data)
            .map_err(|e| Error::internal("building the settings disk", e))?;
    }
    let mut out = b
        .into_inner()
        .map_err(|e| Error::internal("building the settings disk", e))?;
    // A disk is whole sectors.
    while !out.len().is_multiple_of(512) {
        out.push(0);
    }
    out.flush().ok();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_named() {
        let mut b = Vec::new();
        cpio_entry(&mut b, "stacyvm-agent", 0o100555, b"abc");
        assert_eq!(&b[..6], b"070701");
        assert_eq!(b.len() % 4, 0);
        assert!(b.windows(14).any(|w| w == b"stacyvm-agent\0"));
    }

    fn test_spec() -> SpawnSpec {
        crate::SpawnSpec {
            sandbox_id: stacyvm_core::SandboxId::generate(),
            image: "busybox".into(),
            cpu: 1.0,
            memory_mb: 256,
            env: Default::default(),
            workdir: Some("/work".into()),
            network: Default::default(),
            labels: Default::default(),
            mounts: Vec::new(),
            egress_allow: Vec::new(),
        }
    }

    #[test]
    fn settings_refuse_bad_env_names() {
        let mut spec = test_spec();
        spec.env.insert("A".into(), "b c".into());
        let t = settings_tar(&spec, None).unwrap();
        assert_eq!(t.len() % 512, 0);
        spec.env.insert("X=Y".into(), "1".into());
        assert!(matches!(
            settings_tar(&spec, None),
            Err(Error::InvalidRequest(_))
        ));
    }

    #[test]
    fn settings_carry_the_guest_network_only_when_there_is_one() {
        let spec = test_spec();
        let names = |t: Vec<u8>| -> Vec<String> {
            tar::Archive::new(t.as_slice())
                .entries()
                .unwrap()
                .map(|e| e.unwrap().path().unwrap().display().to_string())
                .collect()
        };
        assert!(!names(settings_tar(&spec, None).unwrap()).contains(&"net".to_string()));
        let n = net::GuestNet {
            netns: "svmq-x".into(),
            slot: 3,
        };
        let read = |t: Vec<u8>, name: &str| {
            let mut a = tar::Archive::new(t.as_slice());
            let mut found = None;
            for e in a.entries().unwrap() {
                let mut e = e.unwrap();
                if e.path().unwrap().to_str() == Some(name) {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut e, &mut s).unwrap();
                    found = Some(s);
                }
            }
            found
        };
        let mut nic = NicSettings {
            lease: &n,
            on_link: None,
            resolv_conf: "nameserver 192.0.2.53\n".into(),
        };
        let t = settings_tar(&spec, Some(&nic)).unwrap();
        assert_eq!(
            read(t.clone(), "net").as_deref(),
            Some("10.213.0.14/30 10.213.0.13\n")
        );
        assert_eq!(
            read(t, "resolv.conf").as_deref(),
            Some("nameserver 192.0.2.53\n")
        );
        let mut with_volumes = test_spec();
        with_volumes.mounts = vec![
            stacyvm_core::HostMount {
                source: "/srv/a".into(),
                target: "/data".into(),
                read_only: false,
            },
            stacyvm_core::HostMount {
                source: "/srv/b".into(),
                target: "/opt/my ref".into(),
                read_only: true,
            },
        ];
        assert_eq!(
            read(settings_tar(&with_volumes, None).unwrap(), "volumes").as_deref(),
            Some("stacyvm-vol0 rw /data\nstacyvm-vol1 ro /opt/my ref\n")
        );
        assert_eq!(read(settings_tar(&spec, None).unwrap(), "volumes"), None);
        nic.on_link = Some(std::net::Ipv4Addr::new(169, 254, 53, 53));
        assert_eq!(
            read(settings_tar(&spec, Some(&nic)).unwrap(), "net").as_deref(),
            Some("10.213.0.14/30 10.213.0.13 169.254.53.53\n")
        );
    }
}
