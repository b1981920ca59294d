//! The `template` section of the `api` suite: create → exec-ready from a
//! template against a create from its base image, with and without a warm
//! pool of the template, and how long a template build takes. It runs on a
//! server of its own, started with `--warm-pool docker:template/NAME=N`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::api_suite::{import_busybox, pool_filled};
use crate::baseline::ms;
use crate::report::{Report, Vs};
use crate::server::Server;
use crate::{Args, Ctx};

/// Members the template's warm pool keeps ready.
const POOL_SIZE: usize = 2;
/// The template served from the warm pool, and its twin served cold.
const POOLED: &str = "bench-pooled";
const COLD: &str = "bench-cold";

/// The template builds this section can time: a recipe's name and its
/// `POST /v1/templates` body (without `name`). The base must be a catalog
/// image or a template the server has; `--template-recipes` picks which
/// run. A recipe for a provided template (e.g. `python`, whose base the
/// set-up scripts import) is added here with its steps.
fn recipe(name: &str) -> Option<Value> {
    match name {
        // A few steps of each kind over the busybox image: files made by a
        // command, a file written, env and workdir, a command reading what
        // the earlier steps left, and a start process with a ready check.
        "busybox" => Some(json!({
            "from": "busybox",
            "provider": "docker",
            "steps": [
                {"run": ["sh", "-c",
                    "mkdir -p /app/lib && i=0; while [ $i -lt 200 ]; do echo line $i > /app/lib/f$i; i=$((i+1)); done"]},
                {"write": {"path": "/app/main.sh", "content": "echo ready\n", "mode": "0755"}},
                {"env": {"APP_MODE": "bench"}},
                {"workdir": "/app"},
                {"run": ["sh", "-c", "cat lib/* | wc -l > count"]}
            ],
            "start": ["sh", "-c", "touch /tmp/up; exec sleep 1000000"],
            "ready": ["test", "-e", "/tmp/up"]
        })),
        // The provided `python` template (templates/python.toml) over the
        // root filesystem scripts/build-python-image.sh makes, imported as
        // `debian-python` the way scripts/provide-templates.sh does.
        "python" => Some(json!({
            "from": PYTHON_BASE,
            "provider": "docker",
            "workdir": "/work",
            "env": {
                "PYTHONUNBUFFERED": "1",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                "PIP_BREAK_SYSTEM_PACKAGES": "1"
            },
            "steps": [
                {"run": ["python3", "--version"]},
                {"run": ["python3", "-m", "pip", "--version"]}
            ]
        })),
        _ => None,
    }
}

/// The catalog image the `python` recipe builds on.
const PYTHON_BASE: &str = "debian-python";

/// The python root filesystem tar: `STACYVM_TEST_PYTHON_IMAGE_TAR`, else
/// where scripts/build-python-image.sh puts it.
fn python_tar() -> std::path::PathBuf {
    std::env::var_os("STACYVM_TEST_PYTHON_IMAGE_TAR")
        .map(Into::into)
        .unwrap_or_else(|| crate::baseline::workspace_root().join("target/test-images/python.tar"))
}

pub async fn template_section(ctx: &Ctx, args: &Args, report: &mut Report) -> Result<()> {
    if !args.wants("docker") {
        return Ok(());
    }
    for r in &args.template_recipes {
        if recipe(r).is_none() {
            bail!("--template-recipes: no recipe {r:?} (known: busybox, python)");
        }
    }
    let python = args.template_recipes.iter().any(|r| r == "python");
    if python && !python_tar().exists() {
        bail!(
            "the python recipe needs {} (scripts/build-python-image.sh makes it)",
            python_tar().display()
        );
    }
    let bin = ctx.stacyvm_bin().await?;
    let spec = format!("docker:template/{POOLED}={POOL_SIZE}");
    eprintln!("bench[api]: starting a server with --warm-pool {spec} for the template section");
    let s = Server::start(
        &bin,
        &ctx.agent_bin,
        &format!("{}tpl", ctx.tag),
        &["--warm-pool".into(), spec],
    )
    .await?;
    let result = async {
        import_busybox(&s, ctx).await?;
        if python {
            crate::api_suite::import_image(&s, &python_tar(), PYTHON_BASE).await?;
        }
        builds(&s, args, report).await?;
        creates(&s, args, report).await
    }
    .await;
    s.shutdown().await;
    result
}

/// Starts a build of `body` as template `name`; returns its version.
async fn build_start(s: &Server, name: &str, body: &Value) -> Result<i64> {
    let mut body = body.clone();
    body["name"] = json!(name);
    let v = s
        .json(s.http.post(s.u("/v1/templates")).json(&body))
        .await?;
    v["version"]
        .as_i64()
        .context("the build answered without a version")
}

