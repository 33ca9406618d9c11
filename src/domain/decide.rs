//! Activation and deactivation decisions: `(license, request, now) -> outcome`.
//!
//! The caller holds the license's lock, calls `activate`, then `License::apply`s the change
//! and forwards the same change to the main store. Rejections are values, never errors.

use super::codes::StateCode;
use super::model::{License, Machine, MachineKind, UnixTime, DAY_SECONDS};

/// The request-side facts an activation depends on.
#[derive(Clone, Copy, Debug)]
pub struct ActivateInput<'a> {
    pub machine_code: &'a str,
    pub friendly_name: &'a str,
    /// `FloatingTimeInterval` in seconds; 0 means node-locked.
    pub floating_interval: i64,
    pub max_overdraft: i64,
    pub ip: &'a str,
    /// Shared, not copied: every machine a node records carries the same few node addresses.
    pub proxy_ip: &'a std::sync::Arc<str>,
    pub now: UnixTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reject {
    Blocked,
    Limit,
    FloatingLimit,
}

impl Reject {
    pub fn code(self) -> StateCode {
        match self {
            Reject::Blocked => StateCode::ACTIVATE_BLOCKED,
            Reject::Limit => StateCode::ACTIVATE_LIMIT,
            Reject::FloatingLimit => StateCode::ACTIVATE_FLOATING_LIMIT,
        }
    }
}

/// What an accepted activation changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing to record (known machine, or node locking off).
    None,
    /// Insert or replace the activation with this machine code and seat family.
    Upsert(Machine),
    /// A new machine on a trial-activation key: record it and move `Expires`.
    UpsertWithExpiry(Machine, UnixTime),
    /// Floating lease on a key without a machine limit: shown in the response, not recorded.
    Transient(Machine),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ActivateOutcome {
    Accepted { code: StateCode, change: Change },
    Rejected(Reject),
}

impl ActivateOutcome {
    pub fn code(&self) -> StateCode {
        match self {
            ActivateOutcome::Accepted { code, .. } => *code,
            ActivateOutcome::Rejected(r) => r.code(),
        }
    }
}

pub fn activate(lic: &License, req: &ActivateInput<'_>) -> ActivateOutcome {
    if lic.block {
        return ActivateOutcome::Rejected(Reject::Blocked);
    }
    if req.floating_interval > 0 {
        activate_floating(lic, req)
    } else {
        activate_node_locked(lic, req)
    }
}

fn new_machine(req: &ActivateInput<'_>, kind: MachineKind, floating_expires: UnixTime) -> Machine {
    Machine {
        machine_code: req.machine_code.to_owned(),
        kind,
        ip: req.ip.to_owned(),
        proxy_ip: req.proxy_ip.clone(),
        time: req.now,
        friendly_name: req.friendly_name.to_owned(),
        floating_expires,
    }
}

fn activate_node_locked(lic: &License, req: &ActivateInput<'_>) -> ActivateOutcome {
    if lic
        .node_locked()
        .any(|m| m.machine_code == req.machine_code)
    {
        return accepted(StateCode::ACTIVATE_KNOWN, Change::None);
    }
    if lic.max_no_of_machines <= 0 {
        return accepted(StateCode::ACTIVATE_UNLIMITED, Change::None);
    }
    let used = lic.node_locked().count() as i64;
    // AllowedMachines are admitted even above the limit.
    if used >= lic.max_no_of_machines && !lic.is_allowed_machine(req.machine_code) {
        return ActivateOutcome::Rejected(Reject::Limit);
    }
    let m = new_machine(req, MachineKind::NodeLocked, 0);
    if lic.trial_activation {
        let expires = req.now + lic.period * DAY_SECONDS;
        accepted(
            StateCode::ACTIVATE_TRIAL,
            Change::UpsertWithExpiry(m, expires),
        )
    } else {
        accepted(StateCode::ACTIVATE_NEW, Change::Upsert(m))
    }
}

fn activate_floating(lic: &License, req: &ActivateInput<'_>) -> ActivateOutcome {
    let now = req.now;
    let lease_end = now + req.floating_interval;
    if lic.max_no_of_machines <= 0 {
        let m = new_machine(req, MachineKind::Floating, lease_end);
        return accepted(StateCode::ACTIVATE_FLOATING, Change::Transient(m));
    }
    if let Some(cur) = lic
        .active_floating(now)
        .find(|m| m.machine_code == req.machine_code)
    {
        // A heartbeat: extend the lease, keep the seat family and first-activation time.
        let mut m = cur.clone();
        m.floating_expires = lease_end;
        let code = if m.kind == MachineKind::Overdraft {
            StateCode::ACTIVATE_OVERDRAFT
        } else {
            StateCode::ACTIVATE_FLOATING
        };
        return accepted(code, Change::Upsert(m));
    }
    let active = lic.active_floating(now).count() as i64;
    if active < lic.max_no_of_machines {
        let m = new_machine(req, MachineKind::Floating, lease_end);
        accepted(StateCode::ACTIVATE_FLOATING, Change::Upsert(m))
    } else if req.max_overdraft > 0 && active < lic.max_no_of_machines + req.max_overdraft {
        let m = new_machine(req, MachineKind::Overdraft, lease_end);
        accepted(StateCode::ACTIVATE_OVERDRAFT, Change::Upsert(m))
    } else {
        ActivateOutcome::Rejected(Reject::FloatingLimit)
    }
}

