//! The admin listener: plain HTTP/1.1 for operators and Prometheus, apart from the client
//! port. `/metrics` (Prometheus text), `/livez` (the process answers), `/readyz` (serving,
//! not shutting down, store writes succeeding). No authentication: bind it to loopback or a
//! private network (`admin.listen`).

use crate::store::writer::WriterSender;
use bytes::Bytes;
use http::{header, Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What `/readyz` reports.
pub struct Health {
    /// True once state is loaded and the client port listens; false from the start of shutdown.
    pub serving: AtomicBool,
    pub writer: WriterSender,
}

impl Health {
    /// `Ok` when the node should get traffic, else the reason it should not.
    pub fn ready(&self) -> Result<(), &'static str> {
        if !self.serving.load(Ordering::Relaxed) {
            return Err("not serving (starting or shutting down)");
        }
        if !self.writer.stats().healthy.load(Ordering::Relaxed) {
            return Err("writes reach neither the main store nor the local spool");
        }
        if !self.writer.stats().wal_healthy.load(Ordering::Relaxed) {
            return Err("the activation log cannot be written (activations are not crash-safe)");
        }
        Ok(())
    }
}

pub struct Admin {
    pub metrics: Option<PrometheusHandle>,
    pub health: Arc<Health>,
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn answer(admin: &Admin, req: &hyper::Request<Incoming>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "only GET\n".into());
    }
    match req.uri().path() {
        "/livez" => text(StatusCode::OK, PLAIN, "ok\n".into()),
        "/readyz" => match admin.health.ready() {
            Ok(()) => text(StatusCode::OK, PLAIN, "ready\n".into()),
            Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, PLAIN, format!("{why}\n")),
        },
        "/metrics" => match &admin.metrics {
            Some(h) => {
                crate::metrics::writer_stats(admin.health.writer.stats());
                text(StatusCode::OK, "text/plain; version=0.0.4", h.render())
            }
            None => text(
                StatusCode::NOT_FOUND,
                PLAIN,
                "no metrics recorder in this process\n".into(),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n".into()),
    }
}

/// Serves the admin endpoints until `shutdown` fires. It keeps answering during the client
/// port's drain, so `/readyz` can say 503 while connections finish.
pub async fn serve_admin(listener: TcpListener, admin: Arc<Admin>, shutdown: CancellationToken) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .max_buf_size(16 * 1024);
    loop {
        let (tcp, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let admin = admin.clone();
        let conn = builder.serve_connection(
            TokioIo::new(tcp),
            service_fn(move |req| {
                let r = answer(&admin, &req);
                async move { Ok::<_, Infallible>(r) }
            }),
        );
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}
