//! Workers: registration (upsert), listing and state changes, placement
//! under capacity, heartbeats renewing leases, and lost sandboxes.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Context;
use stacyvm_core::{Error, SandboxState, WorkerId};
use stacyvm_store::{DynStore, WorkerState};

use crate::fixtures;
use crate::harness::TestDb;

pub async fn worker_upsert_get_list_set_state(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let w1 = fixtures::worker("10.0.0.1:7000");
    let w2 = fixtures::worker("local");
    store.worker_upsert(&w1).await?;
    store.worker_upsert(&w2).await?;
    assert_eq!(store.worker_get(&w1.id).await?, Some(w1.clone()));
    assert_eq!(store.worker_get(&WorkerId::generate()).await?, None);

    // Upserting again replaces the record.
    let mut changed = w1.clone();
    changed.address = "10.0.0.9:7000".into();
    changed.providers = vec!["firecracker".into()];
    changed.labels = BTreeMap::from([("gpu".into(), "yes".into()), ("zone".into(), "b".into())]);
    changed.capacity = 3;
    changed.state = WorkerState::Draining;
    changed.last_heartbeat = fixtures::at(30);
    store.worker_upsert(&changed).await?;
    assert_eq!(store.worker_get(&w1.id).await?, Some(changed.clone()));
    assert_eq!(
        store.worker_list().await?,
        vec![changed.clone(), w2.clone()]
    );

    store.worker_set_state(&w2.id, WorkerState::Down).await?;
    let down = store.worker_get(&w2.id).await?.map(|w| w.state);
    assert_eq!(down, Some(WorkerState::Down));
    store.worker_set_state(&w2.id, WorkerState::Ready).await?;
    let mut expected = w2.clone();
    expected.state = WorkerState::Ready;
    assert_eq!(store.worker_get(&w2.id).await?, Some(expected));

    assert!(matches!(
        store
            .worker_set_state(&WorkerId::generate(), WorkerState::Down)
            .await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

pub async fn worker_tokens_are_stored_by_hash_and_revoked_once(db: &TestDb) -> anyhow::Result<()> {
    use stacyvm_core::WorkerTokenId;
    use stacyvm_store::WorkerToken;
    let store = &db.store;
    let t = |hash: &str| WorkerToken {
        id: WorkerTokenId::generate(),
        name: format!("token {hash}"),
        token_hash: hash.to_owned(),
        created_at: fixtures::at(0),
        revoked_at: None,
    };
    let (a, b) = (t("hash-a"), t("hash-b"));
    store.worker_token_create(&a).await?;
    store.worker_token_create(&b).await?;
    assert!(matches!(
        store.worker_token_create(&t("hash-a")).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(store.worker_token_by_hash("hash-b").await?, Some(b.clone()));
    assert_eq!(store.worker_token_by_hash("nope").await?, None);
    assert_eq!(store.worker_token_get(&a.id).await?, Some(a.clone()));
    assert_eq!(store.worker_token_list().await?, vec![a.clone(), b.clone()]);
    let first = fixtures::at(5);
    assert!(store.worker_token_revoke(&a.id, first).await?);
    assert!(store.worker_token_revoke(&a.id, fixtures::at(50)).await?);
    let revoked = store.worker_token_get(&a.id).await?;
    assert_eq!(revoked.and_then(|t| t.revoked_at), Some(first));
    assert!(
        !store
            .worker_token_revoke(&WorkerTokenId::generate(), first)
            .await?
    );
    Ok(())
}

/// One holder at a time; the lease passes on once it ran out by the
/// store's clock, and its holder renews it meanwhile.
pub async fn leader_leases_pass_on_only_when_they_run_out(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let now = store.now().await?;
    let later = |s: i64| now + time::Duration::seconds(s);
    assert!(
        store
            .leader_acquire("reconcile", "a", now, later(10))
            .await?
    );
    assert!(
        !store
            .leader_acquire("reconcile", "b", now, later(10))
            .await?
    );
    assert!(
        store
            .leader_acquire("reconcile", "a", later(5), later(15))
            .await?
    );
    // Another job is leased apart.
    assert!(store.leader_acquire("expire", "b", now, later(10)).await?);
    // b may take over only after a's lease ran out.
    assert!(
        !store
            .leader_acquire("reconcile", "b", later(14), later(24))
            .await?
    );
    assert!(
        store
            .leader_acquire("reconcile", "b", later(16), later(26))
            .await?
    );
    assert!(
        !store
            .leader_acquire("reconcile", "a", later(17), later(27))
            .await?
    );
    // The store's clock is one both backends agree is now-ish.
    let skew = (store.now().await? - stacyvm_core::now()).abs();
    assert!(
        skew < time::Duration::minutes(5),
        "the store's clock is off by {skew}"
    );
    Ok(())
}

/// A worker taking `capacity` sandboxes of one CPU and 256 MiB, ready.
async fn small_worker(db: &TestDb, capacity: i64) -> anyhow::Result<stacyvm_store::WorkerRecord> {
    let mut w = fixtures::worker("10.0.0.7:7071");
    w.capacity = capacity;
    w.capacity_cpu = Some(capacity as f64);
    w.capacity_memory_mb = Some(256 * capacity);
    db.store.worker_upsert(&w).await?;
    Ok(w)
}

/// Placement checks the worker in the same transaction: not ready, full by
/// count, by CPU or by memory is `NoCapacity` naming what is short.
pub async fn placement_checks_state_and_every_capacity(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = fixtures::new_tenant(store, "placed").await?;
    let w = small_worker(db, 2).await?;
    let until = fixtures::at(60);
    let a = fixtures::create(store, &fixtures::sandbox(&t)).await?;
    let placed = store.sandbox_place(&a.id, &w.id, until).await?;
    assert_eq!(placed.worker_id.as_ref(), Some(&w.id));
    assert_eq!(placed.fencing_token, a.fencing_token + 1);
    assert_eq!(placed.lease_expires_at, Some(until));

    // Two CPUs offered, one used: a two-CPU sandbox does not fit.
    let mut big = fixtures::sandbox(&t);
    big.cpu = 2.0;
    let big = fixtures::create(store, &big).await?;
    match store.sandbox_place(&big.id, &w.id, until).await {
        Err(Error::NoCapacity(m)) => assert!(m.contains("CPUs"), "{m}"),
        other => panic!("expected no_capacity for CPU, got {other:?}"),
    }
    let mut fat = fixtures::sandbox(&t);
    fat.memory_mb = 300;
    let fat = fixtures::create(store, &fat).await?;
    match store.sandbox_place(&fat.id, &w.id, until).await {
        Err(Error::NoCapacity(m)) => assert!(m.contains("MiB"), "{m}"),
        other => panic!("expected no_capacity for memory, got {other:?}"),
    }
    let b = fixtures::create(store, &fixtures::sandbox(&t)).await?;
    store.sandbox_place(&b.id, &w.id, until).await?;
    let c = fixtures::create(store, &fixtures::sandbox(&t)).await?;
    match store.sandbox_place(&c.id, &w.id, until).await {
        Err(Error::NoCapacity(m)) => assert!(m.contains("2 of 2 sandboxes"), "{m}"),
        other => panic!("expected no_capacity for the count, got {other:?}"),
    }
    // A sandbox that ends frees its place.
    let mut done = store.sandbox_get(&b.id).await?.context("b")?;
    done.state = SandboxState::Destroyed;
    store.sandbox_update(&done).await?;
    store.sandbox_place(&c.id, &w.id, until).await?;

    store.worker_set_state(&w.id, WorkerState::Draining).await?;
    let d = fixtures::create(store, &fixtures::sandbox(&t)).await?;
    match store.sandbox_place(&d.id, &w.id, until).await {
        Err(Error::NoCapacity(m)) => assert!(m.contains("draining"), "{m}"),
        other => panic!("expected no_capacity for a draining worker, got {other:?}"),
    }
    assert!(matches!(
        store
            .sandbox_place(&d.id, &WorkerId::generate(), until)
            .await,
        Err(Error::NoCapacity(_))
    ));
    Ok(())
}

/// Placements racing from two stores (two control-plane replicas) never
/// put more on a worker than it takes.
pub async fn concurrent_placements_never_overfill_a_worker(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = fixtures::new_tenant(store, "racing").await?;
    let w = small_worker(db, 3).await?;
    let stores: Arc<[DynStore]> = Arc::from(vec![store.clone(), db.open_again().await?]);
    fixtures::warm_up(&stores).await?;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(fixtures::create(store, &fixtures::sandbox(&t)).await?.id);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(ids.len()));
    let tasks: Vec<_> = ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let (stores, barrier, worker) = (stores.clone(), barrier.clone(), w.id.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                stores[i % stores.len()]
                    .sandbox_place(&id, &worker, fixtures::at(60))
                    .await
            })
        })
        .collect();
    let (mut placed, mut refused) = (0, 0);
    for task in tasks {
        match task.await.context("placement task")? {
            Ok(_) => placed += 1,
            Err(Error::NoCapacity(_)) => refused += 1,
            Err(e) => panic!("unexpected error: {e:?}"),
        }
    }
    assert_eq!((placed, refused), (3, 17));
    Ok(())
}

/// A heartbeat renews exactly the worker's live leases, records its
/// providers' health, brings a `down` worker back only when it says it is
/// ready, and keeps a draining worker draining.
pub async fn heartbeats_renew_leases_and_bring_workers_back(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = fixtures::new_tenant(store, "beating").await?;
    let w = small_worker(db, 5).await?;
    let other = small_worker(db, 5).await?;
    let mine = fixtures::create(store, &fixtures::sandbox(&t)).await?;
    store
        .sandbox_place(&mine.id, &w.id, fixtures::at(1))
        .await?;
    let theirs = fixtures::create(store, &fixtures::sandbox(&t)).await?;
    store
        .sandbox_place(&theirs.id, &other.id, fixtures::at(1))
        .await?;
    let ended = fixtures::create(store, &fixtures::sandbox(&t)).await?;
    let mut ended = store
        .sandbox_place(&ended.id, &w.id, fixtures::at(1))
        .await?;
    ended.state = SandboxState::Destroyed;
    store.sandbox_update(&ended).await?;

    let health = vec![stacyvm_store::ProviderState {
        name: "namespaces".into(),
        healthy: false,
        detail: "no user namespaces".into(),
        mode: Some("rootless".into()),
        not_enforced: Some(vec!["memory".into(), "pause".into()]),
        // A certification record travels with the heartbeat.
        certified: Some(false),
        certified_at: Some(fixtures::at(1)),
    }];
    let (now, until) = (fixtures::at(2), fixtures::at(40));
    store.worker_set_state(&w.id, WorkerState::Down).await?;
    let (rec, held) = store
        .worker_heartbeat(&w.id, &health, false, now, until)
        .await?
        .context("a known worker")?;
    assert_eq!(rec.state, WorkerState::Down, "not ready yet: stays down");
    assert_eq!(rec.provider_health, health);
    assert_eq!(rec.last_heartbeat, now);
    assert_eq!(
        held.iter().map(|s| &s.id).collect::<Vec<_>>(),
        vec![&mine.id]
    );
    assert_eq!(held[0].lease_expires_at, Some(until));
    let theirs_now = store.sandbox_get(&theirs.id).await?.context("theirs")?;
    assert!(
        theirs_now.lease_expires_at < Some(until),
        "another worker's lease is not renewed"
    );

    let (rec, _) = store
        .worker_heartbeat(&w.id, &health, true, now, until)
        .await?
        .context("a known worker")?;
    assert_eq!(rec.state, WorkerState::Ready);
    store.worker_set_state(&w.id, WorkerState::Draining).await?;
    let (rec, _) = store
        .worker_heartbeat(&w.id, &health, true, now, until)
        .await?
        .context("a known worker")?;
    assert_eq!(rec.state, WorkerState::Draining);
    assert!(store
        .worker_heartbeat(&WorkerId::generate(), &health, true, now, until)
        .await?
        .is_none());
    Ok(())
}

/// Silent workers go down (one that just heartbeat stays up), a revoked
/// token's workers go down, and sandboxes whose lease ran out become lost
/// with a raised fencing token, so their old holder's writes are refused.
pub async fn lapsed_leases_lose_sandboxes_and_fence_the_old_holder(
    db: &TestDb,
) -> anyhow::Result<()> {
    let store = &db.store;
    let t = fixtures::new_tenant(store, "lapsing").await?;
    let gone = small_worker(db, 5).await?;
    let spared = small_worker(db, 5).await?;
    let now = store.now().await?;
    let past = now - time::Duration::seconds(30);

    let a = fixtures::create(store, &fixtures::sandbox(&t)).await?;
    let a = store.sandbox_place(&a.id, &gone.id, past).await?;
    let b = fixtures::create(store, &fixtures::sandbox(&t)).await?;
    let b = store.sandbox_place(&b.id, &spared.id, past).await?;
    let c = fixtures::create(store, &fixtures::sandbox(&t)).await?;
    let c = store
        .sandbox_place(&c.id, &gone.id, now + time::Duration::seconds(30))
        .await?;

    let lost = store.sandbox_lose_lapsed(now, Some(&spared.id)).await?;
    assert_eq!(lost.iter().map(|s| &s.id).collect::<Vec<_>>(), vec![&a.id]);
    let a_now = store.sandbox_get(&a.id).await?.context("a")?;
    assert_eq!(a_now.state, SandboxState::Lost);
    assert_eq!(a_now.fencing_token, a.fencing_token + 1);
    assert_eq!(
        a_now.failure.as_ref().map(|f| f.code.as_str()),
        Some("lost")
    );
    // The old holder's write, with the token it had, is refused.
    let mut late = a.clone();
    late.state = SandboxState::Failed;
    assert!(matches!(
        store.sandbox_update(&late).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(
        store.sandbox_get(&b.id).await?.map(|s| s.state),
        Some(b.state)
    );
    assert_eq!(
        store.sandbox_get(&c.id).await?.map(|s| s.state),
        Some(c.state)
    );
    // Lost frees the quota: the tenant's count no longer includes it.
    assert!(store
        .sandbox_lose_lapsed(now, Some(&spared.id))
        .await?
        .is_empty());

    // A worker silent since before `now` goes down once; one that
    // heartbeat after stays up.
    let mut silent = small_worker(db, 1).await?;
    silent.last_heartbeat = past;
    store.worker_upsert(&silent).await?;
    assert!(store.worker_down_if_silent(&silent.id, now).await?);
    assert!(!store.worker_down_if_silent(&silent.id, now).await?);
    let mut fresh = small_worker(db, 1).await?;
    fresh.last_heartbeat = now + time::Duration::seconds(1);
    store.worker_upsert(&fresh).await?;
    assert!(!store.worker_down_if_silent(&fresh.id, now).await?);

    let token = fresh.token_id.clone().context("a token")?;
    assert_eq!(store.worker_down_by_token(&token).await?, 1);
    assert_eq!(
        store.worker_get(&fresh.id).await?.map(|w| w.state),
        Some(WorkerState::Down)
    );
    Ok(())
}
