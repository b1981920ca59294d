//! The client: configuration, authentication, error decoding and the
//! bounded retries of idempotent calls.

use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION, RETRY_AFTER};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::error::{ApiError, Error, Result};

/// Where the client talks to when nothing says otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";

/// Read size of streamed uploads: large enough to keep the transfer
/// efficient, small enough that memory use stays flat.
pub(crate) const UPLOAD_CHUNK: usize = 64 * 1024;

/// How transient failures of idempotent calls are retried.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 disables retries.
    pub max_attempts: u32,
    /// The first backoff; it doubles on every attempt.
    pub base_delay: Duration,
    /// No wait is longer than this, not even one a `Retry-After` asks for.
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            base_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// No retries at all.
    pub fn none() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The wait before attempt `attempt + 1` (attempt counts from 1).
    pub(crate) fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(ra) = retry_after {
            return ra.min(self.max_delay);
        }
        let exp = self
            .base_delay
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let capped = exp.min(self.max_delay);
        // Up to 25% jitter, so many clients refused together do not come back together.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let jitter = capped.mul_f64(f64::from(nanos % 1000) / 4000.0);
        (capped + jitter).min(self.max_delay)
    }
}

/// Builds a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientBuilder {
    url: String,
    api_key: Option<String>,
    connect_timeout: Duration,
    timeout: Duration,
    retry: RetryPolicy,
    user_agent: String,
    root_pems: Vec<Vec<u8>>,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            url: DEFAULT_URL.to_owned(),
            api_key: None,
            connect_timeout: Duration::from_secs(10),
            timeout: Duration::from_secs(300),
            retry: RetryPolicy::default(),
            user_agent: format!("stacyvm-sdk-rust/{}", env!("CARGO_PKG_VERSION")),
            root_pems: Vec::new(),
        }
    }
}

impl ClientBuilder {
    /// The server's base URL, e.g. `http://127.0.0.1:7070`.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = url.into();
        self
    }

    /// The API key sent as `Authorization: Bearer …`.
    pub fn api_key(mut self, key: impl Into<String>) -> Self {
        self.api_key = Some(key.into());
        self
    }

    /// How long to wait for a connection.
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.connect_timeout = t;
        self
    }

    /// The longest a plain call may take. Streams (exec output, file
    /// transfers, image imports, log follows) are not bounded by it; a
    /// non-streamed exec gets its own command timeout on top.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// How idempotent calls are retried.
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    pub fn user_agent(mut self, ua: impl Into<String>) -> Self {
        self.user_agent = ua.into();
        self
    }

    /// Also trusts the CA certificates in `pem` for `https://` servers'
    /// terminals (`wss://`), besides the system's (or `SSL_CERT_FILE`'s).
    pub fn add_root_certificate_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_pems.push(pem.into());
        self
    }

    pub fn build(self) -> Result<Client> {
        let mut base = Url::parse(self.url.trim()).map_err(|e| {
            Error::Config(format!("the server URL {:?} is not a URL: {e}", self.url))
        })?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(Error::Config(format!(
                "the server URL {:?} must start with http:// or https://",
                self.url
            )));
        }
        if !base.path().ends_with('/') {
            let p = format!("{}/", base.path());
            base.set_path(&p);
        }
        let mut headers = HeaderMap::new();
        if let Some(key) = self
            .api_key
            .as_deref()
            .map(str::trim)
            .filter(|k| !k.is_empty())
        {
            let mut v = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                Error::Config("the API key holds characters a header cannot carry".into())
            })?;
            v.set_sensitive(true);
            headers.insert(AUTHORIZATION, v);
        }
        let api_key = headers.get(AUTHORIZATION).cloned();
        let http = reqwest::Client::builder()
            .default_headers(headers)
            .connect_timeout(self.connect_timeout)
            .user_agent(self.user_agent.clone())
            .build()
            .map_err(|e| Error::Config(format!("cannot build the HTTP client: {e}")))?;
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                base,
                timeout: self.timeout,
                retry: self.retry,
                ws: crate::pty::WsConfig {
                    authorization: api_key,
                    user_agent: self.user_agent,
                    connect_timeout: self.connect_timeout,
                    root_pems: self.root_pems,
                },
            }),
        })
    }
}

struct Inner {
    http: reqwest::Client,
    base: Url,
    timeout: Duration,
    retry: RetryPolicy,
    ws: crate::pty::WsConfig,
}

/// A StacyVM API client. Cheap to clone; clones share one connection pool.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("url", &self.inner.base.as_str())
            .finish_non_exhaustive()
    }
}

