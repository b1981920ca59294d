//! Ports: which ports of a sandbox are exposed through the control plane,
//! the signed URL tokens that open a private one, and the relay that
//! reaches a port through the sandbox's agent (so no network interface is
//! needed, and only the sandbox's own loopback is reachable).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use sha2::{Digest, Sha256};
use stacyvm_core::{ByteStream, Error, Result, SandboxId, SandboxState};

use super::sandboxes::agent;
use super::{App, Principal};

/// One exposed port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposure {
    pub port: u16,
    pub public: bool,
}

/// The exposed ports of every sandbox, and the secret URL tokens are signed
/// with. The secret is made at start-up, so a restart voids every token.
pub struct Exposures {
    map: Mutex<HashMap<String, BTreeMap<u16, bool>>>,
    secret: [u8; 32],
}

impl Default for Exposures {
    fn default() -> Exposures {
        Exposures {
            map: Mutex::new(HashMap::new()),
            secret: rand::random(),
        }
    }
}

impl Exposures {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeMap<u16, bool>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, id: &str, port: u16) -> Option<bool> {
        self.lock().get(id).and_then(|m| m.get(&port).copied())
    }

    /// Drops every exposure of a sandbox (it was destroyed).
    pub fn forget(&self, id: &str) {
        self.lock().remove(id);
    }

    fn mac(&self, id: &str, port: u16, expires: i64) -> String {
        hmac_sha256(&self.secret, format!("{id}\n{port}\n{expires}").as_bytes())
    }

    /// A token opening `port` of sandbox `id` until `expires` (Unix seconds).
    pub fn sign(&self, id: &str, port: u16, expires: i64) -> String {
        format!("{expires}.{}", self.mac(id, port, expires))
    }

    /// Whether `token` opens `port` of sandbox `id` now.
    pub fn verify(&self, id: &str, port: u16, token: &str, now: i64) -> Result<()> {
        let bad = || Error::Unauthenticated("the port token is not valid".into());
        let (expires, mac) = token.split_once('.').ok_or_else(bad)?;
        let expires: i64 = expires.parse().map_err(|_| bad())?;
        let want = self.mac(id, port, expires);
        // Compared in constant time: the token is an attacker's guess.
        let same = want.len() == mac.len()
            && want
                .bytes()
                .zip(mac.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if !same {
            return Err(bad());
        }
        if now >= expires {
            return Err(Error::Unauthenticated("the port token has expired".into()));
        }
        Ok(())
    }
}

/// HMAC-SHA-256 (RFC 2104) as lower-case hex.
fn hmac_sha256(key: &[u8; 32], msg: &[u8]) -> String {
    let mut block = [0u8; 64];
    block[..32].copy_from_slice(key);
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    hex::encode(outer.finalize())
}

/// Checks a port number from a request.
pub fn check_port(port: i64) -> Result<u16> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Error::InvalidRequest(format!("port {port} is outside 1-65535")))
}

/// Who is asking the relay for a port.
pub enum Caller<'a> {
    Key(&'a Principal),
    /// A signed URL token that was checked.
    Token,
    Nobody,
}

impl App {
    /// The sandbox, running and visible to `who`, on a provider that keeps
    /// its loopback its own.
    async fn port_sandbox(&self, who: &Principal, id: &str) -> Result<SandboxId> {
        let (rec, worker, _) = self.running(who, id).await?;
        check_provider(&rec.provider)?;
        drop(worker);
        Ok(rec.id)
    }

    pub async fn port_expose(
        &self,
        who: &Principal,
        id: &str,
        port: i64,
        public: bool,
    ) -> Result<Exposure> {
        who.require_write()?;
        let port = check_port(port)?;
        let sid = self.port_sandbox(who, id).await?;
        self.ports
            .lock()
            .entry(sid.to_string())
            .or_default()
            .insert(port, public);
        Ok(Exposure { port, public })
    }

