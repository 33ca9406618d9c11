//! The Cryptolens Web API v3 wire format: the `licenseKey` JSON bytes, the response envelopes,
//! the signed `metadata` object and the `<RSAKeyValue>` public key.
//!
//! The license JSON is written by hand, field by field, because clients verify a signature
//! over these exact bytes and our output must match the real service's byte for byte
//! (Newtonsoft.Json: compact, PascalCase, fixed field order, non-ASCII unescaped). The
//! conformance test decodes 1024 real responses and re-encodes them identically.

mod decode;
mod json;

pub use decode::{decode_license, DecodedLicense};
pub use json::{write_json_string, write_newtonsoft_string};

use crate::domain::{License, Machine, Mask};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// Everything that determines the `licenseKey` bytes of one response.
pub struct LicenseView<'a> {
    pub license: &'a License,
    /// Already selected by `License::visible_machines`.
    pub machines: &'a [&'a Machine],
    pub model_version: i64,
    pub mask: Mask,
    pub sign_date: i64,
}

/// Decimal digits, written by serde_json's integer formatter straight into `out`: an answer
/// has a dozen integers and more per machine, and `to_string` would allocate for each.
fn push_int(out: &mut Vec<u8>, v: i64) {
    serde_json::to_writer(&mut *out, &v).expect("writing to a Vec does not fail");
}

fn push_bool(out: &mut Vec<u8>, v: bool) {
    out.extend_from_slice(if v { b"true" } else { b"false" });
}

fn push_opt_str(out: &mut Vec<u8>, v: Option<&str>) {
    match v {
        Some(s) => write_newtonsoft_string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

/// Encodes the license object exactly as Cryptolens does.
pub fn encode_license(v: &LicenseView<'_>, out: &mut Vec<u8>) {
    let l = v.license;
    let m = v.mask;
    out.extend_from_slice(b"{\"ProductId\":");
    push_int(out, l.product_id);
    out.extend_from_slice(b",\"ID\":");
    push_int(out, if m.hides(Mask::ID) { 0 } else { l.id });
    out.extend_from_slice(b",\"Key\":");
    push_opt_str(out, (!m.hides(Mask::KEY)).then_some(l.key.as_str()));
    out.extend_from_slice(b",\"Created\":");
    push_int(out, l.created);
    out.extend_from_slice(b",\"Expires\":");
    push_int(out, l.expires);
    out.extend_from_slice(b",\"Period\":");
    push_int(out, l.period);
    for n in 1..=8u8 {
        out.extend_from_slice(b",\"F");
        out.push(b'0' + n);
        out.extend_from_slice(b"\":");
        push_bool(out, l.features.get(n));
    }
    out.extend_from_slice(b",\"Notes\":");
    push_opt_str(
        out,
        if m.hides(Mask::NOTES) {
            None
        } else {
            l.notes.as_deref()
        },
    );
    out.extend_from_slice(b",\"Block\":");
    push_bool(out, l.block);
    out.extend_from_slice(b",\"GlobalId\":");
    push_int(
        out,
        if m.hides(Mask::GLOBAL_ID) {
            0
        } else {
            l.global_id
        },
    );
    out.extend_from_slice(b",\"Customer\":");
    match (&l.customer, m.hides(Mask::CUSTOMER)) {
        (Some(c), false) => {
            out.extend_from_slice(b"{\"Id\":");
            push_int(out, c.id);
            out.extend_from_slice(b",\"Name\":");
            push_opt_str(out, c.name.as_deref());
            out.extend_from_slice(b",\"Email\":");
            push_opt_str(out, c.email.as_deref());
            out.extend_from_slice(b",\"CompanyName\":");
            push_opt_str(out, c.company_name.as_deref());
            out.extend_from_slice(b",\"Created\":");
            push_int(out, c.created);
            out.push(b'}');
        }
        _ => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"ActivatedMachines\":[");
    for (i, mach) in v.machines.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        encode_machine(mach, v.model_version, out);
    }
    out.extend_from_slice(b"],\"TrialActivation\":");
    push_bool(out, l.trial_activation);
    out.extend_from_slice(b",\"MaxNoOfMachines\":");
    push_int(
        out,
        if m.hides(Mask::MAX_NO_OF_MACHINES) {
            0
        } else {
            l.max_no_of_machines
        },
    );
    out.extend_from_slice(b",\"AllowedMachines\":");
    write_newtonsoft_string(
        out,
        if m.hides(Mask::ALLOWED_MACHINES) {
            ""
        } else {
            &l.allowed_machines
        },
    );
    out.extend_from_slice(b",\"DataObjects\":[");
    if !m.hides(Mask::DATA_OBJECTS) {
        for (i, d) in l.data_objects.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"Id\":");
            push_int(out, d.id);
            out.extend_from_slice(b",\"Name\":");
            write_newtonsoft_string(out, &d.name);
            out.extend_from_slice(b",\"StringValue\":");
            write_newtonsoft_string(out, &d.string_value);
            out.extend_from_slice(b",\"IntValue\":");
            push_int(out, d.int_value);
            out.push(b'}');
        }
    }
    out.push(b']');
    if v.model_version >= 3 {
        out.extend_from_slice(b",\"Reseller\":null");
    }
    out.extend_from_slice(b",\"SignDate\":");
    push_int(out, v.sign_date);
    out.push(b'}');
}

