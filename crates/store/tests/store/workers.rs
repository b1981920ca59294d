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
