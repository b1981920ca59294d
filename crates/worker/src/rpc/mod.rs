//! The worker RPC (gRPC, `proto/worker.proto`): the generated code, how
//! errors and leases travel on it, and both ends: [`server`] runs on the
//! worker's host, [`remote`] is the control plane's [`crate::Worker`] over it.

pub mod remote;
pub mod server;
pub mod tls;

use stacyvm_core::{Error, SandboxId};
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Code, Status};

use crate::Lease;

/// The code generated from `proto/worker.proto`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("stacyvm.worker.v1");
}

/// The StacyVM error code of a failed call, so the control plane rebuilds
/// the same error (and the same HTTP status) the worker met.
const ERROR_CODE: &str = "x-stacyvm-error";
/// Set on a spawn's failure when the worker lacks the image and the caller
/// offered to push it.
pub(crate) const PUSH_IMAGE: &str = "x-stacyvm-push-image";
/// The lease of an agent tunnel (a stream has no first message to carry it).
const LEASE_SANDBOX: &str = "x-stacyvm-sandbox";
const LEASE_TOKEN: &str = "x-stacyvm-fencing-token";
const LEASE_PROVIDER: &str = "x-stacyvm-provider";

/// HTTP/2 flow-control windows of the worker RPC, per stream and per
/// connection.
pub(crate) const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub(crate) const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// The largest gRPC message either end accepts. Agent frames and tunnel
/// chunks are far smaller; this only bounds what a broken peer makes us hold.
pub(crate) const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// A worker's error as a gRPC status carrying its StacyVM code.
pub(crate) fn to_status(e: &Error) -> Status {
    let code = match e {
        Error::InvalidRequest(_) => Code::InvalidArgument,
        Error::Unauthenticated(_) => Code::Unauthenticated,
        Error::Forbidden(_) => Code::PermissionDenied,
        Error::NotFound(_) | Error::ImageNotFound(_) => Code::NotFound,
        Error::Conflict(_) => Code::FailedPrecondition,
        Error::Unsupported(_) => Code::Unimplemented,
        Error::PayloadTooLarge(_) => Code::OutOfRange,
        Error::QuotaExceeded(_) | Error::ResourceExhausted(_) | Error::RateLimited { .. } => {
            Code::ResourceExhausted
        }
        Error::NoCapacity(_) | Error::ProviderUnavailable(_) | Error::Unavailable(_) => {
            Code::Unavailable
        }
        Error::Timeout(_) => Code::DeadlineExceeded,
        Error::Internal(_) => Code::Internal,
    };
    let mut status = Status::new(code, e.message());
    if let Ok(v) = MetadataValue::try_from(e.code()) {
        status.metadata_mut().insert(ERROR_CODE, v);
    }
    status
}

/// The error behind a failed call to worker `worker`: the worker's own
/// error when it sent one, otherwise the worker could not be reached or
/// refused the control plane, which is `Unavailable` (a worker that is
/// away), or `Timeout` past the call's deadline.
pub(crate) fn from_status(worker: &str, s: Status) -> Error {
    if let Some(code) = s.metadata().get(ERROR_CODE).and_then(|v| v.to_str().ok()) {
        return Error::from_code(code, s.message());
    }
    match s.code() {
        Code::DeadlineExceeded => Error::Timeout(format!(
            "worker {worker} did not answer in time: {}",
            s.message()
        )),
        Code::Unauthenticated | Code::PermissionDenied => Error::Unavailable(format!(
            "worker {worker} refused this control plane's credentials (it may have registered \
             again since): {}",
            s.message()
        )),
        _ => Error::Unavailable(format!("worker {worker} is unreachable: {}", s.message())),
    }
}

/// Whether a failed call's status carries a StacyVM error code: the worker
/// itself answered, rather than gRPC (an unknown method) or the transport.
pub(crate) fn has_error_code(s: &Status) -> bool {
    s.metadata().get(ERROR_CODE).is_some()
}

impl From<&Lease> for pb::Lease {
    fn from(l: &Lease) -> pb::Lease {
        pb::Lease {
            sandbox_id: l.sandbox_id.to_string(),
            fencing_token: l.fencing_token,
            provider: l.provider.clone(),
        }
    }
}

/// The lease of a request, checked for shape (the worker trusts the control
/// plane, but not a mangled message).
pub(crate) fn lease_from(l: Option<pb::Lease>) -> Result<Lease, Error> {
    let l = l.ok_or_else(|| Error::InvalidRequest("the call carries no lease".into()))?;
    let id = SandboxId::parse(&l.sandbox_id)
        .ok_or_else(|| Error::InvalidRequest(format!("{:?} is not a sandbox id", l.sandbox_id)))?;
    Ok(Lease::new(&id, l.fencing_token, &l.provider))
}

pub(crate) fn put_lease(md: &mut MetadataMap, l: &Lease) -> Result<(), Error> {
    let bad = |_| Error::InvalidRequest("a lease that cannot travel as metadata".into());
    md.insert(LEASE_SANDBOX, l.sandbox_id.as_str().parse().map_err(bad)?);
    md.insert(
        LEASE_TOKEN,
        l.fencing_token.to_string().parse().map_err(bad)?,
    );
    md.insert(LEASE_PROVIDER, l.provider.parse().map_err(bad)?);
    Ok(())
}

pub(crate) fn lease_from_metadata(md: &MetadataMap) -> Result<Lease, Error> {
    let get = |k: &str| {
        md.get(k)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::InvalidRequest(format!("the tunnel request lacks {k}")))
    };
    let token = get(LEASE_TOKEN)?
        .parse::<i64>()
        .map_err(|_| Error::InvalidRequest(format!("{LEASE_TOKEN} is not an integer")))?;
    lease_from(Some(pb::Lease {
        sandbox_id: get(LEASE_SANDBOX)?.to_owned(),
        fencing_token: token,
        provider: get(LEASE_PROVIDER)?.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_cross_the_rpc_as_the_same_variant() {
        for e in [
            Error::InvalidRequest("x".into()),
            Error::NotFound("x".into()),
            Error::Conflict("x".into()),
            Error::Unsupported("x".into()),
            Error::ImageNotFound("x".into()),
            Error::ResourceExhausted("x".into()),
            Error::ProviderUnavailable("x".into()),
            Error::Timeout("x".into()),
            Error::Internal("x".into()),
        ] {
            assert_eq!(from_status("wrk_1", to_status(&e)), e);
        }
        let away = from_status("wrk_1", Status::unavailable("connection refused"));
        assert!(matches!(away, Error::Unavailable(_)), "{away:?}");
        let refused = from_status("wrk_1", Status::unauthenticated("bad secret"));
        assert!(matches!(refused, Error::Unavailable(_)), "{refused:?}");
    }
}
