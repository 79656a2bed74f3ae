//! Reading whole topics, as the checker sees them: every partition from offset 0 to the end
//! offset it had when the read began.

use std::sync::Arc;

use streamledger_ports::log::{for_each_record, Log, Record};

use crate::AuditError;

/// Every record of `topic`, partition by partition, each partition in offset order.
pub async fn read_topic(log: &Arc<dyn Log>, topic: &str, bar: &indicatif::ProgressBar) -> Result<Vec<Record>, AuditError> {
    let mut out = Vec::new();
    for_each_record(log.as_ref(), topic, |record| {
        out.push(record);
        bar.set_position(out.len() as u64);
        Ok(())
    })
    .await
    .map_err(|e| AuditError::Log { topic: topic.to_string(), message: e.to_string() })?;
    Ok(out)
}
