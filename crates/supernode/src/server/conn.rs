//! Connections: the accept loop, the limits on each connection, and shutdown, under the router.
//!
//! axum's own `serve` has no header, body or idle timeout and no connection cap, and its graceful
//! shutdown waits for every connection however long a client holds it. So each connection is
//! served here by hyper's HTTP/1 server directly:
//! - **Header timeout** (`--header-timeout`): a request's head must be complete this long after
//!   the connection became ready for it (hyper's header read timeout; it also runs while a
//!   kept-alive connection waits for its next request). A connection cut off with part of
//!   a head received is answered 408 in OpenAI's shape first; an idle one is closed silently.
//! - **Keep-alive timeout** (`--keep-alive-timeout`): a connection with no request on it (no
//!   head begun or arrived) that has moved no byte for this long is closed.
//! - **Connection cap** (`--max-connections`): at the cap, the connection that has been quiet
//!   longest among those serving no request is closed to admit the new one; when every
//!   connection is serving a request, new ones wait in the listen backlog.
//! - **Body**: the router's body layer (`super::read_body`) reads each body whole, under a size
//!   and a time limit; a request counts as being served ([`Busy`]) from then until its response
//!   body is dropped.
//! - **Shutdown**: when `stop` fires, accepting stops and every connection that serves no request
//!   (idle, half-sent head or body) is closed at once; the others get hyper's graceful shutdown
//!   (no further request on them). Shortly before `deadline` (half a second, or a quarter of it
//!   if shorter) the engine's requests are cancelled, so their streams can end; at `deadline`
//!   what is still open is closed. The process exits within the shutdown timeout whatever
//!   clients do.
//! - **Malformed requests**: hyper answers a bad request line or oversized headers itself, with
//!   an empty 400/414/431. [`Tracked`] rewrites those answers into OpenAI error JSON (every
//!   answer of the router's own has a body, so an empty error answer is always hyper's).

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Request, Response};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tower::ServiceExt;

/// The most bytes a request head may take (a larger one is a 431). hyper's default of 408 KiB
/// is not a firm bound: one read can grow its buffer past it, so a 500 KB head sometimes parsed.
/// 64 KiB (twice nginx's 32 KiB) leaves a read no such room.
const MAX_HEAD_BYTES: usize = 64 << 10;

/// The limits of [`serve`].
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub keep_alive_timeout: Duration,
}

/// What the server and each connection's task share about one connection.
#[derive(Debug)]
pub struct ConnState {
    /// Requests on it whose head has arrived and whose response body is not yet dropped.
    requests: AtomicUsize,
    /// Those of them being served: body received, response body not yet dropped.
    busy: AtomicUsize,
    /// When a byte last moved either way, in milliseconds since `epoch`.
    last_io_ms: AtomicU64,
    /// Bytes of a request head arrived that hyper has not yet turned into a request.
    head_started: AtomicBool,
    epoch: Instant,
    /// Closes the connection at once.
    kill: Notify,
}

impl ConnState {
    fn new(epoch: Instant) -> ConnState {
        let s = ConnState {
            requests: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            last_io_ms: AtomicU64::new(0),
            head_started: AtomicBool::new(false),
            epoch,
            kill: Notify::new(),
        };
        s.touch();
        s
    }

    fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_io_ms.store(ms, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_io_ms.load(Ordering::Relaxed)))
    }

    fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Relaxed) > 0
    }

    fn has_requests(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0
    }
}

/// One count of a connection's [`ConnState::requests`] or [`ConnState::busy`], given back when
/// dropped (with the response body that holds it).
pub struct Busy {
    st: Arc<ConnState>,
    count: fn(&ConnState) -> &AtomicUsize,
}

impl Busy {
    fn new(st: Arc<ConnState>, count: fn(&ConnState) -> &AtomicUsize) -> Busy {
        count(&st).fetch_add(1, Ordering::Relaxed);
        Busy { st, count }
    }

    /// Marks the connection of `req` (if it came through [`serve`]) as serving a request.
    pub fn start<B>(req: &Request<B>) -> Option<Busy> {
        let st = req.extensions().get::<Arc<ConnState>>()?.clone();
        Some(Busy::new(st, |s| &s.busy))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        (self.count)(&self.st).fetch_sub(1, Ordering::Relaxed);
        self.st.touch();
    }
}

type Registry = Arc<Mutex<HashMap<u64, Arc<ConnState>>>>;

