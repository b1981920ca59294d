//! Server configuration: what `stacyvm serve` was started with, and the
//! defaults a user gets without saying anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use stacyvm_core::{Error, Result, TenantId};

/// Everything the control plane and its local worker need to start.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// `sqlite://PATH` or `postgres://…`; `sqlite://DATA_DIR/stacyvm.db` by default.
    pub store_url: String,
    /// Providers in preference order (`docker`, `namespaces`, `proot`,
    /// `plugin:NAME`).
    pub providers: Vec<String>,
    /// Plugin executables by name (`--plugin NAME=PATH`); a `plugin:NAME`
    /// provider not named here runs `DATA_DIR/plugins/NAME`.
    pub plugins: std::collections::BTreeMap<String, PathBuf>,
    /// The quota a tenant starts with when it is created (the operator's
    /// own tenant has none: it is unlimited).
    pub default_tenant_quota: stacyvm_store::Quota,
    /// Run the in-process worker (single-node mode).
    pub local_worker: bool,
    /// The CA (PEM file) that signed remote workers' TLS certificates
    /// (`--worker-ca`); workers registered with `https://` addresses are
    /// reached with it. `None`: such workers cannot be reached (there is no
    /// trust in system roots for the worker RPC).
    pub worker_ca: Option<PathBuf>,
    pub limits: Limits,
    /// The bootstrap admin key (`STACYVM_ADMIN_KEY`); generated into
    /// `DATA_DIR/admin.key` when absent.
    pub admin_key: Option<String>,
    /// How often reconcilers run.
    pub reconcile_interval: Duration,
    /// Warm pools to keep filled.
    pub pools: Vec<PoolSpec>,
    /// How HTTP connections are accepted, timed out and attributed.
    pub http: HttpConfig,
    /// Whether Docker egress sandboxes may open connections to the host
    /// itself (`--egress-host-access`); by default they reach other
    /// machines only.
    pub egress_host_access: bool,
    /// Where the DNS filter of Docker and namespaces sandboxes with an
    /// allow list forwards the listed names (`--egress-dns-upstream`); empty: the host's
    /// resolvers from `/etc/resolv.conf`.
    pub egress_dns_upstreams: Vec<std::net::SocketAddr>,
    /// The firecracker binary (`--firecracker-bin`); unset:
    /// `$STACYVM_FIRECRACKER_BIN` or `firecracker` on `PATH`.
    pub firecracker_bin: Option<PathBuf>,
    /// Images straight from the Docker daemon that every tenant may run
    /// (`--docker-images`). Without a match, tenants run catalog images
    /// only; the operator's own tenant may run any daemon image.
    pub docker_images: Vec<ImagePattern>,
    /// The E2B-compatible API.
    pub e2b: E2bConfig,
}

/// How the E2B-compatible API (`/sandboxes`, envd) behaves.
#[derive(Clone, Debug, Default)]
pub struct E2bConfig {
    /// The image E2B's `base` template runs (`--e2b-default-template`).
    /// Unset: `base` is refused as not found, naming the flag.
    pub default_template: Option<String>,
    /// The domain sandbox hosts are named under
    /// (`49983-<id>.<domain>`), reported to clients as the sandbox's
    /// `domain` (`--e2b-domain`).
    pub domain: Option<String>,
}

/// A glob over Docker image references (`python:3.12*`, `team/*`): `*`
/// matches any run of characters, `?` one, `[abc]` a set.
///
/// Only plain `[registry/]name[:tag]` references match, never one that
/// Docker could resolve to an image of another name: one with a digest
/// (Docker ignores the tag when a digest is given), an image id
/// (`sha256:<id>`), or a tagless hex string (Docker looks it up as the
/// prefix of an image id when no image has that name). Nor does anything
/// that is not a well-formed reference.
#[derive(Clone, Debug)]
pub struct ImagePattern {
    text: String,
    matcher: globset::GlobMatcher,
}

