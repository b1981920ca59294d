//! Every `stacyvm` client command, run as a user would: the real binary
//! against a real server.

use std::io::Write;
use std::process::Stdio;

use anyhow::{ensure, Context, Result};
use stacyvm_sdk::{SandboxFilter, SandboxState};

use crate::support::{run, sha256_host, test_image_tar, Server, TempPath, IMAGE};

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A new sandbox through the CLI; returns its id.
fn create(server: &Server, extra: &[&str]) -> Result<String> {
    let mut args = vec!["sandbox", "create", "--image", IMAGE];
    args.extend(extra);
    let id = server.ok(&args)?.trim().to_owned();
    ensure!(id.starts_with("sbx_"), "create printed {id:?}");
    Ok(id)
}

#[tokio::test]
async fn sandbox_commands_cover_the_lifecycle_and_exec_exit_codes() -> Result<()> {
    let server = Server::start("proot")?;
    let tar = test_image_tar()?;
    let tar = tar.to_str().context("utf-8 path")?;
    let img = server.json(&["image", "import", IMAGE, tar])?;
    assert_eq!(img[0]["name"], IMAGE);
    assert!(server.ok(&["image", "ls"])?.contains(IMAGE));
    assert_eq!(server.json(&["image", "get", IMAGE])?[0]["name"], IMAGE);

    let id = create(&server, &["--label", "team=cli", "--timeout", "600"])?;
    let table = server.ok(&["sandbox", "ls"])?;
    assert!(
        table.starts_with("ID") && table.contains(&id) && table.contains("running"),
        "{table}"
    );
    let listed = server.json(&["sandbox", "ls", "--label", "team=cli", "--state", "running"])?;
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    assert_eq!(
        server.ok(&["sandbox", "ls", "-q", "--label", "team=none"])?,
        ""
    );
    let got = server.json(&["sandbox", "get", &id])?;
    assert_eq!(
        (got["id"].as_str(), got["labels"]["team"].as_str()),
        (Some(id.as_str()), Some("cli"))
    );
    assert!(server.ok(&["sandbox", "get", &id])?.contains("running"));

    // Output streams keep their own channel and exact bytes; the exit code is the command's.
    let out = run(server.cli().args([
        "sandbox",
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "printf 'out\\377'; echo err >&2; exit 7",
    ]))?;
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(out.stdout, b"out\xff");
    assert_eq!(stderr_of(&out), "err\n");
    let out = run(server.cli().args([
        "sandbox",
        "exec",
        &id,
        "--env",
        "A=b",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo $A $PWD",
    ]))?;
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref()
        ),
        (Some(0), "b /tmp\n")
    );
    let out = run(server
        .cli()
        .args(["sandbox", "exec", &id, "--", "sh", "-c", "kill -9 $$"]))?;
    assert_eq!(out.status.code(), Some(128 + 9));
    let out = run(server
        .cli()
        .args(["sandbox", "exec", "-t", "1", &id, "--", "sleep", "30"]))?;
    assert_eq!(out.status.code(), Some(124), "{}", stderr_of(&out));
    let out = run(server
        .cli()
        .args(["sandbox", "exec", &id, "--", "no-such-program"]))?;
    assert_eq!(out.status.code(), Some(127));
    let mut child = server
        .cli()
        .args(["sandbox", "exec", "-i", &id, "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin piped")?
        .write_all(b"from stdin")?;
    let out = child.wait_with_output()?;
    assert_eq!(out.stdout, b"from stdin");
    let out = run(server.cli().args([
        "sandbox",
        "exec",
        "-o",
        "json",
        &id,
        "--",
        "sh",
        "-c",
        "echo j; exit 4",
    ]))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(
        (
            out.status.code(),
            v["exit_code"].as_i64(),
            v["stdout"].as_str()
        ),
        (Some(4), Some(4), Some("j\n"))
    );

    let t = server.json(&["sandbox", "timeout", &id, "900"])?;
    assert!(t["expires_at"].is_string());
    assert_eq!(server.json(&["sandbox", "pause", &id])?["state"], "paused");
    assert_eq!(
        server.json(&["sandbox", "resume", &id])?["state"],
        "running"
    );
    let logs = server.ok(&["sandbox", "logs", &id])?;
    assert!(logs.contains("lifecycle"), "{logs}");
    assert!(server.json(&["sandbox", "logs", &id])?["lines"]
        .as_array()
        .is_some_and(|l| !l.is_empty()));

    assert_eq!(server.ok(&["sandbox", "rm", &id])?.trim(), id);
    assert_eq!(server.json(&["sandbox", "get", &id])?["state"], "destroyed");
    let out = run(server.cli().args(["sandbox", "logs", "-f", &id]))?;
    assert!(
        out.status.success(),
        "following a destroyed sandbox's log ends: {}",
        stderr_of(&out)
    );

    // Errors: the server's message, code and request id on stderr; exit 1.
    let out = run(server.cli().args(["sandbox", "exec", &id, "--", "true"]))?;
    let err = stderr_of(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        err.starts_with("stacyvm: ") && err.contains("(conflict, request id req_"),
        "{err}"
    );
    let out = run(server.cli().args(["sandbox", "get", "sbx_doesnotexist"]))?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("(not_found, request id req_"),
        "{}",
        stderr_of(&out)
    );
    let out = run(server.cli().args(["sandbox", "rm", "sbx_doesnotexist"]))?;
    assert_eq!(out.status.code(), Some(1));
    // Usage errors exit 2.
    assert_eq!(
        run(server.cli().args(["sandbox", "create"]))?.status.code(),
        Some(2)
    );
    assert_eq!(
        run(server
            .cli()
            .args(["sandbox", "create", "--image", IMAGE, "--rm"]))?
        .status
        .code(),
        Some(2)
    );
    assert_eq!(
        run(server.cli().args(["sandbox", "frobnicate"]))?
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        run(server.cli().args(["sandbox", "ls", "--state", "sideways"]))?
            .status
            .code(),
        Some(2)
    );
    // No server there: a clear transport error.
    let out = run(server.cli().args(["status", "--url", "http://127.0.0.1:9"]))?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out)
            .contains("the connection to the StacyVM server at http://127.0.0.1:9 failed"),
        "{}",
        stderr_of(&out)
    );
    Ok(())
}

