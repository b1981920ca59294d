//! The HTTP/1 server under the router: an accept loop with a cap on
//! connections, a deadline for request heads and for idle keep-alive
//! connections, and graceful shutdown (stop accepting, finish what is in
//! flight, close the idle).
//!
//! The deadlines apply only while a connection waits for a request: from
//! the moment a request's head is complete until its response is fully
//! written (a long exec, an SSE stream, an upload or a download) none
//! applies, so nothing in flight is ever cut by them.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode};
use axum::Router;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

/// The limits of [`serve`].
#[derive(Clone, Copy, Debug)]
pub struct ConnLimits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Serves `router` on `listener` until `stop` turns true, then stops
/// accepting and returns once every connection has finished its last
/// response.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnLimits,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    // At most what a semaphore holds and `acquire_many` can wait for.
    let max = limits
        .max_connections
        .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let slots = Arc::new(Semaphore::new(max));
    let (close_tx, close_rx) = watch::channel(false);
    loop {
        // A slot first: past the cap, new connections wait in the kernel's
        // listen backlog instead of costing memory and a descriptor here.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = stopped(&mut stop) => break,
        };
        let (tcp, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            // Streamed output would wait for Nagle; serving it anyway is better.
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let router = router.clone();
        let close = close_rx.clone();
        tokio::spawn(async move {
            connection(tcp, peer, router, limits, close).await;
            drop(slot);
        });
    }
    drop(listener);
    let _ = close_tx.send(true);
    // Every connection holds a slot until it is done.
    let _ = slots.acquire_many(max as u32).await;
    Ok(())
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            // The sender is gone: nobody can ask for a stop any more.
            std::future::pending::<()>().await;
        }
    }
}

