//! The endorser's side: checking an incoming proposal and signing the simulation's outcome.

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
    let tx_id = p.tx_id.clone();
    if p.channel != network.channel() {
        return Err(ProposalRejection::WrongChannel { tx_id, channel: p.channel.clone(), expected: network.channel().into() });
    }
    if network.role_of(&p.creator).is_none() {
        let key = hex::encode(&p.creator.public_key);
        return Err(ProposalRejection::UnknownCreator { tx_id, org: p.creator.org.clone(), key });
    }
    if p.tx_id != crypto::compute_tx_id(&p.nonce, &p.creator) {
        return Err(ProposalRejection::BadTxId { tx_id });
    }
    if signatures == SignatureChecks::On {
        let message = crypto::proposal_signing_bytes(p);
        if !crypto::verify(&SigCheck { public_key: &p.creator.public_key, message: &message, signature: &p.signature }) {
            return Err(ProposalRejection::BadSignature { tx_id });
        }
    }
    if network.policy(&p.contract).is_none() {
        return Err(ProposalRejection::UnknownContract { tx_id, contract: p.contract.clone() });
    }
    Ok(())
}

/// Signs the outcome of simulating `proposal`.
pub fn endorse(signer: &Signer, proposal: &Proposal, response: Response, rwset: RwSet) -> EndorsementResult {
    let proposal_hash = crypto::proposal_hash(proposal).to_vec();
    let signature = signer.sign(&crypto::endorsement_signing_bytes(&proposal.tx_id, &proposal_hash, &response, &rwset));
    EndorsementResult { tx_id: proposal.tx_id.clone(), endorser: signer.identity().clone(), proposal_hash, response, rwset, signature }
}

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
}
