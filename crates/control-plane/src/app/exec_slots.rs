//! How many commands run at once: per sandbox (a server limit, so one
//! sandbox cannot tie up the control plane) and per tenant (the quota's
//! `max_concurrent_execs`). A slot is held for as long as the exec (or its
//! stream) lives, and given back when it is dropped.
//!
//! The counts live in this control plane's memory: with several
//! control-plane replicas each counts the execs it serves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use stacyvm_core::{Error, Result, SandboxId, TenantId};

#[derive(Default)]
struct Counts {
    per_sandbox: HashMap<SandboxId, usize>,
    per_tenant: HashMap<TenantId, i64>,
}

/// The running execs of this control plane.
#[derive(Clone, Default)]
pub struct ExecSlots {
    counts: Arc<Mutex<Counts>>,
}

/// One running exec; dropping it frees its slot.
pub struct ExecSlot {
    counts: Arc<Mutex<Counts>>,
    sandbox: SandboxId,
    tenant: TenantId,
}

impl ExecSlots {
    /// Takes a slot for an exec in `sandbox` of `tenant`, or says which
    /// limit is reached.
    pub fn acquire(
        &self,
        sandbox: &SandboxId,
        tenant: &TenantId,
        per_sandbox: usize,
        per_tenant: Option<i64>,
    ) -> Result<ExecSlot> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let in_sandbox = c.per_sandbox.get(sandbox).copied().unwrap_or(0);
        if in_sandbox >= per_sandbox {
            return Err(Error::RateLimited {
                message: format!(
                    "sandbox {sandbox} already runs {in_sandbox} commands at once (the \
                     server's limit per sandbox); wait for one to finish"
                ),
                retry_after_s: 1,
            });
        }
        let in_tenant = c.per_tenant.get(tenant).copied().unwrap_or(0);
        if let Some(max) = per_tenant {
            if in_tenant >= max {
                return Err(Error::QuotaExceeded(format!(
                    "quota exceeded: max_concurrent_execs is {max} and the tenant runs \
                     {in_tenant} commands now"
                )));
            }
        }
        *c.per_sandbox.entry(sandbox.clone()).or_default() += 1;
        *c.per_tenant.entry(tenant.clone()).or_default() += 1;
        Ok(ExecSlot {
            counts: self.counts.clone(),
            sandbox: sandbox.clone(),
            tenant: tenant.clone(),
        })
    }
}

impl Drop for ExecSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.per_sandbox.get_mut(&self.sandbox) {
            *n -= 1;
            if *n == 0 {
                c.per_sandbox.remove(&self.sandbox);
            }
        }
        if let Some(n) = c.per_tenant.get_mut(&self.tenant) {
            *n -= 1;
            if *n <= 0 {
                c.per_tenant.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_counted_per_sandbox_and_tenant_and_freed_on_drop() {
        let slots = ExecSlots::default();
        let (a, b) = (SandboxId::generate(), SandboxId::generate());
        let t = TenantId::generate();
        let one = slots.acquire(&a, &t, 2, Some(3)).expect("first");
        let two = slots.acquire(&a, &t, 2, Some(3)).expect("second");
        let e = slots
            .acquire(&a, &t, 2, Some(3))
            .err()
            .expect("a third in a");
        assert_eq!(e.code(), "rate_limited");
        let three = slots.acquire(&b, &t, 2, Some(3)).expect("another sandbox");
        let e = slots
            .acquire(&b, &t, 2, Some(3))
            .err()
            .expect("the tenant's fourth");
        assert_eq!(e.code(), "quota_exceeded");
        drop(one);
        let _four = slots.acquire(&a, &t, 2, Some(3)).expect("a slot came free");
        drop((two, three));
        assert_eq!(slots.counts.lock().expect("lock").per_sandbox.len(), 1);
    }
}