/// Waits until version `version` of `name` is no longer building; fails
/// unless it became ready.
async fn build_wait(s: &Server, name: &str, version: i64) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let t = s
            .json(
                s.http
                    .get(s.u(&format!("/v1/templates/{name}?version={version}"))),
            )
            .await?;
        match t["state"].as_str() {
            Some("ready") => return Ok(()),
            Some("building") => {}
            _ => bail!("template {name} version {version} did not build: {t}"),
        }
        if Instant::now() > deadline {
            bail!("template {name} version {version} still builds after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Build time of each recipe: `POST /v1/templates` until the version is
/// `ready` (sandbox of the base, steps, snapshot into the catalog,
/// sandbox destroyed), one version after another.
async fn builds(s: &Server, args: &Args, report: &mut Report) -> Result<()> {
    for r in &args.template_recipes {
        let body = recipe(r).context("a known recipe")?;
        eprintln!(
            "bench[api]: template build ({r}), {} times",
            args.template_builds
        );
        let name = format!("bench-build-{r}");
        let mut samples = Vec::new();
        for _ in 0..args.template_builds {
            let t = Instant::now();
            let version = build_start(s, &name, &body).await?;
            build_wait(s, &name, version).await?;
            samples.push(ms(t.elapsed()));
        }
        report.time_ms(
            &format!("api.template.build.{r}"),
            &format!("API docker: template build ({r})"),
            &samples,
            Vs::NONE,
            "POST /v1/templates until ready",
        );
        delete_template(s, &name).await?;
    }
    Ok(())
}

/// Create → exec-ready from the busybox recipe's template (cold: spawn,
/// `start`, `ready`), from a warm pool of it, and from its base image,
/// in alternating rounds.
async fn creates(s: &Server, args: &Args, report: &mut Report) -> Result<()> {
    let body = recipe("busybox").context("the busybox recipe")?;
    for name in [POOLED, COLD] {
        let v = build_start(s, name, &body).await?;
        build_wait(s, name, v).await?;
    }
    eprintln!(
        "bench[api]: create → exec-ready from a template (cold, warm pool) and from its base image, {} times",
        args.cold_iters
    );
    let create = |what: Value| async move {
        let t = Instant::now();
        let v = s
            .json(s.http.post(s.u("/v1/sandboxes")).json(&what))
            .await?;
        let id = v["id"]
            .as_str()
            .context("create answered without an id")?
            .to_owned();
        s.exec_true(&id).await?;
        let d = ms(t.elapsed());
        s.destroy(&id).await?;
        anyhow::Ok(d)
    };
    let image = json!({"image": "busybox", "provider": "docker", "timeout_s": 3600});
    let cold = json!({"template": COLD, "provider": "docker", "timeout_s": 3600});
    let pooled = json!({"template": POOLED, "provider": "docker", "timeout_s": 3600});
    let claims_before = pool_claims(s).await?;
    let (mut from_image, mut from_cold, mut from_pool) = (Vec::new(), Vec::new(), Vec::new());
    // The first round warms every path and is not recorded.
    for round in 0..=args.cold_iters {
        // The refill after the last claim would compete with this round's
        // cold creates for the host: each round starts with a full pool.
        pool_full(s).await?;
        let a = create(image.clone()).await?;
        let b = create(cold.clone()).await?;
        let c = create(pooled.clone()).await?;
        if round > 0 {
            from_image.push(a);
            from_cold.push(b);
            from_pool.push(c);
        }
    }
    let claims = pool_claims(s).await? - claims_before;
    let served = if claims == args.cold_iters as u64 + 1 {
        "every create served by the pool".to_owned()
    } else {
        format!(
            "only {claims} of {} creates served by the pool",
            args.cold_iters + 1
        )
    };
    report.time_ms(
        "api.template.create.image",
        "API docker: create → exec-ready from the base image (busybox)",
        &from_image,
        Vs::NONE,
        "cold, no warm pool; the template rows' reference",
    );
    report.time_ms(
        "api.template.create.cold",
        "API docker: create → exec-ready from a template",
        &from_cold,
        Vs::NONE,
        "cold: spawn of the template's image, start, ready polled",
    );
    report.time_ms(
        "api.template.create.pool",
        "API docker: create → exec-ready from a template's warm pool",
        &from_pool,
        Vs::NONE,
        &served,
    );
    for name in [POOLED, COLD] {
        delete_template(s, name).await?;
    }
    Ok(())
}

async fn delete_template(s: &Server, name: &str) -> Result<()> {
    let resp = s
        .http
        .delete(s.u(&format!("/v1/templates/{name}")))
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("deleting template {name}: HTTP {}", resp.status());
    }
    Ok(())
}

/// Waits (bounded) until the template's pool has all its members ready.
async fn pool_full(s: &Server) -> Result<()> {
    pool_filled(s, "image", &format!("template/{POOLED}"), POOL_SIZE).await
}

/// The creates the template's pool has served (`stacyvm_pool_claims_total`).
async fn pool_claims(s: &Server) -> Result<u64> {
    let text = s.http.get(s.u("/metrics")).send().await?.text().await?;
    Ok(claims_in(&text, &format!("template/{POOLED}")))
}

/// Sums the claims counter of the pool of `image` in a Prometheus text page.
fn claims_in(metrics: &str, image: &str) -> u64 {
    let wanted = format!("image=\"{image}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("stacyvm_pool_claims_total{") && l.contains(&wanted))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_read_for_one_pool_only() {
        let page = "# TYPE stacyvm_pool_claims_total counter\n\
            stacyvm_pool_claims_total{provider=\"docker\",image=\"template/bench-pooled\"} 7\n\
            stacyvm_pool_claims_total{provider=\"docker\",image=\"busybox\"} 3\n";
        assert_eq!(claims_in(page, "template/bench-pooled"), 7);
        assert_eq!(claims_in(page, "template/other"), 0);
    }

    #[test]
    fn the_busybox_recipe_is_known_and_others_are_not() {
        assert!(recipe("busybox").is_some_and(|r| r["from"] == "busybox"));
        assert!(recipe("nope").is_none());
    }
}
