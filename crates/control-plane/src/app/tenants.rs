//! Tenants, API keys and quotas.

use stacyvm_core::{now, Error, KeyId, Result, TenantId};
use stacyvm_store::{ApiKey, Page, PageRequest, Quota, Role, Tenant};

use super::{auth, page_limit, App, Principal};

/// A key as created: the secret is returned this once.
pub struct NewKey {
    pub key: ApiKey,
    pub secret: String,
}

fn check_label(what: &str, s: &str) -> Result<()> {
    if s.trim().is_empty() || s.len() > 128 || s.chars().any(|c| c.is_control()) {
        return Err(Error::InvalidRequest(format!(
            "{what} must be 1 to 128 printable characters"
        )));
    }
    Ok(())
}

impl App {
    pub async fn tenant_create(&self, who: &Principal, name: &str) -> Result<(Tenant, Quota)> {
        who.require_admin()?;
        check_label("name", name)?;
        let tenant = Tenant {
            id: TenantId::generate(),
            name: name.to_owned(),
            created_at: now(),
        };
        self.store.tenant_create(&tenant).await?;
        // A new tenant starts with the server's default quota, not unlimited.
        let quota = self.config.default_tenant_quota.clone();
        self.store.quota_set(&tenant.id, &quota).await?;
        Ok((tenant, quota))
    }

    /// Admins list every tenant; others see their own.
    pub async fn tenant_list(
        &self,
        who: &Principal,
        limit: Option<u32>,
        cursor: Option<String>,
    ) -> Result<Page<(Tenant, Quota)>> {
        // Checked for every caller: a tenant's own one-item list takes the
        // same `limit` values as the admin's.
        let limit = page_limit(limit)?;
        let page = if who.is_admin() {
            self.store
                .tenant_list(&PageRequest { cursor, limit })
                .await?
        } else {
            let own = self.store.tenant_get(&who.tenant_id).await?;
            Page {
                items: own.into_iter().collect(),
                next_cursor: None,
            }
        };
        let mut items = Vec::with_capacity(page.items.len());
        for t in page.items {
            let q = self.store.quota_get(&t.id).await?;
            items.push((t, q));
        }
        Ok(Page {
            items,
            next_cursor: page.next_cursor,
        })
    }

    fn tenant_id_visible(&self, who: &Principal, id: &str) -> Result<TenantId> {
        let not_found = || Error::NotFound(format!("tenant {id} not found"));
        let tid = TenantId::parse(id).ok_or_else(not_found)?;
        if !who.can_see(&tid) {
            return Err(not_found());
        }
        Ok(tid)
    }

    pub async fn quota_get(&self, who: &Principal, tenant: &str) -> Result<Quota> {
        let tid = self.tenant_id_visible(who, tenant)?;
        self.store.quota_get(&tid).await
    }

    pub async fn quota_set(&self, who: &Principal, tenant: &str, quota: Quota) -> Result<Quota> {
        let tid = self.tenant_id_visible(who, tenant)?;
        who.require_admin()?;
        let non_negative = [
            quota.max_sandboxes,
            quota.max_memory_mb,
            quota.max_timeout_s,
            quota.max_exec_per_minute,
            quota.max_concurrent_execs,
            quota.max_volumes,
            quota.max_volume_mb,
            quota.max_templates,
        ]
        .iter()
        .flatten()
        .all(|v| *v >= 0);
        let cpu_ok = quota.max_cpu.is_none_or(|c| c.is_finite() && c >= 0.0);
        if !non_negative || !cpu_ok {
            return Err(Error::InvalidRequest(
                "quota limits must be null (unlimited) or non-negative".into(),
            ));
        }
        if let Some(providers) = &quota.allowed_providers {
            if providers.len() > 32 {
                return Err(Error::InvalidRequest(
                    "allowed_providers may name at most 32 providers".into(),
                ));
            }
            let known = self.scheduler.provider_names().await?;
            for p in providers {
                if !known.contains(p) {
                    return Err(Error::InvalidRequest(format!(
                        "allowed_providers names {p:?}, which this server does not run \
                         (configured providers: {})",
                        known.join(", ")
                    )));
                }
            }
        }
        self.store.quota_set(&tid, &quota).await?;
        self.quota_cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&tid);
        self.store.quota_get(&tid).await
    }

    pub async fn key_create(
        &self,
        who: &Principal,
        tenant: &str,
        role: &str,
        name: &str,
    ) -> Result<NewKey> {
        who.require_key_manager()?;
        let role = Role::parse(role).ok_or_else(|| {
            Error::InvalidRequest(format!(
                "role {role:?} must be admin, owner, member or viewer"
            ))
        })?;
        check_label("name", name)?;
        let not_found = || Error::NotFound(format!("tenant {tenant} not found"));
        let tid = TenantId::parse(tenant).ok_or_else(not_found)?;
        // An owner manages its own tenant only; others do not exist for it.
        if !who.can_see(&tid) || self.store.tenant_get(&tid).await?.is_none() {
            return Err(not_found());
        }
        if role == Role::Admin {
            if !who.is_admin() {
                return Err(Error::Forbidden(
                    "only an admin key may mint admin keys".into(),
                ));
            }
            if tid != self.system_tenant {
                return Err(Error::InvalidRequest(format!(
                    "admin keys are global and are minted only on the operator's own tenant \
                     ({}); for a key that manages tenant {tid} alone, use role \"owner\"",
                    self.system_tenant
                )));
            }
        }
        let secret = auth::generate_key();
        let key = ApiKey {
            id: KeyId::generate(),
            tenant_id: tid,
            role,
            name: name.to_owned(),
            key_hash: auth::hash_key(&secret),
            created_at: now(),
            revoked_at: None,
        };
        self.store.key_create(&key).await?;
        Ok(NewKey { key, secret })
    }

    pub async fn key_list(
        &self,
        who: &Principal,
        limit: Option<u32>,
        cursor: Option<String>,
    ) -> Result<Page<ApiKey>> {
        let tenant = if who.is_admin() {
            None
        } else {
            Some(&who.tenant_id)
        };
        self.store
            .key_list(
                tenant,
                &PageRequest {
                    cursor,
                    limit: page_limit(limit)?,
                },
            )
            .await
    }

    pub async fn key_revoke(&self, who: &Principal, id: &str) -> Result<()> {
        who.require_key_manager()?;
        let not_found = || Error::NotFound(format!("key {id} not found"));
        let kid = KeyId::parse(id).ok_or_else(not_found)?;
        let key = self.store.key_get(&kid).await?.ok_or_else(not_found)?;
        if !who.can_see(&key.tenant_id) {
            return Err(not_found());
        }
        if key.role == Role::Admin && !who.is_admin() {
            return Err(Error::Forbidden(
                "only an admin key may revoke admin keys".into(),
            ));
        }
        if self.store.key_revoke(&kid, now()).await? {
            Ok(())
        } else {
            Err(not_found())
        }
    }
}
