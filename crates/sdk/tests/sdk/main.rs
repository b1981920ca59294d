//! The SDK's retry rules, against a scripted HTTP peer that answers with
//! the statuses a real server gives under load (503, 429 with
//! `Retry-After`), which a live server cannot be made to give on cue.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stacyvm_sdk::{Client, CreateSandbox, Error, RetryPolicy};

/// One recorded request: method, path and the Idempotency-Key header.
type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// Serves `script` (status, extra headers, body) in order, one per
/// connection, then 500s; returns the base URL and what it saw.
fn peer(script: Vec<(u16, &'static str, &'static str)>) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding a local port");
    let url = format!("http://{}", listener.local_addr().expect("a bound address"));
    let seen: Seen = Arc::default();
    let log = seen.clone();
    std::thread::spawn(move || {
        let mut script = script.into_iter();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().expect("cloning a socket"));
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let mut len = 0usize;
            let mut idem = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if lower.starts_with("idempotency-key:") {
                    idem = line.split_once(':').map(|(_, v)| v.trim().to_owned());
                }
            }
            let mut body = vec![0u8; len];
            let _ = reader.read_exact(&mut body);
            let mut parts = request_line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_owned();
            let path = parts.next().unwrap_or_default().to_owned();
            log.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((method, path, idem));
            let (status, headers, body) = script.next().unwrap_or((500, "", "{}"));
            let resp = format!(
                "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: req_peer\r\nconnection: close\r\n{headers}\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(resp.as_bytes());
        }
    });
    (url, seen)
}

fn client(url: &str, attempts: u32) -> Client {
    Client::builder()
        .url(url)
        .api_key("svm_peer_key_for_retry_tests")
        .retry(RetryPolicy {
            max_attempts: attempts,
            base_delay: Duration::from_millis(1),
            max_delay: Duration::from_secs(2),
        })
        .build()
        .expect("a valid client")
}

const UNAVAILABLE: &str =
    r#"{"error":{"code":"no_capacity","message":"no worker can take it","request_id":"req_1"}}"#;
const LIMITED: &str =
    r#"{"error":{"code":"rate_limited","message":"slow down","request_id":"req_2"}}"#;
const QUOTA: &str =
    r#"{"error":{"code":"quota_exceeded","message":"max_sandboxes is 0","request_id":"req_3"}}"#;
const HEALTH: &str = r#"{"status":"ok"}"#;

#[tokio::test]
async fn idempotent_calls_retry_on_503_and_429_honouring_retry_after() {
    let (url, seen) = peer(vec![
        (503, "retry-after: 0\r\n", UNAVAILABLE),
        (429, "retry-after: 0\r\n", LIMITED),
        (200, "", HEALTH),
    ]);
    let health = client(&url, 4)
        .healthz()
        .await
        .expect("the third attempt succeeds");
    assert_eq!(health.status, "ok");
    assert_eq!(seen.lock().expect("log").len(), 3);

    let (url, seen) = peer(vec![(503, "", UNAVAILABLE), (204, "", "")]);
    client(&url, 4)
        .sandbox_destroy("sbx_1")
        .await
        .expect("DELETE is retried");
    let seen = seen.lock().expect("log");
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|(m, p, _)| m == "DELETE" && p == "/v1/sandboxes/sbx_1"));
}

#[tokio::test]
async fn retries_are_bounded_and_end_with_the_typed_error() {
    let (url, seen) = peer(vec![(503, "", UNAVAILABLE); 10]);
    let err = client(&url, 3)
        .status()
        .await
        .expect_err("always unavailable");
    assert_eq!(seen.lock().expect("log").len(), 3);
    assert_eq!(
        (err.status(), err.code(), err.request_id()),
        (Some(503), Some("no_capacity"), Some("req_1"))
    );
    assert_eq!(err.message(), "no worker can take it");
}

#[tokio::test]
async fn non_idempotent_calls_and_quota_refusals_are_sent_once() {
    let (url, seen) = peer(vec![(503, "", UNAVAILABLE), (201, "", "{}")]);
    let err = client(&url, 4)
        .tenant_create("t")
        .await
        .expect_err("a POST is not retried");
    assert_eq!(err.code(), Some("no_capacity"));
    assert_eq!(seen.lock().expect("log").len(), 1);

    let (url, seen) = peer(vec![(503, "", UNAVAILABLE), (503, "", UNAVAILABLE)]);
    let err = client(&url, 4)
        .sandbox_create(&CreateSandbox::image("busybox"))
        .await
        .expect_err("sent once");
    assert_eq!(err.status(), Some(503));
    assert_eq!(
        seen.lock().expect("log").len(),
        1,
        "a create without an idempotency key is not retried"
    );

    let (url, seen) = peer(vec![(429, "retry-after: 0\r\n", QUOTA), (200, "", HEALTH)]);
    let err = client(&url, 4)
        .healthz()
        .await
        .expect_err("quota_exceeded is not transient");
    assert_eq!(err.code(), Some("quota_exceeded"));
    assert_eq!(seen.lock().expect("log").len(), 1);
}

#[tokio::test]
async fn a_create_with_an_idempotency_key_is_retried_with_the_same_key() {
    let (url, seen) = peer(vec![
        (503, "retry-after: 0\r\n", UNAVAILABLE),
        (503, "", UNAVAILABLE),
    ]);
    let spec = CreateSandbox {
        idempotency_key: Some("k-123".into()),
        ..CreateSandbox::image("busybox")
    };
    let err = client(&url, 2)
        .sandbox_create(&spec)
        .await
        .expect_err("both attempts refused");
    assert_eq!(err.code(), Some("no_capacity"));
    let seen = seen.lock().expect("log");
    assert_eq!(seen.len(), 2);
    assert!(seen
        .iter()
        .all(|(m, _, k)| m == "POST" && k.as_deref() == Some("k-123")));
}

#[tokio::test]
async fn an_error_body_that_is_not_the_documented_shape_still_gives_status_and_code() {
    let (url, _seen) = peer(vec![(404, "", "<html>nope</html>")]);
    match client(&url, 1).sandbox_get("sbx_1").await {
        Err(Error::Api(e)) => {
            assert_eq!(
                (e.status, e.code.as_str(), e.request_id.as_deref()),
                (404, "not_found", Some("req_peer"))
            );
            assert!(e.message.contains("nope"), "{}", e.message);
        }
        other => panic!("expected an API error, got {other:?}"),
    }
}
