//! Ed25519 batch verification with the terms of each signer summed: the same check as
//! `ed25519_dalek::verify_batch`, and the same verdict on every batch, at about two thirds of its
//! cost when a few keys sign most of the batch, as in a permissioned network.
//!
//! Why not `ed25519_dalek::verify_batch` itself: it checks
//!
//! ```text
//! [-Σ zᵢsᵢ] B + Σ [zᵢ] Rᵢ + Σ [zᵢhᵢ] Aᵢ = 0
//! ```
//!
//! as one multiscalar multiplication of 1 + 2n points for n signatures, with one Aᵢ (public key)
//! per signature even when the keys repeat. In a block every endorsement comes from one of a few
//! peers and the proposals from a few clients, so here the terms of equal keys are summed first,
//! `Σ [zᵢhᵢ] A = [Σ zᵢhᵢ] A`, and the multiplication has 1 + n + k points for k distinct keys.
//! That is the same group element, so the check accepts exactly the batches dalek's accepts.
//! Everything else is dalek's, step by step: hᵢ = SHA-512(Rᵢ ‖ Aᵢ ‖ Mᵢ), the zᵢ drawn from a merlin
//! transcript of the hᵢ and sᵢ (deterministic: the same batch gets the same zᵢ on every peer), and
//! sᵢ refused unless canonical. The property test below holds the two to the same verdict.

use std::collections::hash_map::{Entry, HashMap};
use std::iter::once;

use curve25519_dalek::constants::ED25519_BASEPOINT_POINT;
use curve25519_dalek::edwards::{CompressedEdwardsY, EdwardsPoint};
use curve25519_dalek::scalar::Scalar;
use curve25519_dalek::traits::{IsIdentity, VartimeMultiscalarMul};
use ed25519_dalek::{Signature, VerifyingKey};
use merlin::Transcript;
use sha2::{Digest, Sha512};

/// Whether every signature in the batch is valid, as `ed25519_dalek::verify_batch` decides it.
/// `false` says only that at least one is not: the caller checks them one by one to find which.
pub fn verify_batch(messages: &[&[u8]], signatures: &[Signature], keys: &[VerifyingKey]) -> bool {
    if messages.len() != signatures.len() || signatures.len() != keys.len() {
        return false;
    }
    let hrams: Vec<[u8; 64]> = signatures
        .iter()
        .zip(keys)
        .zip(messages)
        .map(|((sig, key), message)| {
            let mut h = Sha512::new();
            h.update(sig.r_bytes());
            h.update(key.as_bytes());
            h.update(message);
            let mut hram = [0u8; 64];
            hram.copy_from_slice(&h.finalize());
            hram
        })
        .collect();
    // dalek's transcript, label by label, so that the zᵢ are the ones it would draw.
    let mut transcript = Transcript::new(b"ed25519 batch verification");
    for hram in &hrams {
        transcript.append_message(b"hram", hram);
    }
    for sig in signatures {
        transcript.append_message(b"sig.s", sig.s_bytes());
    }
    let mut rng = transcript.build_rng().finalize(&mut ZeroRng);

    let Some(ss) = signatures.iter().map(|sig| Option::<Scalar>::from(Scalar::from_canonical_bytes(*sig.s_bytes()))).collect::<Option<Vec<_>>>()
    else {
        return false;
    };
    let zs: Vec<Scalar> = signatures
        .iter()
        .map(|_| {
            let mut z = [0u8; 16];
            rand_core::RngCore::fill_bytes(&mut rng, &mut z);
            Scalar::from(u128::from_le_bytes(z))
        })
        .collect();
    let b_coefficient: Scalar = ss.iter().zip(&zs).map(|(s, z)| z * s).sum();

    // Σ zᵢhᵢ per distinct key, in the order the keys first appear.
    let mut index: HashMap<&[u8; 32], usize> = HashMap::new();
    let mut signers: Vec<(EdwardsPoint, Scalar)> = Vec::new();
    for ((key, hram), z) in keys.iter().zip(&hrams).zip(&zs) {
        let zh = z * Scalar::from_bytes_mod_order_wide(hram);
        match index.entry(key.as_bytes()) {
            Entry::Occupied(at) => signers[*at.get()].1 += zh,
            Entry::Vacant(at) => {
                at.insert(signers.len());
                signers.push((key.to_edwards(), zh));
            }
        }
    }

    let scalars = once(-b_coefficient).chain(zs).chain(signers.iter().map(|(_, sum)| *sum));
    let points = once(Some(ED25519_BASEPOINT_POINT))
        .chain(signatures.iter().map(|sig| CompressedEdwardsY(*sig.r_bytes()).decompress()))
        .chain(signers.iter().map(|(point, _)| Some(*point)));
    EdwardsPoint::optional_multiscalar_mul(scalars, points).is_some_and(|sum| sum.is_identity())
}