#[tokio::test]
async fn create_rm_runs_one_command_and_removes_the_sandbox() -> Result<()> {
    let server = Server::with_image().await?;
    let out = run(server.cli().args([
        "sandbox",
        "create",
        "--image",
        IMAGE,
        "--rm",
        "--",
        "sh",
        "-c",
        "echo hi; echo oops >&2; exit 3",
    ]))?;
    assert_eq!(out.status.code(), Some(3), "{}", stderr_of(&out));
    assert_eq!(out.stdout, b"hi\n");
    assert_eq!(stderr_of(&out), "oops\n");
    let all = server
        .admin()
        .sandbox_list_all(&SandboxFilter::default())
        .await?;
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].state, SandboxState::Destroyed);

    // Ctrl-C while the command runs: the sandbox is removed all the same.
    let mut child = server
        .cli()
        .args([
            "sandbox",
            "create",
            "--image",
            IMAGE,
            "--rm",
            "--",
            "sh",
            "-c",
            "echo started; sleep 600",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = libc::pid_t::try_from(child.id())?;
    let mut reader = std::io::BufReader::new(child.stdout.take().context("stdout piped")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut reader, &mut line)?;
    assert_eq!(line, "started\n");
    // SAFETY: `pid` is our own child, not yet reaped.
    ensure!(
        unsafe { libc::kill(pid, libc::SIGINT) } == 0,
        "kill(SIGINT)"
    );
    let status = child.wait()?;
    assert_eq!(status.code(), Some(130));
    let live = server
        .admin()
        .sandbox_list(&SandboxFilter {
            state: Some(SandboxState::Running),
            ..Default::default()
        })
        .await?;
    assert!(
        live.sandboxes.is_empty(),
        "left running: {:?}",
        live.sandboxes
    );

    // Without --rm the sandbox stays, and its id goes to stderr.
    let out = run(server
        .cli()
        .args(["sandbox", "create", "--image", IMAGE, "--", "true"]))?;
    assert_eq!(out.status.code(), Some(0));
    let id = stderr_of(&out).trim().to_owned();
    assert_eq!(
        server.admin().sandbox_get(&id).await?.state,
        SandboxState::Running
    );
    Ok(())
}

/// Runs `cmd` to the end and returns its exit status, its peak resident
/// memory in bytes (the kernel's `ru_maxrss`, exact however short the
/// process lives) and its stderr.
fn run_measuring_peak(
    mut cmd: std::process::Command,
) -> Result<(std::process::ExitStatus, u64, String)> {
    use std::os::unix::process::ExitStatusExt;
    let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let mut stderr = child.stderr.take().context("stderr piped")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let pid = libc::pid_t::try_from(child.id())?;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of this plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped (std never waits for
    // it after this), and both out-pointers point to live locals.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    ensure!(
        rc == pid,
        "wait4 failed: {}",
        std::io::Error::last_os_error()
    );
    let err = reader.join().unwrap_or_default();
    let peak = u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024;
    Ok((std::process::ExitStatus::from_raw(status), peak, err))
}

/// Writes `len` pseudo-random bytes (xorshift) to `path`, a MiB at a time.
fn write_random_file(path: &std::path::Path, len: usize) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(buf.len());
        f.write_all(&buf[..n])?;
        left -= n;
    }
    f.flush()?;
    Ok(())
}

