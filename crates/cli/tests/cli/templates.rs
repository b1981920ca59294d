//! `stacyvm template` and the SDK's template calls against a real server on
//! Docker: a build from a TOML file with an uploaded local directory, its
//! log on stderr while it runs, a sandbox from it, ls/get/logs/rm, and a
//! failing build that exits non-zero with the failing step's output.

use std::collections::BTreeMap;

use anyhow::{ensure, Result};
use futures_util::StreamExt;
use stacyvm_sdk::{CreateSandbox, ExecRequest, TemplateLogEvent, TemplateState};

use crate::support::{run, test_image_tar, unique, Server, TempPath, IMAGE};

#[tokio::test]
async fn template_build_from_a_toml_file_then_ls_get_logs_and_rm() -> Result<()> {
    let server = Server::start("docker")?;
    let admin = server.admin();
    admin.image_import_path(IMAGE, test_image_tar()?).await?;
    let dir = TempPath::new("svm-tpl");
    std::fs::create_dir_all(dir.0.join("src"))?;
    std::fs::write(dir.0.join("src/main.sh"), "echo from-upload\n")?;
    let file = dir.0.join("template.toml");
    std::fs::write(
        &file,
        r#"
from = "busybox"
memory_mb = 256
start = ["sh", "-c", "touch /tmp/up; exec sleep 1000"]
ready = ["test", "-e", "/tmp/up"]

[env]
MODE = "toml"

[[steps]]
run = ["sh", "-c", "mkdir -p /app && echo step-output"]

[[steps]]
upload = { path = "/app/src", dir = "src" }

[[steps]]
write = { path = "/app/note", content = "noted" }

[[steps]]
workdir = "/app"
"#,
    )?;
    let name = unique("cli");
    let path = file.to_string_lossy().into_owned();
    let out = run(server
        .cli()
        .args(["template", "build", &name, "-f", &path, "-o", "json"]))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "build failed: {stderr}");
    ensure!(
        stderr.contains("step 1/4") && stderr.contains("step-output"),
        "the build's progress is shown: {stderr}"
    );
    let built: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        built[0]["state"] == "ready" && built[0]["memory_mb"] == 256,
        "{built}"
    );

    let sbx = admin
        .sandbox_create(&CreateSandbox {
            template: Some(name.clone()),
            ..Default::default()
        })
        .await?;
    ensure!(sbx.template.as_deref() == Some(format!("{name}:1").as_str()));
    ensure!(
        sbx.memory_mb == 256,
        "the template's memory applies: {sbx:?}"
    );
    let seen = admin
        .exec(
            &sbx.id,
            &ExecRequest::shell(
                "sh src/main.sh; cat note; echo; echo $MODE; test -e /tmp/up && pwd",
            ),
        )
        .await?;
    ensure!(
        seen.stdout_text() == "from-upload\nnoted\ntoml\n/app\n",
        "{:?}",
        seen.stdout_text()
    );
    admin.sandbox_destroy(&sbx.id).await?;

    let ls = server.ok(&["template", "ls"])?;
    ensure!(ls.contains(&name) && ls.contains("ready"), "{ls}");
    let all = server.ok(&["template", "get", &name, "--all", "-o", "json"])?;
    ensure!(
        serde_json::from_str::<serde_json::Value>(&all)?[0]["version"] == 1,
        "{all}"
    );
    let logs = server.ok(&["template", "logs", &name])?;
    ensure!(
        logs.contains("step-output") && logs.contains("built "),
        "{logs}"
    );
    let mut events = admin.template_logs(&name, Some(1)).await?;
    let mut last = None;
    while let Some(ev) = events.next().await {
        last = Some(ev?);
    }
    ensure!(
        matches!(
            last,
            Some(TemplateLogEvent::End {
                state: TemplateState::Ready,
                ..
            })
        ),
        "{last:?}"
    );
    ensure!(admin.template_list().await?.iter().any(|t| t.name == name));

    // A failing step: non-zero exit, the step's output in the message.
    std::fs::write(
        &file,
        "from = \"busybox\"\n[[steps]]\nrun = [\"sh\", \"-c\", \"echo kaboom >&2; exit 7\"]\n",
    )?;
    let out = run(server.cli().args(["template", "build", &name, "-f", &path]))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "a failed build exits non-zero");
    ensure!(
        stderr.contains("kaboom") && stderr.contains("code 7") && stderr.contains("version 2"),
        "{stderr}"
    );
    // The ready version is still what creates take.
    ensure!(admin.template_get(&name, None).await?.state == TemplateState::Failed);
    let again = admin
        .sandbox_create(&CreateSandbox {
            template: Some(name.clone()),
            env: BTreeMap::from([("MODE".into(), "mine".into())]),
            ..Default::default()
        })
        .await?;
    ensure!(again.template.as_deref() == Some(format!("{name}:1").as_str()));
    admin.sandbox_destroy(&again.id).await?;

    // A file with an unknown key is refused before anything is sent.
    std::fs::write(&file, "from = \"busybox\"\nstepz = []\n")?;
    let out = run(server.cli().args(["template", "build", &name, "-f", &path]))?;
    ensure!(!out.status.success());

    server.ok(&["template", "rm", &name])?;
    let out = run(server.cli().args(["template", "get", &name]))?;
    ensure!(!out.status.success(), "a deleted template is gone");
    Ok(())
}
