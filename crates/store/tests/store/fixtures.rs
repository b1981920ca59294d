//! Records to store: realistic defaults the cases adjust.

use std::collections::BTreeMap;

use stacyvm_core::{EventId, KeyId, Network, SandboxId, SandboxState, TenantId, WorkerId};
use stacyvm_store::{
    Actor, ApiKey, AuditEvent, CreateOutcome, DynStore, Outcome, Role, SandboxRecord, Tenant,
    WorkerRecord, WorkerState,
};
use time::{Duration, OffsetDateTime};

pub fn tenant(name: &str) -> Tenant {
    Tenant {
        id: TenantId::generate(),
        name: name.to_owned(),
        created_at: stacyvm_core::now(),
    }
}

/// Creates a tenant and returns its id.
pub async fn new_tenant(store: &DynStore, name: &str) -> anyhow::Result<TenantId> {
    let t = tenant(name);
    store.tenant_create(&t).await?;
    Ok(t.id)
}

pub fn key(tenant: &TenantId, hash: &str) -> ApiKey {
    ApiKey {
        id: KeyId::generate(),
        tenant_id: tenant.clone(),
        role: Role::Member,
        name: format!("key for {hash}"),
        key_hash: hash.to_owned(),
        created_at: stacyvm_core::now(),
        revoked_at: None,
    }
}

/// A pending sandbox with no optional field set.
pub fn sandbox(tenant: &TenantId) -> SandboxRecord {
    SandboxRecord {
        id: SandboxId::generate(),
        tenant_id: tenant.clone(),
        state: SandboxState::Pending,
        provider: "docker".into(),
        worker_id: None,
        image: "busybox:latest".into(),
        template: None,
        cpu: 1.0,
        memory_mb: 256,
        network: Network::None,
        labels: BTreeMap::new(),
        env: BTreeMap::new(),
        workdir: None,
        timeout_s: 300,
        created_at: stacyvm_core::now(),
        started_at: None,
        expires_at: None,
        destroyed_at: None,
        failure: None,
        lease_expires_at: None,
        fencing_token: 0,
        idempotency_key: None,
        egress_allow: Vec::new(),
    }
}

pub fn with_state(mut rec: SandboxRecord, state: SandboxState) -> SandboxRecord {
    rec.state = state;
    rec
}

pub fn with_labels(mut rec: SandboxRecord, labels: &[(&str, &str)]) -> SandboxRecord {
    rec.labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    rec
}

/// Creates `rec`, insisting that it is new.
pub async fn create(store: &DynStore, rec: &SandboxRecord) -> anyhow::Result<SandboxRecord> {
    match store.sandbox_create(rec).await? {
        CreateOutcome::Created(r) => Ok(r),
        CreateOutcome::Existing(r) => {
            anyhow::bail!("expected a new sandbox, got existing {}", r.id)
        }
    }
}

pub fn event(tenant: Option<&TenantId>, action: &str) -> AuditEvent {
    AuditEvent {
        id: EventId::generate(),
        ts: stacyvm_core::now(),
        tenant_id: tenant.cloned(),
        actor: Actor {
            key_id: Some(KeyId::generate()),
            role: Some(Role::Member),
        },
        action: action.to_owned(),
        target: None,
        sandbox_id: None,
        outcome: Outcome::Ok,
        status: 200,
        request_id: format!("req_{}", EventId::generate()),
        source_ip: Some("127.0.0.1".into()),
        detail: serde_json::json!({}),
    }
}

pub fn worker(address: &str) -> WorkerRecord {
    let now = stacyvm_core::now();
    WorkerRecord {
        id: WorkerId::generate(),
        address: address.to_owned(),
        providers: vec!["docker".into(), "proot".into()],
        labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
        capacity: 10,
        state: WorkerState::Ready,
        registered_at: now,
        last_heartbeat: now,
        name: format!("worker at {address}"),
        provider_health: vec![stacyvm_store::ProviderState {
            name: "docker".into(),
            healthy: true,
            detail: "Docker 20.10".into(),
            mode: None,
            not_enforced: None,
            certified: None,
            certified_at: None,
        }],
        capacity_cpu: Some(8.5),
        capacity_memory_mb: Some(16384),
        token_id: Some(stacyvm_core::WorkerTokenId::generate()),
        secret: Some("svmc_secret".into()),
    }
}

/// A time `secs` seconds from now, with microseconds that are not zero, so
/// round trips that lose precision show.
pub fn at(secs: i64) -> OffsetDateTime {
    stacyvm_core::now() + Duration::seconds(secs)
}

/// Opens connections on every store before a race, so the racers start
/// together instead of queueing behind connection setup.
pub async fn warm_up(stores: &[DynStore]) -> anyhow::Result<()> {
    let pings: Vec<_> = stores
        .iter()
        .flat_map(|s| std::iter::repeat_n(s, 8))
        .map(|s| {
            let s = s.clone();
            tokio::spawn(async move { s.ping().await })
        })
        .collect();
    for p in pings {
        p.await??;
    }
    Ok(())
}