/// dalek's: no outside randomness goes into the zᵢ, so that every peer draws the same ones for
/// the same batch (merlin's `finalize` wants a source; this one adds nothing).
struct ZeroRng;

impl rand_core::RngCore for ZeroRng {
    fn next_u32(&mut self) -> u32 {
        rand_core::impls::next_u32_via_fill(self)
    }

    fn next_u64(&mut self) -> u64 {
        rand_core::impls::next_u64_via_fill(self)
    }

    fn fill_bytes(&mut self, _dest: &mut [u8]) {}

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl rand_core::CryptoRng for ZeroRng {}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer as _, SigningKey};
    use proptest::prelude::*;

    /// A batch of `n` signatures by `signers` distinct keys, then spoiled as `spoil` says.
    fn batch(n: usize, signers: usize, spoil: &[(usize, u8)]) -> (Vec<Vec<u8>>, Vec<Signature>, Vec<VerifyingKey>) {
        let keys: Vec<SigningKey> = (0..signers).map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32])).collect();
        let messages: Vec<Vec<u8>> = (0..n).map(|i| format!("message {i}").into_bytes()).collect();
        let mut sigs: Vec<Signature> = messages.iter().enumerate().map(|(i, m)| keys[i % signers].sign(m)).collect();
        let mut verifying: Vec<VerifyingKey> = (0..n).map(|i| keys[i % signers].verifying_key()).collect();
        for &(at, how) in spoil {
            let i = at % n;
            let mut bytes = sigs[i].to_bytes();
            match how % 5 {
                0 => bytes[0] ^= 1,                        // R changed: another point, or none
                1 => bytes[40] ^= 1,                       // s changed
                2 => bytes[63] |= 0xf0,                    // s not canonical
                3 => verifying[i] = keys[(i + 1) % signers].verifying_key(), // another signer's key
                _ => bytes[..32].copy_from_slice(&[0xff; 32]), // R not a point
            }
            sigs[i] = Signature::from_bytes(&bytes);
        }
        (messages, sigs, verifying)
    }

    fn dalek(messages: &[Vec<u8>], sigs: &[Signature], keys: &[VerifyingKey]) -> bool {
        let messages: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        ed25519_dalek::verify_batch(&messages, sigs, keys).is_ok()
    }

    fn ours(messages: &[Vec<u8>], sigs: &[Signature], keys: &[VerifyingKey]) -> bool {
        let messages: Vec<&[u8]> = messages.iter().map(Vec::as_slice).collect();
        verify_batch(&messages, sigs, keys)
    }

    #[test]
    fn a_good_batch_passes_and_each_kind_of_bad_signature_fails_it() {
        let (m, s, k) = batch(40, 3, &[]);
        assert!(ours(&m, &s, &k));
        for how in 0..5 {
            let (m, s, k) = batch(40, 3, &[(17, how)]);
            assert!(!ours(&m, &s, &k), "spoilt {how}");
            assert!(!dalek(&m, &s, &k), "spoilt {how}");
        }
    }

    #[test]
    fn lengths_that_differ_fail() {
        let (m, s, k) = batch(4, 2, &[]);
        let messages: Vec<&[u8]> = m.iter().map(Vec::as_slice).collect();
        assert!(!verify_batch(&messages[..3], &s, &k));
        assert!(!verify_batch(&messages, &s[..3], &k));
        assert!(verify_batch(&[], &[], &[]), "an empty batch holds nothing bad, as dalek's");
        assert!(ed25519_dalek::verify_batch(&[], &[], &[]).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The same verdict as dalek's on any batch: any size, from one signer to all distinct,
        /// with up to three signatures spoilt in any of five ways.
        #[test]
        fn the_verdict_is_dalek_s(n in 1usize..80, signers in 1usize..12, spoil in prop::collection::vec((0usize..80, 0u8..5), 0..3)) {
            let (m, s, k) = batch(n, signers.min(n), &spoil);
            prop_assert_eq!(ours(&m, &s, &k), dalek(&m, &s, &k));
        }
    }
}
