//! The PostgreSQL backend (skeleton).
use stacyvm_core::{Error, Result};
pub struct PostgresStore;
impl PostgresStore {
    pub async fn open(_url: &str) -> Result<PostgresStore> {
        Err(Error::Internal("postgres store not built yet".into()))
    }
}
