//! The peer-store port: what a validator commits to and what an endorser simulates against.
//!
//! One block's state writes, tx-id index entries, block and savepoint are committed together.
//! The embedded store does that in one transaction; a store without multi-document atomicity
//! (CouchDB) writes the savepoint last and re-applies the blocks after it on start, which is
//! harmless because every write carries its version.

use streamledger_core::state::{CommittedState, StateResult, VersionedValue, WriteBatch};

/// Where a peer is: the last block committed and where it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Savepoint {
    pub block: i64,
    pub block_hash: Vec<u8>,
    /// The running state hash after `block`.
    pub state_hash: Vec<u8>,
    /// The offset of `block` in the blocks topic: the validator resumes after it.
    pub blocks_offset: i64,
}

/// A block as committed: its bytes as read from the blocks topic, and the peer's codes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredBlock {
    pub number: i64,
    pub bytes: Vec<u8>,
    pub codes: Vec<i32>,
}

/// Everything one block commits.
#[derive(Debug, Clone, Copy)]
pub struct BlockCommit<'a> {
    pub block: &'a StoredBlock,
    pub batch: &'a WriteBatch,
    pub savepoint: &'a Savepoint,
}

pub trait PeerStore: CommittedState + Send + Sync {
    /// `None` before the first block.
    fn savepoint(&self) -> StateResult<Option<Savepoint>>;

    /// Commits one block atomically (see the module docs for stores that cannot).
    fn commit(&self, commit: BlockCommit<'_>) -> StateResult<()>;

    /// How many consecutive blocks [`PeerStore::commit_all`] commits atomically, at most: 1 for
    /// a store that commits block by block.
    fn blocks_per_commit(&self) -> usize {
        1
    }

    /// Commits consecutive blocks, in order, at most [`PeerStore::blocks_per_commit`] of them.
    /// Stores that can do it atomically (the embedded store) commit them in one transaction, so
    /// that a validator catching up pays for one commit instead of one per block. The default
    /// commits block by block and skips the blocks the savepoint already covers, so that retrying
    /// after a failure part way through finishes the job.
    fn commit_all(&self, commits: &[BlockCommit<'_>]) -> StateResult<()> {
        let done = self.savepoint()?.map_or(-1, |s| s.block);
        for commit in commits.iter().filter(|c| c.block.number > done) {
            self.commit(*commit)?;
        }
        Ok(())
    }

    fn block(&self, number: i64) -> StateResult<Option<StoredBlock>>;

    /// Makes every commit so far durable, for a store that defers its fsyncs (the embedded store
    /// does, up to a second; see its docs). The validator calls it when no block is waiting and
    /// when it stops, so that a quiet network or a clean stop leaves nothing to re-apply. The
    /// default: commits are durable already.
    fn make_durable(&self) -> StateResult<()> {
        Ok(())
    }

    /// The running state hash after a committed block, where the store keeps it for every block
    /// (the embedded store does; others keep only the savepoint's). A validator that committed
    /// several blocks at once re-produces their verdicts from it after a crash.
    fn state_hash_after(&self, number: i64) -> StateResult<Option<Vec<u8>>> {
        let _ = number;
        Ok(None)
    }

    /// A rich query (a CouchDB Mango selector) over a contract's state, a page at a time:
    /// `Ok(None)` when this store has no rich queries (the embedded store). `page` is the token
    /// the previous page returned.
    fn rich_query(&self, namespace: &str, selector: &serde_json::Value, limit: usize, page: Option<&str>) -> StateResult<Option<QueryPage>> {
        let _ = (namespace, selector, limit, page);
        Ok(None)
    }
}

/// One page of a rich query: matching keys with their values, and the token of the next page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryPage {
    pub entries: Vec<(String, VersionedValue)>,
    pub next: Option<String>,
}