#[tokio::test]
async fn cp_streams_50_mib_both_ways_byte_identical_in_little_memory() -> Result<()> {
    const SIZE: usize = 50 * 1024 * 1024;
    let server = Server::with_image().await?;
    let id = create(&server, &[])?;
    let src = TempPath::new("svm-cp-src");
    write_random_file(&src.0, SIZE)?;
    let want = sha256_host(&src.0)?;

    let mut up = server.cli();
    up.args([
        "cp",
        src.0.to_str().context("utf-8")?,
        &format!("{id}:/work/big.bin"),
    ]);
    let (status, peak_up, err) = run_measuring_peak(up)?;
    assert!(status.success(), "upload failed: {err}");
    let in_sandbox = server.ok(&["sandbox", "exec", &id, "--", "sha256sum", "/work/big.bin"])?;
    assert_eq!(in_sandbox.split_whitespace().next(), Some(want.as_str()));

    let back = TempPath::new("svm-cp-back");
    let mut down = server.cli();
    down.args([
        "cp",
        &format!("{id}:/work/big.bin"),
        back.0.to_str().context("utf-8")?,
    ]);
    let (status, peak_down, err) = run_measuring_peak(down)?;
    assert!(status.success(), "download failed: {err}");
    assert_eq!(std::fs::metadata(&back.0)?.len(), SIZE as u64);
    assert_eq!(sha256_host(&back.0)?, want);

    // Streamed, not buffered: the CLI grows by a few MiB over an idle call,
    // while buffering the file would add its 50 MiB. Measured against the
    // idle call, not a fixed size: a debug build's own footprint grows
    // with the code (28 MiB idle now).
    let (status, baseline, err) = run_measuring_peak({
        let mut c = server.cli();
        c.arg("health");
        c
    })?;
    assert!(status.success(), "health failed: {err}");
    eprintln!("peak RSS of stacyvm: idle {baseline} B, upload {peak_up} B, download {peak_down} B");
    const MIB: u64 = 1024 * 1024;
    for (what, peak) in [("upload", peak_up), ("download", peak_down)] {
        assert!(peak > 0 && baseline > 0, "{what}: no peak RSS measured");
        assert!(
            peak.saturating_sub(baseline) < 16 * MIB,
            "{what} peak RSS {peak} bytes over an idle {baseline}"
        );
    }

    // Into a directory keeps the name; `-` is stdin/stdout; the mode comes along.
    let small = TempPath::new("svm-cp-small");
    std::fs::write(&small.0, b"small file\n")?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&small.0, std::fs::Permissions::from_mode(0o750))?;
    }
    let entry = server.json(&[
        "cp",
        small.0.to_str().context("utf-8")?,
        &format!("{id}:/work/"),
    ])?;
    let name = small
        .0
        .file_name()
        .and_then(|n| n.to_str())
        .context("name")?;
    assert_eq!(entry["path"], format!("/work/{name}"));
    assert_eq!(entry["mode"], "0750");
    let mut child = server
        .cli()
        .args(["cp", "-", &format!("{id}:/work/piped.txt")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()?;
    child
        .stdin
        .take()
        .context("stdin piped")?
        .write_all(b"through a pipe")?;
    assert!(child.wait()?.success());
    assert_eq!(
        server.ok(&["cp", &format!("{id}:/work/piped.txt"), "-"])?,
        "through a pipe"
    );
    let dir = TempPath::new("svm-cp-dir");
    std::fs::create_dir(&dir.0)?;
    server.ok(&[
        "cp",
        &format!("{id}:/work/piped.txt"),
        dir.0.to_str().context("utf-8")?,
    ])?;
    assert_eq!(std::fs::read(dir.0.join("piped.txt"))?, b"through a pipe");

    // A missing source: the server's not_found, and no partial file left.
    let out = run(server.cli().args([
        "cp",
        &format!("{id}:/work/missing"),
        dir.0.join("m").to_str().context("utf-8")?,
    ]))?;
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("not_found"), "{}", stderr_of(&out));
    assert_eq!(std::fs::read_dir(&dir.0)?.count(), 1);
    // Host to host is a usage error.
    assert_eq!(
        run(server.cli().args(["cp", "/etc/hostname", "/tmp/x"]))?
            .status
            .code(),
        Some(2)
    );
    Ok(())
}

