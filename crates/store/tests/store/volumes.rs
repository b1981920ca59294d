//! Volumes: names unique per tenant, listing by tenant, attachments, and the
//! rule that a volume a live sandbox mounts cannot be deleted.

use stacyvm_core::{Error, SandboxState};
use stacyvm_store::VolumeRecord;

use crate::fixtures;
use crate::harness::TestDb;

fn volume(tenant: &stacyvm_core::TenantId, name: &str) -> VolumeRecord {
    VolumeRecord {
        id: stacyvm_core::VolumeId::generate(),
        tenant_id: tenant.clone(),
        name: name.into(),
        size_mb: 64,
        created_at: fixtures::at(1),
        worker_id: None,
    }
}

pub async fn volume_names_are_unique_per_tenant(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let a = fixtures::new_tenant(store, "a").await?;
    let b = fixtures::new_tenant(store, "b").await?;
    let va = volume(&a, "data");
    store.volume_create(&va).await?;
    assert!(matches!(
        store.volume_create(&volume(&a, "data")).await,
        Err(Error::Conflict(_))
    ));
    // The same name in another tenant is another volume.
    let vb = volume(&b, "data");
    store.volume_create(&vb).await?;
    assert_eq!(store.volume_get(&a, "data").await?, Some(va.clone()));
    assert_eq!(store.volume_get(&b, "data").await?, Some(vb.clone()));
    assert_eq!(store.volume_get(&a, "nope").await?, None);
    assert_eq!(store.volume_list(Some(&a)).await?, vec![va.clone()]);
    assert_eq!(store.volume_list(None).await?, vec![va, vb]);
    let ghost = stacyvm_core::TenantId::generate();
    assert!(matches!(
        store.volume_create(&volume(&ghost, "x")).await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

pub async fn a_mounted_volume_is_deleted_only_after_its_sandbox(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = fixtures::new_tenant(store, "t").await?;
    let v = volume(&t, "data");
    store.volume_create(&v).await?;
    let sbx = fixtures::create(store, &fixtures::sandbox(&t)).await?;
    store.volume_attach(&sbx.id, &v.id, "/data", false).await?;
    assert_eq!(store.volume_users(&v.id).await?, vec![sbx.id.clone()]);
    match store.volume_delete(&v.id).await {
        Err(Error::Conflict(m)) => assert!(m.contains(sbx.id.as_str()), "{m}"),
        other => anyhow::bail!("delete while attached: {other:?}"),
    }
    assert!(store.volume_get(&t, "data").await?.is_some());

    let mut gone = fixtures::with_state(sbx, SandboxState::Destroyed);
    gone.destroyed_at = Some(fixtures::at(5));
    store.sandbox_update(&gone).await?;
    assert!(store.volume_users(&v.id).await?.is_empty());
    assert!(store.volume_delete(&v.id).await?);
    assert!(!store.volume_delete(&v.id).await?);
    assert_eq!(store.volume_get(&t, "data").await?, None);
    // Attaching a deleted volume is refused, not stored.
    assert!(matches!(
        store.volume_attach(&gone.id, &v.id, "/data", true).await,
        Err(Error::NotFound(_))
    ));
    Ok(())
}

pub async fn volume_quotas_count_volumes_and_their_sizes(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = fixtures::new_tenant(store, "t").await?;
    store
        .quota_set(
            &t,
            &stacyvm_store::Quota {
                max_volumes: Some(2),
                max_volume_mb: Some(100),
                ..Default::default()
            },
        )
        .await?;
    let q = store.quota_get(&t).await?;
    assert_eq!((q.max_volumes, q.max_volume_mb), (Some(2), Some(100)));
    let mut a = volume(&t, "a");
    a.size_mb = 64;
    store.volume_create(&a).await?;
    let mut big = volume(&t, "big");
    big.size_mb = 40;
    match store.volume_create(&big).await {
        Err(Error::QuotaExceeded(m)) => assert!(m.contains("max_volume_mb"), "{m}"),
        other => anyhow::bail!("over max_volume_mb: {other:?}"),
    }
    let mut b = volume(&t, "b");
    b.size_mb = 36;
    store.volume_create(&b).await?;
    match store.volume_create(&volume(&t, "c")).await {
        Err(Error::QuotaExceeded(m)) => assert!(m.contains("max_volumes"), "{m}"),
        other => anyhow::bail!("over max_volumes: {other:?}"),
    }
    // A deleted volume frees its share.
    assert!(store.volume_delete(&a.id).await?);
    let mut c = volume(&t, "c");
    c.size_mb = 64;
    store.volume_create(&c).await?;
    Ok(())
}
