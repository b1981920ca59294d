//! Workers: registration (upsert), listing and state changes.

use std::collections::BTreeMap;

use stacyvm_core::{Error, WorkerId};
use stacyvm_store::WorkerState;

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
