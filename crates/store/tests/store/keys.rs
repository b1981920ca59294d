//! API keys: stored by hash, listed per tenant, revoked once.

use anyhow::Context;
use stacyvm_core::{Error, KeyId, TenantId};
use stacyvm_store::{PageRequest, Role};

use crate::fixtures::{self, new_tenant};
use crate::harness::TestDb;

pub async fn key_create_lookup_list_revoke(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let a = new_tenant(store, "a").await?;
    let b = new_tenant(store, "b").await?;
    let mut ka = fixtures::key(&a, "hash-a1");
    ka.role = Role::Admin;
    let kb = fixtures::key(&b, "hash-b1");
    let mut ka2 = fixtures::key(&a, "hash-a2");
    ka2.role = Role::Owner;
    for k in [&ka, &kb, &ka2] {
        store.key_create(k).await?;
    }

    assert_eq!(store.key_by_hash("hash-b1").await?, Some(kb.clone()));
    assert_eq!(store.key_by_hash("no-such-hash").await?, None);
    assert_eq!(store.key_get(&ka.id).await?, Some(ka.clone()));
    assert_eq!(store.key_get(&KeyId::generate()).await?, None);

    let all = store.key_list(None, &PageRequest::default()).await?;
    assert_eq!(
        all.items,
        vec![ka.clone(), kb.clone(), ka2.clone()],
        "oldest first"
    );
    let only_a = store.key_list(Some(&a), &PageRequest::default()).await?;
    assert_eq!(only_a.items, vec![ka.clone(), ka2.clone()]);
    let none = store
        .key_list(Some(&TenantId::generate()), &PageRequest::default())
        .await?;
    assert!(none.items.is_empty());

    let first = fixtures::at(0);
    assert!(store.key_revoke(&ka.id, first).await?);
    let revoked = store
        .key_by_hash("hash-a1")
        .await?
        .context("revoked key still found")?;
    assert_eq!(revoked.revoked_at, Some(first));
    assert!(
        store.key_revoke(&ka.id, fixtures::at(60)).await?,
        "revoking twice is fine"
    );
    let again = store.key_get(&ka.id).await?.context("key")?;
    assert_eq!(
        again.revoked_at,
        Some(first),
        "the first revocation time stays"
    );
    assert!(!store.key_revoke(&KeyId::generate(), first).await?);
    assert_eq!(store.key_get(&kb.id).await?.context("kb")?.revoked_at, None);
    Ok(())
}

pub async fn key_conflicts_and_missing_tenant(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let a = new_tenant(store, "a").await?;
    store.key_create(&fixtures::key(&a, "same-hash")).await?;
    assert!(matches!(
        store.key_create(&fixtures::key(&a, "same-hash")).await,
        Err(Error::Conflict(_))
    ));
    match store
        .key_create(&fixtures::key(&TenantId::generate(), "orphan"))
        .await
    {
        Err(Error::NotFound(msg)) => assert!(msg.contains("tenant"), "{msg}"),
        other => panic!("expected not_found, got {other:?}"),
    }
    Ok(())
}

pub async fn key_list_pages(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let a = new_tenant(store, "a").await?;
    let b = new_tenant(store, "b").await?;
    let mut of_a = Vec::new();
    for i in 0..7 {
        let k = fixtures::key(&a, &format!("a-{i}"));
        store.key_create(&k).await?;
        of_a.push(k);
        store
            .key_create(&fixtures::key(&b, &format!("b-{i}")))
            .await?;
    }
    let mut seen = Vec::new();
    let mut page = PageRequest {
        cursor: None,
        limit: 3,
    };
    loop {
        let got = store.key_list(Some(&a), &page).await?;
        seen.extend(got.items);
        match got.next_cursor {
            Some(c) => page.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, of_a);
    Ok(())
}

/// Listing every tenant's keys pages in id order across tenants, and a
/// cursor that is not a key id is refused rather than run.
pub async fn key_list_of_every_tenant_pages_and_checks_its_cursor(
    db: &TestDb,
) -> anyhow::Result<()> {
    let store = &db.store;
    let tenants = [
        new_tenant(store, "a").await?,
        new_tenant(store, "b").await?,
        new_tenant(store, "c").await?,
    ];
    let mut all = Vec::new();
    for i in 0..4 {
        for (n, t) in tenants.iter().enumerate() {
            let k = fixtures::key(t, &format!("hash-{n}-{i}"));
            store.key_create(&k).await?;
            all.push(k);
        }
    }
    let mut seen = Vec::new();
    let mut page = PageRequest {
        cursor: None,
        limit: 5,
    };
    loop {
        let got = store.key_list(None, &page).await?;
        assert!(got.items.len() <= 5);
        seen.extend(got.items);
        match got.next_cursor {
            Some(c) => page.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, all, "every key once, oldest first");

    for cursor in ["garbage", tenants[0].as_str(), "' OR 1=1 --"] {
        let page = PageRequest {
            cursor: Some(cursor.into()),
            limit: 5,
        };
        for tenant in [None, Some(&tenants[0])] {
            assert!(
                matches!(
                    store.key_list(tenant, &page).await,
                    Err(Error::InvalidRequest(_))
                ),
                "{cursor} {tenant:?}"
            );
        }
    }
    Ok(())
}
