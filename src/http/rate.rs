//! Rate limits local to this node (GCRA, governor): requests per client IP, requests per
//! access token, and new machines per license (activation churn, e.g. a leaked key). Each is
//! off when its rate is 0. Cross-node quotas need shared state and are not here.

use crate::config::RateLimitCfg;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

/// Which limit refused a request; also the metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    ClientIp,
    Token,
    LicenseNewMachines,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Limit::ClientIp => "client_ip",
            Limit::Token => "token",
            Limit::LicenseNewMachines => "license_new_machines",
        }
    }
}

pub struct RateLimits {
    ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    token: Option<DefaultKeyedRateLimiter<i64>>,
    license_new: Option<DefaultKeyedRateLimiter<i64>>,
}

/// `rate` per `per`, bursts up to `burst` (at least `rate`); `None` when `rate` is 0.
fn limiter<K: Hash + Eq + Clone>(
    rate: u32,
    burst: u32,
    per: Duration,
) -> Option<DefaultKeyedRateLimiter<K>> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst.max(rate.get())).unwrap_or(rate);
    let quota = Quota::with_period(per / rate.get())?.allow_burst(burst);
    Some(RateLimiter::keyed(quota))
}

impl RateLimits {
    pub fn new(c: &RateLimitCfg) -> RateLimits {
        let second = Duration::from_secs(1);
        RateLimits {
            ip: limiter(c.per_client_ip_per_second, c.per_client_ip_burst, second),
            token: limiter(c.per_token_per_second, c.per_token_burst, second),
            license_new: limiter(
                c.new_machines_per_license_per_minute,
                c.new_machines_per_license_burst,
                Duration::from_secs(60),
            ),
        }
    }

    /// No limits at all (benches, embedding).
    pub fn off() -> RateLimits {
        RateLimits {
            ip: None,
            token: None,
            license_new: None,
        }
    }

    fn check<K: Hash + Eq + Clone>(
        l: &Option<DefaultKeyedRateLimiter<K>>,
        key: &K,
        which: Limit,
    ) -> Result<(), Limit> {
        match l {
            Some(l) if l.check_key(key).is_err() => {
                crate::metrics::rate_limited(which.label());
                Err(which)
            }
            _ => Ok(()),
        }
    }

    pub fn client_ip(&self, ip: IpAddr) -> Result<(), Limit> {
        Self::check(&self.ip, &ip, Limit::ClientIp)
    }

    pub fn token(&self, token_id: i64) -> Result<(), Limit> {
        Self::check(&self.token, &token_id, Limit::Token)
    }

    pub fn new_machine(&self, license_global_id: i64) -> Result<(), Limit> {
        Self::check(
            &self.license_new,
            &license_global_id,
            Limit::LicenseNewMachines,
        )
    }

    /// Forgets keys whose buckets are full again, so memory stays bounded under IP churn.
    pub fn housekeeping(&self) {
        fn tidy<K: Hash + Eq + Clone>(l: &Option<DefaultKeyedRateLimiter<K>>) {
            if let Some(l) = l {
                l.retain_recent();
                l.shrink_to_fit();
            }
        }
        tidy(&self.ip);
        tidy(&self.token);
        tidy(&self.license_new);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refuses_per_key() {
        let c = RateLimitCfg {
            per_client_ip_per_second: 2,
            per_client_ip_burst: 3,
            per_token_per_second: 0,
            per_token_burst: 0,
            new_machines_per_license_per_minute: 1,
            new_machines_per_license_burst: 0,
        };
        let r = RateLimits::new(&c);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let got: Vec<bool> = (0..4).map(|_| r.client_ip(a).is_ok()).collect();
        assert_eq!(got, [true, true, true, false], "a burst of 3, then refused");
        assert!(r.client_ip(b).is_ok(), "another IP has its own bucket");
        assert!((0..100).all(|_| r.token(1).is_ok()), "0 = off");
        assert_eq!(r.new_machine(7), Ok(()));
        assert_eq!(r.new_machine(7), Err(Limit::LicenseNewMachines));
        assert_eq!(r.new_machine(8), Ok(()));
        r.housekeeping();
    }
}
