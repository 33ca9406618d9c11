//! A small HTTPS client for Keygate over HTTP/1.1 or HTTP/2 (hyper + tokio-rustls on the
//! aws-lc-rs provider), used by the system tests and by the load generator (`run`, with its
//! scenarios, reports and the static baseline server).

pub mod report;
pub mod run;
pub mod scenario;
pub mod seed;
pub mod static_server;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// TLS settings trusting exactly the given PEM certificate(s), offering TLS 1.3 and 1.2.
pub fn tls_config(ca_pem: &Path, protocol: Protocol) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    tls_config_versions(ca_pem, protocol, rustls::DEFAULT_VERSIONS)
}

/// The same, offering only `versions` (`&[&rustls::version::TLS12]`: a TLS 1.2 client).
pub fn tls_config_versions(
    ca_pem: &Path,
    protocol: Protocol,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem)? {
        roots.add(c?)?;
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(versions)?
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = match protocol {
        Protocol::Http1 => vec![b"http/1.1".to_vec()],
        Protocol::Http2 => vec![b"h2".to_vec()],
    };
    Ok(Arc::new(cfg))
}

enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

/// One keep-alive connection. HTTP/2 connections can be cloned to multiplex streams.
pub struct Connection {
    sender: Sender,
    authority: String,
}

/// A response: status and body bytes.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_slice(&self.body)?)
    }
}

impl Connection {
    pub async fn connect(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        protocol: Protocol,
    ) -> anyhow::Result<Connection> {
        Self::connect_with_prefix(addr, tls, protocol, &[]).await
    }

    /// Like `connect`, but writes `prefix` (a PROXY protocol header, say) before the TLS
    /// handshake.
    pub async fn connect_with_prefix(
        addr: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
        protocol: Protocol,
        prefix: &[u8],
    ) -> anyhow::Result<Connection> {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        tcp.write_all(prefix).await?;
        let name = ServerName::IpAddress(addr.ip().into());
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await?;
        Self::over(TokioIo::new(stream), addr, protocol).await
    }

    /// Plain HTTP (no TLS), for a listener with `server.plain_http_listen`.
    pub async fn connect_plain(addr: SocketAddr, protocol: Protocol) -> anyhow::Result<Connection> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        Self::over(TokioIo::new(tcp), addr, protocol).await
    }

    async fn over<I>(io: I, addr: SocketAddr, protocol: Protocol) -> anyhow::Result<Connection>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let sender = match protocol {
            Protocol::Http1 => {
                let (s, conn) = http1::handshake(io).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Sender::H1(s)
            }
            Protocol::Http2 => {
                let (s, conn) = http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                Sender::H2(s)
            }
        };
        Ok(Connection {
            sender,
            authority: addr.to_string(),
        })
    }

    /// Another handle on the same HTTP/2 connection (for concurrent streams).
    pub fn clone_h2(&self) -> Option<Connection> {
        match &self.sender {
            Sender::H2(s) => Some(Connection {
                sender: Sender::H2(s.clone()),
                authority: self.authority.clone(),
            }),
            Sender::H1(_) => None,
        }
    }

    /// Sends a request with an explicit method, headers and body.
    pub async fn request(
        &mut self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> anyhow::Result<Reply> {
        let body: Bytes = body.into();
        let mut b = http::Request::builder().method(method).uri(path_and_query);
        if matches!(self.sender, Sender::H1(_)) {
            b = b.header(http::header::HOST, &self.authority);
        } else {
            b = b.uri(format!("https://{}{}", self.authority, path_and_query));
        }
        if !body.is_empty() {
            b = b.header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Full::new(body))?;
        let resp = match &mut self.sender {
            Sender::H1(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
            Sender::H2(s) => {
                s.ready().await?;
                s.send_request(req).await?
            }
        };
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Reply { status, body })
    }

    /// POSTs a form body.
    pub async fn post(&mut self, path: &str, form: &str) -> anyhow::Result<Reply> {
        self.request("POST", path, &[], form.to_owned()).await
    }
}

/// Builds an `application/x-www-form-urlencoded` body.
pub fn form(pairs: &[(&str, &str)]) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        s.append_pair(k, v);
    }
    s.finish()
}
