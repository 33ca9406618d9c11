//! The HTTPS edge: accept loop, TLS handshake, HTTP/1.1 and HTTP/2 (hyper-util auto), body
//! limits, routing, and turning every outcome into a response and a log row. The only module
//! that knows hyper.

pub mod admin;
pub mod client_ip;
pub mod conn_timer;
pub mod drain;
pub mod error;
pub mod handlers;
pub mod proxy_protocol;
pub mod rate;
pub mod response_cache;
pub mod sign_pool;

use crate::request::{self, Params, Request, Route};
use crate::state::State;
use crate::store::writer::WriterSender;
use crate::store::Store;
use bytes::Bytes;
use client_ip::TrustedProxies;
use error::{ApiError, Failure};
use handlers::LogCtx;
use http::{header, Method as HttpMethod, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::borrow::Cow;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Limits that protect the edge from slow or oversized clients.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub body_read_timeout: Duration,
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub max_connections: usize,
    pub drain_timeout: Duration,
}

/// Shared request context.
pub struct Ctx {
    pub state: Arc<State>,
    pub writer: WriterSender,
    /// Distributed mode: activation changes are committed in Redis (`dist`).
    pub dist: Option<Arc<crate::dist::Dist>>,
    /// Used only by CreateTrialKey, which creates a key in the main store.
    pub control_store: Arc<parking_lot::Mutex<Store>>,
    /// GetWebAPILog's connection, apart from CreateTrialKey's so neither waits on the other.
    pub log_store: Arc<parking_lot::Mutex<Store>>,
    pub trial_lock: tokio::sync::Mutex<()>,
    pub limits: Limits,
    /// The edge node's own address recorded as "proxy IP"; the local socket address if unset.
    pub proxy_ip: Option<String>,
    /// Peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
    pub rate_limits: rate::RateLimits,
    pub sign_pool: sign_pool::SignPool,
    /// Interned node addresses (`proxy_ip` of recorded machines); see `Ctx::node_address`.
    pub node_addresses: parking_lot::Mutex<std::collections::HashMap<String, Arc<str>>>,
    pub responses: response_cache::ResponseCache,
    pub request_metrics: crate::metrics::RequestMetrics,
    /// Bits of a client IPv4 / IPv6 address the request log keeps.
    pub log_ip_prefixes: (u8, u8),
}

impl Ctx {
    pub fn now(&self) -> i64 {
        unix_now()
    }

    /// The client IP as the request log keeps it (`privacy.log_ipv4_prefix` / `_ipv6_prefix`).
    fn log_ip(&self, ip: std::net::IpAddr) -> String {
        let (v4, v6) = self.log_ip_prefixes;
        crate::privacy::anonymize_ip(ip, v4, v6).to_string()
    }

    /// The one shared copy of a node address, so the machines it records do not each carry
    /// their own (per connection, not per request).
    fn node_address(&self, addr: String) -> Arc<str> {
        self.node_addresses
            .lock()
            .entry(addr)
            .or_insert_with_key(|a| a.as_str().into())
            .clone()
    }
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Milliseconds since the epoch (propagation times between processes).
pub fn unix_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The addresses of one connection.
struct Conn {
    peer: std::net::IpAddr,
    /// The peer is a trusted proxy: each request's `X-Forwarded-For` names its client.
    behind_proxy: bool,
    proxy_ip: Arc<str>,
    /// The peer's address as text, and as the request log keeps it: the same for every
    /// request not forwarded by a proxy, so formatted once.
    peer_text: String,
    peer_log_text: Arc<str>,
}

impl Conn {
    fn new(ctx: &Ctx, peer: std::net::IpAddr, proxy_ip: Arc<str>) -> Conn {
        Conn {
            peer,
            behind_proxy: ctx.trusted_proxies.contains(peer),
            proxy_ip,
            peer_text: peer.to_string(),
            peer_log_text: ctx.log_ip(peer).into(),
        }
    }

    /// `ip` as text, and as the request log keeps it (shared with the log row, not copied).
    fn texts(&self, ctx: &Ctx, ip: std::net::IpAddr) -> (Cow<'_, str>, Arc<str>) {
        if ip == self.peer {
            (self.peer_text.as_str().into(), self.peer_log_text.clone())
        } else {
            (ip.to_string().into(), ctx.log_ip(ip).into())
        }
    }

    fn client_ip(&self, ctx: &Ctx, headers: &http::HeaderMap) -> std::net::IpAddr {
        if !self.behind_proxy {
            return self.peer;
        }
        let xff = headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.as_bytes());
        ctx.trusted_proxies.client_behind(self.peer, xff)
    }
}

/// Counts a connection in `keygate_connections_open` for as long as it lives.
struct OpenConnection;

