//! Templates: versions numbered per tenant and name (never reused, even
//! after a delete), filters, build logs that only a running build appends
//! to, and builds that finish once.

use stacyvm_core::{Error, TemplateVersionId, TenantId};
use stacyvm_store::{TemplateFilter, TemplateState, TemplateVersion};

use crate::fixtures;
use crate::harness::TestDb;

fn building(tenant: &TenantId, name: &str) -> TemplateVersion {
    TemplateVersion {
        id: TemplateVersionId::generate(),
        tenant_id: tenant.clone(),
        name: name.into(),
        version: 0,
        state: TemplateState::Building,
        image: format!("template/{tenant}/{name}:"),
        spec: serde_json::json!({"from": "busybox", "steps": [{"run": ["true"]}]}),
        failure: None,
        log: String::new(),
        created_at: fixtures::at(1),
        built_at: None,
        heartbeat_at: fixtures::at(1),
        deleted_at: None,
    }
}

pub async fn template_versions_are_numbered_per_tenant_and_name(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let a = fixtures::new_tenant(store, "a").await?;
    let b = fixtures::new_tenant(store, "b").await?;
    let a1 = store.template_version_create(&building(&a, "py")).await?;
    let a2 = store.template_version_create(&building(&a, "py")).await?;
    let b1 = store.template_version_create(&building(&b, "py")).await?;
    let other = store.template_version_create(&building(&a, "sh")).await?;
    assert_eq!(
        (a1.version, a2.version, b1.version, other.version),
        (1, 2, 1, 1)
    );
    assert_eq!(store.template_version_get(&a2.id).await?, Some(a2.clone()));
    assert_eq!(
        store
            .template_version_get(&TemplateVersionId::generate())
            .await?,
        None
    );
    let of = |tenants: Vec<TenantId>, name: Option<&str>| TemplateFilter {
        tenants,
        name: name.map(str::to_owned),
        ..Default::default()
    };
    let ids = |v: Vec<TemplateVersion>| v.into_iter().map(|v| v.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store
            .template_version_list(&of(vec![a.clone()], Some("py")))
            .await?),
        vec![a1.id.clone(), a2.id.clone()]
    );
    assert_eq!(
        ids(store
            .template_version_list(&of(vec![a.clone(), b.clone()], Some("py")))
            .await?)
        .len(),
        3
    );
    assert_eq!(
        ids(store.template_version_list(&of(vec![], None)).await?).len(),
        4
    );
    let ghost = TenantId::generate();
    assert!(matches!(
        store.template_version_create(&building(&ghost, "py")).await,
        Err(Error::NotFound(_))
    ));
    assert_eq!(a2.image, format!("template/{a}/py:2"));
    // The spec comes back as it was written.
    assert_eq!(a1.spec["steps"][0]["run"][0], "true");
    Ok(())
}

pub async fn build_logs_and_finishing_only_while_building(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = fixtures::new_tenant(store, "t").await?;
    let v = store.template_version_create(&building(&t, "py")).await?;
    assert!(
        store
            .template_log_append(&v.id, "step 1\n", fixtures::at(2))
            .await?
    );
    let beat = fixtures::at(3);
    assert!(store.template_log_append(&v.id, "ok\n", beat).await?);
    let mut done = store.template_version_get(&v.id).await?.expect("stored");
    assert_eq!(done.log, "step 1\nok\n");
    assert_eq!(done.heartbeat_at, beat);
    done.state = TemplateState::Failed;
    done.failure = Some("step 1 exited with code 3".into());
    done.built_at = Some(fixtures::at(4));
    assert!(store.template_build_finish(&done).await?);
    // A finished build takes no more log and does not finish twice.
    assert!(
        !store
            .template_log_append(&v.id, "late\n", fixtures::at(5))
            .await?
    );
    done.state = TemplateState::Ready;
    assert!(!store.template_build_finish(&done).await?);
    let read = store.template_version_get(&v.id).await?.expect("stored");
    assert_eq!(read.state, TemplateState::Failed);
    assert_eq!(read.log, "step 1\nok\n");
    let failed = TemplateFilter {
        state: Some(TemplateState::Failed),
        ..Default::default()
    };
    assert_eq!(store.template_version_list(&failed).await?.len(), 1);
    Ok(())
}

