//! Privacy rules that are pure functions of data: which bits of an IP address the request log
//! keeps. The log records the client's network (IPv4 /24, IPv6 /48 by default), not the
//! client's address; activation records keep the full address, because clients see it in
//! `ActivatedMachines`.

use std::net::IpAddr;

/// Zeroes the host bits beyond `v4_prefix` (IPv4) or `v6_prefix` (IPv6). A prefix of 32 or
/// 128 keeps the whole address.
pub fn anonymize_ip(ip: IpAddr, v4_prefix: u8, v6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let keep = u32::from(v4_prefix.min(32));
            let mask = u32::MAX.checked_shl(32 - keep).unwrap_or(0);
            IpAddr::V4((u32::from(v4) & mask).into())
        }
        IpAddr::V6(v6) => {
            let keep = u32::from(v6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - keep).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_the_host_bits() {
        let cases = [
            ("203.0.113.77", 24, 48, "203.0.113.0"),
            ("203.0.113.77", 16, 48, "203.0.0.0"),
            ("203.0.113.77", 32, 48, "203.0.113.77"),
            ("203.0.113.77", 0, 48, "0.0.0.0"),
            ("2001:db8:abcd:1234:5678::1", 24, 48, "2001:db8:abcd::"),
            ("2001:db8:abcd:1234:5678::1", 24, 64, "2001:db8:abcd:1234::"),
            (
                "2001:db8:abcd:1234:5678::1",
                24,
                128,
                "2001:db8:abcd:1234:5678::1",
            ),
            ("::1", 24, 48, "::"),
        ];
        for (ip, v4, v6, want) in cases {
            let got = anonymize_ip(ip.parse().unwrap(), v4, v6);
            assert_eq!(got, want.parse::<IpAddr>().unwrap(), "{ip} /{v4} /{v6}");
        }
    }
}