/// Serves `app` on `listener` until `stop` fires; then returns when every connection is closed,
/// at the latest `deadline` after `stop` fired, having called `cancel` shortly before then if
/// connections were still open.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    stop: impl Future<Output = ()>,
    deadline: Duration,
    cancel: impl FnOnce(),
) {
    let epoch = Instant::now();
    let registry: Registry = Arc::default();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut next_id = 0u64;
    tokio::pin!(stop);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut stop => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                // Out of file descriptors and the like: wait instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let permit = tokio::select! {
            _ = &mut stop => break,
            p = admit(&slots, &registry) => p,
        };
        let _ = stream.set_nodelay(true);
        let st = Arc::new(ConnState::new(epoch));
        next_id += 1;
        let id = next_id;
        lock(&registry).insert(id, st.clone());
        let (app, registry, shutdown) = (app.clone(), registry.clone(), shutdown_rx.clone());
        tasks.spawn(async move {
            connection(stream, app, st, limits, shutdown).await;
            lock(&registry).remove(&id);
            drop(permit);
        });
        // Reap finished tasks so the set does not grow with every connection ever made.
        while tasks.try_join_next().is_some() {}
    }

    // Shutdown: no new connections; idle and half-open ones go now, the rest gracefully.
    drop(listener);
    let _ = shutdown_tx.send(true);
    for st in lock(&registry).values() {
        if !st.is_busy() {
            st.kill.notify_one();
        }
    }
    let grace = (deadline / 4).min(Duration::from_millis(500));
    let all_done = async { while tasks.join_next().await.is_some() {} };
    tokio::pin!(all_done);
    if tokio::time::timeout(deadline - grace, &mut all_done)
        .await
        .is_err()
    {
        cancel();
        let _ = tokio::time::timeout(grace, &mut all_done).await;
    }
}

fn lock(r: &Registry) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ConnState>>> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// A connection slot: at the cap, closes the quietest connection that serves no request and
/// waits for its slot.
async fn admit(slots: &Arc<Semaphore>, registry: &Registry) -> tokio::sync::OwnedSemaphorePermit {
    loop {
        if let Ok(p) = slots.clone().try_acquire_owned() {
            return p;
        }
        let victim = lock(registry)
            .values()
            .filter(|s| !s.is_busy())
            .max_by_key(|s| s.quiet_for())
            .cloned();
        match victim {
            Some(v) => {
                v.kill.notify_one();
                // Its task ends within a poll; then its permit is back.
                if let Ok(Ok(p)) =
                    tokio::time::timeout(Duration::from_millis(100), slots.clone().acquire_owned())
                        .await
                {
                    return p;
                }
            }
            None => {
                // Every connection is serving a request: wait for one to end, but look again
                // now and then in case one falls idle.
                if let Ok(Ok(p)) =
                    tokio::time::timeout(Duration::from_millis(200), slots.clone().acquire_owned())
                        .await
                {
                    return p;
                }
            }
        }
    }
}

async fn connection(
    stream: TcpStream,
    app: Router,
    st: Arc<ConnState>,
    limits: Limits,
    mut shutdown: watch::Receiver<bool>,
) {
    // A second handle on the socket, to answer a head that timed out: hyper then drops the
    // connection without a word, and a client should learn why (408, as for a slow body).
    let (stream, answer) = match split_handle(stream) {
        Ok(pair) => pair,
        Err(_) => return,
    };
    let io = TokioIo::new(Tracked::new(stream, st.clone()));
    let conn_state = st.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        conn_state.head_started.store(false, Ordering::Relaxed);
        let request = Busy::new(conn_state.clone(), |s| &s.requests);
        req.extensions_mut().insert(conn_state.clone());
        let resp = app.clone().oneshot(req.map(Body::new));
        async move { resp.await.map(|r| hold_until_sent(r, Some(request))) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    let conn = builder.serve_connection(io, svc);
    tokio::pin!(conn);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                let timed_out = r.as_ref().is_err_and(|e| e.is_timeout());
                if timed_out && st.head_started.load(Ordering::Relaxed) {
                    let message = format!(
                        "the request's headers did not arrive within {} s (--header-timeout)",
                        limits.header_timeout.as_secs_f64()
                    );
                    // Best effort: the socket's send buffer is empty while a head is being
                    // read, so this small answer goes out without waiting.
                    let _ = (&answer).write_all(&closing_answer(408, "invalid_request_error", &message));
                }
                break;
            }
            _ = st.kill.notified() => break,
            r = shutdown.changed(), if !closing => {
                if r.is_err() || *shutdown.borrow() {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
            _ = tick.tick(), if !closing => {
                // A started head is the header timeout's to end (with its 408), not this.
                let idle = !st.has_requests() && !st.head_started.load(Ordering::Relaxed);
                if idle && st.quiet_for() >= limits.keep_alive_timeout {
                    break;
                }
            }
        }
    }
}

