//! Encoder unit tests; the byte-exact check against real responses is tests/conformance.rs.

use super::*;
use crate::domain::{Customer, DataObject, Features, License, Machine, MachineKind, Mask};

fn sample() -> License {
    License {
        product_id: 4848,
        id: 441,
        global_id: 54722,
        key: "DUKWC-OHSAQ-NLSFN-PNNZD".into(),
        created: 1565801498,
        expires: 3609085340,
        period: 23649,
        features: Features(0b0110_0001),
        notes: Some("Ls1LLAlL1E".into()),
        block: false,
        customer: Some(Box::new(Customer {
            id: 6569,
            name: Some("K0Pujy2sHne6qXQ40sd".into()),
            email: Some("9sXA1WyELzFOVZro".into()),
            company_name: Some("U0mP6uQtIGpRHW375".into()),
            created: 1565801498,
        })),
        trial_activation: true,
        max_no_of_machines: 1,
        version: 0,
        shared_version: 0,
        allowed_machines: String::new(),
        data_objects: vec![DataObject {
            id: 4484,
            name: "6".into(),
            string_value: "UUocTrSTGAi".into(),
            int_value: 805064,
        }],
        machines: vec![Machine {
            machine_code: "a".into(),
            kind: MachineKind::NodeLocked,
            ip: "158.174.10.218".into(),
            proxy_ip: "10.1.1.1".into(),
            time: 1565811740,
            friendly_name: String::new(),
            floating_expires: 0,
        }],
    }
}

fn encode_str(l: &License, mv: i64, mask: Mask) -> String {
    let machines: Vec<&Machine> = l.machines.iter().collect();
    let mut out = Vec::new();
    encode_license(
        &LicenseView {
            license: l,
            machines: &machines,
            model_version: mv,
            mask,
            sign_date: 1570461018,
        },
        &mut out,
    );
    String::from_utf8(out).unwrap()
}

#[test]
fn reference_sample_model_version_1() {
    // The decoded real response quoted in the reference, §2.1.
    let want = r#"{"ProductId":4848,"ID":441,"Key":"DUKWC-OHSAQ-NLSFN-PNNZD","Created":1565801498,"Expires":3609085340,"Period":23649,"F1":true,"F2":false,"F3":false,"F4":false,"F5":false,"F6":true,"F7":true,"F8":false,"Notes":"Ls1LLAlL1E","Block":false,"GlobalId":54722,"Customer":{"Id":6569,"Name":"K0Pujy2sHne6qXQ40sd","Email":"9sXA1WyELzFOVZro","CompanyName":"U0mP6uQtIGpRHW375","Created":1565801498},"ActivatedMachines":[{"Mid":"a","IP":"158.174.10.218","Time":1565811740}],"TrialActivation":true,"MaxNoOfMachines":1,"AllowedMachines":"","DataObjects":[{"Id":4484,"Name":"6","StringValue":"UUocTrSTGAi","IntValue":805064}],"SignDate":1570461018}"#;
    assert_eq!(encode_str(&sample(), 1, Mask(0)), want);
}