impl ImagePattern {
    pub fn parse(text: &str) -> stacyvm_core::Result<ImagePattern> {
        let bad = |why: &str| {
            stacyvm_core::Error::InvalidRequest(format!(
                "Docker image pattern {text:?} is invalid: {why} (patterns look like \"python:3.12*\" or \"team/*\")"
            ))
        };
        if text.is_empty() || text.len() > 512 {
            return Err(bad("it must be 1 to 512 characters"));
        }
        if text.contains('@') {
            return Err(bad(
                "digests are not allowed: with a digest, Docker ignores the name's tag",
            ));
        }
        if !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-/:*?[]!".contains(&b))
        {
            return Err(bad("only letters, digits, '.', '_', '-', '/', ':' and the wildcards * ? [ ] are allowed"));
        }
        let glob = globset::GlobBuilder::new(text)
            .literal_separator(false)
            .build()
            .map_err(|e| bad(&e.kind().to_string()))?;
        Ok(ImagePattern {
            text: text.to_owned(),
            matcher: glob.compile_matcher(),
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the pattern lets tenants run `image` from the Docker daemon.
    pub fn allows(&self, image: &str) -> bool {
        is_plain_reference(image) && self.matcher.is_match(image)
    }
}

/// `[host[:port]/]path[:tag]`, the reference grammar Docker accepts, with
/// no digest: path components of lowercase letters and digits joined by
/// single separators (`.`, `_`, `__`, `-`…), a tag of at most 128 word
/// characters, dots and dashes not starting with either. Image ids and
/// what Docker would take for the prefix of one are not plain.
fn is_plain_reference(image: &str) -> bool {
    if image.is_empty() || image.len() > 255 || image.contains('@') {
        return false;
    }
    let (name, tag) = match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => (&image[..i], Some(&image[i + 1..])),
        _ => (image, None),
    };
    if name == "sha256" || (tag.is_none() && name.bytes().all(|b| b.is_ascii_hexdigit())) {
        return false;
    }
    if let Some(tag) = tag {
        let mut bytes = tag.bytes();
        let first_ok = bytes
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !first_ok
            || tag.len() > 128
            || !bytes.all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return false;
        }
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.len() > 1 {
        let first = parts[0];
        if first.contains('.') || first.contains(':') || first == "localhost" {
            if !is_registry_host(first) {
                return false;
            }
            parts.remove(0);
        }
    }
    parts.iter().all(|c| is_path_component(c))
}

fn is_registry_host(host: &str) -> bool {
    let (name, port) = match host.split_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    let name_ok = name.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !label.starts_with('-')
            && !label.ends_with('-')
    });
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()));
    name_ok && port_ok
}

fn is_path_component(c: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bytes = c.as_bytes();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return false;
    }
    // Separators: one '.', one or two '_', or any number of '-'.
    let mut run = String::new();
    for &b in bytes {
        if alnum(b) {
            if !(run.is_empty()
                || run == "."
                || run == "_"
                || run == "__"
                || run.bytes().all(|r| r == b'-'))
            {
                return false;
            }
            run.clear();
        } else if b"._-".contains(&b) {
            run.push(b as char);
        } else {
            return false;
        }
    }
    true
}

/// The HTTP front: connection limits and timeouts, which peers may speak
/// for a client, and what needs a key.
#[derive(Clone, Debug)]
pub struct HttpConfig {
    /// A client must send a whole request head within this time: from the
    /// connection's start, or from the first byte of a later request.
    pub header_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after
    /// this long without a new one.
    pub idle_timeout: Duration,
    /// Connections served at once; further ones wait in the listen backlog
    /// until one closes.
    pub max_connections: usize,
    /// Peers whose `X-Forwarded-For` names the client (load balancers,
    /// reverse proxies). Everyone else's is ignored.
    pub trusted_proxies: Vec<crate::http::client_addr::Cidr>,
    /// Serve `/metrics` without a key (for scrapers on a trusted network).
    pub metrics_public: bool,
    /// The domain of host-form port URLs, `{port}-{id}.DOMAIN`; without
    /// it, ports are reached by the path form only.
    pub proxy_domain: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            trusted_proxies: Vec::new(),
            metrics_public: false,
            proxy_domain: None,
        }
    }
}

