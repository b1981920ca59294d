//! `stacyvm certify` run by the real binary on this host: Docker, PRoot and
//! the namespaces provider pass and leave a record each and nothing else;
//! `qemu` passes, says which acceleration it runs under and that an egress
//! guest reached a machine beyond the host but not the host; `firecracker`
//! fails with the reason this host's kind of KVM gives; the JSON shape,
//! the text output and the exit codes.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};
use serde_json::Value;

use crate::fixtures::agent_bin;

fn certify(data_dir: &Path, args: &[&str]) -> Result<Output> {
    let out = Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .arg("certify")
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("STACYVM_AGENT_BIN", agent_bin()?)
        .env_remove("STACYVM_PROVIDERS")
        .output()
        .context("running stacyvm certify")?;
    eprintln!(
        "certify {args:?}: exit {:?}\n{}{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

fn json_of(out: &Output) -> Result<Value> {
    serde_json::from_slice(&out.stdout).context("certify -o json printed no JSON")
}

fn provider<'a>(report: &'a Value, name: &str) -> Result<&'a Value> {
    report["providers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["provider"] == name))
        .with_context(|| format!("no {name} in {report}"))
}

fn check<'a>(record: &'a Value, name: &str) -> Result<&'a Value> {
    record["checks"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .with_context(|| format!("no check {name} in {record}"))
}

fn data_dir() -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("svm-certify-")
        .tempdir()
        .context("making a data dir")
}

