//! The ports every stage talks through, so that a stage is written once and runs on the embedded
//! log and store (one process) or on Kafka and CouchDB (scale-out):
//! - [`log`]: topics, partitions and offsets, shaped like Kafka's (append, group consumers that
//!   commit after processing, consumers assigned explicit positions);
//! - [`store`]: a peer's committed world state, tx-id index, block store and savepoint;
//! - [`topics`]: the channel's topic definitions from `topics/topics.toml`.

pub mod conformance;
pub mod log;
pub mod store;
pub mod topics;

/// An error with its causes, joined by `: `. The adapters' HTTP clients need it: reqwest's own
/// message ("error sending request") leaves out the one that says what happened ("connection
/// refused", "invalid peer certificate: UnknownIssuer"). A cause whose words are already in the
/// text is skipped, because some layers (hyper, hyper-util) repeat the message of the one below.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let message = cause.to_string();
        if !text.contains(&message) {
            text.push_str(": ");
            text.push_str(&message);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::error_chain;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Layer(&'static str, #[source] Option<Box<Layer>>);

    #[test]
    fn error_chain_names_every_cause_once() {
        let refused = Layer("connection refused", None);
        let connect = Layer("tcp connect error: connection refused", Some(Box::new(refused)));
        let top = Layer("error sending request", Some(Box::new(connect)));
        assert_eq!(error_chain(&top), "error sending request: tcp connect error: connection refused");
        assert_eq!(error_chain(&Layer("alone", None)), "alone");
    }
}
