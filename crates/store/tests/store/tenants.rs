//! Tenants: create, read, list with paging, unique names.

use stacyvm_core::{Error, TenantId};
use stacyvm_store::PageRequest;

use crate::fixtures;
use crate::harness::TestDb;

pub async fn tenant_create_get_list(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let mut created = Vec::new();
    for name in ["acme", "globex", "initech", "umbrella", "hooli"] {
        let t = fixtures::tenant(name);
        store.tenant_create(&t).await?;
        created.push(t);
    }
    assert_eq!(
        store.tenant_get(&created[2].id).await?,
        Some(created[2].clone())
    );
    assert_eq!(store.tenant_get(&TenantId::generate()).await?, None);

    let mut seen = Vec::new();
    let mut page = PageRequest {
        cursor: None,
        limit: 2,
    };
    loop {
        let got = store.tenant_list(&page).await?;
        assert!(got.items.len() <= 2);
        seen.extend(got.items);
        match got.next_cursor {
            Some(c) => page.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, created, "all tenants, in creation order, once each");

    let all = store.tenant_list(&PageRequest::default()).await?;
    assert_eq!(all.items, created);
    assert_eq!(all.next_cursor, None);
    Ok(())
}

pub async fn duplicate_tenant_name_is_a_conflict(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    store.tenant_create(&fixtures::tenant("dup")).await?;
    let err = store.tenant_create(&fixtures::tenant("dup")).await.err();
    match err {
        Some(Error::Conflict(msg)) => assert!(msg.contains("dup"), "{msg}"),
        other => panic!("expected conflict, got {other:?}"),
    }
    // The same id under another name is refused as well.
    let t = fixtures::tenant("first");
    store.tenant_create(&t).await?;
    let mut same_id = fixtures::tenant("second");
    same_id.id = t.id.clone();
    assert!(matches!(
        store.tenant_create(&same_id).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(
        store
            .tenant_list(&PageRequest::default())
            .await?
            .items
            .len(),
        2
    );
    Ok(())
}

pub async fn bad_cursor_is_invalid_request(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    for cursor in ["garbage", "sbx_0123", "' OR 1=1 --"] {
        let page = PageRequest {
            cursor: Some(cursor.into()),
            limit: 10,
        };
        assert!(
            matches!(
                store.tenant_list(&page).await,
                Err(Error::InvalidRequest(_))
            ),
            "{cursor}"
        );
    }
    let page = PageRequest {
        cursor: Some("-5".into()),
        limit: 10,
    };
    let filter = stacyvm_store::AuditFilter {
        page,
        ..Default::default()
    };
    assert!(matches!(
        store.audit_list(&filter).await,
        Err(Error::InvalidRequest(_))
    ));
    Ok(())
}
