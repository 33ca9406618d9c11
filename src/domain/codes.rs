//! Request-log state codes in the Cryptolens `GGSD` scheme: method group, success (1) or
//! failure (2), detail digit. Cryptolens publishes only some of them; the detail digits we
//! chose for the others are listed in ARCHITECTURE.md.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StateCode(pub u16);

impl StateCode {
    pub const GETKEY_OK: StateCode = StateCode(1010);
    pub const GETKEY_FAILED: StateCode = StateCode(1020);

    /// Activation of a machine that was already active.
    pub const ACTIVATE_KNOWN: StateCode = StateCode(2010);
    /// A new node-locked machine.
    pub const ACTIVATE_NEW: StateCode = StateCode(2011);
    /// Node locking off (`MaxNoOfMachines` = 0): nothing recorded.
    pub const ACTIVATE_UNLIMITED: StateCode = StateCode(2012);
    /// A new machine on a trial-activation key (expiry moved).
    pub const ACTIVATE_TRIAL: StateCode = StateCode(2013);
    pub const ACTIVATE_FLOATING: StateCode = StateCode(2014);
    pub const ACTIVATE_OVERDRAFT: StateCode = StateCode(2015);
    pub const ACTIVATE_FAILED: StateCode = StateCode(2020);
    pub const ACTIVATE_LIMIT: StateCode = StateCode(2021);
    pub const ACTIVATE_BLOCKED: StateCode = StateCode(2022);
    pub const ACTIVATE_FLOATING_LIMIT: StateCode = StateCode(2024);

    pub const TRIAL_CREATED: StateCode = StateCode(3010);
    pub const TRIAL_REUSED: StateCode = StateCode(3011);
    pub const TRIAL_FAILED: StateCode = StateCode(3020);

    /// GetWebAPILog answered (a read: group 50, "none").
    pub const LOG_READ_OK: StateCode = StateCode(5011);
    /// Anything that never reached a method (unknown path, undecodable request), and a
    /// refused GetWebAPILog.
    pub const OTHER_FAILED: StateCode = StateCode(5020);

    pub const DEACTIVATE_OK: StateCode = StateCode(6010);
    pub const DEACTIVATE_FLOATING_OK: StateCode = StateCode(6011);
    pub const DEACTIVATE_FAILED: StateCode = StateCode(6020);
}