fn encode_machine(mach: &Machine, model_version: i64, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"Mid\":");
    write_newtonsoft_string(out, &mach.mid());
    if model_version >= 2 {
        out.extend_from_slice(b",\"FriendlyName\":");
        write_newtonsoft_string(out, &mach.friendly_name);
    }
    out.extend_from_slice(b",\"IP\":");
    write_newtonsoft_string(out, &mach.ip);
    out.extend_from_slice(b",\"Time\":");
    push_int(out, mach.time);
    if model_version >= 2 {
        out.extend_from_slice(b",\"FloatingExpires\":");
        push_int(out, mach.floating_expires);
    }
    out.push(b'}');
}

/// `{"licenseKey":..,"signature":..,"result":0,"message":""}` plus `metadata` when asked for.
pub fn license_response(license_json: &[u8], signature: &[u8], metadata: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(license_json.len() * 4 / 3 + 512);
    out.extend_from_slice(b"{\"licenseKey\":\"");
    out.extend_from_slice(B64.encode(license_json).as_bytes());
    out.extend_from_slice(b"\",\"signature\":\"");
    out.extend_from_slice(B64.encode(signature).as_bytes());
    out.extend_from_slice(b"\",\"result\":0,\"message\":\"\"");
    if let Some(md) = metadata {
        out.extend_from_slice(b",\"metadata\":");
        out.extend_from_slice(md);
    }
    out.push(b'}');
    out
}

/// `{"result":0,"message":""}`.
pub fn ok_response() -> Vec<u8> {
    br#"{"result":0,"message":""}"#.to_vec()
}

/// CreateTrialKey's `{"key":"...","result":0,"message":""}`.
pub fn key_response(key: &str) -> Vec<u8> {
    let mut out = b"{\"key\":".to_vec();
    write_json_string(&mut out, key);
    out.extend_from_slice(b",\"result\":0,\"message\":\"\"}");
    out
}

/// One GetWebAPILog entry, as `web_api_log_response` writes it.
pub struct WebApiLogEntry<'a> {
    pub id: i64,
    pub product_id: Option<i64>,
    pub key: Option<&'a str>,
    pub ip: &'a str,
    pub time: i64,
    pub state: u16,
    pub machine_code: &'a str,
    pub friendly_name: &'a str,
    pub floating_expires: i64,
}