/// A failed accept is about one connection (it reset before we took it) or
/// about the process (out of descriptors); the latter would spin, so wait.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %e, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: ConnLimits,
    mut close: watch::Receiver<bool>,
) {
    let shared = Arc::new(Shared::default());
    let io = TokioIo::new(Watched::new(tcp, shared.clone(), limits));
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let guard = InFlight::start(shared.clone());
        req.extensions_mut().insert(ConnectInfo(peer));
        let router = router.clone();
        async move {
            let resp = match router.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                // The connection becomes the upgraded protocol's, which
                // keeps its own time.
                guard.shared.upgraded.store(true, Ordering::Release);
            }
            Ok::<_, Infallible>(resp.map(|body| {
                Body::new(Tracked {
                    body,
                    _guard: guard,
                })
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stopped(&mut close) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// What the requests of a connection tell its I/O.
#[derive(Default)]
struct Shared {
    /// Requests whose response is not yet fully written.
    in_flight: AtomicUsize,
    /// Requests started so far.
    started: AtomicU64,
    upgraded: AtomicBool,
    /// The connection's task, woken when it goes idle so the idle deadline
    /// is armed even if the client is silent.
    waker: Mutex<Option<Waker>>,
}

/// One request in flight, from its complete head to the end of its
/// response body.
struct InFlight {
    shared: Arc<Shared>,
}

impl InFlight {
    fn start(shared: Arc<Shared>) -> InFlight {
        shared.started.fetch_add(1, Ordering::AcqRel);
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight { shared }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.shared.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            let waker = self
                .shared
                .waker
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            if let Some(w) = waker {
                w.wake();
            }
        }
    }
}

/// A response body that keeps its request counted as in flight until hyper
/// has written it all (or given up on it).
struct Tracked {
    body: Body,
    _guard: InFlight,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// What a connection with nothing in flight is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wait {
    /// Serving, or upgraded: no deadline.
    None,
    /// The rest of a request head.
    Head,
    /// A next request on a kept-alive connection.
    Idle,
}

/// The TCP stream with the connection's deadlines. hyper reads through it
/// whenever it waits for a request, so a deadline that passes there ends
/// the connection: a partial head with an error, an idle connection as if
/// the client had closed it.
struct Watched {
    tcp: TcpStream,
    shared: Arc<Shared>,
    limits: ConnLimits,
    wait: Wait,
    /// `Shared::started` when the current wait began.
    seen: u64,
    deadline: Pin<Box<Sleep>>,
}

impl Watched {
    fn new(tcp: TcpStream, shared: Arc<Shared>, limits: ConnLimits) -> Watched {
        // The first request's head is due from the connection's start.
        Watched {
            tcp,
            shared,
            limits,
            wait: Wait::Head,
            seen: 0,
            deadline: Box::pin(tokio::time::sleep(limits.header_timeout)),
        }
    }

    fn arm(&mut self, wait: Wait) {
        self.wait = wait;
        let after = match wait {
            Wait::Head => self.limits.header_timeout,
            Wait::Idle => self.limits.idle_timeout,
            Wait::None => return,
        };
        self.deadline.as_mut().reset(Instant::now() + after);
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.tcp).poll_read(cx, buf);
        if this.shared.upgraded.load(Ordering::Acquire) {
            return read;
        }
        if this.shared.in_flight.load(Ordering::Acquire) > 0 {
            this.wait = Wait::None;
            if read.is_pending() {
                let mut w = this.shared.waker.lock().unwrap_or_else(|p| p.into_inner());
                match w.as_ref() {
                    Some(old) if old.will_wake(cx.waker()) => {}
                    _ => *w = Some(cx.waker().clone()),
                }
            }
            return read;
        }
        let started = this.shared.started.load(Ordering::Acquire);
        if this.wait == Wait::None || started != this.seen {
            // A response went out since the last wait began: idle now.
            this.seen = started;
            this.arm(Wait::Idle);
        }
        match read {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                if this.wait == Wait::Idle {
                    // The next request has begun: its head is due.
                    this.arm(Wait::Head);
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(r) => return Poll::Ready(r),
            Poll::Pending => {}
        }
        if this.deadline.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        match this.wait {
            Wait::Head => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request head did not arrive in time",
            ))),
            // End of stream: hyper closes an idle connection quietly.
            Wait::Idle => Poll::Ready(Ok(())),
            Wait::None => Poll::Pending,
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn limits() -> ConnLimits {
        ConnLimits {
            header_timeout: Duration::from_millis(500),
            idle_timeout: Duration::from_millis(2500),
            max_connections: 3,
        }
    }

    async fn start(
        limits: ConnLimits,
    ) -> (
        SocketAddr,
        watch::Sender<bool>,
        tokio::task::JoinHandle<io::Result<()>>,
    ) {
        let router = Router::new()
            .route("/", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    // A response whose body trickles for longer than both deadlines.
                    let chunks = futures_util::stream::unfold(0u32, |i| async move {
                        if i == 6 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        Some((Ok::<_, Infallible>(Bytes::from_static(b"x")), i + 1))
                    });
                    Body::from_stream(chunks)
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, router, limits, rx));
        (addr, tx, task)
    }

    /// The `x` chunks of a `/slow` response.
    fn chunks(raw: &str) -> usize {
        raw.matches("\r\nx\r\n").count()
    }

    /// Reads until the server closes the connection; what it sent.
    async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        out
    }

    async fn get(s: &mut TcpStream, path: &str) -> String {
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut buf = vec![0u8; 4096];
        let mut got = Vec::new();
        // `/` answers a sized `ok`, `/slow` a chunked body.
        while !(got.ends_with(b"ok") || got.ends_with(b"\r\n0\r\n\r\n")) {
            let n = s.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed mid-response: {}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got).into_owned()
    }

    #[tokio::test]
    async fn a_stalled_head_is_dropped_and_a_slow_body_is_not() {
        let (addr, _stop, _task) = start(limits()).await;
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        stalled.write_all(b"GET / HTTP/1.1\r\nhost:").await.unwrap();
        let mut silent = TcpStream::connect(addr).await.unwrap();
        // Both are closed without an answer.
        assert!(until_closed(&mut stalled).await.is_empty());
        assert!(until_closed(&mut silent).await.is_empty());

        // A response that takes longer than both deadlines is not cut.
        let mut c = TcpStream::connect(addr).await.unwrap();
        let r = get(&mut c, "/slow").await;
        assert!(r.starts_with("HTTP/1.1 200") && chunks(&r) == 6, "{r}");
        // The connection then idles out, quietly.
        assert!(until_closed(&mut c).await.is_empty());
    }

    #[tokio::test]
    async fn a_kept_alive_connection_serves_again_within_the_idle_time() {
        let (addr, _stop, _task) = start(limits()).await;
        let mut c = TcpStream::connect(addr).await.unwrap();
        for _ in 0..3 {
            assert!(get(&mut c, "/").await.starts_with("HTTP/1.1 200"));
            // Longer than the head deadline, shorter than the idle one.
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
    }

    #[tokio::test]
    async fn connections_past_the_cap_wait_for_a_slot() {
        let mut l = limits();
        l.header_timeout = Duration::from_secs(30);
        l.idle_timeout = Duration::from_secs(30);
        let (addr, _stop, _task) = start(l).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            assert!(get(&mut c, "/").await.starts_with("HTTP/1.1 200"));
            held.push(c);
        }
        let waiting = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            get(&mut c, "/").await
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            !waiting.is_finished(),
            "a fourth connection was served past the cap of 3"
        );
        drop(held.pop());
        let r = waiting.await.unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }

    #[tokio::test]
    async fn shutdown_finishes_what_is_in_flight_and_closes_the_idle() {
        let mut l = limits();
        l.header_timeout = Duration::from_secs(30);
        l.idle_timeout = Duration::from_secs(30);
        let (addr, stop, task) = start(l).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        assert!(get(&mut idle, "/").await.starts_with("HTTP/1.1 200"));
        let mut busy = TcpStream::connect(addr).await.unwrap();
        busy.write_all(b"GET /slow HTTP/1.1\r\nhost: t\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        busy.read_exact(&mut first).await.unwrap();
        stop.send(true).unwrap();
        let rest = String::from_utf8_lossy(&until_closed(&mut busy).await).into_owned();
        assert!(chunks(&rest) == 6, "the in-flight response was cut: {rest}");
        assert!(until_closed(&mut idle).await.is_empty());
        task.await.unwrap().unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
    }
}
