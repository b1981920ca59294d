//! The SQLite backend (skeleton).
use stacyvm_core::{Error, Result};
pub struct SqliteStore;
impl SqliteStore {
    pub async fn open(_path: &std::path::Path) -> Result<SqliteStore> {
        Err(Error::Internal("sqlite store not built yet".into()))
    }
}
