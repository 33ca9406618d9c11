//! Who the client is. The socket peer, unless the peer is one of `server.trusted_proxies`: then
//! the nearest hop of `X-Forwarded-For` that is not itself a trusted proxy. A header from any
//! other peer is ignored, so a client cannot choose the IP it is logged and limited under.

use std::net::IpAddr;
use std::str::FromStr;

/// An address range such as `10.0.0.0/8` or `2001:db8::/32`; a bare address is a single host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let bad = || format!("{s:?} is not an address range like 10.0.0.0/8");
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p.parse::<u8>().map_err(|_| bad())?)),
            None => (s, None),
        };
        let net = canonical(addr.trim().parse::<IpAddr>().map_err(|_| bad())?);
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        if prefix > max {
            return Err(bad());
        }
        Ok(Cidr { net, prefix })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let bits = |ip: IpAddr| match ip {
            IpAddr::V4(v4) => (u128::from(u32::from(v4)), 32),
            IpAddr::V6(v6) => (u128::from(v6), 128),
        };
        let (net, width) = bits(self.net);
        let (ip, ip_width) = bits(canonical(ip));
        if width != ip_width {
            return false;
        }
        let host_bits = u32::from(width - self.prefix);
        let mask = u128::MAX.checked_shl(host_bits).unwrap_or(0);
        net & mask == ip & mask
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, how a dual-stack socket reports IPv4 peers)
/// become plain IPv4.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[derive(Clone, Debug, Default)]
pub struct TrustedProxies(Vec<Cidr>);

impl TrustedProxies {
    pub fn parse(ranges: &[String]) -> Result<TrustedProxies, String> {
        ranges
            .iter()
            .map(|r| r.parse())
            .collect::<Result<_, _>>()
            .map(TrustedProxies)
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|c| c.contains(ip))
    }

    /// The client behind a trusted `peer`, from its `X-Forwarded-For` values (all headers, in
    /// order). Walks from the right past trusted hops; stops at the first untrusted one. An
    /// unparsable hop ends the walk at the last address that was believed.
    pub fn client_behind<'a>(&self, peer: IpAddr, xff: impl Iterator<Item = &'a [u8]>) -> IpAddr {
        let hops: Vec<&[u8]> = xff.flat_map(|v| v.split(|b| *b == b',')).collect();
        let mut client = canonical(peer);
        for hop in hops.iter().rev() {
            if !self.contains(client) {
                break;
            }
            match std::str::from_utf8(hop).ok().and_then(parse_hop) {
                Some(ip) => client = ip,
                None => break,
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, optionally `a.b.c.d:port` or `[v6]:port`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok().map(canonical);
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges() {
        let c: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(c.contains(ip("10.255.1.2")));
        assert!(
            c.contains(ip("::ffff:10.1.2.3")),
            "mapped IPv4 peers match IPv4 ranges"
        );
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(!c.contains(ip("::1")));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        let host: Cidr = "192.0.2.7".parse().unwrap();
        assert!(host.contains(ip("192.0.2.7")) && !host.contains(ip("192.0.2.8")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("203.0.113.1")));
        for bad in ["10.0.0.0/33", "::/129", "10.0.0/8", "x", "10.0.0.0/", ""] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let t = TrustedProxies::parse(&["10.0.0.0/8".into(), "127.0.0.1".into()]).unwrap();
        let hdr = |s: &'static str| std::iter::once(s.as_bytes());
        let cases: &[(&str, &'static str, &str)] = &[
            // peer, X-Forwarded-For, client
            ("203.0.113.9", "198.51.100.1", "203.0.113.9"),
            ("10.0.0.5", "198.51.100.1", "198.51.100.1"),
            ("10.0.0.5", "198.51.100.1, 10.0.0.9", "198.51.100.1"),
            (
                "10.0.0.5",
                "6.6.6.6, 198.51.100.1, 10.0.0.9",
                "198.51.100.1",
            ),
            ("10.0.0.5", "garbage, 10.0.0.9", "10.0.0.9"),
            ("10.0.0.5", "", "10.0.0.5"),
            ("10.0.0.5", "198.51.100.1:4711", "198.51.100.1"),
            ("10.0.0.5", "[2001:db8::1]:443", "2001:db8::1"),
            ("::ffff:127.0.0.1", "2001:db8::2", "2001:db8::2"),
        ];
        for (peer, xff, want) in cases {
            assert_eq!(
                t.client_behind(ip(peer), hdr(xff)),
                ip(want),
                "{peer} {xff}"
            );
        }
        let two = [b"198.51.100.1".as_slice(), b"10.0.0.9".as_slice()];
        assert_eq!(
            t.client_behind(ip("10.0.0.5"), two.into_iter()),
            ip("198.51.100.1")
        );
        let none = TrustedProxies::default();
        assert_eq!(
            none.client_behind(ip("10.0.0.5"), hdr("1.2.3.4")),
            ip("10.0.0.5")
        );
    }
}
