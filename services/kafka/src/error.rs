//! rdkafka errors as the log port's [`LogError`], classified retryable (a broker, leader or
//! coordinator that may come back) or not (a missing topic, a bad config, a record too large).

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;
use streamledger_ports::log::LogError;

/// Errors Kafka clients retry themselves, or that go away once the cluster settles: transport
/// and timeouts, leadership and coordinator moves, rebalances, too few in-sync replicas for now.
pub(crate) fn retryable_code(code: RDKafkaErrorCode) -> bool {
    use RDKafkaErrorCode::*;
    matches!(
        code,
        BrokerTransportFailure
            | Resolve
            | MessageTimedOut
            | AllBrokersDown
            | OperationTimedOut
            | TimedOutQueue
            | QueueFull
            | WaitingForCoordinator
            | Retry
            | LeaderNotAvailable
            | NotLeaderForPartition
            | RequestTimedOut
            | BrokerNotAvailable
            | ReplicaNotAvailable
            | NetworkException
            | CoordinatorLoadInProgress
            | CoordinatorNotAvailable
            | NotCoordinator
            | NotEnoughReplicas
            | NotEnoughReplicasAfterAppend
            | IllegalGeneration
            | UnknownMemberId
            | RebalanceInProgress
            | KafkaStorageError
            | FencedLeaderEpoch
            | UnknownLeaderEpoch
            | OffsetNotAvailable
            | PreferredLeaderNotAvailable
            | ThrottlingQuotaExceeded
            | UnstableOffsetCommit
            | RebootstrapRequired
    )
}

fn code_of(e: &KafkaError) -> Option<RDKafkaErrorCode> {
    match e {
        KafkaError::AdminOp(code) => Some(*code),
        e => e.rdkafka_error_code(),
    }
}

pub(crate) fn is_retryable(e: &KafkaError) -> bool {
    match e {
        // The client went away under us (shutdown), or a request was abandoned: try again.
        KafkaError::Canceled => true,
        e => code_of(e).is_some_and(retryable_code),
    }
}

/// A [`LogError`] for an rdkafka error, with `context` naming the topic, partition or offset.
pub(crate) fn log_error(context: impl Into<String>, e: &KafkaError) -> LogError {
    LogError::new(context, e, is_retryable(e))
}

/// A [`LogError`] for a bare error code (per-topic results of admin calls, delivery reports).
pub(crate) fn code_error(context: impl Into<String>, code: RDKafkaErrorCode) -> LogError {
    LogError::new(context, code, retryable_code(code))
}

/// Metadata carries raw protocol error codes.
pub(crate) fn resp_code(err: RDKafkaRespErr) -> RDKafkaErrorCode {
    RDKafkaErrorCode::from(err)
}

/// The error for an operation on a topic the cluster does not have. Not retryable: topics are
/// created explicitly (`ensure_topic`, `streamledger topics apply`), never on first use.
pub(crate) fn unknown_topic(topic: &str) -> LogError {
    LogError::new(format!("topic {topic}"), "unknown topic (ensure_topic or `streamledger topics apply` creates it)", false)
}

pub(crate) fn no_such_partition(topic: &str, partition: i32, count: i32) -> LogError {
    LogError::new(
        format!("partition {partition} of topic {topic}"),
        format!("no such partition: the topic has {count} partitions"),
        false,
    )
}

/// A blocking rdkafka call that had to run on the blocking pool and did not come back.
pub(crate) fn task_failed(context: impl Into<String>, e: tokio::task::JoinError) -> LogError {
    LogError::new(context, format!("kafka client task failed: {e}"), false)
}
