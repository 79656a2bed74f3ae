//! The chain as the blocks topic holds it. Orderer replicas may both write a block, and garbage
//! or forged records may sit between blocks, so the chain is: block 0, then for each number the
//! first record that decodes, links to the block before and carries a known orderer's signature.
//!
//! This walk is written independently of the validator's admission code on purpose: a checker
//! that shared the code it checks would agree with its bugs.

use std::collections::BTreeMap;

use streamledger_core::codec;
use streamledger_core::crypto::{block_data_hash, block_header_hash};
use streamledger_core::model::Block;
use streamledger_core::network::Network;
use streamledger_core::validation::{check_block, check_block_signature};
use streamledger_ports::log::Record;

use crate::Violation;

/// A block of the chain and where it was read.
pub struct ChainBlock {
    pub offset: i64,
    pub block: Block,
    pub hash: Vec<u8>,
}

#[derive(Default)]
pub struct Chain {
    /// By number, 0 to the tip with no hole.
    pub blocks: Vec<ChainBlock>,
    /// Identical copies of chain blocks (a second orderer replica's): harmless.
    pub copies: u64,
    /// Records that are not chain blocks and were refused: undecodable, unsigned, not linking.
    pub refused: u64,
}

impl Chain {
    pub fn tip(&self) -> i64 {
        self.blocks.len() as i64 - 1
    }
}

/// Builds the chain from the blocks topic's records, in offset order, and reports forks (two
/// different signed blocks for one number that both link) and gaps (a signed block that links
/// to nothing because a block before it never appeared).
pub fn walk(network: &Network, records: &[Record], violations: &mut Vec<Violation>) -> Chain {
    let mut chain = Chain::default();
    // Signed blocks ahead of the tip, by number: a gap unless the missing block comes later.
    let mut ahead: BTreeMap<i64, (i64, Block)> = BTreeMap::new();
    for record in records {
        let Ok(block) = codec::decode::<Block>(&record.value) else {
            chain.refused += 1;
            continue;
        };
        consider(network, &mut chain, &mut ahead, record.offset, block, violations);
        // Blocks that arrived early may follow now (or have become copies or forks).
        while let Some(entry) = ahead.first_entry().filter(|e| *e.key() <= chain.tip() + 1) {
            let (offset, block) = entry.remove();
            consider(network, &mut chain, &mut ahead, offset, block, violations);
        }
    }
    if let Some((&number, (offset, _))) = ahead.iter().next() {
        violations.push(Violation::Gap { missing: chain.tip() + 1, next_present: number, next_offset: *offset });
    }
    chain
}

fn consider(network: &Network, chain: &mut Chain, ahead: &mut BTreeMap<i64, (i64, Block)>, offset: i64, block: Block, violations: &mut Vec<Violation>) {
    let number = block.header.number;
    let tip = chain.tip();
    if number < 0 {
        chain.refused += 1;
    } else if number <= tip {
        let committed = &chain.blocks[number as usize];
        if block_header_hash(&block.header)[..] == committed.hash[..] {
            // Same header: a copy if its transactions are the ones the header's data hash covers;
            // otherwise a forgery (reordered or swapped transactions) that validators refuse.
            if block_data_hash(&block.transactions)[..] == block.header.data_hash[..] {
                chain.copies += 1;
            } else {
                chain.refused += 1;
            }
            return;
        }
        // A different block for a number already in the chain: a fork if an orderer signed it
        // and it links to the same parent; otherwise a forgery that every validator refuses.
        let parent = number.checked_sub(1).filter(|p| *p >= 0).map(|p| &chain.blocks[p as usize].block.header);
        if check_block(network, parent, &block).is_ok() {
            violations.push(Violation::Fork { number, chain_offset: committed.offset, other_offset: offset });
        } else {
            chain.refused += 1;
        }
    } else if number == tip + 1 {
        let parent = chain.blocks.last().map(|b| &b.block.header);
        match check_block(network, parent, &block) {
            Ok(()) => {
                let hash = block_header_hash(&block.header).to_vec();
                chain.blocks.push(ChainBlock { offset, block, hash });
            }
            Err(_) => chain.refused += 1,
        }
    } else if check_block_signature(network, &block).is_ok() {
        ahead.entry(number).or_insert((offset, block));
    } else {
        chain.refused += 1;
    }
}
