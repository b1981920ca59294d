//! API keys: generation, hashing, lookup and the bootstrap admin key.
//!
//! Keys look like `svm_<43 base64url chars>` (256 random bits). Only the
//! SHA-256 of a key is stored; lookups hash the presented key and compare
//! the stored hash in constant time.
//!
//! Every key also has an E2B spelling, `e2b_<lowercase hex>`, because the
//! E2B SDK refuses keys of any other shape. It is the same secret written
//! differently (the hex of the bytes the base64url part encodes, or of the
//! part's own characters for an operator-chosen key that is not canonical
//! base64url), so it resolves to the same key record: same tenant, role,
//! audit trail and revocation, and nothing more is stored.

use std::path::Path;

use base64::Engine;
use sha2::{Digest, Sha256};
use stacyvm_core::{now, Error, KeyId, Result, TenantId};
use stacyvm_store::{ApiKey, DynStore, Role, Tenant};
use subtle::ConstantTimeEq;

use super::Principal;

pub const KEY_PREFIX: &str = "svm_";
/// The prefix of a key's E2B spelling.
pub const E2B_KEY_PREFIX: &str = "e2b_";
const SYSTEM_TENANT_NAME: &str = "system";
const BOOTSTRAP_KEY_NAME: &str = "bootstrap-admin";
/// Characters a configured admin key must carry after its prefix: a short
/// operator-chosen key would be the weakest secret of the deployment.
const MIN_ADMIN_SECRET: usize = 32;

/// A fresh secret key.
pub fn generate_key() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// Hex SHA-256 of a secret key: the only form the store ever sees.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The E2B spelling of a StacyVM key (`svm_…` → `e2b_<hex>`); `None` for a
/// string that is not a StacyVM key.
pub fn e2b_spelling(key: &str) -> Option<String> {
    let secret = key.strip_prefix(KEY_PREFIX)?;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let bytes = match b64.decode(secret) {
        // Only a canonical encoding maps back to the same string.
        Ok(b) if b64.encode(&b) == secret => b,
        _ => secret.as_bytes().to_vec(),
    };
    Some(format!("{E2B_KEY_PREFIX}{}", hex::encode(bytes)))
}

/// The StacyVM spellings an `e2b_<hex>` key may stand for, most likely
/// first: the base64url form of its bytes (generated keys), then the bytes
/// as they are (operator-chosen keys that are not canonical base64url).
fn svm_spellings(e2b: &str) -> Vec<String> {
    let Some(hexpart) = e2b.strip_prefix(E2B_KEY_PREFIX) else {
        return Vec::new();
    };
    // Lowercase only, so each secret has exactly one E2B spelling.
    if hexpart.bytes().any(|b| b.is_ascii_uppercase()) {
        return Vec::new();
    }
    let Ok(bytes) = hex::decode(hexpart) else {
        return Vec::new();
    };
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut out = vec![format!("{KEY_PREFIX}{}", b64.encode(&bytes))];
    if let Ok(s) = std::str::from_utf8(&bytes) {
        // Only when that is how `e2b_spelling` would have written it.
        let canonical = b64.decode(s).is_ok_and(|b| b64.encode(&b) == s);
        if !canonical && !s.is_empty() {
            out.push(format!("{KEY_PREFIX}{s}"));
        }
    }
    out
}

/// Resolves a bearer key (either spelling) to its principal;
/// `Unauthenticated` for a missing, unknown or revoked key.
pub async fn authenticate(store: &DynStore, bearer: Option<&str>) -> Result<Principal> {
    let key = bearer.ok_or_else(|| {
        Error::Unauthenticated("missing API key: send `Authorization: Bearer svm_…`".into())
    })?;
    if key.len() > 600 {
        return Err(Error::Unauthenticated("invalid API key".into()));
    }
    let candidates = if key.starts_with(KEY_PREFIX) {
        vec![key.to_owned()]
    } else {
        svm_spellings(key)
    };
    if candidates.is_empty() || candidates.iter().any(|k| k.len() > 256) {
        return Err(Error::Unauthenticated("invalid API key".into()));
    }
    let mut found = None;
    let mut hash = String::new();
    for k in &candidates {
        hash = hash_key(k);
        if let Some(f) = store.key_by_hash(&hash).await? {
            found = Some(f);
            break;
        }
    }
    let Some(found) = found else {
        return Err(Error::Unauthenticated("invalid API key".into()));
    };
    // The lookup is by hash already; comparing again in constant time keeps
    // any future prefix-based lookup from leaking timing.
    if !bool::from(found.key_hash.as_bytes().ct_eq(hash.as_bytes())) {
        return Err(Error::Unauthenticated("invalid API key".into()));
    }
    if found.revoked_at.is_some() {
        return Err(Error::Unauthenticated("API key has been revoked".into()));
    }
    Ok(Principal {
        key_id: found.id,
        tenant_id: found.tenant_id,
        role: found.role,
    })
}

impl super::App {
    /// Resolves the bearer key of a call from `addr`.
    ///
    /// A valid key is always served. Failures are counted per client
    /// address; past `limits.auth_failures_per_minute` a bad key gets
    /// `RateLimited` instead of `Unauthenticated`, telling a flooding client
    /// to back off without locking out a neighbour (same NAT or proxy) whose
    /// key works.
    pub async fn authenticate(
        &self,
        bearer: Option<&str>,
        addr: Option<std::net::IpAddr>,
    ) -> Result<Principal> {
        let err = match authenticate(&self.store, bearer).await {
            Ok(p) => return Ok(p),
            Err(e) => e,
        };
        if let (Error::Unauthenticated(_), Some(addr)) = (&err, addr) {
            self.auth_failures
                .failed(addr, self.config.limits.auth_failures_per_minute)?;
        }
        Err(err)
    }
}