#[tokio::test]
async fn cp_of_a_directory_sends_the_tree_as_one_tar() -> Result<()> {
    let server = Server::with_image().await?;
    let id = create(&server, &[])?;
    let tree = TempPath::new("svm-cp-tree");
    std::fs::create_dir_all(tree.0.join("src/lib"))?;
    for i in 0..20 {
        std::fs::write(tree.0.join(format!("src/lib/m{i}.txt")), format!("{i}\n"))?;
    }
    std::fs::write(tree.0.join("run.sh"), "#!/bin/sh\necho ran\n")?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            tree.0.join("run.sh"),
            std::fs::Permissions::from_mode(0o755),
        )?;
    }
    std::os::unix::fs::symlink("src/lib/m0.txt", tree.0.join("first"))?;
    let host = tree.0.to_str().context("utf-8")?;

    // To a new path: the directory's contents land there.
    let summary = server.json(&["cp", host, &format!("{id}:/work/proj")])?;
    assert_eq!(summary["path"], "/work/proj");
    assert_eq!(
        (summary["files"].as_u64(), summary["symlinks"].as_u64()),
        (Some(21), Some(1))
    );
    let seen = server.ok(&[
        "sandbox",
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "ls /work/proj/src/lib | wc -l; /work/proj/run.sh; cat /work/proj/first",
    ])?;
    assert_eq!(
        seen.split_whitespace().collect::<Vec<_>>(),
        ["20", "ran", "0"]
    );

    // Into an existing directory: under the directory's own name, as cp does.
    let name = tree
        .0
        .file_name()
        .and_then(|n| n.to_str())
        .context("name")?;
    let summary = server.json(&["cp", host, &format!("{id}:/work/")])?;
    assert_eq!(summary["path"], format!("/work/{name}"));

    // `.` has no name of its own: its contents go straight into the target.
    let out = run(server
        .cli()
        .current_dir(&tree.0)
        .args(["cp", ".", &format!("{id}:/srv/")]))?;
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        server.ok(&["sandbox", "exec", &id, "--", "/srv/run.sh"])?,
        "ran\n"
    );

    // And back: a sandbox directory comes down as one tar, unpacked into a
    // new host directory, or under its own name into an existing one. The
    // sandbox's links stay links: nothing of the host's /etc/shadow is
    // read, and nothing is written through them.
    server.ok(&[
        "sandbox",
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "ln -s /etc/shadow /work/proj/shadow && mkfifo /work/proj/pipe && chmod 4755 /work/proj/run.sh",
    ])?;
    let back = TempPath::new("svm-cp-back-tree");
    let out = run(server.cli().args([
        "cp",
        &format!("{id}:/work/proj"),
        back.0.to_str().context("utf-8")?,
    ]))?;
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(
        stderr_of(&out).contains("21 files, 2 directories, 2 symlinks"),
        "{}",
        stderr_of(&out)
    );
    assert_eq!(
        std::fs::read_to_string(back.0.join("src/lib/m7.txt"))?,
        "7\n"
    );
    assert_eq!(
        std::fs::read_link(back.0.join("shadow"))?,
        std::path::Path::new("/etc/shadow")
    );
    assert!(!back.0.join("pipe").exists());
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(back.0.join("run.sh"))?
            .permissions()
            .mode();
        assert_eq!(mode & 0o7000, 0, "no set-id bit reaches the host: {mode:o}");
        assert_eq!(mode & 0o100, 0o100, "{mode:o}");
    }
    let out = run(server.cli().args([
        "cp",
        &format!("{id}:/work/proj"),
        &format!("{}/", back.0.display()),
    ]))?;
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(
        std::fs::read_to_string(back.0.join("proj/first"))?,
        "0\n",
        "into an existing directory, under the sandbox directory's name"
    );
    // To stdout: the tar itself.
    let out = run(server
        .cli()
        .args(["cp", &format!("{id}:/work/proj/src"), "-"]))?;
    assert!(out.status.success(), "{}", stderr_of(&out));
    let mut names = Vec::new();
    for e in tar::Archive::new(&out.stdout[..]).entries()? {
        names.push(e?.path()?.to_string_lossy().into_owned());
    }
    assert_eq!(names.len(), 21, "{names:?}");
    assert!(names.contains(&"lib/m19.txt".to_owned()), "{names:?}");
    Ok(())
}

