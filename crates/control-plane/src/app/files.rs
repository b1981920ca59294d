//! Files: every file operation of a running sandbox, through its agent,
//! with paths checked before they leave the control plane.

use stacyvm_core::{validate_sandbox_path, ByteStream, FileEntry, Result};
use stacyvm_provider::agent_client::WriteAs;

use super::sandboxes::invalid;
use super::{App, Principal};

impl App {
    pub async fn file_write(
        &self,
        who: &Principal,
        id: &str,
        path: &str,
        mode: Option<u32>,
        body: ByteStream,
    ) -> Result<FileEntry> {
        self.file_write_as(who, id, path, mode, &WriteAs::default(), body)
            .await
    }

    /// [`App::file_write`] with [`WriteAs`]: the sandbox's user the file
    /// and the parents it makes belong to, and its extended attributes.
    pub async fn file_write_as(
        &self,
        who: &Principal,
        id: &str,
        path: &str,
        mode: Option<u32>,
        with: &WriteAs,
        body: ByteStream,
    ) -> Result<FileEntry> {
        who.require_write()?;
        let path = validate_sandbox_path(path)?;
        let agent = self.agent_of(who, id).await?;
        agent.file_write_as(&path, mode, with, body).await
    }

    pub async fn file_extract(
        &self,
        who: &Principal,
        id: &str,
        path: &str,
        body: ByteStream,
    ) -> Result<stacyvm_core::ArchiveSummary> {
        who.require_write()?;
        let path = validate_sandbox_path(path)?;
        let agent = self.agent_of(who, id).await?;
        agent.file_extract(&path, body).await
    }

    pub async fn file_read(&self, who: &Principal, id: &str, path: &str) -> Result<ByteStream> {
        let path = validate_sandbox_path(path)?;
        let agent = self.agent_of(who, id).await?;
        agent.file_read(&path).await
    }

    /// `path` as a tar stream (a directory's entries relative to it).
    /// Reading, like [`App::file_read`]: any key of the sandbox's tenant.
    pub async fn file_archive(&self, who: &Principal, id: &str, path: &str) -> Result<ByteStream> {
        let path = validate_sandbox_path(path)?;
        let agent = self.agent_of(who, id).await?;
        agent.file_archive(&path).await
    }

    pub async fn file_stat(&self, who: &Principal, id: &str, path: &str) -> Result<FileEntry> {
        let path = validate_sandbox_path(path)?;
        let agent = self.agent_of(who, id).await?;
        agent.file_stat(&path).await
    }

    pub async fn file_list(
        &self,
        who: &Principal,
        id: &str,
        path: &str,
        recursive: bool,
    ) -> Result<Vec<FileEntry>> {
        let path = validate_sandbox_path(path)?;
        let agent = self.agent_of(who, id).await?;
        agent.file_list(&path, recursive).await
    }

    pub async fn file_glob(&self, who: &Principal, id: &str, pattern: &str) -> Result<Vec<String>> {
        if !pattern.starts_with('/') || pattern.contains('\0') || pattern.len() > 4096 {
            return Err(invalid(
                "pattern must be an absolute glob like /work/**/*.py, without NUL bytes",
            ));
        }
        let agent = self.agent_of(who, id).await?;
        agent.file_glob(pattern).await
    }

    pub async fn file_move(
        &self,
        who: &Principal,
        id: &str,
        from: &str,
        to: &str,
        overwrite: bool,
    ) -> Result<FileEntry> {
        who.require_write()?;
        let (from, to) = (validate_sandbox_path(from)?, validate_sandbox_path(to)?);
        let agent = self.agent_of(who, id).await?;
        agent.file_move(&from, &to, overwrite).await
    }

    pub async fn file_chmod(
        &self,
        who: &Principal,
        id: &str,
        path: &str,
        mode: u32,
    ) -> Result<FileEntry> {
        who.require_write()?;
        let path = validate_sandbox_path(path)?;
        let agent = self.agent_of(who, id).await?;
        agent.file_chmod(&path, mode).await
    }

    pub async fn file_mkdir(
        &self,
        who: &Principal,
        id: &str,
        path: &str,
        parents: bool,
    ) -> Result<FileEntry> {
        self.file_mkdir_as(who, id, path, parents, None).await
    }

    /// [`App::file_mkdir`], what it makes belonging to `user`.
    pub async fn file_mkdir_as(
        &self,
        who: &Principal,
        id: &str,
        path: &str,
        parents: bool,
        user: Option<&str>,
    ) -> Result<FileEntry> {
        who.require_write()?;
        let path = validate_sandbox_path(path)?;
        let agent = self.agent_of(who, id).await?;
        agent.file_mkdir_as(&path, parents, user).await
    }

    pub async fn file_delete(
        &self,
        who: &Principal,
        id: &str,
        path: &str,
        recursive: bool,
    ) -> Result<()> {
        who.require_write()?;
        let path = validate_sandbox_path(path)?;
        if path == "/" {
            return Err(invalid("the sandbox root cannot be deleted"));
        }
        let agent = self.agent_of(who, id).await?;
        agent.file_delete(&path, recursive).await
    }
}
