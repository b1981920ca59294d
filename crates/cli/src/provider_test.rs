//! `stacyvm provider-test --plugin PATH`: runs the provider conformance
//! suite (`stacyvm_provider::conformance`, the cases every built-in provider
//! passes) against a plugin, on a scratch data dir, and prints pass or fail
//! per case. Exits 0 only when every case passed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use futures_util::FutureExt;
use stacyvm_provider::conformance::{Harness, CASES};
use stacyvm_provider::images::ImageCatalog;
use stacyvm_provider::plugin::{self, PluginConfig, PluginProvider, PluginTiming};
use stacyvm_provider::DynProvider;

/// The catalog name the suite's image is imported under.
const IMAGE: &str = "conformance";

/// Longest a case may run before it counts as failed (a hang).
const CASE_LIMIT: Duration = Duration::from_secs(600);

#[derive(Args)]
pub struct ProviderTestArgs {
    /// The plugin executable to test.
    #[arg(long, value_name = "PATH")]
    plugin: PathBuf,
    /// The plugin's name (NAME of plugin:NAME). Default: from the file name.
    #[arg(long)]
    name: Option<String>,
    /// A root filesystem tar with a busybox userland (sh, cat, ls, stat, seq,
    /// wc, grep, ln, sleep) for the sandboxes; scripts/build-test-image.sh
    /// builds one.
    #[arg(long, env = "STACYVM_TEST_IMAGE_TAR", value_name = "TAR")]
    image_tar: PathBuf,
    /// Run only this case (repeatable). Default: every case.
    #[arg(long = "case", value_name = "NAME")]
    cases: Vec<String>,
}

/// The message of the last panic, kept by the hook `run` installs.
static PANIC: Mutex<Option<String>> = Mutex::new(None);

fn last_panic() -> Option<String> {
    PANIC.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// A plugin name from a file name: `docker_cli.py` → `docker_cli`.
fn name_from(path: &std::path::Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .skip_while(|c| !c.is_ascii_alphanumeric())
        .take(32)
        .collect();
    if plugin::validate_name(&name).is_ok() {
        name
    } else {
        "under-test".into()
    }
}

pub async fn run(args: ProviderTestArgs) -> Result<ExitCode> {
    let name = args.name.clone().unwrap_or_else(|| name_from(&args.plugin));
    plugin::validate_name(&name)?;
    for c in &args.cases {
        if !CASES.iter().any(|(n, _)| n == c) {
            let all: Vec<&str> = CASES.iter().map(|(n, _)| *n).collect();
            bail!("no case {c:?}; the cases are: {}", all.join(", "));
        }
    }
    let scratch = tempfile::Builder::new()
        .prefix("svm-provider-test-")
        .tempdir()
        .context("making a scratch data dir")?;
    let data_dir = scratch.path().canonicalize()?;
    let executable = plugin::locate(&data_dir, &name, Some(&args.plugin))?;
    let agent_bin = stacyvm_provider::agent_binary_path()?;
    let catalog = Arc::new(ImageCatalog::open(&data_dir.join("images"))?);
    let tar = tokio::fs::File::open(&args.image_tar)
        .await
        .with_context(|| format!("opening the image tar {}", args.image_tar.display()))?;
    catalog
        .import(IMAGE, Box::pin(tokio_util::io::ReaderStream::new(tar)))
        .await
        .with_context(|| format!("importing {}", args.image_tar.display()))?;
    let instance = format!(
        "provider-test-{}",
        stacyvm_core::SandboxId::generate()
            .as_str()
            .trim_start_matches("sbx_")
    );
    let provider_for = || -> Result<DynProvider> {
        Ok(Arc::new(PluginProvider::new(PluginConfig {
            name: name.clone(),
            executable: executable.clone(),
            args: Vec::new(),
            env: Vec::new(),
            data_dir: data_dir.clone(),
            agent_bin: agent_bin.clone(),
            catalog: catalog.clone(),
            instance: instance.clone(),
            timing: PluginTiming::default(),
        })?))
    };

    // The cases assert as tests do: a failed assertion is reported as the
    // case's failure, not printed as a crash.
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| info.payload().downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        let at = info
            .location()
            .map(|l| format!(" (at {}:{})", l.file(), l.line()))
            .unwrap_or_default();
        *PANIC.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(format!("{}{at}", message.replace('\n', " ")));
    }));
    println!(
        "provider-test: plugin:{name} ({}), the conformance suite",
        executable.display()
    );
    let health = provider_for()?.health().await;
    println!(
        "health: {} — {}",
        if health.healthy {
            "healthy"
        } else {
            "UNHEALTHY"
        },
        health.detail
    );
    let (mut passed, mut failed) = (0, 0);
    for (case, run_case) in CASES {
        if !args.cases.is_empty() && !args.cases.iter().any(|c| c == case) {
            continue;
        }
        // Every case gets a fresh plugin process: one case's crash or hang
        // does not fail the next.
        let h = Harness::new(provider_for()?, &data_dir, IMAGE);
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            CASE_LIMIT,
            std::panic::AssertUnwindSafe(run_case(&h)).catch_unwind(),
        )
        .await;
        let took = started.elapsed().as_secs_f64();
        drop(h);
        match outcome {
            Ok(Ok(Ok(()))) => {
                passed += 1;
                println!("PASS {case} ({took:.1} s)");
            }
            Ok(Ok(Err(e))) => {
                failed += 1;
                println!("FAIL {case} ({took:.1} s): {e:#}");
            }
            Ok(Err(_)) => {
                failed += 1;
                let why = last_panic().unwrap_or_else(|| "a panic".into());
                println!("FAIL {case} ({took:.1} s): {why}");
            }
            Err(_) => {
                failed += 1;
                println!(
                    "FAIL {case}: did not finish within {} s",
                    CASE_LIMIT.as_secs()
                );
            }
        }
    }
    println!("{passed} passed, {failed} failed");
    Ok(if failed == 0 && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_file_names() {
        assert_eq!(name_from("/x/docker_cli.py".as_ref()), "docker_cli");
        assert_eq!(name_from("/x/My Plugin".as_ref()), "my-plugin");
        assert_eq!(name_from("/x/.hidden".as_ref()), "hidden");
        assert_eq!(name_from("/x/___".as_ref()), "under-test");
    }
}