#[tokio::test]
async fn files_commands_inspect_and_change_a_sandbox() -> Result<()> {
    let server = Server::with_image().await?;
    let id = create(&server, &[])?;
    assert_eq!(
        server.json(&["files", "mkdir", &id, "/work/a/b"])?[0]["type"],
        "dir"
    );
    server.ok(&[
        "sandbox",
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo x > /work/a/b/f.py; echo y > /work/a/g.txt",
    ])?;
    let ls = server.ok(&["files", "ls", &id, "/work/a"])?;
    assert!(
        ls.contains("/work/a/b") && ls.contains("/work/a/g.txt"),
        "{ls}"
    );
    let rec = server.json(&["files", "ls", "-r", &id, "/work/a"])?;
    assert_eq!(rec.as_array().map(Vec::len), Some(3));
    assert_eq!(
        server.json(&["files", "stat", &id, "/work/a/g.txt"])?[0]["size"],
        2
    );
    assert_eq!(
        server.ok(&["files", "glob", &id, "/work/**/*.py"])?,
        "/work/a/b/f.py\n"
    );
    assert_eq!(
        server.json(&["files", "chmod", &id, "0700", "/work/a/g.txt"])?[0]["mode"],
        "0700"
    );
    assert_eq!(
        server.json(&["files", "mv", &id, "/work/a/g.txt", "/work/h.txt"])?[0]["path"],
        "/work/h.txt"
    );
    // Moving onto an existing file needs --overwrite.
    server.ok(&[
        "sandbox",
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo z > /work/z.txt",
    ])?;
    let out = run(server
        .cli()
        .args(["files", "mv", &id, "/work/h.txt", "/work/z.txt"]))?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("(conflict, request id "),
        "{}",
        stderr_of(&out)
    );
    server.ok(&["files", "mv", "-f", &id, "/work/h.txt", "/work/z.txt"])?;
    let out = run(server.cli().args(["files", "rm", &id, "/work/a"]))?;
    assert_eq!(out.status.code(), Some(1), "a non-empty directory needs -r");
    server.ok(&["files", "rm", "-r", &id, "/work/a"])?;
    let out = run(server.cli().args(["files", "stat", &id, "/work/a"]))?;
    assert!(stderr_of(&out).contains("not_found"), "{}", stderr_of(&out));
    let out = run(server.cli().args(["files", "ls", &id, "relative"]))?;
    assert!(
        stderr_of(&out).contains("invalid_request"),
        "{}",
        stderr_of(&out)
    );
    Ok(())
}