impl OpenConnection {
    fn new() -> OpenConnection {
        crate::metrics::connections_open(1.0);
        OpenConnection
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        crate::metrics::connections_open(-1.0);
    }
}

fn json_response(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

/// The route's index in `metrics::ROUTES`.
fn route_index(r: Option<Route>) -> usize {
    match r {
        Some(Route::Activate) => 0,
        Some(Route::GetKey) => 1,
        Some(Route::Deactivate) => 2,
        Some(Route::CreateTrialKey) => 3,
        Some(Route::GetWebApiLog) => 4,
        None => 5,
    }
}

async fn handle(
    ctx: Arc<Ctx>,
    conn: Arc<Conn>,
    req: hyper::Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = tokio::time::Instant::now();
    let mut log = LogCtx::at(ctx.now());
    let route = request::route(req.uri().path());
    let client_ip = conn.client_ip(&ctx, req.headers());
    let (ip_text, ip_log_text) = conn.texts(&ctx, client_ip);
    let outcome = serve(
        &ctx,
        route,
        client_ip,
        &ip_text,
        &conn.proxy_ip,
        req,
        &mut log,
    )
    .await;
    let (status, body, code, label) = match outcome {
        Ok((body, code)) => (StatusCode::OK, body, code, "ok"),
        Err(f) => (
            f.error.status(),
            Bytes::from(crate::wire::error_response(f.error.message())),
            f.code,
            f.error.label(),
        ),
    };
    ctx.writer
        .log(log.row(ip_log_text, conn.proxy_ip.clone(), code));
    ctx.request_metrics
        .record(route_index(route.ok()), label, started.elapsed());
    Ok(json_response(status, body))
}

async fn serve(
    ctx: &Arc<Ctx>,
    route: Result<Route, request::RouteError>,
    client_ip: std::net::IpAddr,
    client_ip_text: &str,
    proxy_ip: &Arc<str>,
    req: hyper::Request<Incoming>,
    log: &mut LogCtx,
) -> handlers::Outcome {
    let other = |e: ApiError| Failure::new(e, crate::domain::StateCode::OTHER_FAILED);
    if req.method() != HttpMethod::GET && req.method() != HttpMethod::POST {
        return Err(other(ApiError::HttpMethod));
    }
    let route = route.map_err(|e| other(request::DecodeOutcome::Route(e).into()))?;
    let fail_code = match route {
        Route::Activate => crate::domain::StateCode::ACTIVATE_FAILED,
        Route::GetKey => crate::domain::StateCode::GETKEY_FAILED,
        Route::Deactivate => crate::domain::StateCode::DEACTIVATE_FAILED,
        Route::CreateTrialKey => crate::domain::StateCode::TRIAL_FAILED,
        Route::GetWebApiLog => crate::domain::StateCode::OTHER_FAILED,
    };
    ctx.rate_limits
        .client_ip(client_ip)
        .map_err(|_| Failure::new(ApiError::RateLimited, fail_code))?;
    if let Some(enc) = req.headers().get(header::CONTENT_ENCODING) {
        if !enc.as_bytes().eq_ignore_ascii_case(b"identity") {
            return Err(other(ApiError::UnsupportedEncoding));
        }
    }
    let (parts, body) = req.into_parts();
    // A declared length over the limit is refused before reading (hyper has parsed and
    // checked Content-Length already: its size hint is that length).
    if hyper::body::Body::size_hint(&body).lower() > ctx.limits.max_body_bytes as u64 {
        return Err(other(ApiError::BodyTooLarge));
    }
    // A small body nearly always arrives with the headers, so the first poll usually
    // finishes it; the read timeout (a timer entry to make and drop) is armed only when not.
    let mut read = std::pin::pin!(read_body(body, ctx.limits.max_body_bytes));
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(read.as_mut().poll(cx))).await;
    let body = match first {
        std::task::Poll::Ready(r) => r,
        std::task::Poll::Pending => tokio::time::timeout(ctx.limits.body_read_timeout, read)
            .await
            .unwrap_or(Err(ApiError::BodyTimeout)),
    }
    .map_err(other)?;
    let query = parts.uri.query().unwrap_or("").as_bytes();
    let params = Params::parse(query, &body);
    let decoded = Request::decode(route, &params);
    let request =
        decoded.map_err(|e| Failure::new(request::DecodeOutcome::Params(e).into(), fail_code))?;
    let client_ip = client_ip_text;
    match request {
        Request::Activate(r) => handlers::activate(ctx, r, client_ip, proxy_ip, log).await,
        Request::GetKey(r) => handlers::get_key(ctx, r, log).await,
        Request::Deactivate(r) => handlers::deactivate(ctx, r, log).await,
        Request::CreateTrialKey(r) => {
            handlers::create_trial_key(ctx, r, client_ip, proxy_ip, log).await
        }
        Request::GetWebApiLog(r) => handlers::get_web_api_log(ctx, r, log).await,
    }
}

