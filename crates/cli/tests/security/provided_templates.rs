//! The provided `python` template, built by the project's own script as
//! set-up builds it: the operator's template, which a member of another
//! tenant starts and runs Python in, and whose sandbox holds none of the
//! server's secrets or data.

use std::process::Command;

use anyhow::{ensure, Context, Result};
use serde_json::{json, Value};

use crate::support::{
    python_image_tar, random_hex, s, workspace_root, Server, ServerOptions, StoreKind,
};

/// Runs `scripts/provide-templates.sh` for the `python` template against
/// `server` with the admin key, as `scripts/setup.sh` does.
async fn provide_python(server: &Server) -> Result<()> {
    let tar = python_image_tar()?;
    let script = workspace_root().join("scripts/provide-templates.sh");
    let (url, key) = (server.url.clone(), server.admin_key.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&script)
            .args(["--python-tar"])
            .arg(&tar)
            .arg("python")
            .env("STACYVM_URL", url)
            .env("STACYVM_API_KEY", key)
            .env("STACYVM_BIN", env!("CARGO_BIN_EXE_stacyvm"))
            .env("NO_COLOR", "1")
            .output()
    })
    .await?
    .context("running scripts/provide-templates.sh")?;
    ensure!(
        out.status.success(),
        "scripts/provide-templates.sh failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_runs_python_in_the_provided_template_and_reaches_no_server_secret() -> Result<()>
{
    let server = Server::start(ServerOptions::new(StoreKind::Sqlite).providers("docker"))?;
    let admin = server.admin();
    provide_python(&server).await?;
    let operator = admin.get("/v1/whoami").await?.ok(200)?;
    let built = admin.get("/v1/templates/python").await?.ok(200)?;
    ensure!(
        built["state"] == "ready" && built["version"] == 1,
        "{built}"
    );
    // A second run finds the template ready and builds nothing.
    provide_python(&server).await?;
    let versions = admin.get("/v1/templates/python/versions").await?.ok(200)?;
    ensure!(
        versions["templates"].as_array().map(Vec::len) == Some(1),
        "a rerun built again: {versions}"
    );

    let (tenant, member) = admin.tenant_with("member").await?;
    // The operator's template, seen by another tenant.
    let seen = member.get("/v1/templates/python").await?.ok(200)?;
    ensure!(
        seen["tenant_id"] == operator["tenant_id"] && seen["tenant_id"] != tenant.as_str(),
        "the python template should be the operator's: {seen}"
    );
    let sb = member.create_sandbox(json!({"template": "python"})).await?;
    let id = s(&sb, "id")?;
    ensure!(
        sb["template"] == "python:1" && sb["tenant_id"] == tenant.as_str(),
        "{sb}"
    );
    let r = member
        .exec(id, json!({"cmd": ["python3", "-c", "print(1+1)"]}))
        .await?;
    ensure!(
        r["exit_code"] == 0 && r["stdout"] == "2\n",
        "python3 -c 'print(1+1)': {r}"
    );

    // What Python in a member's sandbox tries to read of the server.
    let data = server.data_dir().display().to_string();
    let pid = server.pid().context("the server's pid")?;
    let done = format!("probe-done-{}", random_hex(8));
    let probe = format!(
        r#"
import glob, os
def show(what, f):
    try:
        print(what, f())
    except Exception as e:
        print(what, "refused:", type(e).__name__)
data = {data:?}
show("key", lambda: open(data + "/admin.key").read())
show("list", lambda: os.listdir(data))
show("db", lambda: open(data + "/stacyvm.db", "rb").read(64))
show("root", lambda: open("/proc/1/root" + data + "/admin.key").read())
show("server", lambda: open("/proc/{pid}/environ", "rb").read())
for p in glob.glob("/proc/[0-9]*/environ"):
    show(p, lambda: open(p, "rb").read())
for p in glob.glob("/proc/[0-9]*/root" + data + "/admin.key"):
    show(p, lambda: open(p).read())
print({done:?})
"#
    );
    let r: Value = member
        .exec(id, json!({"cmd": ["python3", "-c", probe]}))
        .await?;
    let text = format!("{}{}", s(&r, "stdout")?, s(&r, "stderr")?);
    ensure!(
        text.contains(&done),
        "the probe did not run to its end: {r}"
    );
    ensure!(
        !text.contains(&server.admin_key),
        "a member's python sandbox read the admin key"
    );
    ensure!(
        !text.contains("STACYVM_ADMIN_KEY"),
        "a member's python sandbox read the server's environment"
    );
    ensure!(
        !text.contains("SQLite format"),
        "a member's python sandbox read the database"
    );
    ensure!(
        !text.contains("instance.id") && !text.contains("'images'"),
        "a member's python sandbox listed the data dir: {text}"
    );
    member.destroy(id).await?;
    // The template's image goes with it, here and in Docker (each run's is
    // its own tenant's); the base image's Docker copy is shared by digest.
    admin.delete("/v1/templates/python").await?.ok(204)?;
    Ok(())
}