#[tokio::test]
async fn operator_commands_manage_tenants_keys_quotas_and_report() -> Result<()> {
    let server = Server::with_image().await?;
    let tenant = server.json(&["tenant", "create", "acme"])?;
    let tid = tenant[0]["id"].as_str().context("tenant id")?.to_owned();
    assert!(server.ok(&["tenant", "ls"])?.contains("acme"));

    let q = server.json(&[
        "quota",
        "set",
        &tid,
        "--max-sandboxes",
        "1",
        "--max-cpu",
        "2.5",
    ])?;
    assert_eq!(
        (q["max_sandboxes"].as_i64(), q["max_cpu"].as_f64()),
        (Some(1), Some(2.5))
    );
    let q = server.json(&["quota", "set", &tid, "--max-cpu", "unlimited"])?;
    assert_eq!(
        (q["max_sandboxes"].as_i64(), q["max_cpu"].is_null()),
        (Some(1), true),
        "other limits stay"
    );
    assert!(server
        .ok(&["quota", "get", &tid])?
        .contains("max_sandboxes"));
    let q = server.json(&["quota", "set", &tid, "--max-templates", "3"])?;
    assert_eq!(q["max_templates"].as_i64(), Some(3));
    assert!(server
        .ok(&["quota", "get", &tid])?
        .contains("max_templates"));
    let q = server.json(&["quota", "set", &tid, "--max-templates", "unlimited"])?;
    assert!(q["max_templates"].is_null(), "{q}");
    assert_eq!(
        run(server
            .cli()
            .args(["quota", "set", &tid, "--max-cpu", "lots"]))?
        .status
        .code(),
        Some(2)
    );

    // PRoot is for the tenants the operator names.
    let q = server.json(&["quota", "set", &tid, "--allowed-providers", "proot"])?;
    assert_eq!(q["allowed_providers"], serde_json::json!(["proot"]));
    let key = server.json(&[
        "key", "create", "--tenant", &tid, "--role", "member", "--name", "ci",
    ])?;
    let secret = key["key"].as_str().context("the secret")?.to_owned();
    let kid = key["id"].as_str().context("key id")?.to_owned();
    assert!(server.ok(&["key", "ls"])?.contains(&kid));
    assert!(
        server.ok(&["keys", "ls"])?.contains(&kid),
        "`keys` is an alias"
    );

    // The member key works, and the tenant's quota holds for it.
    let member = |args: &[&str]| run(server.cli_as(&secret).args(args));
    let out = member(&["sandbox", "create", "--image", IMAGE])?;
    assert!(out.status.success(), "{}", stderr_of(&out));
    let out = member(&["sandbox", "create", "--image", IMAGE])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("(quota_exceeded, request id "),
        "{}",
        stderr_of(&out)
    );
    // A refusal that arrives while the upload is still being sent is
    // reported, not a silent death of the CLI by SIGPIPE.
    let big = TempPath::new("svm-import-refused");
    std::fs::write(&big.0, vec![0u8; 32 << 20])?;
    let out = member(&["image", "import", "x", &big.0.to_string_lossy()])?;
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("forbidden"), "{}", stderr_of(&out));

    // `--e2b` prints the key's E2B spelling alone; it is the same key,
    // accepted wherever the key is and revoked with it.
    let spelled = server.ok(&[
        "key", "create", "--tenant", &tid, "--role", "viewer", "--name", "e2b", "--e2b",
    ])?;
    let spelled = spelled.trim().to_owned();
    assert!(
        spelled.len() > 4
            && spelled.starts_with("e2b_")
            && spelled[4..]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "{spelled}"
    );
    let out = run(server.cli_as(&spelled).args(["sandbox", "ls"]))?;
    assert!(out.status.success(), "{}", stderr_of(&out));
    let keys = server.json(&["key", "ls"])?;
    let e2b_kid = keys
        .as_array()
        .context("keys")?
        .iter()
        .find(|k| k["name"] == "e2b")
        .and_then(|k| k["id"].as_str())
        .context("the e2b key's id")?
        .to_owned();
    server.ok(&["key", "revoke", &e2b_kid])?;
    let out = run(server.cli_as(&spelled).args(["sandbox", "ls"]))?;
    assert!(
        stderr_of(&out).contains("unauthenticated"),
        "{}",
        stderr_of(&out)
    );

    assert_eq!(server.ok(&["key", "revoke", &kid])?.trim(), kid);
    let out = member(&["sandbox", "ls"])?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("unauthenticated"),
        "{}",
        stderr_of(&out)
    );

    let audit = server.json(&["audit", "--action", "sandbox.create"])?;
    let events = audit["events"].as_array().context("events")?;
    assert!(
        events.iter().any(|e| e["outcome"] == "ok")
            && events.iter().any(|e| e["outcome"] == "denied")
    );
    assert!(server
        .ok(&[
            "audit",
            "--outcome",
            "denied",
            "--since",
            "2000-01-01T00:00:00Z"
        ])?
        .contains("sandbox.create"));
    assert_eq!(
        run(server.cli().args(["audit", "--since", "yesterday"]))?
            .status
            .code(),
        Some(2)
    );

    let status = server.json(&["status"])?;
    assert_eq!(
        (status["mode"].as_str(), status["store"]["ok"].as_bool()),
        (Some("single-node"), Some(true))
    );
    let human = server.ok(&["status"])?;
    assert!(
        human.contains("proot") && human.contains("single-node"),
        "{human}"
    );
    assert!(server.ok(&["health"])?.contains("ready"));
    let workers = server.json(&["workers", "ls"])?;
    let wid = workers[0]["id"].as_str().context("worker id")?.to_owned();
    assert_eq!(
        server.json(&["workers", "drain", &wid])?[0]["state"],
        "draining"
    );

    // An image live sandboxes use cannot go; once they are destroyed it can.
    let out = run(server.cli().args(["image", "rm", IMAGE]))?;
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("(conflict, request id "),
        "{}",
        stderr_of(&out)
    );
    let ids = server.ok(&["sandbox", "ls", "-q", "--state", "running"])?;
    let ids: Vec<&str> = ids.lines().collect();
    assert_eq!(ids.len(), 1);
    let mut rm = vec!["sandbox", "rm"];
    rm.extend(&ids);
    server.ok(&rm)?;
    assert_eq!(server.ok(&["image", "rm", IMAGE])?.trim(), IMAGE);
    let out = run(server.cli().args(["image", "get", IMAGE]))?;
    assert!(
        stderr_of(&out).contains("not_found") || stderr_of(&out).contains("image_not_found"),
        "{}",
        stderr_of(&out)
    );

    let completions = server.ok(&["completions", "bash"])?;
    assert!(completions.contains("stacyvm") && completions.contains("sandbox"));
    Ok(())
}