pub async fn deleted_templates_keep_their_numbers_until_purged(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = fixtures::new_tenant(store, "t").await?;
    let v1 = store.template_version_create(&building(&t, "py")).await?;
    let v2 = store.template_version_create(&building(&t, "py")).await?;
    let gone_at = fixtures::at(9);
    let deleted = store.template_delete(&t, "py", gone_at).await?;
    assert_eq!(deleted.len(), 2);
    assert!(deleted.iter().all(|v| v.deleted_at == Some(gone_at)));
    let live = TemplateFilter {
        tenants: vec![t.clone()],
        ..Default::default()
    };
    assert!(store.template_version_list(&live).await?.is_empty());
    let all = TemplateFilter {
        deleted: true,
        ..live.clone()
    };
    assert_eq!(store.template_version_list(&all).await?.len(), 2);
    // A build of a deleted template learns it at its next log write, and
    // cannot bring its version back.
    assert!(
        !store
            .template_log_append(&v2.id, "late\n", fixtures::at(10))
            .await?
    );
    let mut late = v2.clone();
    late.state = TemplateState::Ready;
    late.built_at = Some(fixtures::at(10));
    assert!(!store.template_build_finish(&late).await?);
    // The name's next build takes a number no earlier build had.
    let v3 = store.template_version_create(&building(&t, "py")).await?;
    assert_eq!(v3.version, 3);
    assert!(store
        .template_delete(&t, "nope", fixtures::at(9))
        .await?
        .is_empty());
    assert!(store.template_version_purge(&v1.id).await?);
    assert!(!store.template_version_purge(&v1.id).await?);
    assert_eq!(store.template_version_list(&all).await?.len(), 2);
    // Purged rows take no number back with them.
    store.template_delete(&t, "py", gone_at).await?;
    for v in [&v2.id, &v3.id] {
        assert!(store.template_version_purge(v).await?);
    }
    let v4 = store.template_version_create(&building(&t, "py")).await?;
    assert_eq!(v4.version, 4);
    Ok(())
}

pub async fn max_templates_counts_names_not_versions(db: &TestDb) -> anyhow::Result<()> {
    let store = &db.store;
    let t = fixtures::new_tenant(store, "t").await?;
    let other = fixtures::new_tenant(store, "other").await?;
    store
        .quota_set(
            &t,
            &stacyvm_store::Quota {
                max_templates: Some(2),
                ..Default::default()
            },
        )
        .await?;
    assert_eq!(store.quota_get(&t).await?.max_templates, Some(2));
    store.template_version_create(&building(&t, "a")).await?;
    store.template_version_create(&building(&t, "b")).await?;
    // More versions of a kept template are no new template.
    let b2 = store.template_version_create(&building(&t, "b")).await?;
    assert_eq!(b2.version, 2);
    match store.template_version_create(&building(&t, "c")).await {
        Err(Error::QuotaExceeded(m)) => assert!(m.contains("max_templates is 2"), "{m}"),
        other => anyhow::bail!("a third template over max_templates 2: {other:?}"),
    }
    // The refusal took no version number, and another tenant is not bound.
    store
        .template_version_create(&building(&other, "c"))
        .await?;
    store
        .template_version_create(&building(&other, "d"))
        .await?;
    store
        .template_version_create(&building(&other, "e"))
        .await?;
    // A deleted template frees its slot at once, before its rows are purged.
    store.template_delete(&t, "a", fixtures::at(9)).await?;
    let c = store.template_version_create(&building(&t, "c")).await?;
    assert_eq!(c.version, 1);
    match store.template_version_create(&building(&t, "a")).await {
        Err(Error::QuotaExceeded(_)) => {}
        other => anyhow::bail!("a deleted name built again over the quota: {other:?}"),
    }
    Ok(())
}
