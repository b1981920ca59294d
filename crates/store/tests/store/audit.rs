//! The audit log: append, filter, page, and no way to change history.

use stacyvm_core::{KeyId, TenantId};
use stacyvm_store::{Actor, AuditEvent, AuditFilter, Outcome, PageRequest, Role};
use time::Duration;

use crate::fixtures::{self, new_tenant};
use crate::harness::TestDb;

fn ids(events: &[AuditEvent]) -> Vec<String> {
    events.iter().map(|e| e.id.to_string()).collect()
}

pub async fn audit_round_trips_and_filters(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let a = new_tenant(store, "a").await?;
    let b = new_tenant(store, "b").await?;
    let base = fixtures::at(0);

    let mut e1 = fixtures::event(Some(&a), "sandbox.create");
    e1.ts = base - Duration::seconds(10);
    e1.target = Some("sbx_1".into());
    e1.sandbox_id = Some("sbx_1".into());
    e1.status = 201;
    e1.detail =
        serde_json::json!({"image": "busybox", "cpu": 0.5, "nested": {"list": [1, "two", null]}});
    let mut e2 = fixtures::event(None, "auth.refused");
    e2.ts = base;
    e2.actor = Actor {
        key_id: None,
        role: None,
    };
    e2.outcome = Outcome::Denied;
    e2.status = 401;
    e2.source_ip = None;
    let mut e3 = fixtures::event(Some(&b), "sandbox.exec");
    e3.ts = base + Duration::seconds(5);
    e3.sandbox_id = Some("sbx_2".into());
    e3.actor = Actor {
        key_id: Some(KeyId::generate()),
        role: Some(Role::Admin),
    };
    let mut e4 = fixtures::event(Some(&a), "sandbox.exec");
    e4.ts = base + Duration::seconds(6);
    e4.sandbox_id = Some("sbx_1".into());
    e4.outcome = Outcome::Error;
    e4.status = 500;
    let mut e5 = fixtures::event(Some(&a), "sandbox.destroy");
    e5.ts = base + Duration::seconds(7);
    e5.sandbox_id = Some("sbx_1".into());
    e5.outcome = Outcome::Denied;
    e5.status = 403;
    let all = vec![e1.clone(), e2.clone(), e3.clone(), e4.clone(), e5.clone()];
    for e in &all {
        store.audit_append(e).await?;
    }

    let list = |f: AuditFilter| async move { store.audit_list(&f).await.map(|p| p.items) };
    assert_eq!(
        list(AuditFilter::default()).await?,
        all,
        "every event, tenant-less included, in order"
    );
    assert_eq!(
        ids(&list(AuditFilter {
            tenant_id: Some(a.clone()),
            ..Default::default()
        })
        .await?),
        ids(&[e1.clone(), e4.clone(), e5.clone()])
    );
    assert_eq!(
        ids(&list(AuditFilter {
            sandbox_id: Some("sbx_1".into()),
            ..Default::default()
        })
        .await?),
        ids(&[e1.clone(), e4.clone(), e5.clone()])
    );
    assert_eq!(
        ids(&list(AuditFilter {
            action: Some("sandbox.exec".into()),
            ..Default::default()
        })
        .await?),
        ids(&[e3.clone(), e4.clone()])
    );
    assert_eq!(
        ids(&list(AuditFilter {
            outcome: Some(Outcome::Denied),
            ..Default::default()
        })
        .await?),
        ids(&[e2.clone(), e5.clone()])
    );
    assert_eq!(
        ids(&list(AuditFilter {
            since: Some(base),
            ..Default::default()
        })
        .await?),
        ids(&[e2.clone(), e3.clone(), e4.clone(), e5.clone()]),
        "since is inclusive"
    );
    assert_eq!(
        ids(&list(AuditFilter {
            tenant_id: Some(a.clone()),
            action: Some("sandbox.exec".into()),
            outcome: Some(Outcome::Error),
            sandbox_id: Some("sbx_1".into()),
            since: Some(base + Duration::seconds(6)),
            page: PageRequest::default(),
        })
        .await?),
        ids(&[e4.clone()])
    );
    let nobody = list(AuditFilter {
        tenant_id: Some(TenantId::generate()),
        ..Default::default()
    })
    .await?;
    assert!(nobody.is_empty());

    // An event id is appended once.
    assert!(matches!(
        store.audit_append(&e1).await,
        Err(stacyvm_core::Error::Conflict(_))
    ));
    Ok(())
}