/// Request limits and defaults.
#[derive(Clone, Debug)]
pub struct Limits {
    pub json_body_bytes: usize,
    pub upload_bytes: u64,
    pub exec_output_cap: u64,
    pub default_exec_timeout: Duration,
    pub max_exec_timeout: Duration,
    pub default_sandbox_timeout_s: i64,
    pub max_sandbox_timeout_s: i64,
    pub default_cpu: f64,
    pub max_cpu: f64,
    pub default_memory_mb: i64,
    pub min_memory_mb: i64,
    pub max_memory_mb: i64,
    /// Limit for calls that are not streams or uploads.
    pub request_timeout: Duration,
    /// How long a worker's lease on a sandbox lasts without renewal (the
    /// lease TTL, `--lease-ttl`): a worker silent this long is `down` and
    /// its sandboxes `lost`. Leases are renewed every third of it.
    pub lease: Duration,
    /// Failed authentication attempts one address may make per minute
    /// before it is refused with 429.
    pub auth_failures_per_minute: i64,
    /// Execs (and streaming execs) one sandbox may run at once.
    pub max_execs_per_sandbox: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            json_body_bytes: 10 * 1024 * 1024,
            upload_bytes: 1024 * 1024 * 1024,
            exec_output_cap: stacyvm_core::exec::DEFAULT_OUTPUT_CAP,
            default_exec_timeout: Duration::from_secs(60),
            max_exec_timeout: Duration::from_secs(24 * 3600),
            default_sandbox_timeout_s: 300,
            max_sandbox_timeout_s: 7 * 24 * 3600,
            default_cpu: 1.0,
            max_cpu: 64.0,
            default_memory_mb: 512,
            min_memory_mb: 16,
            max_memory_mb: 256 * 1024,
            request_timeout: Duration::from_secs(120),
            lease: Duration::from_secs(15),
            auth_failures_per_minute: 120,
            max_execs_per_sandbox: 32,
        }
    }
}

/// Providers that are not a security boundary, whatever a worker reports:
/// never chosen for a create that does not name them, and usable only by
/// tenants whose quota lists them in `allowed_providers`. Workers add the
/// providers that say so themselves (`Provider::security_boundary`: plugins
/// that do not declare one).
pub const RESTRICTED_PROVIDERS: [&str; 1] = ["proot"];

/// What a new tenant may use unless the operator says otherwise: 10 live
/// sandboxes, 8 CPUs, 16 GiB, a day per sandbox, 600 execs a minute and 100
/// at once, 10 volumes holding 10 GiB in all (volume space is real disk,
/// allocated at create; snapshot and template images count against it too)
/// and 20 templates.
pub fn default_tenant_quota() -> stacyvm_store::Quota {
    stacyvm_store::Quota {
        max_sandboxes: Some(10),
        max_cpu: Some(8.0),
        max_memory_mb: Some(16 * 1024),
        max_timeout_s: Some(24 * 3600),
        max_exec_per_minute: Some(600),
        allowed_providers: None,
        max_concurrent_execs: Some(100),
        max_volumes: Some(10),
        max_volume_mb: Some(10 * 1024),
        max_templates: Some(20),
    }
}