/// The stream, and a second (non-blocking) handle on the same socket.
fn split_handle(stream: TcpStream) -> io::Result<(TcpStream, std::net::TcpStream)> {
    let std_stream = stream.into_std()?;
    let answer = std_stream.try_clone()?;
    Ok((TcpStream::from_std(std_stream)?, answer))
}

/// The connection's socket: notes when bytes move, and turns hyper's own empty error answers
/// into OpenAI error JSON.
struct Tracked {
    inner: TcpStream,
    st: Arc<ConnState>,
    /// A rewritten answer being written, and how many of hyper's bytes it stands for.
    pending: Option<(Vec<u8>, usize, usize)>,
}

impl Tracked {
    fn new(inner: TcpStream, st: Arc<ConnState>) -> Tracked {
        Tracked {
            inner,
            st,
            pending: None,
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.st.touch();
            if !self.st.has_requests() {
                self.st.head_started.store(true, Ordering::Relaxed);
            }
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.pending.is_none() {
            if let Some(json) = rewrite_bare_error(buf) {
                this.pending = Some((json, 0, buf.len()));
            }
        }
        if let Some((bytes, off, stands_for)) = &mut this.pending {
            while *off < bytes.len() {
                let n = ready!(Pin::new(&mut this.inner).poll_write(cx, &bytes[*off..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                *off += n;
                this.st.touch();
            }
            let n = *stands_for;
            this.pending = None;
            return Poll::Ready(Ok(n));
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.st.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// If `buf` is exactly an HTTP/1.1 error answer with no body (what hyper sends for a request
/// it cannot parse), the same answer with an OpenAI error body.
fn rewrite_bare_error(buf: &[u8]) -> Option<Vec<u8>> {
    let head = buf.strip_prefix(b"HTTP/1.1 ")?;
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    if end != buf.len() {
        return None;
    }
    let status: u16 = std::str::from_utf8(head.get(..3)?).ok()?.parse().ok()?;
    if !(400..600).contains(&status) {
        return None;
    }
    let head_text = std::str::from_utf8(&buf[..end]).ok()?.to_ascii_lowercase();
    if !head_text.contains("\r\ncontent-length: 0\r\n") {
        return None;
    }
    let (kind, message) = match status {
        400 => ("invalid_request_error", "the request is not valid HTTP/1.1"),
        414 => ("invalid_request_error", "the request URI is too long"),
        431 => (
            "invalid_request_error",
            "the request's headers are too large",
        ),
        s if s >= 500 => ("server_error", "the server could not handle the request"),
        _ => ("invalid_request_error", "the request was refused"),
    };
    Some(closing_answer(status, kind, message))
}

/// A whole HTTP/1.1 answer with an OpenAI error body that closes the connection.
fn closing_answer(status: u16, kind: &str, message: &str) -> Vec<u8> {
    let reason = axum::http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let body = serde_json::json!({ "error": {
        "message": message, "type": kind, "param": null, "code": null,
    }})
    .to_string();
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A response body that keeps its request counted until it is dropped.
pub fn hold_until_sent(resp: Response<Body>, busy: Option<Busy>) -> Response<Body> {
    match busy {
        None => resp,
        Some(b) => resp.map(|body| Body::new(Held { body, _busy: b })),
    }
}

struct Held {
    body: Body,
    _busy: Busy,
}

impl http_body::Body for Held {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_error_answers_become_json() {
        let hyper_431 =
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\ndate: x\r\n\r\n";
        let out = String::from_utf8(rewrite_bare_error(hyper_431).expect("rewritten")).unwrap();
        assert!(out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        let body: serde_json::Value =
            serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        // Answers with a body, successes, and partial writes are left alone.
        for buf in [
            &b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\n{}"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n",
            b"data: HTTP/1.1 400\r\n\r\n",
        ] {
            assert!(rewrite_bare_error(buf).is_none(), "{buf:?}");
        }
    }
}