pub async fn audit_pages_in_append_order(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = new_tenant(store, "paged").await?;
    let mut appended = Vec::new();
    for i in 0..30 {
        let tenant = if i % 3 == 0 { None } else { Some(&t) };
        let mut e = fixtures::event(tenant, "file.write");
        e.detail = serde_json::json!({ "i": i });
        store.audit_append(&e).await?;
        appended.push(e);
    }
    let mut seen = Vec::new();
    let mut filter = AuditFilter {
        page: PageRequest {
            cursor: None,
            limit: 7,
        },
        ..Default::default()
    };
    loop {
        let page = store.audit_list(&filter).await?;
        assert!(page.items.len() <= 7);
        seen.extend(page.items);
        match page.next_cursor {
            Some(c) => filter.page.cursor = Some(c),
            None => break,
        }
    }
    assert_eq!(seen, appended);

    let mut only_t = Vec::new();
    let mut filter = AuditFilter {
        tenant_id: Some(t.clone()),
        page: PageRequest {
            cursor: None,
            limit: 4,
        },
        ..Default::default()
    };
    loop {
        let page = store.audit_list(&filter).await?;
        only_t.extend(page.items);
        match page.next_cursor {
            Some(c) => filter.page.cursor = Some(c),
            None => break,
        }
    }
    let expected: Vec<_> = appended
        .into_iter()
        .filter(|e| e.tenant_id.is_some())
        .collect();
    assert_eq!(only_t, expected);
    Ok(())
}

/// The store has no path that changes an event, and the schema refuses
/// anyone who tries behind its back.
pub async fn audit_events_refuse_update_and_delete(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let e = fixtures::event(None, "sandbox.create");
    store.audit_append(&e).await?;
    assert!(db
        .raw_execute("UPDATE audit_events SET action = 'forged'")
        .await
        .is_err());
    assert!(db.raw_execute("DELETE FROM audit_events").await.is_err());
    assert_eq!(
        store.audit_list(&AuditFilter::default()).await?.items,
        vec![e]
    );
    Ok(())
}

/// Appends made at once all land, each answered for itself: a duplicate id
/// among them fails alone (the SQLite store commits concurrent appends in
/// one transaction, so this also checks that one bad event does not sink
/// the group).
pub async fn concurrent_appends_all_land_and_a_duplicate_fails_alone(
    db: &TestDb,
) -> anyhow::Result<()> {
    let t = new_tenant(&db.store, "burst").await?;
    let first = fixtures::event(Some(&t), "sandbox.exec");
    db.store.audit_append(&first).await?;
    let mut events: Vec<AuditEvent> = (0..200)
        .map(|i| {
            let mut e = fixtures::event(Some(&t), "sandbox.exec");
            e.detail = serde_json::json!({ "i": i });
            e
        })
        .collect();
    events.insert(100, first.clone());
    let tasks: Vec<_> = events
        .iter()
        .cloned()
        .map(|e| {
            let store = db.store.clone();
            tokio::spawn(async move { store.audit_append(&e).await })
        })
        .collect();
    let mut conflicts = 0;
    for (e, task) in events.iter().zip(tasks) {
        match task.await? {
            Ok(()) => assert_ne!(e.id, first.id, "the duplicate was accepted"),
            Err(stacyvm_core::Error::Conflict(_)) => {
                assert_eq!(e.id, first.id, "a unique event was refused");
                conflicts += 1;
            }
            Err(other) => anyhow::bail!("append failed: {other}"),
        }
    }
    assert_eq!(conflicts, 1);

    let mut stored = Vec::new();
    let mut filter = AuditFilter {
        tenant_id: Some(t.clone()),
        page: PageRequest {
            cursor: None,
            limit: 1000,
        },
        ..Default::default()
    };
    loop {
        let page = db.store.audit_list(&filter).await?;
        stored.extend(page.items);
        match page.next_cursor {
            Some(c) => filter.page.cursor = Some(c),
            None => break,
        }
    }
    let mut want = ids(&events);
    want.sort();
    want.dedup();
    let mut got = ids(&stored);
    got.sort();
    assert_eq!(got, want, "every accepted event is stored exactly once");
    Ok(())
}