fn accepted(code: StateCode, change: Change) -> ActivateOutcome {
    ActivateOutcome::Accepted { code, change }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeactivateOutcome {
    /// The node-locked activation was removed.
    Removed,
    /// The floating seat (if any) was released; never an error.
    FloatingReleased {
        removed: bool,
    },
    Blocked,
    NotActivated,
}

impl DeactivateOutcome {
    pub fn code(&self) -> StateCode {
        match self {
            DeactivateOutcome::Removed => StateCode::DEACTIVATE_OK,
            DeactivateOutcome::FloatingReleased { .. } => StateCode::DEACTIVATE_FLOATING_OK,
            DeactivateOutcome::Blocked | DeactivateOutcome::NotActivated => {
                StateCode::DEACTIVATE_FAILED
            }
        }
    }
}

pub fn deactivate(lic: &License, machine_code: &str, floating: bool) -> DeactivateOutcome {
    if lic.block {
        return DeactivateOutcome::Blocked;
    }
    if floating {
        let removed = lic
            .machines
            .iter()
            .any(|m| m.is_floating() && m.machine_code == machine_code);
        DeactivateOutcome::FloatingReleased { removed }
    } else if lic.node_locked().any(|m| m.machine_code == machine_code) {
        DeactivateOutcome::Removed
    } else {
        DeactivateOutcome::NotActivated
    }
}

/// `License::apply` on a machine list and `Expires` alone (distributed mode builds the next
/// snapshot with it, without copying the rest of the license). False for a change that
/// writes nothing.
pub fn apply_change(
    machines: &mut Vec<Machine>,
    expires: &mut UnixTime,
    change: &Change,
    now: UnixTime,
) -> bool {
    let (m, new_expires) = match change {
        Change::None | Change::Transient(_) => return false,
        Change::Upsert(m) => (m, None),
        Change::UpsertWithExpiry(m, e) => (m, Some(*e)),
    };
    if let Some(e) = new_expires {
        *expires = e;
    }
    if m.is_floating() {
        machines.retain(|x| !x.is_floating() || x.floating_expires > now);
    }
    let same =
        |x: &&mut Machine| x.is_floating() == m.is_floating() && x.machine_code == m.machine_code;
    match machines.iter_mut().find(same) {
        Some(x) => *x = m.clone(),
        None => machines.push(m.clone()),
    }
    true
}

impl License {
    /// Applies an accepted activation. Expired floating leases are pruned here so a license's
    /// list stays bounded by its seat count (the store prunes the same rows, see
    /// `StoreEvent::FloatingExpired`). A renewed or re-recorded machine keeps its list position,
    /// as its store row keeps its `seq`.
    pub fn apply(&mut self, change: &Change, now: UnixTime) {
        if apply_change(&mut self.machines, &mut self.expires, change, now) {
            self.version += 1;
        }
    }

    /// Removes the activation(s) a deactivation releases; returns whether anything went.
    pub fn remove_machine(&mut self, machine_code: &str, floating: bool) -> bool {
        let before = self.machines.len();
        self.machines
            .retain(|m| m.is_floating() != floating || m.machine_code != machine_code);
        let removed = self.machines.len() != before;
        if removed {
            self.version += 1;
        }
        removed
    }

    /// Removes every activation (either seat family) matching `erase`; returns how many went.
    pub fn remove_machines_where(&mut self, erase: impl Fn(&Machine) -> bool) -> usize {
        let before = self.machines.len();
        self.machines.retain(|m| !erase(m));
        let removed = before - self.machines.len();
        if removed > 0 {
            self.version += 1;
        }
        removed
    }

    /// Blanks the IP of every activation `erase` picks; returns how many changed.
    pub fn blank_ips_where(&mut self, erase: impl Fn(&Machine) -> bool) -> usize {
        let mut changed = 0;
        for m in &mut self.machines {
            if !m.ip.is_empty() && erase(m) {
                m.ip.clear();
                changed += 1;
            }
        }
        if changed > 0 {
            self.version += 1;
        }
        changed
    }

    /// The activations a response lists.
    ///
    /// ModelVersion 3 lists node-locked and active floating seats; older versions list the
    /// node-locked ones plus only the calling floating device. When ActivatedMachines is masked,
    /// only the calling machine's own entry is returned.
    pub fn visible_machines<'a>(
        &'a self,
        model_version: i64,
        caller: Option<&'a Machine>,
        masked: bool,
        now: UnixTime,
    ) -> Vec<&'a Machine> {
        if masked {
            return caller.into_iter().collect();
        }
        let mut out: Vec<&Machine> = if model_version >= 3 {
            self.machines
                .iter()
                .filter(|m| !m.is_floating() || m.floating_expires > now)
                .collect()
        } else {
            self.node_locked().collect()
        };
        if let Some(c) = caller {
            if c.is_floating() && !out.iter().any(|m| std::ptr::eq(*m, c) || *m == c) {
                out.push(c);
            }
        }
        out
    }
}
