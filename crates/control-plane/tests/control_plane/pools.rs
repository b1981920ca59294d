//! Warm pools against the real providers: members are claimed by creates,
//! carry the new sandbox's env, workdir and labels, are never reused, are
//! refilled, survive reconciliation, and a refused claim loses nothing.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use stacyvm_control_plane::config::PoolSpec;

use crate::support::Server;

async fn wait_ready(s: &Server, provider: &str, want: u64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let st = s.get("/v1/status").await?;
        let ready = st["pools"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["provider"] == provider))
            .and_then(|p| p["ready"].as_u64())
            .unwrap_or(0);
        if ready >= want {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "pool {provider} never reached {want} ready: {}",
            st["pools"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn claims(s: &Server) -> anyhow::Result<f64> {
    let text = s
        .http
        .get(format!("{}/metrics", s.url))
        .bearer_auth(crate::support::ADMIN_KEY)
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("stacyvm_pool_claims_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

async fn pool_round_trip(provider: &str) -> anyhow::Result<()> {
    let provider_owned = provider.to_owned();
    let s = Server::start(move |c| {
        c.providers = vec![provider_owned.clone()];
        c.pools = vec![PoolSpec {
            provider: provider_owned,
            image: "busybox".into(),
            size: 2,
        }];
        // Reconcile often, so the test sees that members are not taken for orphans.
        c.reconcile_interval = Duration::from_millis(100);
    })
    .await?;
    let result = async {
        wait_ready(&s, provider, 2).await?;
        // Several full reconciliation passes go by; the members stay.
        tokio::time::sleep(Duration::from_secs(2)).await;
        wait_ready(&s, provider, 2).await?;

        let before = claims(&s).await?;
        let (st, a) = s
            .json(
                Method::POST,
                "/v1/sandboxes",
                json!({"image": "busybox", "provider": provider, "env": {"FOO": "one"},
                       "labels": {"team": "a"}, "workdir": "/work/a", "timeout_s": 120}),
            )
            .await?;
        anyhow::ensure!(st == 201, "create: {st} {a}");
        anyhow::ensure!(
            claims(&s).await? == before + 1.0,
            "the create did not come from the pool"
        );
        anyhow::ensure!(a["labels"]["team"] == "a" && a["state"] == "running", "{a}");
        let id_a = a["id"].as_str().unwrap_or_default().to_owned();
        let (st, out) = s
            .json(
                Method::POST,
                &format!("/v1/sandboxes/{id_a}/exec"),
                json!({"cmd": ["sh", "-c", "echo $FOO; pwd; echo secret > /tmp/left-behind"]}),
            )
            .await?;
        anyhow::ensure!(st == 200 && out["stdout"] == "one\n/work/a\n", "{st} {out}");

        // The pool refills, and the next claim is a different, clean member.
        wait_ready(&s, provider, 2).await?;
        let (st, b) = s
            .json(
                Method::POST,
                "/v1/sandboxes",
                json!({"image": "busybox", "provider": provider}),
            )
            .await?;
        anyhow::ensure!(st == 201, "{b}");
        let id_b = b["id"].as_str().unwrap_or_default().to_owned();
        anyhow::ensure!(id_a != id_b);
        let (_, out) = s
            .json(
                Method::POST,
                &format!("/v1/sandboxes/{id_b}/exec"),
                json!({"cmd": ["sh", "-c", "cat /tmp/left-behind 2>&1; echo FOO=$FOO"]}),
            )
            .await?;
        anyhow::ensure!(
            out["stdout"]
                .as_str()
                .is_some_and(|o| o.contains("No such file") && o.contains("FOO=\n")),
            "a claimed member carried something over: {out}"
        );

        // A claim refused by quota gives the member back.
        let (_, t) = s
            .json(
                Method::POST,
                "/v1/tenants",
                json!({"name": format!("pool-{provider}")}),
            )
            .await?;
        let tid = t["id"].as_str().unwrap_or_default().to_owned();
        let (st, _) = s
            .json(
                Method::PUT,
                &format!("/v1/tenants/{tid}/quota"),
                json!({"max_sandboxes": 0, "allowed_providers": [provider]}),
            )
            .await?;
        anyhow::ensure!(st == 200);
        let (_, k) = s
            .json(
                Method::POST,
                "/v1/keys",
                json!({"tenant_id": tid, "role": "member", "name": "m"}),
            )
            .await?;
        let key = k["key"].as_str().unwrap_or_default().to_owned();
        wait_ready(&s, provider, 2).await?;
        let claims_before = claims(&s).await?;
        let r = s
            .http
            .post(format!("{}/v1/sandboxes", s.url))
            .bearer_auth(&key)
            .json(&json!({"image": "busybox", "provider": provider}))
            .send()
            .await?;
        anyhow::ensure!(r.status() == 429, "{}", r.status());
        let st = s.get("/v1/status").await?;
        let pool = &st["pools"][0];
        anyhow::ensure!(
            pool["ready"] == 2,
            "the refused claim lost a member: {pool}"
        );
        anyhow::ensure!(claims(&s).await? == claims_before + 1.0);

        for id in [&id_a, &id_b] {
            let r = s
                .req(Method::DELETE, &format!("/v1/sandboxes/{id}"))
                .send()
                .await?;
            anyhow::ensure!(r.status() == 204);
        }
        Ok(())
    }
    .await;
    let data_dir = s.data_dir.clone();
    let instance = std::fs::read_to_string(data_dir.join("instance.id"))?
        .trim()
        .to_owned();
    s.stop().await?;
    result?;
    // Nothing of the pool is left on the host.
    if provider == "docker" {
        let out = std::process::Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=dev.stacyvm.instance={instance}"),
            ])
            .output()?;
        anyhow::ensure!(
            out.stdout.is_empty(),
            "containers left: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    } else {
        let out = std::process::Command::new("pgrep")
            .args(["-f", &data_dir.display().to_string()])
            .output()?;
        anyhow::ensure!(
            out.stdout.is_empty(),
            "processes left: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn proot_pool_members_are_claimed_once_and_refilled() -> anyhow::Result<()> {
    pool_round_trip("proot").await
}

#[tokio::test(flavor = "multi_thread")]
async fn docker_pool_members_are_claimed_once_and_refilled() -> anyhow::Result<()> {
    pool_round_trip("docker").await
}

#[test]
fn pool_specs_parse_and_refuse_junk() {
    assert_eq!(
        PoolSpec::parse("docker:busybox=4").unwrap(),
        PoolSpec {
            provider: "docker".into(),
            image: "busybox".into(),
            size: 4
        }
    );
    assert_eq!(
        PoolSpec::parse("proot:reg/img:tag=1").unwrap().image,
        "reg/img:tag"
    );
    for bad in [
        "docker",
        "docker:busybox",
        "docker:busybox=x",
        ":busybox=1",
        "docker:=1",
        "d:i=99999",
    ] {
        assert!(PoolSpec::parse(bad).is_err(), "{bad}");
    }
}
