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

/// Every operation of the reference at `/docs` has a one-line summary and
/// a description (from the handler's doc comment: its first paragraph, then
/// the rest), and every parameter and response a description.
#[test]
fn every_operation_has_a_summary_and_a_description() {
    let doc = stacyvm_control_plane::http::openapi::document();
    let paths = doc["paths"].as_object().expect("paths is an object");
    let mut missing = Vec::new();
    let mut operations = 0;
    for (path, item) in paths {
        for (method, op) in item.as_object().expect("a path item is an object") {
            operations += 1;
            let name = format!("{} {path}", method.to_uppercase());
            for field in ["summary", "description"] {
                if op[field].as_str().is_none_or(|s| s.trim().is_empty()) {
                    missing.push(format!("{name}: no {field}"));
                }
            }
            if op["summary"].as_str().is_some_and(|s| s.contains('\n')) {
                missing.push(format!("{name}: the summary is more than one line"));
            }
            for param in op["parameters"].as_array().into_iter().flatten() {
                if param["description"].as_str().is_none_or(|s| s.is_empty()) {
                    missing.push(format!(
                        "{name}: parameter {} has no description",
                        param["name"]
                    ));
                }
            }
            for (status, resp) in op["responses"].as_object().into_iter().flatten() {
                if resp["description"].as_str().is_none_or(|s| s.is_empty()) {
                    missing.push(format!("{name}: response {status} has no description"));
                }
            }
        }
    }
    assert!(operations >= 40, "only {operations} operations");
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}

/// Every call documents its error answers, and every JSON body of the
/// reference carries an example whose fields are the schema's own.
#[test]
fn every_operation_documents_its_errors_with_examples_that_fit_the_schemas() {
    let doc = stacyvm_control_plane::http::openapi::document();
    let schemas = doc["components"]["schemas"]
        .as_object()
        .expect("schemas is an object");
    let mut problems = Vec::new();
    let mut checked = 0;
    let mut check = |name: &str, media: &serde_json::Value, problems: &mut Vec<String>| {
        let Some(schema_name) = media["schema"]["$ref"]
            .as_str()
            .and_then(|r| r.strip_prefix("#/components/schemas/"))
        else {
            return;
        };
        let Some(example) = media.get("example") else {
            problems.push(format!("{name}: no example of {schema_name}"));
            return;
        };
        checked += 1;
        let schema = &schemas[schema_name];
        let props = schema["properties"].as_object();
        for key in example.as_object().into_iter().flat_map(|o| o.keys()) {
            if props.is_none_or(|p| !p.contains_key(key)) {
                problems.push(format!(
                    "{name}: the example's {key:?} is not a field of {schema_name}"
                ));
            }
        }
        for req in schema["required"].as_array().into_iter().flatten() {
            let req = req.as_str().unwrap_or_default();
            if example.get(req).is_none() {
                problems.push(format!(
                    "{name}: the example lacks {schema_name}'s required {req:?}"
                ));
            }
        }
    };
    for (path, item) in doc["paths"].as_object().expect("paths is an object") {
        for (method, op) in item.as_object().expect("a path item is an object") {
            let name = format!("{} {path}", method.to_uppercase());
            let responses = op["responses"].as_object().expect("responses is an object");
            if !responses.contains_key("500") {
                problems.push(format!("{name}: no 500"));
            }
            if path.starts_with("/v1/") && !responses.contains_key("401") {
                problems.push(format!("{name}: no 401"));
            }
            if path.contains('{') && !responses.contains_key("404") {
                problems.push(format!("{name}: no 404"));
            }
            if let Some(media) = op.pointer("/requestBody/content/application~1json") {
                check(&format!("{name} request"), media, &mut problems);
            }
            for (status, resp) in responses {
                if let Some(media) = resp.pointer("/content/application~1json") {
                    check(&format!("{name} {status}"), media, &mut problems);
                }
            }
        }
    }
    assert!(checked >= 100, "only {checked} examples checked");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
