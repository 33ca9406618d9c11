//! Table tests of the activation semantics (reference §3), no server involved.

use super::decide::Change;
use super::*;

const NOW: i64 = 1_700_000_000;

fn license(max: i64) -> License {
    License {
        product_id: 3,
        id: 1,
        global_id: 10,
        key: "AAAAA-BBBBB-CCCCC-DDDDD".into(),
        created: NOW - 100,
        expires: NOW + 30 * DAY_SECONDS,
        period: 30,
        features: Features::default(),
        notes: None,
        block: false,
        customer: None,
        trial_activation: false,
        max_no_of_machines: max,
        version: 0,
        shared_version: 0,
        allowed_machines: String::new(),
        data_objects: vec![],
        machines: vec![],
    }
}

static PROXY: std::sync::LazyLock<std::sync::Arc<str>> =
    std::sync::LazyLock::new(|| "10.0.0.1".into());

fn input(mc: &str) -> ActivateInput<'_> {
    ActivateInput {
        machine_code: mc,
        friendly_name: "",
        floating_interval: 0,
        max_overdraft: 0,
        ip: "203.0.113.9",
        proxy_ip: &PROXY,
        now: NOW,
    }
}

fn floating(mc: &str, interval: i64, overdraft: i64, now: i64) -> ActivateInput<'_> {
    ActivateInput {
        floating_interval: interval,
        max_overdraft: overdraft,
        now,
        ..input(mc)
    }
}

/// Activates and applies; returns the state code or the rejection.
fn run(lic: &mut License, req: &ActivateInput<'_>) -> Result<StateCode, Reject> {
    match activate(lic, req) {
        ActivateOutcome::Accepted { code, change } => {
            lic.apply(&change, req.now);
            Ok(code)
        }
        ActivateOutcome::Rejected(r) => Err(r),
    }
}

#[test]
fn node_locked_limit_and_idempotent_reactivation() {
    let mut l = license(2);
    assert_eq!(run(&mut l, &input("a")), Ok(StateCode::ACTIVATE_NEW));
    let first_time = l.machines[0].time;
    let later = ActivateInput {
        now: NOW + 50,
        ..input("a")
    };
    assert_eq!(run(&mut l, &later), Ok(StateCode::ACTIVATE_KNOWN));
    assert_eq!(l.machines.len(), 1);
    assert_eq!(l.machines[0].time, first_time, "re-activation keeps Time");
    assert_eq!(run(&mut l, &input("b")), Ok(StateCode::ACTIVATE_NEW));
    assert_eq!(run(&mut l, &input("c")), Err(Reject::Limit));
    assert_eq!(l.machines.len(), 2);
    assert_eq!(&*l.machines[0].proxy_ip, "10.0.0.1");
    assert_eq!(l.machines[0].ip, "203.0.113.9");
}

#[test]
fn zero_max_is_unlimited_and_unrecorded() {
    let mut l = license(0);
    for mc in ["a", "b", "c", "d"] {
        assert_eq!(run(&mut l, &input(mc)), Ok(StateCode::ACTIVATE_UNLIMITED));
    }
    assert!(l.machines.is_empty());
}

#[test]
fn allowed_machines_bypass_the_limit() {
    let mut l = license(1);
    l.allowed_machines = "x\ny".into();
    assert_eq!(run(&mut l, &input("a")), Ok(StateCode::ACTIVATE_NEW));
    assert_eq!(run(&mut l, &input("b")), Err(Reject::Limit));
    assert_eq!(run(&mut l, &input("y")), Ok(StateCode::ACTIVATE_NEW));
    assert_eq!(run(&mut l, &input("x")), Ok(StateCode::ACTIVATE_NEW));
    assert!(
        !l.is_allowed_machine(""),
        "an empty machine code is never allowed"
    );
}

#[test]
fn blocked_keys_refuse_activation_and_deactivation() {
    let mut l = license(2);
    run(&mut l, &input("a")).unwrap();
    l.block = true;
    assert_eq!(run(&mut l, &input("a")), Err(Reject::Blocked));
    assert_eq!(deactivate(&l, "a", false), DeactivateOutcome::Blocked);
}

