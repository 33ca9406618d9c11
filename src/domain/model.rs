//! Plain data for a license key as Cryptolens models it, plus the activated machines.

/// Unix seconds (UTC). Cryptolens sends every date this way under `SignMethod=1`.
pub type UnixTime = i64;

/// Seconds in a day; periods are whole days.
pub const DAY_SECONDS: i64 = 86_400;

/// `F1`..`F8` as bits 0..7.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Features(pub u8);

impl Features {
    pub fn get(self, n: u8) -> bool {
        (1..=8).contains(&n) && self.0 & (1 << (n - 1)) != 0
    }
    pub fn with(self, n: u8, on: bool) -> Self {
        if !(1..=8).contains(&n) {
            return self;
        }
        let bit = 1 << (n - 1);
        Features(if on { self.0 | bit } else { self.0 & !bit })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Customer {
    pub id: i64,
    /// Cryptolens sends `null` for an unset email or company; so do we.
    pub name: Option<String>,
    pub email: Option<String>,
    pub company_name: Option<String>,
    pub created: UnixTime,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataObject {
    pub id: i64,
    pub name: String,
    pub string_value: String,
    pub int_value: i64,
}

/// Whether an activation holds a node-locked seat or a floating (leased) one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MachineKind {
    NodeLocked,
    Floating,
    /// A floating seat granted above `MaxNoOfMachines` through `MaxOverdraft`.
    Overdraft,
}

impl MachineKind {
    /// The prefix Cryptolens puts before the machine code in `Mid`. Python's
    /// `IsOnRightMachine` strips 9 characters for floating and 19 for overdraft seats.
    pub fn mid_prefix(self) -> &'static str {
        match self {
            MachineKind::NodeLocked => "",
            MachineKind::Floating => "floating:",
            MachineKind::Overdraft => "floating:overdraft:",
        }
    }
    pub fn as_i64(self) -> i64 {
        match self {
            MachineKind::NodeLocked => 0,
            MachineKind::Floating => 1,
            MachineKind::Overdraft => 2,
        }
    }
    pub fn from_i64(v: i64) -> Self {
        match v {
            1 => MachineKind::Floating,
            2 => MachineKind::Overdraft,
            _ => MachineKind::NodeLocked,
        }
    }
}

/// One activated device. `machine_code` is what the client sent; `Mid` on the wire is
/// `kind.mid_prefix() + machine_code`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    pub machine_code: String,
    pub kind: MachineKind,
    /// Client IP as seen by the edge node.
    pub ip: String,
    /// The edge node's own address that served the activation; stored, never returned.
    pub proxy_ip: std::sync::Arc<str>,
    /// First activation (kept on re-activation).
    pub time: UnixTime,
    pub friendly_name: String,
    /// Lease end for floating seats, 0 for node-locked ones.
    pub floating_expires: UnixTime,
}

impl Machine {
    pub fn mid(&self) -> String {
        let mut s = String::with_capacity(self.kind.mid_prefix().len() + self.machine_code.len());
        s.push_str(self.kind.mid_prefix());
        s.push_str(&self.machine_code);
        s
    }
    pub fn is_floating(&self) -> bool {
        self.kind != MachineKind::NodeLocked
    }
}

/// A license key with everything Cryptolens returns about it, and its activations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct License {
    pub product_id: i64,
    /// Per-product key number (`ID`).
    pub id: i64,
    pub global_id: i64,
    pub key: String,
    pub created: UnixTime,
    pub expires: UnixTime,
    pub period: i64,
    pub features: Features,
    pub notes: Option<String>,
    pub block: bool,
    /// Boxed: most licenses have none, and inline it would make every license 80 bytes larger.
    pub customer: Option<Box<Customer>>,
    pub trial_activation: bool,
    pub max_no_of_machines: i64,
    /// Newline-separated machine codes that may always activate.
    pub allowed_machines: String,
    pub data_objects: Vec<DataObject>,
    /// Node-locked and floating activations, in activation order.
    pub machines: Vec<Machine>,
    /// Bumped by every change to this license in memory (`apply`, `remove_machine`, a reload):
    /// with the time, it identifies everything an answer about the license depends on.
    pub version: u64,
    /// In distributed mode, the version of these activations in Redis (0: not known there
    /// yet). A node only installs a newer one (version fence).
    pub shared_version: u64,
}

impl License {
    pub fn is_allowed_machine(&self, machine_code: &str) -> bool {
        !machine_code.is_empty()
            && self
                .allowed_machines
                .split('\n')
                .any(|m| m.trim_end_matches('\r') == machine_code)
    }
    pub fn node_locked(&self) -> impl Iterator<Item = &Machine> {
        self.machines.iter().filter(|m| !m.is_floating())
    }
    /// Floating seats whose lease has not run out at `now`.
    pub fn active_floating(&self, now: UnixTime) -> impl Iterator<Item = &Machine> {
        self.machines
            .iter()
            .filter(move |m| m.is_floating() && m.floating_expires > now)
    }
}

/// Which fields a response hides (`FieldsToReturn`, or the token's feature lock).
///
/// Cryptolens does not publish its bit values; these follow the order of the nine fields the
/// C++ SDK treats as optional. A hidden field stays present with a neutral value (see `wire`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Mask(pub i64);

impl Mask {
    pub const ID: i64 = 1;
    pub const KEY: i64 = 2;
    pub const NOTES: i64 = 4;
    pub const GLOBAL_ID: i64 = 8;
    pub const CUSTOMER: i64 = 16;
    pub const ACTIVATED_MACHINES: i64 = 32;
    pub const MAX_NO_OF_MACHINES: i64 = 64;
    pub const ALLOWED_MACHINES: i64 = 128;
    pub const DATA_OBJECTS: i64 = 256;
    /// Our addition: hides the `metadata` object (it is then `null`).
    pub const METADATA: i64 = 512;

    pub fn hides(self, bit: i64) -> bool {
        self.0 & bit != 0
    }
}

/// What a read of the request log (GetWebAPILog) asks for beyond whose log it is: filters,
/// page size, cursor and order. The same from the decoded request to the store's query.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogFilter {
    /// Exact match.
    pub machine_code: Option<String>,
    /// Contained, case-insensitively.
    pub friendly_name: Option<String>,
    /// State codes; empty = all.
    pub states: Vec<u16>,
    pub limit: i64,
    /// Rows after this id in the chosen order (the next page).
    pub starting_after: Option<i64>,
    /// Rows before this id in the chosen order (the previous page).
    pub ending_before: Option<i64>,
    /// Newest first unless ascending.
    pub ascending: bool,
}
