//! PROXY protocol v2: the binary header a TCP load balancer sends before anything else, naming
//! the client it accepted the connection from. Read before TLS, only from trusted peers.

use std::net::IpAddr;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Headers longer than this (TLVs included) are refused rather than buffered.
const MAX_HEADER: usize = 1024;

#[derive(Debug, PartialEq, Eq)]
pub enum PpError {
    Io,
    NotV2,
    TooLong,
    Invalid,
}

/// Reads exactly one v2 header from `s`, so the next byte is the client's first. `Some(ip)` is
/// the source of a proxied connection; `None` is a LOCAL connection (the balancer's own health
/// check) or an address family without an IP, which keeps the peer address.
pub async fn read_v2<S: AsyncRead + Unpin>(s: &mut S) -> Result<Option<IpAddr>, PpError> {
    let mut fixed = [0u8; 16];
    s.read_exact(&mut fixed).await.map_err(|_| PpError::Io)?;
    if &fixed[..12] != ppp::v2::PROTOCOL_PREFIX {
        return Err(PpError::NotV2);
    }
    let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if 16 + len > MAX_HEADER {
        return Err(PpError::TooLong);
    }
    let mut buf = Vec::with_capacity(16 + len);
    buf.extend_from_slice(&fixed);
    buf.resize(16 + len, 0);
    s.read_exact(&mut buf[16..])
        .await
        .map_err(|_| PpError::Io)?;
    let h = ppp::v2::Header::try_from(buf.as_slice()).map_err(|_| PpError::Invalid)?;
    if h.command == ppp::v2::Command::Local {
        return Ok(None);
    }
    Ok(match h.addresses {
        ppp::v2::Addresses::IPv4(a) => Some(IpAddr::V4(a.source_address)),
        ppp::v2::Addresses::IPv6(a) => Some(IpAddr::V6(a.source_address)),
        ppp::v2::Addresses::Unspecified | ppp::v2::Addresses::Unix(_) => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A v2 PROXY/TCP4 header built by hand from the specification, not by the parser's crate.
    fn tcp4(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        h.extend_from_slice(&[0x21, 0x11, 0, 12]);
        h.extend_from_slice(&src);
        h.extend_from_slice(&dst);
        h.extend_from_slice(&4711u16.to_be_bytes());
        h.extend_from_slice(&443u16.to_be_bytes());
        h
    }

    #[tokio::test]
    async fn reads_exactly_the_header() {
        let mut bytes = tcp4([198, 51, 100, 7], [10, 0, 0, 1]);
        bytes.extend_from_slice(b"\x16\x03\x01rest-of-client-hello");
        let mut r = bytes.as_slice();
        assert_eq!(
            read_v2(&mut r).await,
            Ok(Some("198.51.100.7".parse().unwrap()))
        );
        assert_eq!(
            r, b"\x16\x03\x01rest-of-client-hello",
            "the TLS bytes are untouched"
        );
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_v2_header() {
        let mut local = tcp4([1, 2, 3, 4], [5, 6, 7, 8]);
        local[12] = 0x20; // LOCAL
        assert_eq!(read_v2(&mut local.as_slice()).await, Ok(None));
        let v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec();
        assert_eq!(read_v2(&mut v1.as_slice()).await, Err(PpError::NotV2));
        let tls = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03aaaaaaaaaaaa".to_vec();
        assert_eq!(read_v2(&mut tls.as_slice()).await, Err(PpError::NotV2));
        let mut long = tcp4([1, 2, 3, 4], [5, 6, 7, 8]);
        long[14] = 0xff;
        assert_eq!(read_v2(&mut long.as_slice()).await, Err(PpError::TooLong));
        let short = tcp4([1, 2, 3, 4], [5, 6, 7, 8]);
        assert_eq!(read_v2(&mut &short[..20]).await, Err(PpError::Io));
    }
}
