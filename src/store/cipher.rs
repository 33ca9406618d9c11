//! Encryption at rest of personal fields (machine codes, IPs, friendly names, customer names,
//! emails and companies, trial machine codes) and of tenants' signing keys.
//!
//! A field is stored as `enc1:<key id>:<base64(nonce ‖ ciphertext ‖ tag)>`, AES-256-GCM. The
//! nonce is an HMAC-SHA256 of the plaintext under a second key derived from the same secret
//! (a synthetic IV, as in SIV): the same value always encrypts to the same text under one key.
//! That is the keyed hash behind equality lookups: a query for a machine code compares
//! ciphertexts, so primary keys, `ON CONFLICT` and unique indexes keep working, and nothing
//! else about the value leaks but its equality with other values. Two different values never
//! share a nonce unless HMAC-SHA256 collides.
//!
//! Keys come from a file (`privacy.encryption_key_file`): one `<id> <base64 of 32 bytes>` per
//! line, the first one encrypts, all of them decrypt. Rotation: put a new key first, run
//! `keygate privacy rotate-key` (re-encrypts every field under it), then drop the old line.
//! Values without the prefix are plaintext (a store from before encryption was turned on) and
//! are read as they are.

use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use aws_lc_rs::hmac;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use std::path::Path;

const PREFIX: &str = "enc1:";
/// Bytes fields (signing keys) carry the same prefix as raw bytes.
const BYTES_PREFIX: &[u8] = b"enc1:";

struct Key {
    id: String,
    aead: LessSafeKey,
    nonce: hmac::Key,
}

/// The keys of one node; `None` in `Store` means encryption is off.
pub struct Keyring {
    keys: Vec<Key>,
}

#[derive(Debug, thiserror::Error)]
pub enum CipherError {
    #[error("encryption key file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("a stored value is encrypted with key {0:?}, which is not in the key file")]
    UnknownKey(String),
    #[error("a stored encrypted value is damaged or was not made with these keys")]
    Damaged,
    #[error("a stored value is encrypted but no privacy.encryption_key_file is configured")]
    NoKeys,
}

fn derive(secret: &[u8], label: &[u8]) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, secret), label)
}

impl Keyring {
    /// Parses the key file's text (see the module docs).
    pub fn parse(text: &str) -> Result<Keyring, String> {
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (id, b64) = line
                .split_once(char::is_whitespace)
                .ok_or(format!("line {}: expected `<id> <base64 key>`", n + 1))?;
            if id.is_empty() || id.contains(':') || id.len() > 32 {
                return Err(format!(
                    "line {}: the key id must be 1-32 characters without ':'",
                    n + 1
                ));
            }
            let secret = B64
                .decode(b64.trim())
                .map_err(|_| format!("line {}: the key is not base64", n + 1))?;
            if secret.len() != 32 {
                return Err(format!("line {}: the key must be 32 bytes", n + 1));
            }
            if keys.iter().any(|k: &Key| k.id == id) {
                return Err(format!("line {}: key id {id:?} appears twice", n + 1));
            }
            let enc = derive(&secret, b"keygate/v1/aes-256-gcm");
            let nonce = derive(&secret, b"keygate/v1/synthetic-iv");
            keys.push(Key {
                id: id.to_owned(),
                aead: LessSafeKey::new(
                    UnboundKey::new(&AES_256_GCM, enc.as_ref()).map_err(|_| "bad key")?,
                ),
                nonce: hmac::Key::new(hmac::HMAC_SHA256, nonce.as_ref()),
            });
        }
        if keys.is_empty() {
            return Err("no key in the file".into());
        }
        Ok(Keyring { keys })
    }

    pub fn load(path: &Path) -> Result<Keyring, CipherError> {
        let err = |reason: String| CipherError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Keyring::parse(&text).map_err(err)
    }

    /// A new key file line: `<id> <base64 of 32 random bytes>`.
    pub fn new_key_line(id: &str) -> String {
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::fill(&mut secret).expect("system randomness");
        format!("{id} {}", B64.encode(secret))
    }

    pub fn current_id(&self) -> &str {
        &self.keys[0].id
    }

    fn seal_with(k: &Key, plain: &[u8]) -> Vec<u8> {
        let tag = hmac::sign(&k.nonce, plain);
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&tag.as_ref()[..NONCE_LEN]);
        let mut buf = plain.to_vec();
        k.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(k.id.as_bytes()),
                &mut buf,
            )
            .expect("AES-GCM sealing cannot fail for these sizes");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        out
    }

    fn seal_text_with(k: &Key, plain: &str) -> String {
        if plain.is_empty() {
            // Blank stays blank: retention and erasure blank fields, and look for blanks.
            return String::new();
        }
        format!(
            "{PREFIX}{}:{}",
            k.id,
            B64.encode(Self::seal_with(k, plain.as_bytes()))
        )
    }

    /// The stored form of a text field under the current key.
    pub fn seal_text(&self, plain: &str) -> String {
        Self::seal_text_with(&self.keys[0], plain)
    }

    /// Every form `plain` can have in the store: under each key, and as plaintext (rows from
    /// before encryption, or not yet rotated). Equality lookups match any of them.
    pub fn lookup_forms(&self, plain: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .keys
            .iter()
            .map(|k| Self::seal_text_with(k, plain))
            .collect();
        v.push(plain.to_owned());
        v.dedup();
        v
    }

    fn open_with(&self, id: &str, sealed: &[u8]) -> Result<Vec<u8>, CipherError> {
        let k = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or_else(|| CipherError::UnknownKey(id.to_owned()))?;
        if sealed.len() < NONCE_LEN {
            return Err(CipherError::Damaged);
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let mut buf = body.to_vec();
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| CipherError::Damaged)?;
        let plain = k
            .aead
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut buf)
            .map_err(|_| CipherError::Damaged)?;
        Ok(plain.to_vec())
    }

    pub fn seal_bytes(&self, plain: &[u8]) -> Vec<u8> {
        let k = &self.keys[0];
        let mut out = BYTES_PREFIX.to_vec();
        out.extend_from_slice(k.id.as_bytes());
        out.push(b':');
        out.extend_from_slice(&Self::seal_with(k, plain));
        out
    }
}

