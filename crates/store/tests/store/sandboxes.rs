//! Sandboxes: records, filtered lists and paging, fencing tokens, leases,
//! reconciler queries and idempotent creates.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use anyhow::Context;
use stacyvm_core::{Error, Network, SandboxId, SandboxState, TenantId, WorkerId};
use stacyvm_store::{CreateOutcome, Failure, PageRequest, SandboxFilter};

use crate::fixtures::{self, create, new_tenant, with_labels, with_state};
use crate::harness::TestDb;

pub async fn sandbox_round_trips_every_field(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "full").await?;
    let rec = stacyvm_store::SandboxRecord {
        id: SandboxId::generate(),
        tenant_id: t.clone(),
        state: SandboxState::Running,
        provider: "proot".into(),
        worker_id: Some(WorkerId::generate()),
        image: "alpine:3.20".into(),
        template: Some("python".into()),
        cpu: 0.25,
        memory_mb: 768,
        network: Network::Egress,
        labels: BTreeMap::from([
            ("app".into(), "web".into()),
            ("quote\"s".into(), "ünïcode ✓ 'and' \\ slashes".into()),
        ]),
        env: BTreeMap::from([
            ("PATH".into(), "/bin".into()),
            ("EMPTY".into(), String::new()),
        ]),
        workdir: Some("/work".into()),
        timeout_s: 86_400,
        created_at: fixtures::at(0),
        started_at: Some(fixtures::at(1)),
        expires_at: Some(fixtures::at(86_400)),
        destroyed_at: Some(fixtures::at(2)),
        failure: Some(Failure {
            code: "image_not_found".into(),
            message: "no such image".into(),
        }),
        lease_expires_at: Some(fixtures::at(30)),
        fencing_token: 7,
        idempotency_key: Some("req-123".into()),
        egress_allow: stacyvm_core::EgressRule::parse_list(&[
            "10.0.0.0/8",
            "2001:db8::/32",
            "pypi.org",
        ])
        .expect("a valid allow list"),
    };
    let created = create(store, &rec).await?;
    assert_eq!(created, rec, "create returns what it stored");
    assert_eq!(store.sandbox_get(&rec.id).await?, Some(rec.clone()));

    let minimal = fixtures::sandbox(&t);
    assert_eq!(create(store, &minimal).await?, minimal);
    assert_eq!(store.sandbox_get(&minimal.id).await?, Some(minimal));
    assert_eq!(store.sandbox_get(&SandboxId::generate()).await?, None);

    // Creating the same id twice is a conflict, not a second row.
    match store.sandbox_create(&rec_without_key(&rec)).await {
        Err(Error::Conflict(_)) => {}
        other => panic!("expected conflict, got {other:?}"),
    }
    Ok(())
}

fn rec_without_key(rec: &stacyvm_store::SandboxRecord) -> stacyvm_store::SandboxRecord {
    let mut r = rec.clone();
    r.idempotency_key = None;
    r
}

pub async fn sandbox_create_for_missing_tenant_is_not_found(db: &TestDb) -> anyhow::Result<()> {
    let missing = TenantId::generate();
    match db.store.sandbox_create(&fixtures::sandbox(&missing)).await {
        Err(Error::NotFound(msg)) => assert!(msg.contains(missing.as_str()), "{msg}"),
        other => panic!("expected not_found, got {other:?}"),
    }
    Ok(())
}