/// Containers of the certification runs on `data_dir` still on the daemon.
fn certify_containers(data_dir: &Path) -> Result<String> {
    let instance = std::fs::read_to_string(data_dir.join("instance.id"))?;
    let out = Command::new("docker")
        .args(["ps", "-a", "--filter"])
        .arg(format!(
            "label=dev.stacyvm.instance={}-certify",
            instance.trim()
        ))
        .args(["--format", "{{.Names}}"])
        .output()
        .context("docker ps")?;
    ensure!(out.status.success(), "docker ps failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[test]
fn docker_proot_and_namespaces_pass_and_leave_only_their_records() -> Result<()> {
    let dir = data_dir()?;
    let out = certify(
        dir.path(),
        &[
            "--provider",
            "docker,proot",
            "--provider",
            "namespaces",
            "-o",
            "json",
        ],
    )?;
    ensure!(out.status.code() == Some(0), "exit {:?}", out.status.code());
    let report = json_of(&out)?;
    ensure!(report["passed"] == true, "{report}");
    ensure!(report["version"] == env!("CARGO_PKG_VERSION"), "{report}");
    ensure!(report["host"]["hostname"].is_string(), "{report}");
    // The catalog was empty: an image was made from busybox-static.
    ensure!(
        report["image"]["source"] == "busybox-static"
            && report["image"]["name"] == "certify-busybox",
        "{report}"
    );
    for name in ["docker", "proot", "namespaces"] {
        let rec = provider(&report, name)?;
        ensure!(rec["passed"] == true, "{name}: {rec}");
        ensure!(rec["image"] == "certify-busybox", "{rec}");
        ensure!(rec["certified_at"].is_string(), "{rec}");
        for c in [
            "health", "spawn", "exec", "files", "pause", "snapshot", "destroy",
        ] {
            ensure!(check(rec, c)?["passed"] == true, "{name} {c}: {rec}");
        }
        let files = check(rec, "files")?["reason"].as_str().unwrap_or_default();
        for op in [
            "write", "read", "list", "stat", "move", "chmod", "glob", "delete",
        ] {
            ensure!(files.contains(op), "{name} files: {files}");
        }
        // The record on disk is the one printed.
        let on_disk: Value = serde_json::from_slice(
            &std::fs::read(dir.path().join(format!("certification/{name}.json")))
                .with_context(|| format!("{name}'s record"))?,
        )?;
        ensure!(&on_disk == rec, "{name}: {on_disk} vs {rec}");
    }
    // Docker and namespaces limits hold for real: a fork bomb and a hog.
    for name in ["docker", "namespaces", "proot"] {
        let rec = provider(&report, name)?;
        let enforced = |limit: &str| {
            !rec["not_enforced"]
                .as_array()
                .is_some_and(|l| l.iter().any(|v| v == limit))
        };
        if enforced("pids") {
            let c = check(rec, "pids-limit")?;
            ensure!(
                c["passed"] == true
                    && c["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("stopped at")),
                "{name}: {c}"
            );
        }
        if enforced("memory") {
            ensure!(
                check(rec, "memory-limit")?["passed"] == true,
                "{name}: {rec}"
            );
        }
    }
    ensure!(
        check(provider(&report, "docker")?, "hardened")?["passed"] == true,
        "{report}"
    );
    // A namespaces sandbox with egress reached a machine beyond the host,
    // and none of the host's own services.
    ensure!(
        check(provider(&report, "namespaces")?, "network")?["passed"] == true,
        "{report}"
    );
    // PRoot is no security boundary, and the record says so.
    let proot = provider(&report, "proot")?;
    ensure!(
        proot["not_enforced"]
            .as_array()
            .is_some_and(|l| l.iter().any(|v| v == "isolation")),
        "{proot}"
    );
    // Nothing else is left: no sandbox, no image, no temporary file.
    ensure!(
        certify_containers(dir.path())?.is_empty(),
        "containers left behind"
    );
    let images: Vec<_> = std::fs::read_dir(dir.path().join("images"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| !n.to_string_lossy().starts_with('.'))
        .collect();
    ensure!(images.is_empty(), "images left in the catalog: {images:?}");
    let mut records: Vec<String> = std::fs::read_dir(dir.path().join("certification"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    records.sort();
    ensure!(
        records == ["docker.json", "namespaces.json", "proot.json"],
        "{records:?}"
    );
    for p in ["proot", "namespaces"] {
        let left: Vec<_> = std::fs::read_dir(dir.path().join(p))
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
            .unwrap_or_default();
        ensure!(left.is_empty(), "{p} left {left:?}");
    }
    Ok(())
}

/// What this host's `/dev/kvm` is, read independently of the code under
/// test.
fn host_kvm() -> &'static str {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let virt = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let module = |m: &str| Path::new("/sys/module").join(m).exists();
    if !Path::new("/dev/kvm").exists() {
        "none"
    } else if virt && (module("kvm_intel") || module("kvm_amd")) {
        "hardware"
    } else if module("kvm_pvm") {
        "pvm"
    } else {
        "none"
    }
}

#[test]
fn firecracker_fails_with_the_reason_of_this_hosts_kvm() -> Result<()> {
    let dir = data_dir()?;
    let out = certify(dir.path(), &["--provider", "firecracker", "-o", "json"])?;
    ensure!(out.status.code() == Some(1), "exit {:?}", out.status.code());
    let report = json_of(&out)?;
    ensure!(report["passed"] == false, "{report}");
    ensure!(
        report.get("image").is_none(),
        "no sandbox, no image: {report}"
    );
    let rec = provider(&report, "firecracker")?;
    ensure!(rec["passed"] == false, "{rec}");
    let kind = host_kvm();
    eprintln!("this host's KVM: {kind}");
    ensure!(
        rec["mode"] == kind,
        "the record's mode is the host's kind: {rec}"
    );
    let boot = check(rec, "kvm-boots-guest")?;
    match kind {
        "pvm" => {
            ensure!(check(rec, "kvm-device")?["passed"] == true, "{rec}");
            ensure!(
                boot["passed"] == false,
                "a stock kernel never boots on PVM: {boot}"
            );
            ensure!(
                boot["reason"].as_str().is_some_and(|r| {
                    r.contains("software KVM (PVM): a stock guest kernel does not boot")
                }),
                "{boot}"
            );
            ensure!(
                boot["fix"].as_str().is_some_and(|f| {
                    f.contains("CONFIG_PVM_GUEST") && f.contains("--guest-kernel")
                }),
                "{boot}"
            );
        }
        "hardware" => {
            // Hardware KVM boots a stock kernel; what fails is the rest.
            ensure!(
                boot["passed"] == true
                    && boot["reason"]
                        .as_str()
                        .is_some_and(|r| r.contains("mounting root")),
                "{boot}"
            );
        }
        _ => {
            ensure!(check(rec, "kvm-device")?["passed"] == false, "{rec}");
            ensure!(boot["passed"] == false, "{boot}");
        }
    }
    if which("firecracker").is_none() {
        let bin = check(rec, "firecracker-binary")?;
        ensure!(
            bin["passed"] == false
                && bin["reason"] == "no firecracker binary; set --firecracker-bin",
            "{bin}"
        );
    }
    // No sandbox is booted on a host that failed the checks above.
    ensure!(check(rec, "sandbox-checks")?["passed"] == false, "{rec}");
    // The failed record is kept: serve reads its reason.
    ensure!(
        dir.path().join("certification/firecracker.json").is_file(),
        "no record"
    );
    Ok(())
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

#[test]
fn text_output_names_the_failed_check_and_its_fix() -> Result<()> {
    let dir = data_dir()?;
    let missing = dir.path().join("no-such-vmlinuz");
    let out = certify(
        dir.path(),
        &[
            "--provider",
            "firecracker",
            "--guest-kernel",
            missing.to_str().context("utf-8 path")?,
            "--firecracker-bin",
            "/nonexistent/firecracker",
        ],
    )?;
    ensure!(out.status.code() == Some(1), "exit {:?}", out.status.code());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |prefix: &str| text.lines().find(|l| l.trim_start().starts_with(prefix));
    let kernel = line("FAIL guest-kernel").context("a FAIL guest-kernel line")?;
    ensure!(kernel.contains(&missing.display().to_string()), "{kernel}");
    ensure!(
        text.contains("fix: build the guest assets with scripts/build-guest.sh"),
        "{text}"
    );
    ensure!(
        line("FAIL firecracker-binary").is_some_and(|l| l.contains("/nonexistent/firecracker")),
        "{text}"
    );
    ensure!(text.contains("firecracker: NOT CERTIFIED"), "{text}");
    Ok(())
}

#[test]
fn qemu_passes_and_says_which_acceleration_it_runs_under() -> Result<()> {
    let dir = data_dir()?;
    let out = certify(dir.path(), &["--provider", "qemu", "-o", "json"])?;
    ensure!(out.status.code() == Some(0), "exit {:?}", out.status.code());
    let report = json_of(&out)?;
    let rec = provider(&report, "qemu")?;
    ensure!(rec["passed"] == true, "{rec}");
    let accel = check(rec, "accel")?["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    match host_kvm() {
        // No KVM that boots a stock kernel here: TCG, said so.
        "pvm" | "none" => {
            ensure!(rec["mode"] == "tcg", "{rec}");
            ensure!(accel.starts_with("TCG mode"), "{accel}");
        }
        _ => ensure!(accel.contains("KVM boots a guest here"), "{accel}"),
    }
    for c in ["spawn", "exec", "files", "pause", "network", "destroy"] {
        ensure!(check(rec, c)?["passed"] == true, "qemu {c}: {rec}");
    }
    // The egress guest reached the machine beyond the host and nothing of
    // the host's; that machine's namespace and veth are gone again.
    let net = check(rec, "network")?["reason"]
        .as_str()
        .unwrap_or_default();
    ensure!(net.contains("reached a listener beyond the host"), "{net}");
    // Named after this certification's process (others may run at once).
    let named = |prefix: &str| {
        net.split(|c: char| c.is_whitespace() || c == ',' || c == ')')
            .find(|w| w.starts_with(prefix))
            .map(str::to_owned)
            .with_context(|| format!("no {prefix}… in {net}"))
    };
    let (netns, veth) = (named("svmcert-")?, named("svcert")?);
    ensure!(
        !Path::new("/run/netns").join(&netns).exists(),
        "certify left {netns}"
    );
    ensure!(
        !Path::new("/sys/class/net").join(&veth).exists(),
        "certify left its veth {veth}"
    );
    let left: Vec<_> = std::fs::read_dir(dir.path().join("qemu"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    ensure!(left.is_empty(), "qemu left {left:?}");
    Ok(())
}

#[test]
fn bad_arguments_are_refused_before_anything_runs() -> Result<()> {
    let dir = data_dir()?;
    let out = certify(dir.path(), &["--provider", "vmware"])?;
    ensure!(
        out.status.code() == Some(2),
        "an unknown provider is a usage mistake"
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("unknown provider \"vmware\""),
        "the message names it"
    );
    let out = certify(dir.path(), &["--provider", "proot", "--image", "nope"])?;
    ensure!(
        out.status.code() == Some(2),
        "a missing image is a usage mistake"
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("--image nope"),
        "the message names the flag"
    );
    let out = certify(dir.path(), &["--provider", " "])?;
    ensure!(out.status.code() == Some(2), "no provider at all");
    ensure!(
        !dir.path().join("certification").exists(),
        "no record is written for a run that did not happen"
    );
    Ok(())
}

#[test]
fn ctrl_c_mid_spawn_leaves_no_sandbox_image_or_record() -> Result<()> {
    let dir = data_dir()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .arg("certify")
        .arg("--data-dir")
        .arg(dir.path())
        .args(["--provider", "qemu"])
        .env("STACYVM_AGENT_BIN", agent_bin()?)
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting stacyvm certify")?;
    // The KVM probe comes first; then the VM's directory appears, and the
    // guest takes seconds more to reach its agent.
    let sandboxes = dir.path().join("qemu");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(180);
    let started = loop {
        let any = std::fs::read_dir(&sandboxes)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if any {
            break true;
        }
        if child.try_wait()?.is_some() || std::time::Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    if !started {
        let _ = child.kill();
        let _ = child.wait();
        anyhow::bail!("certify never started a qemu sandbox");
    }
    let sent = Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()?;
    ensure!(sent.success(), "kill -INT");
    let status = child.wait()?;
    ensure!(
        !status.success(),
        "an interrupted run does not pass: {status}"
    );
    let left: Vec<_> = std::fs::read_dir(&sandboxes)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    ensure!(left.is_empty(), "qemu left {left:?}");
    let images: Vec<_> = std::fs::read_dir(dir.path().join("images"))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| !n.to_string_lossy().starts_with('.'))
        .collect();
    ensure!(images.is_empty(), "images left in the catalog: {images:?}");
    ensure!(
        !dir.path().join("certification/qemu.json").exists(),
        "no record for a run that did not finish"
    );
    Ok(())
}