#[tokio::test]
async fn docker_sandboxes_run_through_the_cli_too() -> Result<()> {
    let server = Server::start("proot,docker")?;
    server
        .admin()
        .image_import_path(IMAGE, test_image_tar()?)
        .await?;
    let out = run(server.cli().args([
        "sandbox",
        "create",
        "--image",
        IMAGE,
        "--provider",
        "docker",
        "--rm",
        "--",
        "sh",
        "-c",
        "echo in docker; exit 5",
    ]))?;
    assert_eq!(out.status.code(), Some(5), "{}", stderr_of(&out));
    assert_eq!(out.stdout, b"in docker\n");
    let id = create(&server, &["--provider", "docker"])?;
    assert_eq!(server.json(&["sandbox", "get", &id])?["provider"], "docker");
    let src = TempPath::new("svm-cp-docker");
    write_random_file(&src.0, 3 * 1024 * 1024 + 7)?;
    server.ok(&[
        "cp",
        src.0.to_str().context("utf-8")?,
        &format!("{id}:/tmp/f"),
    ])?;
    let back = TempPath::new("svm-cp-docker-back");
    server.ok(&[
        "cp",
        &format!("{id}:/tmp/f"),
        back.0.to_str().context("utf-8")?,
    ])?;
    assert_eq!(sha256_host(&back.0)?, sha256_host(&src.0)?);
    let out = run(server.cli().args(["sandbox", "pause", &id]))?;
    // Docker can pause; either way the answer is the server's, not a crash.
    assert!(
        out.status.success() || stderr_of(&out).contains("unsupported"),
        "{}",
        stderr_of(&out)
    );
    Ok(())
}