#[test]
fn trial_activation_moves_expiry_on_new_machines_only() {
    let mut l = license(3);
    l.trial_activation = true;
    l.period = 7;
    assert_eq!(run(&mut l, &input("a")), Ok(StateCode::ACTIVATE_TRIAL));
    assert_eq!(l.expires, NOW + 7 * DAY_SECONDS);
    let later = ActivateInput {
        now: NOW + 1000,
        ..input("a")
    };
    assert_eq!(run(&mut l, &later), Ok(StateCode::ACTIVATE_KNOWN));
    assert_eq!(
        l.expires,
        NOW + 7 * DAY_SECONDS,
        "a known machine does not extend"
    );
    let other = ActivateInput {
        now: NOW + 1000,
        ..input("b")
    };
    assert_eq!(run(&mut l, &other), Ok(StateCode::ACTIVATE_TRIAL));
    assert_eq!(
        l.expires,
        NOW + 1000 + 7 * DAY_SECONDS,
        "each new device extends"
    );
}

#[test]
fn floating_seats_lease_refresh_and_expire() {
    let mut l = license(1);
    assert_eq!(
        run(&mut l, &floating("a", 100, 0, NOW)),
        Ok(StateCode::ACTIVATE_FLOATING)
    );
    assert_eq!(l.machines[0].mid(), "floating:a");
    assert_eq!(l.machines[0].floating_expires, NOW + 100);
    assert_eq!(
        run(&mut l, &floating("b", 100, 0, NOW + 10)),
        Err(Reject::FloatingLimit)
    );
    assert_eq!(
        run(&mut l, &floating("a", 100, 0, NOW + 50)),
        Ok(StateCode::ACTIVATE_FLOATING)
    );
    assert_eq!(
        l.machines[0].floating_expires,
        NOW + 150,
        "heartbeat extends the lease"
    );
    assert_eq!(
        l.machines[0].time, NOW,
        "and keeps the first activation time"
    );
    // After the lease ran out another machine takes the seat and the stale lease is pruned.
    assert_eq!(
        run(&mut l, &floating("b", 100, 0, NOW + 151)),
        Ok(StateCode::ACTIVATE_FLOATING)
    );
    assert_eq!(l.machines.len(), 1);
    assert_eq!(l.machines[0].machine_code, "b");
}

#[test]
fn renewal_keeps_list_position() {
    let mut l = license(3);
    for mc in ["a", "b", "c"] {
        run(&mut l, &floating(mc, 100, 0, NOW)).unwrap();
    }
    run(&mut l, &floating("a", 100, 0, NOW + 50)).unwrap();
    let order: Vec<&str> = l.machines.iter().map(|m| m.machine_code.as_str()).collect();
    assert_eq!(
        order,
        ["a", "b", "c"],
        "as the store's `seq` keeps it, so a restart shows the same list"
    );
    assert_eq!(l.machines[0].floating_expires, NOW + 150);
    // b and c ran out; d prunes them and takes a seat at the end.
    run(&mut l, &floating("a", 100, 0, NOW + 120)).unwrap();
    run(&mut l, &floating("d", 100, 0, NOW + 121)).unwrap();
    let order: Vec<&str> = l.machines.iter().map(|m| m.machine_code.as_str()).collect();
    assert_eq!(order, ["a", "d"]);
}

#[test]
fn floating_seats_are_counted_apart_from_node_locked() {
    let mut l = license(1);
    assert_eq!(run(&mut l, &input("a")), Ok(StateCode::ACTIVATE_NEW));
    assert_eq!(
        run(&mut l, &floating("a", 60, 0, NOW)),
        Ok(StateCode::ACTIVATE_FLOATING)
    );
    assert_eq!(l.node_locked().count(), 1);
    assert_eq!(l.active_floating(NOW).count(), 1);
    assert_eq!(
        deactivate(&l, "a", true),
        DeactivateOutcome::FloatingReleased { removed: true }
    );
    assert!(l.remove_machine("a", true));
    assert_eq!(
        l.node_locked().count(),
        1,
        "floating release leaves the node-locked seat"
    );
}

#[test]
fn overdraft_seats() {
    let mut l = license(1);
    run(&mut l, &floating("a", 100, 1, NOW)).unwrap();
    assert_eq!(
        run(&mut l, &floating("b", 100, 1, NOW)),
        Ok(StateCode::ACTIVATE_OVERDRAFT)
    );
    let b = l.machines.iter().find(|m| m.machine_code == "b").unwrap();
    assert_eq!(b.mid(), "floating:overdraft:b");
    assert_eq!(
        b.mid().len() - "b".len(),
        19,
        "SDKs strip 19 characters for overdraft seats"
    );
    assert_eq!(
        run(&mut l, &floating("c", 100, 1, NOW)),
        Err(Reject::FloatingLimit)
    );
    assert_eq!(
        run(&mut l, &floating("b", 100, 1, NOW + 5)),
        Ok(StateCode::ACTIVATE_OVERDRAFT)
    );
}

