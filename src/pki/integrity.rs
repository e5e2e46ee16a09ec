//! The operator's integrity key: an HMAC-SHA256 key held in a Secret of the operator's own
//! namespace, which tenants cannot read. What the operator writes into a tenant's namespace (the
//! target Secret's data and the annotations that say what it was made from) carries a tag made
//! with it, so a tenant who edits the Secret cannot make it look intact, and the operator never has
//! to open (decrypt, run a KDF on) bytes a tenant can write to know whether they are still its own.

use aws_lc_rs::hmac;

/// The key's length in bytes (HMAC-SHA256's block-size-safe choice, as for a 256-bit key).
pub const KEY_LEN: usize = 32;

#[derive(Clone)]
pub struct IntegrityKey(hmac::Key);

impl std::fmt::Debug for IntegrityKey {
    // A secret: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IntegrityKey(..)")
    }
}

/// Why stored key bytes cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("the integrity key must be at least {KEY_LEN} bytes, found {0}")]
pub struct ShortKey(usize);

impl IntegrityKey {
    /// A key from stored bytes (at least [`KEY_LEN`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ShortKey> {
        if bytes.len() < KEY_LEN {
            return Err(ShortKey(bytes.len()));
        }
        Ok(Self(hmac::Key::new(hmac::HMAC_SHA256, bytes)))
    }

    /// New random key bytes, to be stored (from the operating system's CSPRNG).
    pub fn generate() -> [u8; KEY_LEN] {
        rand::random()
    }

    /// The tag of `parts` under `purpose`, hex: each part length-prefixed so that no two
    /// sequences of parts give the same input, and the purpose first so that a tag made for one
    /// use is never valid for another.
    pub fn tag(&self, purpose: &str, parts: &[&[u8]]) -> String {
        let mut context = hmac::Context::with_key(&self.0);
        for part in std::iter::once(purpose.as_bytes()).chain(parts.iter().copied()) {
            context.update(&(part.len() as u64).to_be_bytes());
            context.update(part);
        }
        hex::encode(context.sign().as_ref())
    }

    /// Whether `tag` is the tag of `parts` under `purpose` (compared in constant time).
    pub fn verify(&self, purpose: &str, parts: &[&[u8]], tag: &str) -> bool {
        let expected = self.tag(purpose, parts);
        expected.len() == tag.len()
            && aws_lc_rs::constant_time::verify_slices_are_equal(
                expected.as_bytes(),
                tag.as_bytes(),
            )
            .is_ok()
    }

    /// A new random key that lives as long as the process: for an operator run without a stored
    /// key (every restart then sees every Secret as edited and reads it once).
    pub fn random() -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, &Self::generate()))
    }

    /// A fixed key for unit tests.
    #[cfg(test)]
    pub fn for_tests() -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, &[7u8; KEY_LEN]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tag_depends_on_the_key_the_purpose_and_how_the_parts_are_split() {
        let key = IntegrityKey::for_tests();
        let other = IntegrityKey::from_bytes(&[8u8; KEY_LEN]).expect("long enough");
        let tag = key.tag("secret", &[b"ab", b"c"]);
        assert!(key.verify("secret", &[b"ab", b"c"], &tag));
        assert!(!other.verify("secret", &[b"ab", b"c"], &tag), "another key");
        assert!(
            !key.verify("password", &[b"ab", b"c"], &tag),
            "another purpose"
        );
        assert!(
            !key.verify("secret", &[b"a", b"bc"], &tag),
            "the same bytes split otherwise"
        );
        assert!(
            !key.verify("secret", &[b"ab", b"c"], &tag[..10]),
            "a truncated tag"
        );
        assert_eq!(tag.len(), 64);
        // Not a plain SHA-256 a tenant could compute.
        use sha2::{Digest, Sha256};
        assert_ne!(tag, hex::encode(Sha256::digest(b"abc")));
    }

    #[test]
    fn a_short_key_is_refused() {
        assert!(IntegrityKey::from_bytes(&[1u8; 16]).is_err());
        assert_ne!(IntegrityKey::generate(), IntegrityKey::generate());
    }
}