pub async fn sandbox_list_filters(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let a = new_tenant(store, "a").await?;
    let b = new_tenant(store, "b").await?;
    let a_web = create(
        store,
        &with_labels(fixtures::sandbox(&a), &[("app", "web"), ("env", "prod")]),
    )
    .await?;
    let a_web_dev = create(
        store,
        &with_state(
            with_labels(fixtures::sandbox(&a), &[("app", "web"), ("env", "dev")]),
            SandboxState::Running,
        ),
    )
    .await?;
    let a_db = create(store, &with_labels(fixtures::sandbox(&a), &[("app", "db")])).await?;
    let b_web = create(
        store,
        &with_labels(fixtures::sandbox(&b), &[("app", "web"), ("env", "prod")]),
    )
    .await?;
    // A label whose key looks like a JSON path must match literally.
    let a_dotted = create(store, &with_labels(fixtures::sandbox(&a), &[("a.b", "c")])).await?;

    let list = |tenant: Option<&TenantId>, state: Option<SandboxState>, labels: &[(&str, &str)]| {
        SandboxFilter {
            tenant_id: tenant.cloned(),
            state,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
    };
    let ids = |items: Vec<stacyvm_store::SandboxRecord>| {
        items.into_iter().map(|s| s.id).collect::<Vec<_>>()
    };

    let all = store.sandbox_list(&list(None, None, &[])).await?;
    assert_eq!(
        ids(all.items),
        vec![
            a_web.id.clone(),
            a_web_dev.id.clone(),
            a_db.id.clone(),
            b_web.id.clone(),
            a_dotted.id.clone()
        ]
    );
    let of_a = store.sandbox_list(&list(Some(&a), None, &[])).await?;
    assert_eq!(
        ids(of_a.items),
        vec![
            a_web.id.clone(),
            a_web_dev.id.clone(),
            a_db.id.clone(),
            a_dotted.id.clone()
        ]
    );
    let web = store
        .sandbox_list(&list(None, None, &[("app", "web")]))
        .await?;
    assert_eq!(
        ids(web.items),
        vec![a_web.id.clone(), a_web_dev.id.clone(), b_web.id.clone()]
    );
    let web_prod_a = store
        .sandbox_list(&list(Some(&a), None, &[("app", "web"), ("env", "prod")]))
        .await?;
    assert_eq!(ids(web_prod_a.items), vec![a_web.id.clone()]);
    let running = store
        .sandbox_list(&list(Some(&a), Some(SandboxState::Running), &[]))
        .await?;
    assert_eq!(ids(running.items), vec![a_web_dev.id.clone()]);
    let either = store
        .sandbox_list(&SandboxFilter {
            any_state: vec![SandboxState::Paused, SandboxState::Running],
            ..Default::default()
        })
        .await?;
    assert_eq!(ids(either.items), vec![a_web_dev.id.clone()]);
    let pending_or_running = store
        .sandbox_list(&SandboxFilter {
            tenant_id: Some(b.clone()),
            any_state: vec![a_db.state, SandboxState::Running],
            ..Default::default()
        })
        .await?;
    assert_eq!(ids(pending_or_running.items), vec![b_web.id.clone()]);
    let running_db = store
        .sandbox_list(&list(None, Some(SandboxState::Running), &[("app", "db")]))
        .await?;
    assert!(running_db.items.is_empty());
    let dotted = store
        .sandbox_list(&list(None, None, &[("a.b", "c")]))
        .await?;
    assert_eq!(ids(dotted.items), vec![a_dotted.id.clone()]);
    let nested_path = store.sandbox_list(&list(None, None, &[("a", "b")])).await?;
    assert!(nested_path.items.is_empty());
    let injection = store
        .sandbox_list(&list(None, None, &[("app' OR '1'='1", "x")]))
        .await?;
    assert!(injection.items.is_empty());
    Ok(())
}

pub async fn sandbox_list_pages_over_more_than_limit(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "many").await?;
    let other = new_tenant(store, "noise").await?;
    let mut mine = Vec::new();
    for i in 0..23 {
        mine.push(create(store, &fixtures::sandbox(&t)).await?.id);
        if i % 4 == 0 {
            create(store, &fixtures::sandbox(&other)).await?;
        }
    }
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut filter = SandboxFilter {
        tenant_id: Some(t.clone()),
        page: PageRequest {
            cursor: None,
            limit: 5,
        },
        ..Default::default()
    };
    loop {
        let page = store.sandbox_list(&filter).await?;
        pages += 1;
        assert!(page.items.len() <= 5);
        seen.extend(page.items.into_iter().map(|s| s.id));
        match page.next_cursor {
            Some(c) => filter.page.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(pages, 5);
    assert_eq!(seen, mine, "every sandbox once, in creation order");

    // An exact multiple of the limit ends without an empty extra page.
    filter.page = PageRequest {
        cursor: None,
        limit: 23,
    };
    let exact = store.sandbox_list(&filter).await?;
    assert_eq!(exact.items.len(), 23);
    assert_eq!(exact.next_cursor, None);

    // Limits are clamped to 1..=1000.
    filter.page = PageRequest {
        cursor: None,
        limit: 0,
    };
    let one = store.sandbox_list(&filter).await?;
    assert_eq!(one.items.len(), 1);
    assert!(one.next_cursor.is_some());
    filter.page = PageRequest {
        cursor: None,
        limit: 1_000_000,
    };
    let capped = store.sandbox_list(&filter).await?;
    assert_eq!(capped.items.len(), 23);
    assert_eq!(capped.next_cursor, None);

    filter.page = PageRequest {
        cursor: Some("not-a-cursor".into()),
        limit: 5,
    };
    assert!(matches!(
        store.sandbox_list(&filter).await,
        Err(Error::InvalidRequest(_))
    ));
    Ok(())
}

pub async fn sandbox_update_checks_fencing_token(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "fenced").await?;
    let mut rec = create(store, &fixtures::sandbox(&t)).await?;

    rec.state = SandboxState::Running;
    rec.worker_id = Some(WorkerId::generate());
    rec.started_at = Some(fixtures::at(1));
    rec.expires_at = Some(fixtures::at(600));
    rec.lease_expires_at = Some(fixtures::at(30));
    rec.labels = BTreeMap::from([("changed".into(), "yes".into())]);
    store.sandbox_update(&rec).await?;
    assert_eq!(store.sandbox_get(&rec.id).await?, Some(rec.clone()));

    rec.state = SandboxState::Failed;
    rec.failure = Some(Failure {
        code: "spawn".into(),
        message: "exit 1".into(),
    });
    rec.destroyed_at = Some(fixtures::at(2));
    store.sandbox_update(&rec).await?;
    assert_eq!(store.sandbox_get(&rec.id).await?, Some(rec.clone()));

    let mut stale = rec.clone();
    stale.fencing_token -= 1;
    stale.state = SandboxState::Destroyed;
    match store.sandbox_update(&stale).await {
        Err(Error::Conflict(msg)) => assert!(msg.starts_with("stale fencing token"), "{msg}"),
        other => panic!("expected conflict, got {other:?}"),
    }
    let mut ahead = rec.clone();
    ahead.fencing_token += 1;
    assert!(matches!(
        store.sandbox_update(&ahead).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(
        store.sandbox_get(&rec.id).await?,
        Some(rec.clone()),
        "refused updates change nothing"
    );

    let missing = fixtures::sandbox(&t);
    assert!(matches!(
        store.sandbox_update(&missing).await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

pub async fn sandbox_claim_increments_token(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "claimed").await?;
    let rec = create(store, &fixtures::sandbox(&t)).await?;
    let w1 = WorkerId::generate();
    let w2 = WorkerId::generate();

    let lease1 = fixtures::at(30);
    let claimed = store.sandbox_claim(&rec.id, &w1, lease1).await?;
    assert_eq!(claimed.fencing_token, rec.fencing_token + 1);
    assert_eq!(claimed.worker_id.as_ref(), Some(&w1));
    assert_eq!(claimed.lease_expires_at, Some(lease1));
    assert_eq!(store.sandbox_get(&rec.id).await?, Some(claimed.clone()));

    let lease2 = fixtures::at(60);
    let taken = store.sandbox_claim(&rec.id, &w2, lease2).await?;
    assert_eq!(taken.fencing_token, rec.fencing_token + 2);
    assert_eq!(taken.worker_id.as_ref(), Some(&w2));

    // The first holder's token is stale now.
    let mut from_w1 = claimed.clone();
    from_w1.state = SandboxState::Running;
    assert!(matches!(
        store.sandbox_update(&from_w1).await,
        Err(Error::Conflict(_))
    ));
    let mut from_w2 = taken.clone();
    from_w2.state = SandboxState::Running;
    store.sandbox_update(&from_w2).await?;

    // Concurrent claims each get their own token: none is handed out twice.
    let store2 = db.open_again().await?;
    let stores = Arc::new([store.clone(), store2]);
    let claims: Vec<_> = (0..10)
        .map(|i| {
            let stores = stores.clone();
            let id = rec.id.clone();
            tokio::spawn(async move {
                stores[i % 2]
                    .sandbox_claim(&id, &WorkerId::generate(), fixtures::at(90))
                    .await
            })
        })
        .collect();
    let mut tokens = BTreeSet::new();
    for c in claims {
        tokens.insert(c.await.context("claim task")??.fencing_token);
    }
    assert_eq!(tokens.len(), 10);
    assert_eq!(tokens.last().copied(), Some(rec.fencing_token + 12));

    match store
        .sandbox_claim(&SandboxId::generate(), &w1, lease1)
        .await
    {
        Err(Error::NotFound(_)) => {}
        other => panic!("expected not_found, got {other:?}"),
    }
    Ok(())
}

pub async fn lease_renew_extends_live_sandboxes_of_the_worker(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "leases").await?;
    let w = WorkerId::generate();
    let other = WorkerId::generate();
    let old = fixtures::at(10);
    let mut held = Vec::new();
    for state in [
        SandboxState::Running,
        SandboxState::Paused,
        SandboxState::Destroyed,
    ] {
        let rec = create(store, &with_state(fixtures::sandbox(&t), state)).await?;
        held.push(store.sandbox_claim(&rec.id, &w, old).await?);
    }
    let rec = create(store, &fixtures::sandbox(&t)).await?;
    let elsewhere = store.sandbox_claim(&rec.id, &other, old).await?;

    let new = fixtures::at(120);
    assert_eq!(store.lease_renew(&w, new).await?, 2);
    for h in &held {
        let now = store.sandbox_get(&h.id).await?.context("held sandbox")?;
        let expected = if h.state.is_terminal() { old } else { new };
        assert_eq!(now.lease_expires_at, Some(expected), "{}", h.state);
        assert_eq!(
            now.fencing_token, h.fencing_token,
            "renewing is not a change of owner"
        );
    }
    assert_eq!(store.sandbox_get(&elsewhere.id).await?, Some(elsewhere));
    assert_eq!(store.lease_renew(&WorkerId::generate(), new).await?, 0);
    Ok(())
}

pub async fn live_expired_and_counts(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let a = new_tenant(store, "a").await?;
    let b = new_tenant(store, "b").await?;
    let now = fixtures::at(0);
    let with_expiry =
        |tenant: &TenantId, state: SandboxState, expires: Option<time::OffsetDateTime>| {
            let mut r = with_state(fixtures::sandbox(tenant), state);
            r.expires_at = expires;
            r
        };
    let past = create(
        store,
        &with_expiry(
            &a,
            SandboxState::Running,
            Some(now - time::Duration::seconds(5)),
        ),
    )
    .await?;
    let exactly_now = create(store, &with_expiry(&b, SandboxState::Paused, Some(now))).await?;
    let future = create(
        store,
        &with_expiry(
            &a,
            SandboxState::Running,
            Some(now + time::Duration::microseconds(1)),
        ),
    )
    .await?;
    let never = create(store, &with_expiry(&b, SandboxState::Pending, None)).await?;
    let destroyed_past = create(
        store,
        &with_expiry(
            &a,
            SandboxState::Destroyed,
            Some(now - time::Duration::seconds(9)),
        ),
    )
    .await?;
    let failed = create(store, &with_expiry(&b, SandboxState::Failed, None)).await?;
    let lost = create(store, &with_expiry(&a, SandboxState::Lost, Some(now))).await?;
    let stopping = create(store, &with_expiry(&a, SandboxState::Stopping, None)).await?;
    let starting = create(store, &with_expiry(&b, SandboxState::Starting, None)).await?;

    let live: Vec<_> = store
        .sandbox_list_live()
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(
        live,
        vec![
            past.id.clone(),
            exactly_now.id.clone(),
            future.id.clone(),
            never.id.clone(),
            stopping.id.clone(),
            starting.id.clone()
        ]
    );
    let expired: Vec<_> = store
        .sandbox_list_expired(now)
        .await?
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(
        expired,
        vec![past.id.clone(), exactly_now.id.clone()],
        "at or before now, live only"
    );
    let _ = (destroyed_past, failed, lost);

    let counts = store.sandbox_count_by_state().await?;
    let counts: BTreeMap<String, i64> = counts.into_iter().collect();
    let expected: BTreeMap<String, i64> = [
        ("running", 2),
        ("paused", 1),
        ("pending", 1),
        ("destroyed", 1),
        ("failed", 1),
        ("lost", 1),
        ("stopping", 1),
        ("starting", 1),
    ]
    .into_iter()
    .map(|(s, n)| (s.to_owned(), n))
    .collect();
    assert_eq!(counts, expected);

    let of = |t: &TenantId| {
        let t = t.clone();
        async move {
            Ok::<BTreeMap<String, i64>, anyhow::Error>(
                store
                    .sandbox_count_by_state_of(&t)
                    .await?
                    .into_iter()
                    .collect(),
            )
        }
    };
    let counts_a = of(&a).await?;
    let expected_a: BTreeMap<String, i64> = [
        ("running", 2),
        ("destroyed", 1),
        ("lost", 1),
        ("stopping", 1),
    ]
    .into_iter()
    .map(|(s, n)| (s.to_owned(), n))
    .collect();
    assert_eq!(counts_a, expected_a, "tenant a only");
    let counts_b = of(&b).await?;
    let expected_b: BTreeMap<String, i64> = [
        ("paused", 1),
        ("pending", 1),
        ("failed", 1),
        ("starting", 1),
    ]
    .into_iter()
    .map(|(s, n)| (s.to_owned(), n))
    .collect();
    assert_eq!(counts_b, expected_b, "tenant b only");
    assert!(
        of(&TenantId::generate()).await?.is_empty(),
        "a tenant without sandboxes"
    );
    Ok(())
}

pub async fn idempotency_keys(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let a = new_tenant(store, "a").await?;
    let b = new_tenant(store, "b").await?;
    let mut first = fixtures::sandbox(&a);
    first.idempotency_key = Some("create-1".into());
    let first = create(store, &first).await?;

    // The retry carries a new id and spec, and gets the first sandbox back.
    let mut retry = fixtures::sandbox(&a);
    retry.idempotency_key = Some("create-1".into());
    retry.image = "other".into();
    match store.sandbox_create(&retry).await? {
        CreateOutcome::Existing(r) => assert_eq!(r, first),
        CreateOutcome::Created(r) => panic!("created a second sandbox {}", r.id),
    }
    assert_eq!(store.sandbox_get(&retry.id).await?, None);

    // Keys are per tenant.
    let mut other_tenant = fixtures::sandbox(&b);
    other_tenant.idempotency_key = Some("create-1".into());
    create(store, &other_tenant).await?;

    // No key: every create is new.
    create(store, &fixtures::sandbox(&a)).await?;
    create(store, &fixtures::sandbox(&a)).await?;

    // A replay is answered even when the quota is now full: it creates nothing.
    store
        .quota_set(
            &a,
            &stacyvm_store::Quota {
                max_sandboxes: Some(1),
                ..Default::default()
            },
        )
        .await?;
    let mut replay = fixtures::sandbox(&a);
    replay.idempotency_key = Some("create-1".into());
    assert!(matches!(
        store.sandbox_create(&replay).await?,
        CreateOutcome::Existing(_)
    ));
    let mut fresh = fixtures::sandbox(&a);
    fresh.idempotency_key = Some("create-2".into());
    assert!(matches!(
        store.sandbox_create(&fresh).await,
        Err(Error::QuotaExceeded(_))
    ));
    Ok(())
}

pub async fn concurrent_creates_with_one_idempotency_key_make_one_sandbox(
    db: &TestDb,
) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "retries").await?;
    let stores = Arc::new([store.clone(), db.open_again().await?]);
    fixtures::warm_up(&*stores).await?;
    let barrier = Arc::new(tokio::sync::Barrier::new(20));
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let stores = stores.clone();
            let barrier = barrier.clone();
            let mut rec = fixtures::sandbox(&t);
            rec.idempotency_key = Some("same".into());
            tokio::spawn(async move {
                barrier.wait().await;
                stores[i % 2].sandbox_create(&rec).await
            })
        })
        .collect();
    let mut created = Vec::new();
    let mut existing = Vec::new();
    for task in tasks {
        match task.await.context("create task")?? {
            CreateOutcome::Created(r) => created.push(r),
            CreateOutcome::Existing(r) => existing.push(r),
        }
    }
    assert_eq!(created.len(), 1);
    assert_eq!(existing.len(), 19);
    assert!(existing.iter().all(|r| r == &created[0]));
    let all = store
        .sandbox_list(&SandboxFilter {
            tenant_id: Some(t),
            ..Default::default()
        })
        .await?;
    assert_eq!(all.items, created);
    Ok(())
}

