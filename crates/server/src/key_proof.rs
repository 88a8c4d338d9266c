//! A user proves they hold a key's private half before it is theirs: they sign a message naming
//! them with `ssh-keygen -Y sign` (an SSHSIG), and the server checks it here.

use ssh_key::{PublicKey, SshSig};

/// The SSHSIG namespace of a key's proof of possession (`ssh-keygen -Y sign -n warren-key`).
pub const KEY_PROOF_NAMESPACE: &str = "warren-key";

/// What a user signs to prove they hold a key's private half before it is theirs: it names the
/// user, so a signature made for one user proves nothing for another.
pub fn key_proof_message(user_id: &str) -> String {
    format!("warren: this key is mine, user {user_id}\n")
}

/// Checks that `signature` (an armored SSHSIG, as `ssh-keygen -Y sign` prints it) was made by
/// `public_key` (`type base64 [comment]`) over [`key_proof_message`] of `user_id`.
pub fn verify_key_proof(public_key: &str, signature: &str, user_id: &str) -> Result<(), String> {
    let key = PublicKey::from_openssh(public_key)
        .map_err(|e| format!("the public key cannot be read: {e}"))?;
    let sig = SshSig::from_pem(signature.trim()).map_err(|e| {
        format!("the signature is not an SSH signature (`ssh-keygen -Y sign`): {e}")
    })?;
    if sig.public_key() != key.key_data() {
        return Err("the signature was made with another key".into());
    }
    key.verify(
        KEY_PROOF_NAMESPACE,
        key_proof_message(user_id).as_bytes(),
        &sig,
    )
    .map_err(|e| format!("the signature does not prove this key for this user: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_key::{HashAlg, LineEnding, PrivateKey};

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]))
    }

    fn proof(key: &PrivateKey, namespace: &str, user: &str) -> String {
        key.sign(
            namespace,
            HashAlg::Sha512,
            key_proof_message(user).as_bytes(),
        )
        .expect("a signature")
        .to_pem(LineEnding::LF)
        .expect("armored")
    }

    #[test]
    fn a_key_is_proven_only_by_its_own_signature_for_its_own_user() {
        let alice = key(1);
        let public = alice.public_key().to_openssh().expect("openssh form");
        let good = proof(&alice, KEY_PROOF_NAMESPACE, "u-alice");
        assert_eq!(verify_key_proof(&public, &good, "u-alice"), Ok(()));
        // Alice's proof replayed by bob, for bob's account.
        assert!(verify_key_proof(&public, &good, "u-bob").is_err());
        // Bob signs with his own key and claims alice's.
        let forged = proof(&key(2), KEY_PROOF_NAMESPACE, "u-bob");
        let err = verify_key_proof(&public, &forged, "u-bob").unwrap_err();
        assert!(err.contains("another key"), "{err}");
        // A signature made for another purpose (git commit signing).
        assert!(verify_key_proof(&public, &proof(&alice, "git", "u-alice"), "u-alice").is_err());
        assert!(verify_key_proof(&public, "not a signature", "u-alice").is_err());
    }
}