/// Whether a call may be sent again after a transient failure.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Retry {
    Idempotent,
    Once,
}

/// How long a call may take.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Deadline {
    /// The client's plain-call timeout.
    Default,
    /// The client's timeout plus this much (a non-streamed exec).
    Extra(Duration),
    /// No total deadline: the body is a stream.
    Streaming,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
    #[serde(default)]
    request_id: Option<String>,
}

impl Client {
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// A client for `url` with `api_key`, defaults otherwise.
    pub fn new(url: impl Into<String>, api_key: impl Into<String>) -> Result<Client> {
        Client::builder().url(url).api_key(api_key).build()
    }

    /// A client from `STACYVM_URL` (default `http://127.0.0.1:7070`) and
    /// `STACYVM_API_KEY`.
    pub fn from_env() -> Result<Client> {
        Client::builder_from_env().build()
    }

    /// A builder preset from `STACYVM_URL` and `STACYVM_API_KEY`, to adjust further.
    pub fn builder_from_env() -> ClientBuilder {
        let mut b = Client::builder();
        if let Some(url) = std::env::var("STACYVM_URL")
            .ok()
            .filter(|u| !u.trim().is_empty())
        {
            b = b.url(url);
        }
        if let Some(key) = std::env::var("STACYVM_API_KEY")
            .ok()
            .filter(|k| !k.trim().is_empty())
        {
            b = b.api_key(key);
        }
        b
    }

    /// The server's base URL.
    pub fn base_url(&self) -> &Url {
        &self.inner.base
    }

    pub(crate) fn ws_config(&self) -> &crate::pty::WsConfig {
        &self.inner.ws
    }

