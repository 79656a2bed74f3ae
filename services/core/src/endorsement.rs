//! The endorser's side: checking an incoming proposal and signing the simulation's outcome.

use rayon::prelude::*;

use crate::crypto::{self, SigCheck, SignatureChecks, Signer};
use crate::model::*;
use crate::network::Network;

/// Why an endorser refuses to simulate a proposal. The same checks run again in the validator, so
/// a proposal that slips past an endorser still cannot commit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposalRejection {
    #[error("proposal {tx_id} is for channel {channel:?}, this network serves {expected:?}")]
    WrongChannel { tx_id: String, channel: String, expected: String },
    #[error("proposal {tx_id}: creator {org} with key {key} is not registered in the network")]
    UnknownCreator { tx_id: String, org: String, key: String },
    #[error("proposal {tx_id}: tx id is not SHA-256(nonce || creator)")]
    BadTxId { tx_id: String },
    #[error("proposal {tx_id}: the creator's signature does not verify")]
    BadSignature { tx_id: String },
    #[error("proposal {tx_id}: contract {contract:?} is not deployed on this channel")]
    UnknownContract { tx_id: String, contract: String },
}

pub fn check_proposal(network: &Network, p: &Proposal) -> Result<(), ProposalRejection> {
    check_proposal_with(network, p, SignatureChecks::On)
}

/// [`check_proposal`], with the signature check switchable off for benchmarks only.
pub fn check_proposal_with(network: &Network, p: &Proposal, signatures: SignatureChecks) -> Result<(), ProposalRejection> {
    check_fields(network, p, || {
        signatures == SignatureChecks::Off
            || crypto::verify(&SigCheck { public_key: &p.creator.public_key, message: &crypto::proposal_signing_bytes(p), signature: &p.signature })
    })
}

/// [`check_proposal_with`] for a batch, with the same verdicts: the creators' signatures are
/// checked in one batched, parallel pass (`crypto::verify_all`, about twice as fast per signature
/// as one by one), as an endorser receives proposals in batches.
///
/// Only proposals that pass the checks before the signature go into that pass. Their verdict
/// does not depend on the signature, and one bad signature fails its whole batch of
/// `crypto::BATCH` into one-by-one checks: a stranger's proposals, or ones with a forged tx id,
/// must not make the members' cost that much.
pub fn check_proposals_with(network: &Network, proposals: &[Proposal], signatures: SignatureChecks) -> Vec<Result<(), ProposalRejection>> {
    let before: Vec<Result<(), ProposalRejection>> = proposals.iter().map(|p| check_before_signature(network, p)).collect();
    let verified = match signatures {
        SignatureChecks::Off => vec![true; proposals.len()],
        SignatureChecks::On => {
            let messages = signing_bytes_to_check(proposals, &before);
            let checks: Vec<Option<SigCheck>> = proposals
                .iter()
                .zip(&messages)
                .map(|(p, message)| message.as_ref().map(|message| SigCheck { public_key: &p.creator.public_key, message, signature: &p.signature }))
                .collect();
            crypto::verify_present(&checks)
        }
    };
    proposals.iter().zip(before).zip(verified).map(|((p, before), ok)| before.and_then(|()| check_from_signature(network, p, ok))).collect()
}

/// What each creator signed, for the proposals whose signature is worth checking: those that
/// passed every check before it.
fn signing_bytes_to_check(proposals: &[Proposal], before: &[Result<(), ProposalRejection>]) -> Vec<Option<Vec<u8>>> {
    proposals.par_iter().zip(before).map(|(p, before)| before.is_ok().then(|| crypto::proposal_signing_bytes(p))).collect()
}

/// The checks in Fabric's order; `signature_verifies` runs only if the ones before it pass.
fn check_fields(network: &Network, p: &Proposal, signature_verifies: impl FnOnce() -> bool) -> Result<(), ProposalRejection> {
    check_before_signature(network, p)?;
    check_from_signature(network, p, signature_verifies())
}

/// The checks before the signature: the channel, a registered creator, and the tx id.
fn check_before_signature(network: &Network, p: &Proposal) -> Result<(), ProposalRejection> {
    let tx_id = || p.tx_id.clone();
    if p.channel != network.channel() {
        return Err(ProposalRejection::WrongChannel { tx_id: tx_id(), channel: p.channel.clone(), expected: network.channel().into() });
    }
    if network.role_of(&p.creator).is_none() {
        let key = hex::encode(&p.creator.public_key);
        return Err(ProposalRejection::UnknownCreator { tx_id: tx_id(), org: p.creator.org.clone(), key });
    }
    if p.tx_id != crypto::compute_tx_id(&p.nonce, &p.creator) {
        return Err(ProposalRejection::BadTxId { tx_id: tx_id() });
    }
    Ok(())
}

/// The signature's verdict, then the checks after it.
fn check_from_signature(network: &Network, p: &Proposal, signature_verifies: bool) -> Result<(), ProposalRejection> {
    if !signature_verifies {
        return Err(ProposalRejection::BadSignature { tx_id: p.tx_id.clone() });
    }
    if network.policy(&p.contract).is_none() {
        return Err(ProposalRejection::UnknownContract { tx_id: p.tx_id.clone(), contract: p.contract.clone() });
    }
    Ok(())
}

