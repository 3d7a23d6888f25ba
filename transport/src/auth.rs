//! Peer authentication: challenge-response with HMAC-SHA256 over the job secret.
//!
//! Every process of a job holds the same secret (`BPS_JOB_SECRET`, generated per job by
//! bps-launch). A connection is accepted only after both ends proved they hold it, without
//! sending it: each side contributes a fresh random nonce, and each answers with
//! `HMAC(secret, role label ‖ dialer nonce ‖ acceptor nonce ‖ context)`, where the context binds
//! the proof to the two process ids and the lane, so a proof cannot be replayed on another
//! connection or reflected back. Comparisons are constant-time (`verify_slice`).
//!
//! The secret is kept in a [`Secret`], whose `Debug` never shows it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a proof.
pub const MAC_LEN: usize = 32;

/// The job secret. Its `Debug` output is redacted.
#[derive(Clone)]
pub struct Secret(std::sync::Arc<Vec<u8>>);

impl Secret {
    /// Wrap secret bytes. Empty secrets are refused (`None`).
    pub fn new(bytes: impl Into<Vec<u8>>) -> Option<Secret> {
        let b = bytes.into();
        (!b.is_empty()).then(|| Secret(std::sync::Arc::new(b)))
    }

    /// A fresh random secret of 32 bytes, as lower-case hex (what bps-launch hands out).
    ///
    /// # Errors
    /// When the system has no randomness to give.
    pub fn generate_hex() -> std::io::Result<String> {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b).map_err(std::io::Error::other)?;
        Ok(b.iter().map(|x| format!("{x:02x}")).collect())
    }

    /// The proof of one side of a handshake.
    pub fn prove(&self, label: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        for p in parts {
            m.update(&(p.len() as u32).to_le_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// Check a peer's proof in constant time.
    pub fn verify(&self, label: &[u8], parts: &[&[u8]], proof: &[u8]) -> bool {
        let mut m = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        for p in parts {
            m.update(&(p.len() as u32).to_le_bytes());
            m.update(p);
        }
        m.verify_slice(proof).is_ok()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A fresh random nonce.
///
/// # Panics
/// When the system has no randomness (the kernel's getrandom failed), which leaves no safe way
/// to authenticate.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut b = [0u8; NONCE_LEN];
    getrandom::fill(&mut b).expect("the system random source failed");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_verify_only_with_the_same_secret_and_context() {
        let a = Secret::new(b"job-1".to_vec()).unwrap();
        let b = Secret::new(b"job-2".to_vec()).unwrap();
        let n1 = nonce();
        let n2 = nonce();
        let p = a.prove(b"dialer", &[&n1, &n2, &1u32.to_le_bytes()]);
        assert!(a.verify(b"dialer", &[&n1, &n2, &1u32.to_le_bytes()], &p));
        assert!(!b.verify(b"dialer", &[&n1, &n2, &1u32.to_le_bytes()], &p));
        assert!(!a.verify(b"acceptor", &[&n1, &n2, &1u32.to_le_bytes()], &p));
        assert!(!a.verify(b"dialer", &[&n2, &n1, &1u32.to_le_bytes()], &p));
        assert!(!a.verify(b"dialer", &[&n1, &n2, &2u32.to_le_bytes()], &p));
        assert!(!a.verify(b"dialer", &[&n1, &n2, &1u32.to_le_bytes()], &p[..31]));
        assert_ne!(n1, n2);
        assert!(Secret::new(Vec::new()).is_none());
        assert_eq!(format!("{a:?}"), "Secret(<redacted>)");
        assert_eq!(Secret::generate_hex().unwrap().len(), 64);
    }
}