#[tokio::test]
async fn allow_lists_through_the_cli() -> Result<()> {
    let server = Server::start("proot,docker")?;
    server
        .admin()
        .image_import_path(IMAGE, test_image_tar()?)
        .await?;
    let id = create(
        &server,
        &[
            "--provider",
            "docker",
            "--allow",
            "192.0.2.7",
            "--allow",
            "Example.COM",
        ],
    )?;
    let got = server.json(&["sandbox", "get", &id])?;
    assert_eq!(got["network"], "egress", "{got}");
    assert_eq!(
        got["network_allow"],
        serde_json::json!(["192.0.2.7/32", "example.com"]),
        "{got}"
    );
    // Outside the list nothing answers, not even an address one off.
    let out = run(server.cli().args([
        "sandbox",
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "nc -w 2 192.0.2.8 80 </dev/null; echo rc=$?",
    ]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rc=") && !text.contains("rc=0"), "{text}");
    server.ok(&["sandbox", "rm", &id])?;

    // A bad entry is named; a provider that cannot enforce says so; a list
    // with network none is a usage error.
    let out = run(server.cli().args([
        "sandbox",
        "create",
        "--image",
        IMAGE,
        "--provider",
        "docker",
        "--allow",
        "bad_name!",
    ]))?;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("bad_name!") && err.contains("invalid_request"),
        "{err}"
    );
    let out = run(server.cli().args([
        "sandbox",
        "create",
        "--image",
        IMAGE,
        "--provider",
        "proot",
        "--allow",
        "10.0.0.1",
    ]))?;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains("proot") && err.contains("unsupported"),
        "{err}"
    );
    let out = run(server.cli().args([
        "sandbox",
        "create",
        "--image",
        IMAGE,
        "--network",
        "none",
        "--allow",
        "10.0.0.1",
    ]))?;
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    Ok(())
}
