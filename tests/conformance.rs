//! Byte-exact encoder conformance: every real Cryptolens response in
//! ../shared/conformance decodes into our model and encodes back to the identical bytes,
//! and its signature verifies with the recorded modulus.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use keygate::domain::{Machine, Mask};
use keygate::wire::{decode_license, encode_license, LicenseView};
use std::path::PathBuf;

fn shared(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/conformance")
        .join(name);
    assert!(
        p.exists(),
        "conformance data missing: {} (the repository expects shared/ beside it)",
        p.display()
    );
    p
}

/// Decodes `license_json`, encodes it again and returns the new bytes.
fn reencode(license_json: &[u8]) -> Vec<u8> {
    let d = decode_license(license_json).expect("decodes");
    let machines: Vec<&Machine> = d.license.machines.iter().collect();
    let mut out = Vec::new();
    encode_license(
        &LicenseView {
            license: &d.license,
            machines: &machines,
            model_version: d.model_version,
            mask: Mask(0),
            sign_date: d.sign_date,
        },
        &mut out,
    );
    out
}

#[test]
fn all_1024_activate_responses_reencode_byte_exact_and_verify() {
    let text = std::fs::read_to_string(shared("cryptolens-activate-responses.jsonl")).unwrap();
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        let case: serde_json::Value = serde_json::from_str(line).unwrap();
        let response: serde_json::Value = match &case["response"] {
            serde_json::Value::String(s) => serde_json::from_str(s).unwrap(),
            v => v.clone(),
        };
        assert_eq!(response["result"], 0, "case {i}");
        let lk = B64
            .decode(response["licenseKey"].as_str().unwrap())
            .unwrap();
        let sig = B64.decode(response["signature"].as_str().unwrap()).unwrap();
        let again = reencode(&lk);
        assert!(
            again == lk,
            "case {} differs:\n real: {}\n ours: {}",
            case["case"],
            String::from_utf8_lossy(&lk),
            String::from_utf8_lossy(&again)
        );
        let modulus = B64.decode(case["modulus"].as_str().unwrap()).unwrap();
        let exponent = B64.decode(case["exponent"].as_str().unwrap()).unwrap();
        assert!(
            keygate::signing::verify_sha256(&modulus, &exponent, &lk, &sig),
            "signature of case {i}"
        );
        // The key and product the case was activated with are what the license says.
        let d = decode_license(&lk).unwrap();
        assert_eq!(d.license.key, case["key"].as_str().unwrap());
        assert_eq!(d.license.product_id, case["product_id"].as_i64().unwrap());
        n += 1;
    }
    assert_eq!(n, 1024);
}

#[test]
fn model_version_3_sample_reencodes_byte_exact() {
    let skm: serde_json::Value = serde_json::from_slice(
        &std::fs::read(shared("cryptolens-modelversion3-license.skm")).unwrap(),
    )
    .unwrap();
    let lk = B64.decode(skm["licenseKey"].as_str().unwrap()).unwrap();
    let d = decode_license(&lk).unwrap();
    assert_eq!(d.model_version, 3);
    assert!(
        d.license.machines.len() > 100,
        "the sample lists many machines"
    );
    assert_eq!(reencode(&lk), lk);
}

#[test]
fn our_signatures_verify_like_the_sdks_expect() {
    let der = keygate::signing::generate_pkcs8().unwrap();
    let s = keygate::signing::Signer::from_pkcs8(&der).unwrap();
    let xml = s.public_key_xml();
    assert!(
        xml.starts_with("<RSAKeyValue><Modulus>")
            && xml.ends_with("</Modulus><Exponent>AQAB</Exponent></RSAKeyValue>")
    );
    let m = &xml["<RSAKeyValue><Modulus>".len()..xml.find("</Modulus>").unwrap()];
    let modulus = B64.decode(m).unwrap();
    assert_eq!(
        modulus.len(),
        256,
        "RSA-2048: Python hard-codes a 256-byte modulus"
    );
    let msg = br#"{"ProductId":1}"#;
    let sig = s.sign_sha256(msg).unwrap();
    assert!(keygate::signing::verify_sha256(
        &modulus,
        &[1, 0, 1],
        msg,
        &sig
    ));
    assert!(!keygate::signing::verify_sha256(
        &modulus,
        &[1, 0, 1],
        b"tampered",
        &sig
    ));
    let sig512 = s.sign_sha512(msg).unwrap();
    assert!(keygate::signing::verify_sha512(
        &modulus,
        &[1, 0, 1],
        msg,
        &sig512
    ));
    // PKCS#1 v1.5 is deterministic.
    assert_eq!(s.sign_sha256(msg).unwrap(), sig);
}
