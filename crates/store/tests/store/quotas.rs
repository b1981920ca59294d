//! Quotas: storage, and their enforcement inside `sandbox_create`, including
//! under concurrency.

use std::sync::Arc;

use anyhow::Context;
use stacyvm_core::{Error, SandboxState, TenantId};
use stacyvm_store::{CreateOutcome, DynStore, Quota, SandboxFilter};

use crate::fixtures::{self, create, new_tenant};
use crate::harness::TestDb;

pub async fn quota_defaults_set_and_replace(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "q").await?;
    assert_eq!(
        store.quota_get(&t).await?,
        Quota::default(),
        "unlimited until set"
    );
    let full = Quota {
        max_sandboxes: Some(10),
        max_cpu: Some(4.5),
        max_memory_mb: Some(8192),
        max_timeout_s: Some(3600),
        max_exec_per_minute: Some(120),
        allowed_providers: Some(vec!["docker".into(), "proot".into()]),
        max_concurrent_execs: Some(100),
        max_volumes: Some(3),
        max_volume_mb: Some(4096),
        max_templates: Some(5),
    };
    store.quota_set(&t, &full).await?;
    assert_eq!(store.quota_get(&t).await?, full);
    let partial = Quota {
        max_sandboxes: Some(1),
        ..Quota::default()
    };
    store.quota_set(&t, &partial).await?;
    assert_eq!(
        store.quota_get(&t).await?,
        partial,
        "set replaces every limit"
    );
    // Another tenant is unaffected.
    let other = new_tenant(store, "other").await?;
    assert_eq!(store.quota_get(&other).await?, Quota::default());
    Ok(())
}