    pub async fn port_list(&self, who: &Principal, id: &str) -> Result<Vec<Exposure>> {
        let rec = self.sandbox_visible(who, id).await?;
        Ok(self
            .ports
            .lock()
            .get(&rec.id.to_string())
            .map(|m| {
                m.iter()
                    .map(|(p, public)| Exposure {
                        port: *p,
                        public: *public,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    pub async fn port_remove(&self, who: &Principal, id: &str, port: i64) -> Result<()> {
        who.require_write()?;
        let port = check_port(port)?;
        let rec = self.sandbox_visible(who, id).await?;
        let removed = self
            .ports
            .lock()
            .get_mut(&rec.id.to_string())
            .and_then(|m| m.remove(&port));
        match removed {
            Some(_) => Ok(()),
            None => Err(Error::NotFound(format!(
                "port {port} of sandbox {id} is not exposed"
            ))),
        }
    }

    /// A signed token for an exposed port, valid for `ttl_secs`.
    pub async fn port_token(
        &self,
        who: &Principal,
        id: &str,
        port: i64,
        ttl_secs: i64,
    ) -> Result<(String, i64)> {
        who.require_write()?;
        let port = check_port(port)?;
        if !(1..=7 * 24 * 3600).contains(&ttl_secs) {
            return Err(Error::InvalidRequest(format!(
                "ttl_seconds {ttl_secs} is outside 1-604800"
            )));
        }
        let rec = self.sandbox_visible(who, id).await?;
        let sid = rec.id.to_string();
        if self.ports.get(&sid, port).is_none() {
            return Err(Error::NotFound(format!(
                "port {port} of sandbox {id} is not exposed"
            )));
        }
        let expires = unix_now() + ttl_secs;
        Ok((self.ports.sign(&sid, port, expires), expires))
    }

    /// Checks a URL token for `port` of sandbox `id`.
    pub fn port_token_check(&self, id: &str, port: u16, token: &str) -> Result<()> {
        self.ports.verify(id, port, token, unix_now())
    }

    /// Opens a relayed connection to an exposed port: `input` goes to the
    /// server inside the sandbox, the answer is what it sends back.
    ///
    /// Everything that is not an exposed port of a sandbox the caller may
    /// use is "not found", so the relay tells strangers nothing.
    pub async fn port_connect(
        &self,
        caller: Caller<'_>,
        id: &str,
        port: u16,
        input: ByteStream,
    ) -> Result<ByteStream> {
        let not_found = || Error::NotFound(format!("port {port} of sandbox {id} is not exposed"));
        let sid = SandboxId::parse(id).ok_or_else(not_found)?;
        let public = self.ports.get(sid.as_ref(), port);
        let rec = self.store.sandbox_get(&sid).await?;
        let Some(rec) = rec else {
            self.ports.forget(sid.as_ref());
            return Err(not_found());
        };
        match caller {
            Caller::Key(who) if !who.can_see(&rec.tenant_id) => return Err(not_found()),
            // A request to the sandbox's server can change what is in it:
            // a read-only key reaches public ports only.
            Caller::Key(who) if public == Some(false) => who.require_write()?,
            Caller::Key(_) | Caller::Token => {}
            Caller::Nobody if public == Some(true) => {}
            Caller::Nobody => {
                return Err(Error::Unauthenticated(
                    "this port is private: send an API key or a signed port token".into(),
                ))
            }
        }
        if public.is_none() {
            return Err(not_found());
        }
        if rec.state.is_terminal() {
            self.ports.forget(sid.as_ref());
            return Err(not_found());
        }
        if rec.state != SandboxState::Running {
            return Err(Error::Conflict(format!(
                "sandbox {id} is {}, not running",
                rec.state
            )));
        }
        check_provider(&rec.provider)?;
        let (worker, lease) = self.lease_of(&rec).await?;
        let client = agent(&worker, &lease).await?;
        client.port_connect(port, input).await
    }
}

/// PRoot shares the host's network: its "loopback" is the host's, so a
/// relay there would reach the host's services.
fn check_provider(provider: &str) -> Result<()> {
    if provider == "proot" || provider.starts_with("plugin:") {
        return Err(Error::Unsupported(format!(
            "the {provider} provider cannot expose ports: its sandboxes have no loopback of their own"
        )));
    }
    Ok(())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_open_their_port_until_they_expire() {
        let e = Exposures::default();
        let t = e.sign("sb-1", 8080, 1000);
        assert!(e.verify("sb-1", 8080, &t, 999).is_ok());
        assert!(e.verify("sb-1", 8080, &t, 1000).is_err());
        assert!(e.verify("sb-1", 8081, &t, 999).is_err());
        assert!(e.verify("sb-2", 8080, &t, 999).is_err());
        let forged = format!("2000.{}", t.split_once('.').map(|x| x.1).unwrap_or(""));
        assert!(e.verify("sb-1", 8080, &forged, 999).is_err());
        assert!(e.verify("sb-1", 8080, "junk", 0).is_err());
        assert!(Exposures::default().verify("sb-1", 8080, &t, 999).is_err());
    }

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        // HMAC pads short keys with zeros, so "Jefe" padded to 32 bytes is
        // the RFC's key.
        let mut key = [0u8; 32];
        key[..4].copy_from_slice(b"Jefe");
        assert_eq!(
            hmac_sha256(&key, b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn ports_outside_the_range_are_refused() {
        assert!(check_port(0).is_err());
        assert!(check_port(65536).is_err());
        assert!(check_port(-1).is_err());
        assert_eq!(check_port(65535).ok(), Some(65535));
    }
}