/// Signs the outcome of simulating `proposal`. The result names no proposal record; an endorser
/// that read the proposal from the log names it with [`EndorsementResult::answering`].
pub fn endorse(signer: &Signer, proposal: &Proposal, response: Response, rwset: RwSet) -> EndorsementResult {
    let proposal_hash = crypto::proposal_hash(proposal).to_vec();
    // The proposal record is left out of what is signed: it routes the result to an attempt of
    // its tx id, it vouches for nothing. The signature goes into the ordered transaction without
    // the record, so the validators, which never see one, could not check it over one. A record
    // altered on the topic can only send a result to another attempt of the same tx id, where it
    // still counts only for a proposal with its hash, and the validators check its signature.
    let signature = signer.sign(&crypto::endorsement_signing_bytes(&proposal.tx_id, &proposal_hash, &response, &rwset));
    let (proposal_partition, proposal_offset) = NO_RECORD;
    EndorsementResult {
        tx_id: proposal.tx_id.clone(),
        endorser: signer.identity().clone(),
        proposal_hash,
        response,
        rwset,
        signature,
        proposal_partition,
        proposal_offset,
    }
}

/// A `(partition, offset)` that names no proposal record: a result's written with schema v1 or
/// not endorsed from the log, a rejection's that names none.
pub const NO_RECORD: (i32, i64) = (-1, -1);

/// Does this endorsement result sign what it claims, for this proposal?
pub fn verify_endorsement(proposal: &Proposal, result: &EndorsementResult) -> bool {
    let hash = crypto::proposal_hash(proposal);
    result.proposal_hash == hash
        && crypto::verify(&SigCheck {
            public_key: &result.endorser.public_key,
            message: &crypto::endorsement_signing_bytes(&proposal.tx_id, &hash, &result.response, &result.rwset),
            signature: &result.signature,
        })
}

impl EndorsementResult {
    pub fn endorsement(&self) -> Endorsement {
        Endorsement { endorser: self.endorser.clone(), signature: self.signature.clone() }
    }

    /// This result, naming the proposal record it answers: `(partition, offset)` in `proposals`.
    pub fn answering(mut self, (partition, offset): (i32, i64)) -> Self {
        (self.proposal_partition, self.proposal_offset) = (partition, offset);
        self
    }

    /// The proposal record this result answers, `(partition, offset)`, if it names one.
    pub fn proposal_record(&self) -> Option<(i32, i64)> {
        (self.proposal_partition >= 0 && self.proposal_offset >= 0).then_some((self.proposal_partition, self.proposal_offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::Fixture;

    #[test]
    fn a_batch_gets_the_verdicts_one_by_one_checks_give() {
        let f = Fixture::new();
        let good = || f.proposal("kv", "put", &["k", "v"]);
        let mut wrong_channel = good();
        wrong_channel.channel = "other".into();
        let mut stranger = good();
        Signer::from_seed("Org1", [77; 32]).sign_proposal(&mut stranger);
        let mut bad_tx_id = good();
        bad_tx_id.tx_id = "00".repeat(32);
        let mut bad_signature = good();
        bad_signature.signature[0] ^= 1;
        let mut short_signature = good();
        short_signature.signature.truncate(10);
        let unknown_contract = f.proposal("nope", "put", &["k", "v"]);
        // More than one signature batch, with the bad ones in the first.
        let mut batch = vec![wrong_channel, stranger, bad_tx_id, bad_signature, short_signature, unknown_contract];
        batch.extend((0..crypto::BATCH).map(|_| good()));
        for checks in [SignatureChecks::On, SignatureChecks::Off] {
            let one_by_one: Vec<_> = batch.iter().map(|p| check_proposal_with(&f.network, p, checks)).collect();
            assert_eq!(check_proposals_with(&f.network, &batch, checks), one_by_one, "{checks:?}");
        }
        let verdicts = check_proposals_with(&f.network, &batch, SignatureChecks::On);
        let kinds: Vec<&str> = verdicts[..6]
            .iter()
            .map(|v| match v {
                Err(ProposalRejection::WrongChannel { .. }) => "channel",
                Err(ProposalRejection::UnknownCreator { .. }) => "creator",
                Err(ProposalRejection::BadTxId { .. }) => "tx id",
                Err(ProposalRejection::BadSignature { .. }) => "signature",
                Err(ProposalRejection::UnknownContract { .. }) => "contract",
                Ok(()) => "ok",
            })
            .collect();
        assert_eq!(kinds, ["channel", "creator", "tx id", "signature", "signature", "contract"]);
        assert!(verdicts[6..].iter().all(Result::is_ok));
        assert!(check_proposals_with(&f.network, &[], SignatureChecks::On).is_empty());
    }

    #[test]
    fn only_proposals_that_pass_the_checks_before_it_have_their_signature_checked() {
        let f = Fixture::new();
        let good = || f.proposal("kv", "put", &["k", "v"]);
        let mut stranger = good();
        Signer::from_seed("Org1", [77; 32]).sign_proposal(&mut stranger);
        stranger.signature[0] ^= 1;
        let mut wrong_channel = good();
        wrong_channel.channel = "other".into();
        let mut bad_tx_id = good();
        bad_tx_id.tx_id = "00".repeat(32);
        let mut bad_signature = good();
        bad_signature.signature[0] ^= 1;
        let unknown_contract = f.proposal("nope", "put", &["k", "v"]);
        let batch = [good(), stranger, wrong_channel, bad_tx_id, bad_signature, unknown_contract, good()];
        let before: Vec<_> = batch.iter().map(|p| check_before_signature(&f.network, p)).collect();
        // A member's bad signature and an unknown contract still get theirs checked: the
        // signature comes before the contract in Fabric's order.
        let checked: Vec<usize> = signing_bytes_to_check(&batch, &before).iter().enumerate().filter(|(_, m)| m.is_some()).map(|(i, _)| i).collect();
        assert_eq!(checked, [0, 4, 5, 6]);
    }
}
