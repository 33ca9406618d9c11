//! RSA-2048 PKCS#1 v1.5 signing over aws-lc-rs (SHA-256 for licenses, SHA-512 for metadata).
//! CPU only: the key is loaded once per tenant and shared.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256, RSA_PKCS1_SHA512};

#[derive(Debug, thiserror::Error)]
pub enum SigningError {
    #[error("the private key is not a valid PKCS#8 RSA key: {0}")]
    BadKey(String),
    #[error("the key is {0} bits; Cryptolens clients need RSA-2048")]
    WrongSize(usize),
    #[error("key generation failed")]
    Generate,
    #[error("signing failed")]
    Sign,
}

pub struct Signer {
    key: KeyPair,
    rng: SystemRandom,
    xml: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").finish_non_exhaustive()
    }
}

/// A new RSA-2048 key as PKCS#8 DER.
pub fn generate_pkcs8() -> Result<Vec<u8>, SigningError> {
    let kp = KeyPair::generate(KeySize::Rsa2048).map_err(|_| SigningError::Generate)?;
    let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&kp)
        .map_err(|_| SigningError::Generate)?;
    Ok(der.as_ref().to_vec())
}

impl Signer {
    pub fn from_pkcs8(der: &[u8]) -> Result<Signer, SigningError> {
        let key = KeyPair::from_pkcs8(der).map_err(|e| SigningError::BadKey(e.to_string()))?;
        if key.public_modulus_len() != 256 {
            return Err(SigningError::WrongSize(key.public_modulus_len() * 8));
        }
        let c: PublicKeyComponents<Vec<u8>> = key.public_key().into();
        let xml = crate::wire::rsa_key_value_xml(&c.n, &c.e);
        Ok(Signer {
            key,
            rng: SystemRandom::new(),
            xml,
        })
    }

    /// `<RSAKeyValue>` XML the vendor pastes into their application.
    pub fn public_key_xml(&self) -> &str {
        &self.xml
    }

    pub fn sign_sha256(&self, msg: &[u8]) -> Result<Vec<u8>, SigningError> {
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA256, &self.rng, msg, &mut sig)
            .map_err(|_| SigningError::Sign)?;
        Ok(sig)
    }

    pub fn sign_sha512(&self, msg: &[u8]) -> Result<Vec<u8>, SigningError> {
        let mut sig = vec![0u8; self.key.public_modulus_len()];
        self.key
            .sign(&RSA_PKCS1_SHA512, &self.rng, msg, &mut sig)
            .map_err(|_| SigningError::Sign)?;
        Ok(sig)
    }
}

/// Verifies a PKCS#1 v1.5 SHA-256 signature against a raw modulus and exponent (big-endian),
/// as every Cryptolens SDK does. Used by tests and tooling.
pub fn verify_sha256(modulus: &[u8], exponent: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    let pk = aws_lc_rs::signature::RsaPublicKeyComponents {
        n: modulus,
        e: exponent,
    };
    pk.verify(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256, msg, sig)
        .is_ok()
}

/// As `verify_sha256`, for the SHA-512 metadata signature.
pub fn verify_sha512(modulus: &[u8], exponent: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    let pk = aws_lc_rs::signature::RsaPublicKeyComponents {
        n: modulus,
        e: exponent,
    };
    pk.verify(&aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA512, msg, sig)
        .is_ok()
}