/// `{"logs":[...],"result":0,"message":""}`. Entries carry the fields of Cryptolens'
/// `WebAPILog` in lower camel case; the data-object fields (`doIntValue`, `doId`) are 0, as
/// Keygate has no data-object methods.
pub fn web_api_log_response(entries: &[WebApiLogEntry<'_>]) -> Vec<u8> {
    let mut out = b"{\"logs\":[".to_vec();
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(
            format!(
                "{{\"id\":{},\"productId\":{},\"key\":",
                e.id,
                e.product_id.unwrap_or(0)
            )
            .as_bytes(),
        );
        match e.key {
            Some(k) => write_json_string(&mut out, k),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"ip\":");
        write_json_string(&mut out, e.ip);
        out.extend_from_slice(
            format!(
                ",\"time\":{},\"state\":{},\"machineCode\":",
                e.time, e.state
            )
            .as_bytes(),
        );
        write_json_string(&mut out, e.machine_code);
        out.extend_from_slice(b",\"friendlyName\":");
        write_json_string(&mut out, e.friendly_name);
        out.extend_from_slice(
            format!(
                ",\"floatingExpires\":{},\"doIntValue\":0,\"doId\":0}}",
                e.floating_expires
            )
            .as_bytes(),
        );
    }
    out.extend_from_slice(b"],\"result\":0,\"message\":\"\"}");
    out
}

/// `{"result":1,"message":"..."}`: the one error shape every client understands.
pub fn error_response(message: &str) -> Vec<u8> {
    let mut out = b"{\"result\":1,\"message\":".to_vec();
    write_json_string(&mut out, message);
    out.push(b'}');
    out
}

/// The license status reported in `metadata` (§2.5 of the reference).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LicenseStatus {
    pub is_valid: bool,
    /// 0 none, 1 expired, 2 blocked.
    pub reason_for_invalidity: i64,
    pub trial: bool,
    pub time_limited: bool,
    pub time_left_days: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Metadata {
    pub activated_machines: i64,
    pub status: LicenseStatus,
    pub used_floating_machines: i64,
}

/// The bytes signed inside `metadata.signature` (`Data`): PascalCase so .NET's
/// case-insensitive comparison with the outer object holds.
pub fn metadata_data(md: &Metadata) -> Vec<u8> {
    let s = &md.status;
    format!(
        "{{\"ActivatedMachines\":{},\"LicenseStatus\":{{\"IsValid\":{},\"ReasonForInvalidity\":{},\"Trial\":{},\"TimeLimited\":{},\"TimeLeft\":{}}},\"UsedFloatingMachines\":{}}}",
        md.activated_machines, s.is_valid, s.reason_for_invalidity, s.trial, s.time_limited, s.time_left_days, md.used_floating_machines
    )
    .into_bytes()
}

/// The outer `metadata` object. `data` is `metadata_data(md)`, `data_signature` its SHA-512
/// PKCS#1 signature, `date` the signing time.
pub fn metadata_object(md: &Metadata, data: &[u8], data_signature: &[u8], date: i64) -> Vec<u8> {
    let inner = format!(
        "{{\"Data\":\"{}\",\"Signature\":\"{}\",\"Date\":{},\"Version\":1}}",
        B64.encode(data),
        B64.encode(data_signature),
        date
    );
    let s = &md.status;
    format!(
        "{{\"activatedMachines\":{},\"licenseStatus\":{{\"isValid\":{},\"reasonForInvalidity\":{},\"trial\":{},\"timeLimited\":{},\"timeLeft\":{}}},\"usedFloatingMachines\":{},\"signature\":\"{}\"}}",
        md.activated_machines, s.is_valid, s.reason_for_invalidity, s.trial, s.time_limited, s.time_left_days, md.used_floating_machines,
        B64.encode(inner.as_bytes())
    )
    .into_bytes()
}

/// The public key as .NET's `RSA.ToXmlString(false)`: what every Cryptolens SDK parses.
pub fn rsa_key_value_xml(modulus: &[u8], exponent: &[u8]) -> String {
    format!(
        "<RSAKeyValue><Modulus>{}</Modulus><Exponent>{}</Exponent></RSAKeyValue>",
        B64.encode(modulus),
        B64.encode(exponent)
    )
}

#[cfg(test)]
mod tests;