/// The whole body, refused once it passes `max` bytes. A body of one data frame (what a small
/// form nearly always is) is returned as it came, without copying; trailers are ignored.
async fn read_body(mut body: Incoming, max: usize) -> Result<Bytes, ApiError> {
    let mut first = Bytes::new();
    let mut rest: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| ApiError::BadInput)?.into_data() else {
            continue;
        };
        if first.len() + rest.len() + data.len() > max {
            return Err(ApiError::BodyTooLarge);
        }
        if first.is_empty() {
            first = data;
        } else {
            if rest.is_empty() {
                rest.extend_from_slice(&first);
            }
            rest.extend_from_slice(&data);
        }
    }
    Ok(if rest.is_empty() {
        first
    } else {
        Bytes::from(rest)
    })
}

/// One client-API listener: HTTPS, or plain HTTP when configured explicitly
/// (`server.plain_http_listen`). With `proxy_protocol`, every connection must come from a
/// trusted proxy and start with a PROXY protocol v2 header.
pub struct Listener {
    pub tcp: TcpListener,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub proxy_protocol: bool,
}

/// Serves `listener` until `shutdown` fires, then drains its open connections.
pub async fn serve_listener(listener: Listener, ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let limits = ctx.limits.clone();
    let drain = drain::Drain::default();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let acceptor = listener.tls.map(tokio_rustls::TlsAcceptor::from);
    let proxy_protocol = listener.proxy_protocol;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // Replaced per connection by a `conn_timer::ConnTimer`.
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        // hyper's floor for its read buffer is 8 KiB; headers beyond it get 431.
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(limits.max_header_bytes as u32);
    let builder = Arc::new(builder);
    loop {
        let (mut tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.tcp.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::warn!("connection limit reached; closing new connection");
            crate::metrics::connection_refused();
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let proxy_ip = ctx.node_address(match (&ctx.proxy_ip, tcp.local_addr()) {
            (Some(p), _) => p.clone(),
            (None, Ok(a)) => a.ip().to_string(),
            (None, Err(_)) => String::new(),
        });
        let peer_ip = client_ip::canonical(peer.ip());
        let (acceptor, ctx, builder, watcher) = (
            acceptor.clone(),
            ctx.clone(),
            builder.clone(),
            drain.clone(),
        );
        let handshake_timeout = limits.tls_handshake_timeout;
        tokio::spawn(async move {
            let _permit = permit;
            let _open = OpenConnection::new();
            let mut peer = peer_ip;
            if proxy_protocol {
                if !ctx.trusted_proxies.contains(peer_ip) {
                    tracing::debug!("PROXY protocol connection from an untrusted peer; closed");
                    crate::metrics::proxy_protocol_refused("untrusted_peer");
                    return;
                }
                match tokio::time::timeout(handshake_timeout, proxy_protocol::read_v2(&mut tcp))
                    .await
                {
                    Ok(Ok(Some(ip))) => peer = client_ip::canonical(ip),
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => {
                        tracing::debug!(error = ?e, "bad PROXY protocol header; closed");
                        crate::metrics::proxy_protocol_refused("invalid_header");
                        return;
                    }
                    Err(_) => {
                        crate::metrics::proxy_protocol_refused("timeout");
                        return;
                    }
                }
            }
            let conn = Arc::new(Conn::new(&ctx, peer, proxy_ip));
            let svc = service_fn(move |req| handle(ctx.clone(), conn.clone(), req));
            // The header read timeout re-armed per request without a timer entry each.
            let mut builder = (*builder).clone();
            builder.http1().timer(conn_timer::ConnTimer::default());
            let Some(acceptor) = acceptor else {
                let c = builder.serve_connection(TokioIo::new(tcp), svc);
                if let Err(e) = watcher.watch(c.into_owned()).await {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            };
            let tls = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "TLS handshake failed");
                    crate::metrics::tls_handshake("failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!("TLS handshake timed out");
                    crate::metrics::tls_handshake("timeout");
                    return;
                }
            };
            let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
            crate::metrics::tls_handshake(if resumed { "resumed" } else { "full" });
            let c = builder.serve_connection(TokioIo::new(tls), svc);
            if let Err(e) = watcher.watch(c.into_owned()).await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener.tcp);
    tokio::select! {
        _ = drain.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(limits.drain_timeout) => tracing::warn!("drain timeout; closing remaining connections"),
    }
}
