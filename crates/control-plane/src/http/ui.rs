//! The browser-facing pages: the web console at `/ui` and the API reference
//! at `/docs`. Every file is built into the binary, nothing is fetched from
//! elsewhere at run time, and each page gets a Content-Security-Policy that
//! allows scripts, styles and calls from this origin only.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use stacyvm_core::Error;

use super::error::ApiError;

/// Scripts and styles from this origin only: no inline script, no `eval`,
/// no other host. `img-src data:` is for the icons inlined in stylesheets.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; font-src 'self'; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($name:literal, $type:expr, $path:literal) => {
        Asset {
            name: $name,
            content_type: $type,
            body: include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/", $path)),
        }
    };
}

const HTML: &str = "text/html; charset=utf-8";
const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";
const TEXT: &str = "text/plain; charset=utf-8";

/// The console's files, served under `/ui/`.
const UI: &[Asset] = &[
    asset!("index.html", HTML, "ui/index.html"),
    asset!("console.css", CSS, "ui/console.css"),
    asset!("app.js", JS, "ui/app.js"),
    asset!("api.js", JS, "ui/api.js"),
    asset!("dom.js", JS, "ui/dom.js"),
    asset!("sandboxes.js", JS, "ui/sandboxes.js"),
    asset!("sandbox.js", JS, "ui/sandbox.js"),
    asset!("admin.js", JS, "ui/admin.js"),
    asset!("volumes.js", JS, "ui/volumes.js"),
];

/// The reference's files, served under `/docs/`: Swagger UI (vendored from
/// npm by `scripts/vendor-swagger-ui.sh`, with its license) and the page
/// that starts it.
const DOCS: &[Asset] = &[
    asset!("index.html", HTML, "docs/index.html"),
    asset!("docs.js", JS, "docs/docs.js"),
    asset!("docs.css", CSS, "docs/docs.css"),
    asset!(
        "swagger-ui-bundle.js",
        JS,
        "docs/swagger-ui/swagger-ui-bundle.js"
    ),
    asset!("swagger-ui.css", CSS, "docs/swagger-ui/swagger-ui.css"),
    asset!("LICENSE", TEXT, "docs/swagger-ui/LICENSE"),
    asset!("NOTICE", TEXT, "docs/swagger-ui/NOTICE"),
    asset!(
        "swagger-ui-bundle.js.LICENSE.txt",
        TEXT,
        "docs/swagger-ui/swagger-ui-bundle.js.LICENSE.txt"
    ),
];

/// The routes of both pages. They need no key: the pages hold no data, and
/// every call they make carries the key the user types in.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { serve(UI, "index.html") }))
        .route(
            "/ui/{file}",
            get(|Path(file): Path<String>| async move { serve(UI, &file) }),
        )
        .route("/docs", get(|| async { serve(DOCS, "index.html") }))
        .route("/docs/", get(|| async { serve(DOCS, "index.html") }))
        .route(
            "/docs/{file}",
            get(|Path(file): Path<String>| async move { serve(DOCS, &file) }),
        )
}

fn serve(assets: &[Asset], name: &str) -> Response {
    let Some(a) = assets.iter().find(|a| a.name == name) else {
        return ApiError(Error::NotFound(format!("no such file {name:?}"))).into_response();
    };
    let mut resp = (StatusCode::OK, a.body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(a.content_type),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Revalidated on every load, so a new binary's pages are never mixed
    // with an old one's cached scripts.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file added to `assets/ui/` or `assets/docs/` but not to the tables
    /// above would be a 404 in the browser.
    #[test]
    fn every_asset_file_is_served() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets");
        let mut unserved = Vec::new();
        for (dir, table) in [("ui", UI), ("docs", DOCS), ("docs/swagger-ui", DOCS)] {
            for entry in std::fs::read_dir(root.join(dir)).expect("reading an assets directory") {
                let entry = entry.expect("a directory entry");
                if entry.file_type().expect("a file type").is_dir() {
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if !table.iter().any(|a| a.name == name) {
                    unserved.push(format!("{dir}/{name}"));
                }
            }
        }
        assert!(unserved.is_empty(), "not served: {unserved:?}");
    }

    #[test]
    fn pages_carry_their_type_and_the_policy() {
        let r = serve(UI, "app.js");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], JS);
        assert_eq!(
            r.headers()[header::CONTENT_SECURITY_POLICY],
            CONTENT_SECURITY_POLICY
        );
        assert_eq!(serve(DOCS, "../ui/app.js").status(), StatusCode::NOT_FOUND);
    }
}
