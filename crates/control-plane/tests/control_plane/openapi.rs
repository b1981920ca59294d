//! The OpenAPI document is part of the API contract: this snapshot makes
//! every change to it deliberate. After an intended change, regenerate with
//! `UPDATE_SNAPSHOTS=1 cargo nextest run -p stacyvm-control-plane openapi`
//! and review the diff.

use std::path::PathBuf;

fn snapshot_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/control_plane/snapshots/openapi.json")
}

#[test]
fn openapi_document_matches_the_snapshot() {
    let doc = stacyvm_control_plane::http::openapi::document();
    let rendered = serde_json::to_string_pretty(&doc).expect("a JSON value always renders") + "\n";
    let path = snapshot_path();
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &rendered).expect("writing the snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with UPDATE_SNAPSHOTS=1 to create it",
            path.display()
        )
    });
    assert!(
        expected == rendered,
        "the OpenAPI document changed; if intended, rerun with UPDATE_SNAPSHOTS=1 and commit {}",
        path.display()
    );
}

#[test]
fn openapi_document_covers_every_endpoint_of_the_contract() {
    let doc = stacyvm_control_plane::http::openapi::document();
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1")),
        "{}",
        doc["openapi"]
    );
    let paths = doc["paths"].as_object().expect("paths is an object");
    let expected: &[(&str, &str)] = &[
        ("/v1/sandboxes", "post"),
        ("/v1/sandboxes", "get"),
        ("/v1/sandboxes/{id}", "get"),
        ("/v1/sandboxes/{id}", "delete"),
        ("/v1/sandboxes/{id}/timeout", "post"),
        ("/v1/sandboxes/{id}/pause", "post"),
        ("/v1/sandboxes/{id}/resume", "post"),
        ("/v1/sandboxes/{id}/logs", "get"),
        ("/v1/sandboxes/{id}/exec", "post"),
        ("/v1/sandboxes/{id}/exec/stream", "post"),
        ("/v1/sandboxes/{id}/files", "put"),
        ("/v1/sandboxes/{id}/files", "get"),
        ("/v1/sandboxes/{id}/files", "delete"),
        ("/v1/sandboxes/{id}/files/stat", "get"),
        ("/v1/sandboxes/{id}/files/list", "get"),
        ("/v1/sandboxes/{id}/files/glob", "get"),
        ("/v1/sandboxes/{id}/files/move", "post"),
        ("/v1/sandboxes/{id}/files/chmod", "post"),
        ("/v1/sandboxes/{id}/files/mkdir", "post"),
        ("/v1/images", "post"),
        ("/v1/images", "get"),
        ("/v1/images/{name}", "get"),
        ("/v1/images/{name}", "delete"),
        ("/v1/tenants", "post"),
        ("/v1/tenants", "get"),
        ("/v1/tenants/{id}/quota", "get"),
        ("/v1/tenants/{id}/quota", "put"),
        ("/v1/keys", "post"),
        ("/v1/keys", "get"),
        ("/v1/keys/{id}", "delete"),
        ("/v1/audit", "get"),
        ("/v1/status", "get"),
        ("/v1/workers", "get"),
        ("/v1/workers/{id}/drain", "post"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ];
    for (path, method) in expected {
        assert!(
            paths.get(*path).and_then(|p| p.get(*method)).is_some(),
            "{} {path} is missing from the OpenAPI document",
            method.to_uppercase()
        );
    }
}