#[test]
fn floating_without_a_limit_is_transient() {
    let l = license(0);
    match activate(&l, &floating("a", 100, 0, NOW)) {
        ActivateOutcome::Accepted {
            change: Change::Transient(m),
            ..
        } => assert_eq!(m.mid(), "floating:a"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn deactivation_outcomes() {
    let mut l = license(2);
    run(&mut l, &input("a")).unwrap();
    assert_eq!(deactivate(&l, "a", false), DeactivateOutcome::Removed);
    assert_eq!(deactivate(&l, "zz", false), DeactivateOutcome::NotActivated);
    assert_eq!(
        deactivate(&l, "zz", true),
        DeactivateOutcome::FloatingReleased { removed: false }
    );
    assert!(l.remove_machine("a", false));
    assert!(l.machines.is_empty());
    assert_eq!(
        DeactivateOutcome::FloatingReleased { removed: false }.code(),
        StateCode::DEACTIVATE_FLOATING_OK
    );
}

#[test]
fn visible_machines_per_model_version_and_mask() {
    let mut l = license(3);
    run(&mut l, &input("a")).unwrap();
    run(&mut l, &input("b")).unwrap();
    run(&mut l, &floating("f", 100, 0, NOW)).unwrap();
    run(&mut l, &floating("g", 100, 0, NOW)).unwrap();
    let f = l
        .machines
        .iter()
        .find(|m| m.machine_code == "f")
        .unwrap()
        .clone();
    let mids = |v: Vec<&Machine>| v.iter().map(|m| m.mid()).collect::<Vec<_>>();
    assert_eq!(
        mids(l.visible_machines(3, None, false, NOW)),
        ["a", "b", "floating:f", "floating:g"]
    );
    assert_eq!(
        mids(l.visible_machines(1, Some(&f), false, NOW)),
        ["a", "b", "floating:f"]
    );
    assert_eq!(mids(l.visible_machines(1, None, false, NOW)), ["a", "b"]);
    assert_eq!(
        mids(l.visible_machines(3, Some(&f), true, NOW)),
        ["floating:f"]
    );
    assert_eq!(
        mids(l.visible_machines(3, None, false, NOW + 500)),
        ["a", "b"],
        "expired leases are hidden"
    );
}

#[test]
fn scopes() {
    let s = Scope {
        token_id: 9,
        tenant_id: 1,
        methods: Method::GetKey as i64,
        product_lock: Some(3),
        key_lock: Some(-1),
        feature_lock: 0,
    };
    assert_eq!(
        s.allows_method(Method::Activate),
        Err(ScopeError::AccessDenied)
    );
    assert_eq!(s.allows_method(Method::GetKey), Ok(()));
    assert_eq!(s.allows_product(4), Err(ScopeError::AccessDenied));
    assert_eq!(s.allows_product(3), Ok(()));
    assert_eq!(s.allows_key(77), Ok(()), "-1 allows any named key");
    let locked = Scope {
        key_lock: Some(5),
        feature_lock: 32,
        ..s
    };
    assert_eq!(locked.allows_key(6), Err(ScopeError::AccessDenied));
    assert_eq!(
        locked.mask(1),
        Mask(32),
        "the feature lock wins over FieldsToReturn"
    );
    assert_eq!(
        Scope {
            feature_lock: 0,
            ..locked
        }
        .mask(3),
        Mask(3)
    );
    assert_eq!(Method::parse(" getkey "), Some(Method::GetKey));
    assert_eq!(Method::parse("Increment"), None);
}

#[test]
fn features() {
    let f = Features::default()
        .with(1, true)
        .with(8, true)
        .with(9, true);
    assert!(f.get(1) && f.get(8) && !f.get(2) && !f.get(9) && !f.get(0));
    assert_eq!(f.with(1, false), Features(0x80));
}

#[test]
fn every_change_moves_the_version() {
    let mut l = license(3);
    let v0 = l.version;
    run(&mut l, &input("a")).unwrap();
    assert_eq!(l.version, v0 + 1, "a new machine");
    run(&mut l, &input("a")).unwrap();
    assert_eq!(l.version, v0 + 1, "a known machine changes nothing");
    run(&mut l, &floating("f", 60, 0, NOW)).unwrap();
    run(&mut l, &floating("f", 60, 0, NOW + 1)).unwrap();
    assert_eq!(l.version, v0 + 3, "a lease and its renewal");
    assert!(l.remove_machine("a", false));
    assert_eq!(l.version, v0 + 4);
    assert!(!l.remove_machine("a", false));
    assert_eq!(l.version, v0 + 4, "nothing removed, nothing changed");
}