pub async fn quota_of_missing_tenant_is_not_found(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let missing = TenantId::generate();
    assert!(matches!(
        store.quota_get(&missing).await,
        Err(Error::NotFound(_))
    ));
    let q = Quota {
        max_sandboxes: Some(1),
        ..Quota::default()
    };
    assert!(matches!(
        store.quota_set(&missing, &q).await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

async fn live_count(store: &DynStore, tenant: &TenantId) -> anyhow::Result<usize> {
    let page = store
        .sandbox_list(&SandboxFilter {
            tenant_id: Some(tenant.clone()),
            ..Default::default()
        })
        .await?;
    Ok(page.items.iter().filter(|s| !s.state.is_terminal()).count())
}

pub async fn concurrent_creates_never_overshoot_max_sandboxes(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "racy").await?;
    store
        .quota_set(
            &t,
            &Quota {
                max_sandboxes: Some(5),
                ..Quota::default()
            },
        )
        .await?;
    // A second store on the same database, as a second control-plane
    // replica (or process) would have: the limit holds across both.
    let stores: Arc<[DynStore]> = Arc::from(vec![store.clone(), db.open_again().await?]);
    fixtures::warm_up(&stores).await?;
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let stores = stores.clone();
            let barrier = barrier.clone();
            let rec = fixtures::sandbox(&t);
            tokio::spawn(async move {
                barrier.wait().await;
                stores[i % stores.len()].sandbox_create(&rec).await
            })
        })
        .collect();
    let (mut created, mut refused) = (0, 0);
    for task in tasks {
        match task.await.context("create task")? {
            Ok(CreateOutcome::Created(_)) => created += 1,
            Ok(CreateOutcome::Existing(r)) => panic!("no idempotency key, yet existing {}", r.id),
            Err(Error::QuotaExceeded(msg)) => {
                assert_eq!(
                    msg,
                    "quota exceeded: max_sandboxes is 5 and the tenant has 5 live sandboxes"
                );
                refused += 1
            }
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!((created, refused), (5, 45));
    assert_eq!(live_count(store, &t).await?, 5);
    Ok(())
}

pub async fn cpu_and_memory_limits(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "sized").await?;
    store
        .quota_set(
            &t,
            &Quota {
                max_cpu: Some(2.0),
                max_memory_mb: Some(1024),
                ..Quota::default()
            },
        )
        .await?;
    let sized = |cpu: f64, memory_mb: i64| {
        let mut r = fixtures::sandbox(&t);
        r.cpu = cpu;
        r.memory_mb = memory_mb;
        r
    };
    create(store, &sized(1.5, 256)).await?;
    match store.sandbox_create(&sized(1.0, 256)).await {
        Err(Error::QuotaExceeded(msg)) => assert!(msg.contains("max_cpu is 2"), "{msg}"),
        other => panic!("expected max_cpu refusal, got {other:?}"),
    }
    // Exactly at the limit is allowed, float sums included (0.1 + 0.2 + 0.2).
    create(store, &sized(0.1, 256)).await?;
    create(store, &sized(0.2, 256)).await?;
    create(store, &sized(0.2, 256)).await?;
    match store.sandbox_create(&sized(0.01, 1)).await {
        Err(Error::QuotaExceeded(msg)) => assert!(msg.contains("max_cpu"), "{msg}"),
        other => panic!("expected max_cpu refusal, got {other:?}"),
    }

    let m = new_tenant(store, "memory").await?;
    store
        .quota_set(
            &m,
            &Quota {
                max_memory_mb: Some(1024),
                ..Quota::default()
            },
        )
        .await?;
    let mem = |memory_mb: i64| {
        let mut r = fixtures::sandbox(&m);
        r.memory_mb = memory_mb;
        r
    };
    create(store, &mem(512)).await?;
    create(store, &mem(512)).await?;
    match store.sandbox_create(&mem(1)).await {
        Err(Error::QuotaExceeded(msg)) => assert!(msg.contains("max_memory_mb is 1024"), "{msg}"),
        other => panic!("expected max_memory_mb refusal, got {other:?}"),
    }
    Ok(())
}

pub async fn terminal_sandboxes_free_quota(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "churn").await?;
    store
        .quota_set(
            &t,
            &Quota {
                max_sandboxes: Some(2),
                max_cpu: Some(2.0),
                ..Quota::default()
            },
        )
        .await?;
    let mut live = create(store, &fixtures::sandbox(&t)).await?;
    create(store, &fixtures::sandbox(&t)).await?;
    assert!(matches!(
        store.sandbox_create(&fixtures::sandbox(&t)).await,
        Err(Error::QuotaExceeded(_))
    ));
    for terminal in [
        SandboxState::Destroyed,
        SandboxState::Failed,
        SandboxState::Lost,
    ] {
        live.state = terminal;
        store.sandbox_update(&live).await?;
        live = create(store, &fixtures::sandbox(&t))
            .await
            .context(terminal)?;
        assert!(matches!(
            store.sandbox_create(&fixtures::sandbox(&t)).await,
            Err(Error::QuotaExceeded(_))
        ));
    }
    assert_eq!(live_count(store, &t).await?, 2);
    Ok(())
}

pub async fn quota_messages_name_limit_and_numbers(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "msgs").await?;
    store
        .quota_set(
            &t,
            &Quota {
                max_memory_mb: Some(1000),
                ..Quota::default()
            },
        )
        .await?;
    let mut r = fixtures::sandbox(&t);
    r.memory_mb = 700;
    create(store, &r).await?;
    let mut big = fixtures::sandbox(&t);
    big.memory_mb = 400;
    match store.sandbox_create(&big).await {
        Err(e @ Error::QuotaExceeded(_)) => {
            assert_eq!(e.code(), "quota_exceeded");
            let msg = e.to_string();
            for part in ["max_memory_mb is 1000", "700", "400"] {
                assert!(msg.contains(part), "{msg:?} lacks {part:?}");
            }
        }
        other => panic!("expected quota_exceeded, got {other:?}"),
    }
    Ok(())
}

/// An empty provider list (no provider allowed) is kept as such: it is not
/// the unset list (the server's default set).
pub async fn an_empty_provider_list_is_not_unset(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "no-providers").await?;
    let none_allowed = Quota {
        allowed_providers: Some(Vec::new()),
        ..Quota::default()
    };
    store.quota_set(&t, &none_allowed).await?;
    assert_eq!(store.quota_get(&t).await?, none_allowed);
    assert_eq!(db.open_again().await?.quota_get(&t).await?, none_allowed);
    store.quota_set(&t, &Quota::default()).await?;
    assert_eq!(store.quota_get(&t).await?.allowed_providers, None);
    Ok(())
}