/// What the bootstrap did, so `serve` can tell the operator.
pub struct Bootstrap {
    pub system_tenant: TenantId,
    /// The key when it was generated on this start (print it once).
    pub generated_key: Option<String>,
    /// Where the key is kept when generated.
    pub key_file: Option<std::path::PathBuf>,
}

/// Makes sure the system tenant and the bootstrap admin key exist.
///
/// With `STACYVM_ADMIN_KEY` set, that key becomes the bootstrap admin key
/// (an earlier, different bootstrap key is revoked). Without it, the first
/// start generates one and writes it to `DATA_DIR/admin.key` (mode 0600);
/// later starts reuse that file.
pub async fn bootstrap(
    store: &DynStore,
    data_dir: &Path,
    env_key: Option<&str>,
) -> Result<Bootstrap> {
    let system_tenant = ensure_system_tenant(store).await?;
    let key_file = data_dir.join("admin.key");
    let (key, generated, file) = match env_key {
        Some(k) => {
            if !k.starts_with(KEY_PREFIX) || k.len() < KEY_PREFIX.len() + MIN_ADMIN_SECRET {
                return Err(Error::InvalidRequest(format!(
                    "STACYVM_ADMIN_KEY must start with {KEY_PREFIX} and carry at least \
                     {MIN_ADMIN_SECRET} more characters (a generated key carries 43)"
                )));
            }
            (k.to_owned(), None, None)
        }
        None => match std::fs::read_to_string(&key_file) {
            Ok(s) if s.trim().starts_with(KEY_PREFIX) => {
                (s.trim().to_owned(), None, Some(key_file))
            }
            _ => {
                let k = generate_key();
                write_key_file(&key_file, &k)?;
                (k.clone(), Some(k), Some(key_file))
            }
        },
    };
    let hash = hash_key(&key);
    if store.key_by_hash(&hash).await?.is_none() {
        // Retire earlier bootstrap keys so only the configured one works.
        let mut page = stacyvm_store::PageRequest {
            cursor: None,
            limit: 1000,
        };
        loop {
            let keys = store.key_list(Some(&system_tenant), &page).await?;
            for k in keys
                .items
                .iter()
                .filter(|k| k.name == BOOTSTRAP_KEY_NAME && k.revoked_at.is_none())
            {
                store.key_revoke(&k.id, now()).await?;
            }
            match keys.next_cursor {
                Some(c) => page.cursor = Some(c),
                None => break,
            }
        }
        store
            .key_create(&ApiKey {
                id: KeyId::generate(),
                tenant_id: system_tenant.clone(),
                role: Role::Admin,
                name: BOOTSTRAP_KEY_NAME.into(),
                key_hash: hash,
                created_at: now(),
                revoked_at: None,
            })
            .await?;
    }
    Ok(Bootstrap {
        system_tenant,
        generated_key: generated,
        key_file: file,
    })
}

async fn ensure_system_tenant(store: &DynStore) -> Result<TenantId> {
    let mut page = stacyvm_store::PageRequest {
        cursor: None,
        limit: 1000,
    };
    loop {
        let tenants = store.tenant_list(&page).await?;
        if let Some(t) = tenants.items.iter().find(|t| t.name == SYSTEM_TENANT_NAME) {
            return Ok(t.id.clone());
        }
        match tenants.next_cursor {
            Some(c) => page.cursor = Some(c),
            None => break,
        }
    }
    let tenant = Tenant {
        id: TenantId::generate(),
        name: SYSTEM_TENANT_NAME.into(),
        created_at: now(),
    };
    match store.tenant_create(&tenant).await {
        Ok(()) => Ok(tenant.id),
        // Another control plane created it concurrently: use theirs.
        Err(Error::Conflict(_)) => Box::pin(ensure_system_tenant(store)).await,
        Err(e) => Err(e),
    }
}

fn write_key_file(path: &Path, key: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("key.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Error::internal(format!("writing {}", tmp.display()), e))?;
    f.write_all(format!("{key}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::internal(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::internal(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefixed_unique_and_hashed() {
        let a = generate_key();
        let b = generate_key();
        assert!(a.starts_with(KEY_PREFIX));
        assert_ne!(a, b);
        assert_eq!(hash_key(&a), hash_key(&a));
        assert_ne!(hash_key(&a), hash_key(&b));
        assert_eq!(hash_key(&a).len(), 64);
    }

    #[test]
    fn the_e2b_spelling_maps_back_to_the_same_key() {
        let generated = generate_key();
        let e2b = e2b_spelling(&generated).expect("a key");
        assert!(e2b.starts_with(E2B_KEY_PREFIX));
        assert!(e2b[4..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
        assert_eq!(e2b.len(), 4 + 64);
        assert_eq!(svm_spellings(&e2b)[0], generated);
        // An operator-chosen key that is not canonical base64url.
        let chosen = "svm_sdktest_sdktest_sdktest_sdktest_sdktest";
        let e2b = e2b_spelling(chosen).expect("a key");
        assert!(svm_spellings(&e2b).contains(&chosen.to_owned()));
        assert_eq!(e2b_spelling("sk_other"), None);
        // Uppercase hex, odd length and non-hex are no key at all.
        assert!(svm_spellings(&e2b.to_uppercase().replacen("E2B_", "e2b_", 1)).is_empty());
        assert!(svm_spellings("e2b_abc").is_empty());
        assert!(svm_spellings("e2b_zz").is_empty());
    }
}