    /// The URL of `segments` (each percent-encoded as one path segment)
    /// under the base URL, with `query` pairs.
    pub(crate) fn url(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Url> {
        let mut url = self.inner.base.clone();
        {
            let mut path = url.path_segments_mut().map_err(|_| {
                Error::Config(format!(
                    "the server URL {} cannot take a path",
                    self.inner.base
                ))
            })?;
            path.pop_if_empty();
            path.extend(segments);
        }
        if !query.is_empty() {
            let mut q = url.query_pairs_mut();
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        Ok(url)
    }

    pub(crate) fn request(&self, method: Method, url: Url, deadline: Deadline) -> RequestBuilder {
        let rb = self.inner.http.request(method, url);
        match deadline {
            Deadline::Default => rb.timeout(self.inner.timeout),
            Deadline::Extra(d) => rb.timeout(self.inner.timeout + d),
            Deadline::Streaming => rb,
        }
    }

    /// Sends the request `build` makes, retrying when `retry` allows and
    /// the failure is transient (429 `rate_limited`, 503, a connection that
    /// could not be made or timed out), with backoff and `Retry-After`
    /// honoured. Success is any 2xx; anything else becomes [`Error::Api`].
    pub(crate) async fn send<F>(&self, retry: Retry, build: F) -> Result<Response>
    where
        F: Fn() -> Result<RequestBuilder>,
    {
        let policy = &self.inner.retry;
        let max = if retry == Retry::Idempotent {
            policy.max_attempts.max(1)
        } else {
            1
        };
        let mut attempt = 1;
        loop {
            let rb = build()?;
            let err = match rb.send().await {
                Ok(resp) if resp.status().is_success() => return Ok(resp),
                Ok(resp) => api_error(resp).await,
                Err(e) => self.transport(e),
            };
            if attempt >= max || !transient(&err) {
                return Err(err);
            }
            let retry_after = err.as_api().and_then(|a| a.retry_after);
            tokio::time::sleep(policy.delay(attempt, retry_after)).await;
            attempt += 1;
        }
    }

    /// Sends and decodes a JSON answer.
    pub(crate) async fn send_json<T, F>(&self, retry: Retry, build: F) -> Result<T>
    where
        T: DeserializeOwned,
        F: Fn() -> Result<RequestBuilder>,
    {
        let resp = self.send(retry, build).await?;
        decode(resp).await
    }

    /// Streams `reader` as the body of one request and decodes the JSON
    /// answer. Sent once, never retried: a reader cannot be replayed.
    pub(crate) async fn send_reader_json<T, R>(
        &self,
        method: Method,
        url: Url,
        content_type: &'static str,
        reader: R,
    ) -> Result<T>
    where
        T: DeserializeOwned,
        R: tokio::io::AsyncRead + Send + 'static,
    {
        let body = std::sync::Mutex::new(Some(reqwest::Body::wrap_stream(
            tokio_util::io::ReaderStream::with_capacity(reader, UPLOAD_CHUNK),
        )));
        self.send_json(Retry::Once, || {
            let b = body
                .lock()
                .ok()
                .and_then(|mut g| g.take())
                .ok_or_else(|| Error::Protocol("the upload body was already sent".into()))?;
            Ok(self
                .request(method.clone(), url.clone(), Deadline::Streaming)
                .header("Content-Type", content_type)
                .body(b))
        })
        .await
    }

    pub(crate) fn transport(&self, e: reqwest::Error) -> Error {
        let mut url = self.inner.base.clone();
        url.set_query(None);
        Error::Transport {
            url: url.as_str().trim_end_matches('/').to_owned(),
            source: e,
        }
    }
}

fn transient(e: &Error) -> bool {
    match e {
        Error::Api(a) => a.status == 503 || (a.status == 429 && a.code == "rate_limited"),
        Error::Transport { source, .. } => source.is_connect() || source.is_timeout(),
        _ => false,
    }
}

fn retry_after_of(resp: &Response) -> Option<Duration> {
    let v = resp.headers().get(RETRY_AFTER)?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// The server's error body as an [`ApiError`]; a body that is not the
/// documented shape still yields the status and some text.
pub(crate) async fn api_error(resp: Response) -> Error {
    let status = resp.status();
    let retry_after = retry_after_of(&resp);
    let header_id = resp
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let text = resp.text().await.unwrap_or_default();
    error_from_parts(status, retry_after, header_id, &text)
}

/// An [`Error::Api`] from a refused answer's status, headers and body.
pub(crate) fn error_from_parts(
    status: StatusCode,
    retry_after: Option<Duration>,
    header_id: Option<String>,
    text: &str,
) -> Error {
    match serde_json::from_str::<ErrorEnvelope>(text) {
        Ok(env) => Error::Api(ApiError {
            status: status.as_u16(),
            code: env.error.code,
            message: env.error.message,
            request_id: env.error.request_id.filter(|r| !r.is_empty()).or(header_id),
            retry_after,
        }),
        Err(_) => Error::Api(ApiError {
            status: status.as_u16(),
            code: fallback_code(status).to_owned(),
            message: if text.trim().is_empty() {
                format!("the server answered {status}")
            } else {
                format!(
                    "the server answered {status}: {}",
                    text.trim().chars().take(300).collect::<String>()
                )
            },
            request_id: header_id,
            retry_after,
        }),
    }
}

fn fallback_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_request",
        401 => "unauthenticated",
        403 => "forbidden",
        404 => "not_found",
        409 => "conflict",
        413 => "payload_too_large",
        429 => "rate_limited",
        503 => "provider_unavailable",
        504 => "timeout",
        _ => "internal",
    }
}

pub(crate) async fn decode<T: DeserializeOwned>(resp: Response) -> Result<T> {
    let url = resp.url().path().to_owned();
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| Error::Protocol(format!("reading the answer of {url}: {e}")))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| Error::Protocol(format!("decoding the answer of {url}: {e}")))
}

pub(crate) fn request_id_of(resp: &Response) -> Option<String> {
    resp.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            max_attempts: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(1),
        };
        let d1 = p.delay(1, None);
        let d3 = p.delay(3, None);
        assert!(
            d1 >= Duration::from_millis(100) && d1 <= Duration::from_millis(125),
            "{d1:?}"
        );
        assert!(
            d3 >= Duration::from_millis(400) && d3 <= Duration::from_millis(500),
            "{d3:?}"
        );
        assert_eq!(p.delay(30, None), Duration::from_secs(1));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(60))),
            Duration::from_secs(1)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_millis(300))),
            Duration::from_millis(300)
        );
    }

    #[test]
    fn builder_rejects_bad_urls_and_keeps_base_paths() {
        assert!(matches!(
            Client::builder().url("not a url").build(),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            Client::builder().url("ftp://x").build(),
            Err(Error::Config(_))
        ));
        let c = Client::builder()
            .url("http://h:1/prefix")
            .build()
            .expect("valid url");
        let u = c
            .url(&["v1", "sandboxes", "../x"], &[("path", "/a b&c".into())])
            .expect("joins");
        assert_eq!(
            u.as_str(),
            "http://h:1/prefix/v1/sandboxes/..%2Fx?path=%2Fa+b%26c"
        );
    }
}
