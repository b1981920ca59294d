//! Egress allow lists through the API: entries validated and named when
//! bad, refused by providers that cannot enforce them, and on Docker and
//! namespaces enforced against real servers and a real DNS server beyond the host (a
//! network namespace behind a veth pair that the test creates).

use anyhow::{ensure, Result};
use serde_json::{json, Value};
use stacyvm_provider::egress_filter::far_side::FarSide;

use crate::support::{Api, Server, ServerOptions, StoreKind};

async fn create_err(
    api: &Api,
    network: Value,
    provider: &str,
    status: u16,
    code: &str,
) -> Result<String> {
    let e = api
        .post(
            "/v1/sandboxes",
            json!({"image": "busybox", "provider": provider, "network": network}),
        )
        .await?
        .err(status, code)?;
    Ok(e.message)
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_lists_are_checked_refused_where_unenforceable_and_enforced() -> Result<()> {
    let far = FarSide::start().await?;
    // The allow list is carried out by the worker in the server's own
    // process: it is the one given the test's DNS server as upstream.
    let server = Server::start(
        ServerOptions::new(StoreKind::Sqlite)
            .providers("docker,proot,namespaces,qemu")
            .local_worker()
            .env("STACYVM_EGRESS_DNS_UPSTREAM", &far.dns),
    )?;
    let admin = server.admin();
    admin.import_busybox().await?;

    for (entry, why) in [
        ("10.0.0.0/33", "prefix length"),
        ("bad_name!", "host name"),
        ("-a.example", "host name"),
        ("10.0.0.0/x", "not a number"),
    ] {
        let msg = create_err(
            &admin,
            json!({"allow": [entry]}),
            "docker",
            400,
            "invalid_request",
        )
        .await?;
        ensure!(msg.contains(entry) && msg.contains(why), "{entry}: {msg}");
    }
    let msg = create_err(
        &admin,
        json!({"allow": []}),
        "docker",
        400,
        "invalid_request",
    )
    .await?;
    ensure!(msg.contains("at least one"), "{msg}");
    let many: Vec<String> = (0..65).map(|i| format!("10.0.{i}.0/24")).collect();
    let msg = create_err(
        &admin,
        json!({"allow": many}),
        "docker",
        400,
        "invalid_request",
    )
    .await?;
    ensure!(msg.contains("64"), "{msg}");
    // Providers without a network namespace StacyVM filters refuse the
    // list rather than grant full egress.
    for provider in ["proot"] {
        let msg = create_err(
            &admin,
            json!({"allow": ["10.0.0.1"]}),
            provider,
            409,
            "unsupported",
        )
        .await?;
        ensure!(msg.contains(provider) && msg.contains("allow"), "{msg}");
    }
    // "full" is egress by another name.
    let s = admin
        .create_sandbox(json!({"image": "busybox", "provider": "docker", "network": "full"}))
        .await?;
    ensure!(
        s["network"] == "egress" && s.get("network_allow").is_none(),
        "{s}"
    );
    admin.destroy(s["id"].as_str().unwrap_or_default()).await?;

    for provider in ["docker", "namespaces", "qemu"] {
        let s = admin
            .create_sandbox(json!({"image": "busybox", "provider": provider,
                "network": {"allow": [far.allowed, "Allowed.Test."]}}))
            .await?;
        let id = s["id"].as_str().unwrap_or_default().to_owned();
        let listed = json!([format!("{}/32", far.allowed), "allowed.test"]);
        ensure!(
            s["network"] == "egress" && s["network_allow"] == listed,
            "{provider}: {s}"
        );
        let got = admin.get(&format!("/v1/sandboxes/{id}")).await?.ok(200)?;
        ensure!(got["network_allow"] == listed, "{got}");

        let nc = |addr: &str| format!("nc -w 3 {addr} {} </dev/null 2>/dev/null; true", far.port);
        let out = admin.sh(&id, &nc(&far.allowed)).await?;
        ensure!(
            out.trim() == format!("hello-from-{}", far.allowed),
            "{provider}: {out:?}"
        );
        let out = admin.sh(&id, &nc(&far.denied)).await?;
        ensure!(
            out.is_empty(),
            "{provider}: a denied address answered: {out:?}"
        );
        let out = admin.sh(&id, &nc("allowed.test")).await?;
        ensure!(
            out.trim() == format!("hello-from-{}", far.named),
            "{provider}: {out:?}"
        );
        let out = admin
            .sh(
                &id,
                "nslookup -type=a denied.test >/dev/null 2>&1; echo rc=$?",
            )
            .await?;
        ensure!(out.trim() != "rc=0", "{provider}: {out}");
        ensure!(
            far.asked().iter().all(|n| n == "allowed.test"),
            "{:?}",
            far.asked()
        );
        admin.destroy(&id).await?;
    }
    Ok(())
}
