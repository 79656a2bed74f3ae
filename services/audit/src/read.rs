//! Reading whole topics, as the checker sees them: every partition from offset 0 to the end
//! offset it had when the read began.

use std::sync::Arc;
use std::time::Duration;

use streamledger_ports::log::{Log, Record, Subscription};

use crate::AuditError;

/// Every record of `topic`, partition by partition, each partition in offset order.
pub async fn read_topic(log: &Arc<dyn Log>, topic: &str, bar: &indicatif::ProgressBar) -> Result<Vec<Record>, AuditError> {
    let fail = |e: streamledger_ports::log::LogError| AuditError::Log { topic: topic.to_string(), message: e.to_string() };
    let partitions = log.partition_count(topic).await.map_err(fail)?;
    let mut out = Vec::new();
    for partition in 0..partitions {
        let end = log.end_offset(topic, partition).await.map_err(fail)?;
        if end == 0 {
            continue;
        }
        let mut consumer = log.consumer(Subscription::assign(topic, partition, 0)).await.map_err(fail)?;
        let mut next = 0;
        let mut empty_polls = 0;
        while next < end {
            let batch = consumer.poll(10_000, Duration::from_millis(500)).await.map_err(fail)?;
            if batch.is_empty() {
                // A log that holds records below its end offset must return them; waiting
                // forever would hide a lost record, so give up after a while and say where.
                empty_polls += 1;
                if empty_polls >= 60 {
                    return Err(AuditError::Log {
                        topic: topic.to_string(),
                        message: format!("partition {partition}: nothing returned at offset {next}, below the end offset {end}"),
                    });
                }
                continue;
            }
            empty_polls = 0;
            for record in batch {
                if record.offset >= end {
                    break;
                }
                next = record.offset + 1;
                out.push(record);
            }
            bar.set_position(out.len() as u64);
        }
    }
    Ok(out)
}