impl ServerConfig {
    /// The defaults for a data dir: listen on 127.0.0.1:7070, SQLite in the
    /// data dir, the Docker and namespaces providers.
    pub fn new(data_dir: PathBuf) -> ServerConfig {
        let store_url = format!("sqlite://{}", data_dir.join("stacyvm.db").display());
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir,
            store_url,
            providers: vec!["docker".into(), "namespaces".into()],
            plugins: Default::default(),
            default_tenant_quota: default_tenant_quota(),
            local_worker: true,
            worker_ca: None,
            limits: Limits::default(),
            admin_key: None,
            reconcile_interval: Duration::from_secs(1),
            pools: Vec::new(),
            http: HttpConfig::default(),
            egress_host_access: false,
            firecracker_bin: None,
            egress_dns_upstreams: Vec::new(),
            docker_images: Vec::new(),
            e2b: E2bConfig::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warm_pools_name_an_image_or_a_template() {
        let p = PoolSpec::parse("docker:busybox=4").expect("an image pool");
        assert_eq!(
            (p.image.as_str(), p.size, p.template()),
            ("busybox", 4, None)
        );
        let t = PoolSpec::parse("docker:template/py=2").expect("a template pool");
        assert_eq!(t.template(), Some((None, "py")));
        let tenant = TenantId::generate();
        let own = PoolSpec::parse(&format!("docker:template/{tenant}/py=1")).expect("a tenant's");
        assert_eq!(own.template(), Some((Some(tenant), "py")));
        for bad in [
            "docker:template/py:3=2",
            "docker:template/Py=2",
            "docker:template/not-a-tenant/py=2",
            "docker:template/=2",
        ] {
            assert!(PoolSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn image_patterns_match_plain_references_only() {
        let p = |t: &str| ImagePattern::parse(t).expect("a valid pattern");
        let py = p("python:3.12*");
        for ok in ["python:3.12", "python:3.12-slim", "python:3.12.1"] {
            assert!(py.allows(ok), "{ok}");
        }
        for no in [
            "python",
            "python:3.11",
            "postgres:3.12",
            "python:3.12@sha256:0123456789abcdef",
            "python:3.12/../../postgres",
            "python:3.12 ",
        ] {
            assert!(!py.allows(no), "{no}");
        }
        let team = p("registry.example.com:5000/team/*");
        assert!(team.allows("registry.example.com:5000/team/app:v1"));
        assert!(team.allows("registry.example.com:5000/team/tools/app"));
        assert!(!team.allows("registry.example.com:5000/other/app"));
        assert!(!team.allows("registry.example.com:5000/team/App"));
        assert!(!team.allows("registry.example.com:5000/team/a..b"));
        let all = p("*");
        for ok in [
            "busybox",
            "stacyvm-test/busybox:latest",
            "a__b/c-d.e:1_2",
            "localhost/x",
            "cafe:latest",
        ] {
            assert!(all.allows(ok), "{ok}");
        }
        for no in [
            "",
            "Busybox",
            "x@sha256:00",
            "-x",
            "x/",
            "/x",
            "x//y",
            "x:",
            "x:-1",
            "x:.1",
            "x___y",
            "x/../y",
            "bad host:1/x",
            "cafe",
            "08d3481",
            "sha256:08d3481553378d2f325848e36c46673f78c3e43e7308688b4e97383408caa1a2",
        ] {
            assert!(!all.allows(no), "{no:?}");
        }
    }

    #[test]
    fn bad_image_patterns_are_refused() {
        for bad in ["", "x@sha256:*", "a b", "x{y,z}", "[", "x\\y"] {
            assert!(ImagePattern::parse(bad).is_err(), "{bad:?}");
        }
    }
}

/// One pool: `size` idle sandboxes of `image` on `provider`. An image of
/// `template/NAME` names the operator's template NAME (the public catalog),
/// `template/TENANT/NAME` a tenant's own: the pool holds sandboxes of its
/// newest ready version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolSpec {
    pub provider: String,
    pub image: String,
    pub size: usize,
}

impl PoolSpec {
    /// Parses `PROVIDER:IMAGE=N`, e.g. `docker:busybox=4`.
    pub fn parse(s: &str) -> Result<PoolSpec> {
        let bad = || {
            Error::InvalidRequest(format!(
                "warm pool {s:?} must look like PROVIDER:IMAGE=N, e.g. docker:busybox=4"
            ))
        };
        let (head, n) = s.rsplit_once('=').ok_or_else(bad)?;
        let (provider, image) = head.split_once(':').ok_or_else(bad)?;
        let size: usize = n.trim().parse().map_err(|_| bad())?;
        if provider.is_empty() || image.is_empty() || size > 1024 {
            return Err(bad());
        }
        let spec = PoolSpec {
            provider: provider.to_owned(),
            image: image.to_owned(),
            size,
        };
        if image.starts_with("template/") && spec.template().is_none() {
            return Err(Error::InvalidRequest(format!(
                "warm pool {s:?}: a template's pool is PROVIDER:template/NAME=N (the operator's \
                 template) or PROVIDER:template/TENANT/NAME=N, with a template name of a-z, 0-9, \
                 '.', '_', '-' and no version (the pool follows the newest ready one)"
            )));
        }
        Ok(spec)
    }

    /// For a template's pool: the tenant whose template it is (`None`: the
    /// operator's) and the template's name.
    pub fn template(&self) -> Option<(Option<TenantId>, &str)> {
        let rest = self.image.strip_prefix("template/")?;
        let (tenant, name) = match rest.split_once('/') {
            Some((t, n)) => (Some(TenantId::parse(t)?), n),
            None => (None, rest),
        };
        crate::app::templates::is_template_name(name).then_some((tenant, name))
    }
}