pub async fn sandbox_update_from_writes_only_from_the_state_read(
    db: &TestDb,
) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "cas").await?;
    let mut rec = create(store, &fixtures::sandbox(&t)).await?;
    rec.state = SandboxState::Running;
    store.sandbox_update(&rec).await?;

    // A reconciler read `running`; meanwhile a destroy moved the row on.
    let read = rec.clone();
    rec.state = SandboxState::Destroyed;
    rec.destroyed_at = Some(fixtures::at(5));
    store.sandbox_update(&rec).await?;
    let mut stale = read.clone();
    stale.state = SandboxState::Failed;
    assert!(
        !store
            .sandbox_update_from(&stale, SandboxState::Running)
            .await?
    );
    assert_eq!(
        store.sandbox_get(&rec.id).await?,
        Some(rec.clone()),
        "nothing written"
    );

    // From the state actually stored, the write goes through.
    let mut next = rec.clone();
    next.labels = BTreeMap::from([("after".into(), "destroy".into())]);
    assert!(
        store
            .sandbox_update_from(&next, SandboxState::Destroyed)
            .await?
    );
    assert_eq!(store.sandbox_get(&rec.id).await?, Some(next.clone()));

    // A stale fencing token is still a conflict, a missing row still not found.
    let mut fenced = next.clone();
    fenced.fencing_token -= 1;
    assert!(matches!(
        store
            .sandbox_update_from(&fenced, SandboxState::Destroyed)
            .await,
        Err(Error::Conflict(_))
    ));
    let mut missing = next.clone();
    missing.id = stacyvm_core::SandboxId::generate();
    assert!(matches!(
        store
            .sandbox_update_from(&missing, SandboxState::Destroyed)
            .await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

/// Every filter at once, paged: the label values and the cursor are bound
/// in the order the conditions name them, page after page.
pub async fn sandbox_list_pages_newest_first(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "newest").await?;
    let other = new_tenant(store, "noise").await?;
    let mut mine = Vec::new();
    for i in 0..12 {
        let mut sb = fixtures::sandbox(&t);
        if i % 3 == 0 {
            sb.labels.insert("pick".into(), "yes".into());
        }
        mine.push((create(store, &sb).await?.id, i % 3 == 0));
        if i % 4 == 0 {
            create(store, &fixtures::sandbox(&other)).await?;
        }
    }
    let read_all = |labels: Vec<(String, String)>, limit: u32| {
        let mut filter = SandboxFilter {
            tenant_id: Some(t.clone()),
            labels,
            page: PageRequest {
                cursor: None,
                limit,
            },
            newest_first: true,
            ..Default::default()
        };
        async move {
            let mut seen = Vec::new();
            let mut pages = 0;
            loop {
                let page = store.sandbox_list(&filter).await?;
                pages += 1;
                assert!(page.items.len() <= limit as usize);
                seen.extend(page.items.into_iter().map(|s| s.id));
                match page.next_cursor {
                    Some(c) => filter.page.cursor = Some(c),
                    None => break,
                }
            }
            anyhow::Ok((seen, pages))
        }
    };
    let (seen, pages) = read_all(Vec::new(), 5).await?;
    let newest: Vec<_> = mine.iter().rev().map(|(id, _)| id.clone()).collect();
    assert_eq!(seen, newest, "every sandbox once, newest first");
    assert_eq!(pages, 3);
    // With a filter, across pages of one.
    let (seen, _) = read_all(vec![("pick".into(), "yes".into())], 1).await?;
    let picked: Vec<_> = mine
        .iter()
        .rev()
        .filter(|(_, p)| *p)
        .map(|(id, _)| id.clone())
        .collect();
    assert_eq!(seen, picked);
    Ok(())
}

pub async fn sandbox_list_pages_under_every_filter(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "filtered").await?;
    let other = new_tenant(store, "other").await?;
    let wanted = [("app", "web"), ("tier", "front")];
    let mut matching = Vec::new();
    for i in 0..9 {
        let rec = create(
            store,
            &with_state(
                with_labels(fixtures::sandbox(&t), &wanted),
                SandboxState::Running,
            ),
        )
        .await?;
        matching.push(rec.id);
        // Near misses: each fails exactly one condition.
        let near = match i % 4 {
            0 => with_labels(fixtures::sandbox(&t), &wanted),
            1 => with_state(
                with_labels(fixtures::sandbox(&t), &[("app", "web")]),
                SandboxState::Running,
            ),
            2 => with_state(
                with_labels(fixtures::sandbox(&t), &[("app", "web"), ("tier", "back")]),
                SandboxState::Running,
            ),
            _ => with_state(
                with_labels(fixtures::sandbox(&other), &wanted),
                SandboxState::Running,
            ),
        };
        create(store, &near).await?;
    }
    let mut filter = SandboxFilter {
        tenant_id: Some(t.clone()),
        state: Some(SandboxState::Running),
        labels: wanted
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        page: PageRequest {
            cursor: None,
            limit: 2,
        },
        ..Default::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = store.sandbox_list(&filter).await?;
        assert!(page.items.len() <= 2);
        seen.extend(page.items.into_iter().map(|s| s.id));
        match page.next_cursor {
            Some(c) => filter.page.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, matching, "only the matches, each once, in order");
    Ok(())
}

/// Writers racing from one state read, on two stores: exactly one moves the
/// sandbox on, the others are told the state moved, and the stored record
/// is the winner's.
pub async fn concurrent_update_from_lets_exactly_one_writer_through(
    db: &TestDb,
) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "cas-race").await?;
    let mut rec = create(store, &fixtures::sandbox(&t)).await?;
    rec.state = SandboxState::Running;
    store.sandbox_update(&rec).await?;
    let stores = Arc::new([store.clone(), db.open_again().await?]);
    fixtures::warm_up(&*stores).await?;
    let barrier = Arc::new(tokio::sync::Barrier::new(12));
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let stores = stores.clone();
            let barrier = barrier.clone();
            let mut next = rec.clone();
            next.state = if i % 2 == 0 {
                SandboxState::Stopping
            } else {
                SandboxState::Failed
            };
            next.labels = BTreeMap::from([("writer".to_owned(), i.to_string())]);
            tokio::spawn(async move {
                barrier.wait().await;
                let written = stores[i % 2]
                    .sandbox_update_from(&next, SandboxState::Running)
                    .await;
                written.map(|w| (w, next))
            })
        })
        .collect();
    let mut winners = Vec::new();
    for task in tasks {
        let (written, next) = task.await.context("update task")??;
        if written {
            winners.push(next);
        }
    }
    assert_eq!(winners.len(), 1, "one writer moves the sandbox on");
    assert_eq!(store.sandbox_get(&rec.id).await?, winners.pop());
    Ok(())
}