#[test]
fn model_version_3_adds_reseller_and_machine_fields() {
    let s = encode_str(&sample(), 3, Mask(0));
    assert!(s.contains(r#"{"Mid":"a","FriendlyName":"","IP":"158.174.10.218","Time":1565811740,"FloatingExpires":0}"#), "{s}");
    assert!(
        s.ends_with(r#""Reseller":null,"SignDate":1570461018}"#),
        "{s}"
    );
    assert!(!s.contains("10.1.1.1"), "the proxy IP is never returned");
}

#[test]
fn masked_fields_stay_present_with_neutral_values() {
    let s = encode_str(&sample(), 3, Mask(511));
    for want in [
        r#""ID":0"#,
        r#""Key":null"#,
        r#""Notes":null"#,
        r#""GlobalId":0"#,
        r#""Customer":null"#,
        r#""MaxNoOfMachines":0"#,
        r#""AllowedMachines":"""#,
        r#""DataObjects":[]"#,
    ] {
        assert!(s.contains(want), "{want} missing in {s}");
    }
    // Still valid JSON with every key Python indexes.
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    for k in [
        "ProductId",
        "Created",
        "Expires",
        "Period",
        "F1",
        "F8",
        "Block",
        "TrialActivation",
        "SignDate",
        "ActivatedMachines",
    ] {
        assert!(v.get(k).is_some(), "{k}");
    }
}

/// The escaping rule written the plain way, one character at a time.
fn escape_by_chars(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{0}'..='\u{1f}' | '\u{85}' | '\u{2028}' | '\u{2029}' => {
                out.push_str(&format!("\\u{:04x}", ch as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[test]
fn newtonsoft_escaping_matches_the_rule_on_random_strings() {
    // Characters near every boundary the byte scanner looks at (lead bytes 0xC2 and 0xE2
    // with other continuations), mixed at random.
    let alphabet: Vec<char> = "aZ09 \"\\\n\r\t\u{0}\u{8}\u{b}\u{c}\u{1f}\u{7f}\u{80}\u{84}\u{85}\u{86}\u{a0}éß\u{2000}\u{2027}\u{2028}\u{2029}\u{202a}\u{20ac}€😀"
        .chars()
        .collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..40_000 {
        // Short strings of anything, and longer plain runs with a few characters mixed in
        // (the scanner skips eight bytes at a time).
        let (len, plain) = if round % 2 == 0 {
            (next() % 12, 0)
        } else {
            (next() % 48, 7)
        };
        let s: String = (0..len)
            .map(|_| match next() % (plain + 1) {
                0 => alphabet[(next() % alphabet.len() as u64) as usize],
                _ => 'p',
            })
            .collect();
        let mut out = Vec::new();
        write_newtonsoft_string(&mut out, &s);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            escape_by_chars(&s),
            "{s:?}"
        );
    }
}

#[test]
fn newtonsoft_escaping() {
    let mut out = Vec::new();
    write_newtonsoft_string(&mut out, "a\"b\\c\nd\te\u{1}f\u{7f}g\u{85}h\u{2028}é<>&'");
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "\"a\\\"b\\\\c\\nd\\te\\u0001f\u{7f}g\\u0085h\\u2028é<>&'\""
    );
}

#[test]
fn envelopes() {
    assert_eq!(
        error_response("Access denied."),
        br#"{"result":1,"message":"Access denied."}"#
    );
    assert_eq!(
        key_response("AB-CD"),
        br#"{"key":"AB-CD","result":0,"message":""}"#
    );
    let r = String::from_utf8(license_response(b"{}", &[1, 2], Some(b"null"))).unwrap();
    assert_eq!(
        r,
        r#"{"licenseKey":"e30=","signature":"AQI=","result":0,"message":"","metadata":null}"#
    );
}

#[test]
fn metadata_signature_is_base64_json_with_data_and_signature() {
    let md = Metadata {
        activated_machines: 2,
        status: LicenseStatus {
            is_valid: true,
            reason_for_invalidity: 0,
            trial: false,
            time_limited: true,
            time_left_days: 3,
        },
        used_floating_machines: 1,
    };
    let data = metadata_data(&md);
    let obj: serde_json::Value =
        serde_json::from_slice(&metadata_object(&md, &data, &[9, 9], 77)).unwrap();
    assert_eq!(obj["activatedMachines"], 2);
    assert_eq!(obj["licenseStatus"]["timeLeft"], 3);
    let inner = B64.decode(obj["signature"].as_str().unwrap()).unwrap();
    let inner: serde_json::Value = serde_json::from_slice(&inner).unwrap();
    assert_eq!(B64.decode(inner["Data"].as_str().unwrap()).unwrap(), data);
    assert_eq!(inner["Signature"], "CQk=");
    assert_eq!(inner["Date"], 77);
    let d: serde_json::Value = serde_json::from_slice(&data).unwrap();
    assert_eq!(d["LicenseStatus"]["TimeLimited"], true);
}

#[test]
fn decode_round_trips_our_output() {
    let l = sample();
    let s = encode_str(&l, 3, Mask(0));
    let d = decode_license(s.as_bytes()).unwrap();
    assert_eq!(d.model_version, 3);
    assert_eq!(d.sign_date, 1570461018);
    let mut want = l.clone();
    want.machines[0].proxy_ip = "".into();
    assert_eq!(d.license, want);
}

/// Integers are written as `to_string` writes them, at the edges and on a spread between.
#[test]
fn integers_are_written_as_std_formats_them() {
    let mut v: Vec<i64> = vec![
        0,
        1,
        -1,
        9,
        10,
        -10,
        99,
        100,
        i64::MAX,
        i64::MIN,
        i64::MIN + 1,
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for shift in 0..64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        v.push((x >> shift) as i64);
        v.push(-((x >> (shift + 1).min(63)) as i64));
    }
    for n in v {
        let mut out = b"x".to_vec();
        push_int(&mut out, n);
        assert_eq!(out, format!("x{n}").into_bytes(), "{n}");
    }
}
