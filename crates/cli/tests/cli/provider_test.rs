//! `stacyvm provider-test`: the conformance suite run by the real binary
//! against the reference plugin (every case passes, exit 0) and against a
//! plugin that cannot do file operations (those cases fail, exit 1).

use std::path::PathBuf;
use std::process::{Command, Output};

use anyhow::{ensure, Context, Result};

use crate::fixtures::{agent_bin, test_image_tar, workspace_root};

/// Every case of the suite, as the command names them.
const CASES: [&str; 11] = [
    "spawn_and_exit_code",
    "stdout_and_stderr_are_kept_apart",
    "stdin_is_delivered",
    "env_and_cwd_are_applied",
    "timeout_kills_the_command_and_its_children",
    "stream_delivers_the_first_chunk_before_the_end",
    "binary_file_round_trips_byte_identical",
    "file_operations_follow_the_api",
    "paths_and_symlinks_never_reach_the_host",
    "destroy_is_idempotent_and_leaves_nothing",
    "unknown_sandboxes_and_images_are_reported",
];

fn provider_test(plugin: PathBuf, extra: &[&str]) -> Result<(Output, String)> {
    let out = Command::new(env!("CARGO_BIN_EXE_stacyvm"))
        .arg("provider-test")
        .arg("--plugin")
        .arg(&plugin)
        .args(extra)
        .env("STACYVM_AGENT_BIN", agent_bin()?)
        .env("STACYVM_TEST_IMAGE_TAR", test_image_tar()?)
        .output()
        .context("running stacyvm provider-test")?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "provider-test {}:\n{stdout}{}",
        plugin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out, stdout))
}

fn docker_available() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn provider_test_passes_the_reference_plugin() -> Result<()> {
    ensure!(
        docker_available(),
        "dockerd is not reachable, and the reference plugin drives it: start it \
         (`. scripts/lib.sh && ensure_dockerd`)"
    );
    let (out, stdout) =
        provider_test(workspace_root().join("examples/plugins/docker_cli.py"), &[])?;
    ensure!(out.status.success(), "exit {:?}", out.status.code());
    for case in CASES {
        ensure!(
            stdout
                .lines()
                .any(|l| l.starts_with(&format!("PASS {case} "))),
            "{case} passed"
        );
    }
    ensure!(stdout.contains("11 passed, 0 failed"), "the summary");
    Ok(())
}

#[test]
fn provider_test_fails_a_plugin_that_misses_cases() -> Result<()> {
    let hostexec = workspace_root().join("crates/provider/tests/provider/plugins/hostexec.py");
    let (out, stdout) = provider_test(
        hostexec.clone(),
        &[
            "--case",
            "stdout_and_stderr_are_kept_apart",
            "--case",
            "file_operations_follow_the_api",
        ],
    )?;
    ensure!(out.status.code() == Some(1), "exit {:?}", out.status.code());
    ensure!(
        stdout
            .lines()
            .any(|l| l.starts_with("PASS stdout_and_stderr_are_kept_apart ")),
        "exec through the plugin passes"
    );
    let failed = stdout
        .lines()
        .find(|l| l.starts_with("FAIL file_operations_follow_the_api "))
        .context("the file case fails")?;
    ensure!(failed.contains("have no agent"), "and says why: {failed}");
    ensure!(stdout.contains("1 passed, 1 failed"), "the summary");

    // An unknown case is an error before anything runs.
    let (out, _) = provider_test(hostexec, &["--case", "no_such_case"])?;
    ensure!(out.status.code() == Some(1));
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("no case \"no_such_case\""),
        "names the problem"
    );
    Ok(())
}
