//! Reading a `licenseKey` JSON produced by Cryptolens (or by us) back into the model.
//! Used by the conformance test and by `keygate` tooling that inspects responses.

use crate::domain::{Customer, DataObject, Features, License, Machine, MachineKind};
use serde_json::Value;

pub struct DecodedLicense {
    pub license: License,
    pub sign_date: i64,
    /// 3 when the object carries `Reseller`, 2 when machines carry `FriendlyName`, else 1.
    pub model_version: i64,
}

fn int(v: &Value, k: &str) -> Result<i64, String> {
    v.get(k)
        .and_then(Value::as_i64)
        .ok_or_else(|| format!("{k}: expected an integer"))
}
fn string(v: &Value, k: &str) -> Result<String, String> {
    v.get(k)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("{k}: expected a string"))
}
fn opt_string(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).map(str::to_owned)
}
fn boolean(v: &Value, k: &str) -> Result<bool, String> {
    v.get(k)
        .and_then(Value::as_bool)
        .ok_or_else(|| format!("{k}: expected a bool"))
}

pub fn decode_license(bytes: &[u8]) -> Result<DecodedLicense, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut features = Features::default();
    for n in 1..=8u8 {
        features = features.with(n, boolean(&v, &format!("F{n}"))?);
    }
    let customer = match v.get("Customer") {
        Some(Value::Null) | None => None,
        Some(c) => Some(Customer {
            id: int(c, "Id")?,
            name: opt_string(c, "Name"),
            email: opt_string(c, "Email"),
            company_name: opt_string(c, "CompanyName"),
            created: int(c, "Created")?,
        }),
    };
    let mut model_version = if v.get("Reseller").is_some() { 3 } else { 1 };
    let mut machines = Vec::new();
    for m in v
        .get("ActivatedMachines")
        .and_then(Value::as_array)
        .ok_or("ActivatedMachines: expected an array")?
    {
        let mid = string(m, "Mid")?;
        let (kind, code) = if let Some(c) = mid.strip_prefix("floating:overdraft:") {
            (MachineKind::Overdraft, c)
        } else if let Some(c) = mid.strip_prefix("floating:") {
            (MachineKind::Floating, c)
        } else {
            (MachineKind::NodeLocked, mid.as_str())
        };
        if m.get("FriendlyName").is_some() && model_version < 2 {
            model_version = 2;
        }
        machines.push(Machine {
            machine_code: code.to_owned(),
            kind,
            ip: string(m, "IP")?,
            proxy_ip: "".into(),
            time: int(m, "Time")?,
            friendly_name: m
                .get("FriendlyName")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            floating_expires: m
                .get("FloatingExpires")
                .and_then(Value::as_i64)
                .unwrap_or(0),
        });
    }
    let mut data_objects = Vec::new();
    for d in v
        .get("DataObjects")
        .and_then(Value::as_array)
        .ok_or("DataObjects: expected an array")?
    {
        data_objects.push(DataObject {
            id: int(d, "Id")?,
            name: string(d, "Name")?,
            string_value: string(d, "StringValue")?,
            int_value: int(d, "IntValue")?,
        });
    }
    let license = License {
        product_id: int(&v, "ProductId")?,
        id: int(&v, "ID")?,
        global_id: int(&v, "GlobalId")?,
        key: string(&v, "Key")?,
        created: int(&v, "Created")?,
        expires: int(&v, "Expires")?,
        period: int(&v, "Period")?,
        features,
        notes: v.get("Notes").and_then(Value::as_str).map(str::to_owned),
        block: boolean(&v, "Block")?,
        customer: customer.map(Box::new),
        trial_activation: boolean(&v, "TrialActivation")?,
        max_no_of_machines: int(&v, "MaxNoOfMachines")?,
        allowed_machines: string(&v, "AllowedMachines")?,
        data_objects,
        machines,
        version: 0,
        shared_version: 0,
    };
    Ok(DecodedLicense {
        license,
        sign_date: int(&v, "SignDate")?,
        model_version,
    })
}
