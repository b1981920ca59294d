//! Images for containers: catalog images imported into Docker once per
//! digest, and references checked before the daemon sees them.

use super::*;

/// The Docker reference a catalog image is imported under:
/// `stacyvm-catalog/<name>:<first 12 hex digits of the digest>`, so a
/// re-imported catalog image gets a new tag and an unchanged one is reused.
pub(super) fn catalog_docker_ref(info: &ImageInfo) -> String {
    let mut flat: String = info
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    while flat.ends_with('-') {
        flat.pop();
    }
    if flat.is_empty() {
        flat.push_str("image");
    }
    let hex = info.digest.strip_prefix("sha256:").unwrap_or(&info.digest);
    let short: String = hex.chars().take(12).collect();
    format!("{CATALOG_REPO_PREFIX}{flat}:{short}")
}

/// Characters Docker accepts in an image reference; anything else would be
/// mangled in the request URL.
pub(super) fn check_docker_reference(image: &str) -> Result<()> {
    if image.is_empty()
        || image.len() > 512
        || !image.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/' | b':' | b'@')
        })
    {
        return Err(Error::InvalidRequest(format!(
            "image {image:?} is not a valid image reference (letters, digits, '.', '_', '-', '/', ':' and '@' only)"
        )));
    }
    Ok(())
}

impl Inner {
    /// Finds the Docker image for `image`: a catalog image (imported into
    /// Docker on first use), or an image the daemon already has.
    pub(super) async fn resolve_image(&self, docker: &Docker, image: &str) -> Result<String> {
        if validate_image_name(image).is_ok() {
            match self.cfg.catalog.open_tar(image).await {
                Ok((info, file)) => return self.ensure_catalog_image(docker, &info, file).await,
                Err(Error::ImageNotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        check_docker_reference(image)?;
        match docker.inspect_image(image).await {
            Ok(_) => Ok(image.to_owned()),
            Err(e) if is_status(&e, 404) || is_status(&e, 400) => {
                Err(Error::ImageNotFound(format!(
                    "image {image:?} is neither in the image catalog nor in the Docker daemon \
                 (import it with `stacyvm image import`, or load it into Docker)"
                )))
            }
            Err(e) => Err(self.docker_error(format_args!("looking up image {image:?}"), e)),
        }
    }

    /// Imports a catalog image into Docker unless it is there already. One
    /// import per tag at a time: concurrent spawns wait for the first.
    pub(super) async fn ensure_catalog_image(
        &self,
        docker: &Docker,
        info: &ImageInfo,
        file: tokio::fs::File,
    ) -> Result<String> {
        let reference = catalog_docker_ref(info);
        let lock = new_lock_for(&self.image_imports, &reference);
        let _held = lock.lock().await;
        match docker.inspect_image(&reference).await {
            Ok(_) => return Ok(reference),
            Err(e) if is_status(&e, 404) => {}
            Err(e) => {
                return Err(self.docker_error(format_args!("looking up image {reference}"), e))
            }
        }
        let (repo, tag) = reference
            .rsplit_once(':')
            .expect("catalog references always carry a tag");
        let options = CreateImageOptionsBuilder::default()
            .from_src("-")
            .repo(repo)
            .tag(tag)
            .message(&format!(
                "StacyVM catalog image {} ({})",
                info.name, info.digest
            ))
            .build();
        let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(file));
        let mut progress = docker.create_image(Some(options), Some(body), None);
        while let Some(step) = progress.next().await {
            step.map_err(|e| {
                self.docker_error(
                    format_args!("importing catalog image {} into Docker", info.name),
                    e,
                )
            })?;
        }
        docker.inspect_image(&reference).await.map_err(|e| {
            self.docker_error(
                format_args!("importing catalog image {} into Docker", info.name),
                e,
            )
        })?;
        tracing::info!(image = %info.name, reference = %reference, "catalog image imported into Docker");
        Ok(reference)
    }
}