/// Reads a stored text field: decrypted when sealed, as it is otherwise.
pub fn open_text(ring: Option<&Keyring>, stored: String) -> Result<String, CipherError> {
    let Some(rest) = stored.strip_prefix(PREFIX) else {
        return Ok(stored);
    };
    let ring = ring.ok_or(CipherError::NoKeys)?;
    let (id, b64) = rest.split_once(':').ok_or(CipherError::Damaged)?;
    let sealed = B64.decode(b64).map_err(|_| CipherError::Damaged)?;
    String::from_utf8(ring.open_with(id, &sealed)?).map_err(|_| CipherError::Damaged)
}

/// Reads a stored bytes field (a signing key).
pub fn open_bytes(ring: Option<&Keyring>, stored: Vec<u8>) -> Result<Vec<u8>, CipherError> {
    let Some(rest) = stored.strip_prefix(BYTES_PREFIX) else {
        return Ok(stored);
    };
    let ring = ring.ok_or(CipherError::NoKeys)?;
    let colon = rest
        .iter()
        .position(|b| *b == b':')
        .ok_or(CipherError::Damaged)?;
    let id = std::str::from_utf8(&rest[..colon]).map_err(|_| CipherError::Damaged)?;
    ring.open_with(id, &rest[colon + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(lines: &[&str]) -> Keyring {
        Keyring::parse(&lines.join("\n")).unwrap()
    }

    #[test]
    fn sealed_fields_round_trip_compare_equal_and_hide_the_value() {
        let a = Keyring::new_key_line("a");
        let r = ring(&[&a]);
        let s = r.seal_text("9d95f5f8-machine");
        assert!(s.starts_with("enc1:a:"), "{s}");
        assert!(!s.contains("9d95"), "{s}");
        assert_eq!(
            s,
            r.seal_text("9d95f5f8-machine"),
            "deterministic: equality lookups"
        );
        assert_ne!(s, r.seal_text("9d95f5f8-machinf"));
        assert_eq!(open_text(Some(&r), s.clone()).unwrap(), "9d95f5f8-machine");
        assert_eq!(r.seal_text(""), "", "blank stays blank");
        assert_eq!(open_text(Some(&r), "plain".into()).unwrap(), "plain");
        assert!(matches!(
            open_text(None, s.clone()),
            Err(CipherError::NoKeys)
        ));
        // Tampering is detected: one flipped bit in the nonce, the ciphertext or the tag.
        let b64 = s.strip_prefix("enc1:a:").unwrap();
        let sealed = B64.decode(b64).unwrap();
        for i in [0, NONCE_LEN, sealed.len() - 1] {
            let mut bad = sealed.clone();
            bad[i] ^= 1;
            let bad = format!("enc1:a:{}", B64.encode(bad));
            assert!(open_text(Some(&r), bad).is_err(), "byte {i}");
        }
        let b = r.seal_bytes(b"\x30\x82private");
        assert!(!b.windows(7).any(|w| w == b"private"));
        assert_eq!(open_bytes(Some(&r), b).unwrap(), b"\x30\x82private");
    }

    #[test]
    fn rotation_reads_old_keys_and_lookups_find_every_form() {
        let (old, new) = (Keyring::new_key_line("old"), Keyring::new_key_line("new"));
        let before = ring(&[&old]);
        let stored = before.seal_text("203.0.113.9");
        let after = ring(&[&new, &old]);
        assert_eq!(after.current_id(), "new");
        assert_eq!(
            open_text(Some(&after), stored.clone()).unwrap(),
            "203.0.113.9"
        );
        let forms = after.lookup_forms("203.0.113.9");
        assert!(forms.contains(&stored) && forms.contains(&after.seal_text("203.0.113.9")));
        assert!(
            forms.contains(&"203.0.113.9".to_owned()),
            "plaintext rows too"
        );
        let dropped = ring(&[&new]);
        assert!(matches!(
            open_text(Some(&dropped), stored),
            Err(CipherError::UnknownKey(_))
        ));
    }

    #[test]
    fn key_files_are_checked() {
        for bad in [
            "",
            "# only a comment",
            "k",
            "k notbase64!",
            "k AAAA",
            "a:b AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        ] {
            assert!(Keyring::parse(bad).is_err(), "{bad:?}");
        }
        let k = Keyring::new_key_line("k");
        assert!(
            Keyring::parse(&format!("{k}\n{k}")).is_err(),
            "duplicate id"
        );
    }
}
