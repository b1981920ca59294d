//! Audit events: what the control plane records for every mutating call and
//! every refusal, and how they are read back.

use stacyvm_core::{now, EventId, Result, TenantId};
use stacyvm_store::{Actor, AuditEvent, AuditFilter, DynStore, Outcome, Page, PageRequest};
use time::OffsetDateTime;

use super::{page_limit, Principal};

/// The parts of an event the caller knows; the rest is filled in here.
pub struct EventDraft {
    pub tenant_id: Option<TenantId>,
    pub actor: Actor,
    pub action: String,
    pub target: Option<String>,
    pub sandbox_id: Option<String>,
    pub status: u16,
    pub request_id: String,
    pub source_ip: Option<String>,
    pub detail: serde_json::Value,
}

/// Classifies a status code as the audit log does.
pub fn outcome_for(status: u16) -> Outcome {
    match status {
        200..=399 => Outcome::Ok,
        401 | 403 | 404 | 429 => Outcome::Denied,
        _ => Outcome::Error,
    }
}

/// Appends the event; the caller sends its response only after this returns.
pub async fn record(store: &DynStore, draft: EventDraft) -> Result<()> {
    store
        .audit_append(&AuditEvent {
            id: EventId::generate(),
            ts: now(),
            tenant_id: draft.tenant_id,
            actor: draft.actor,
            action: draft.action,
            target: draft.target,
            sandbox_id: draft.sandbox_id,
            outcome: outcome_for(draft.status),
            status: i32::from(draft.status),
            request_id: draft.request_id,
            source_ip: draft.source_ip,
            detail: draft.detail,
        })
        .await
}

/// Query of `GET /v1/audit`.
pub struct AuditQuery {
    pub sandbox_id: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<Outcome>,
    pub since: Option<OffsetDateTime>,
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

/// Admins see every event (including tenant-less refusals); others their
/// tenant's. Viewers may read their tenant's audit too.
pub async fn audit_list(
    store: &DynStore,
    who: &Principal,
    q: AuditQuery,
) -> Result<Page<AuditEvent>> {
    let filter = AuditFilter {
        tenant_id: if who.is_admin() {
            None
        } else {
            Some(who.tenant_id.clone())
        },
        sandbox_id: q.sandbox_id,
        action: q.action,
        outcome: q.outcome,
        since: q.since,
        page: PageRequest {
            cursor: q.cursor,
            limit: page_limit(q.limit)?,
        },
    };
    store.audit_list(&filter).await
}
