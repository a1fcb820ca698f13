//! What a lease operation fails with, and which DynamoDB errors are worth
//! another attempt.

use std::fmt;

use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};

use super::lease::Lease;

/// A lease operation's failure.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The write's condition failed: the lease is not where the caller's copy
    /// said (another worker took it, a handoff moved it, the counter moved,
    /// it was deleted). Not retried: the caller re-reads and decides.
    #[error("lease {lease_key} in table {table}: {op} refused, the lease moved ({})", Moved(current.as_deref()))]
    Lost {
        table: String,
        lease_key: String,
        op: &'static str,
        /// The row as it is now, when DynamoDB returned it (`None`: deleted,
        /// or not returned).
        current: Option<Box<Lease>>,
    },
    /// Anything else, after the bounded retries of a transient failure.
    #[error("lease table {table}: {op}{}: {message}", key.as_deref().map(|k| format!(" of lease {k}")).unwrap_or_default())]
    Failed {
        table: String,
        op: &'static str,
        key: Option<String>,
        message: String,
    },
}

impl LeaseError {
    pub fn is_lost(&self) -> bool {
        matches!(self, LeaseError::Lost { .. })
    }
}

/// How a lost lease is described: who holds it now.
struct Moved<'a>(Option<&'a Lease>);

impl fmt::Display for Moved<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("gone or not returned"),
            Some(lease) => write!(
                f,
                "now held by {}, counter {}",
                lease.actual_owner().unwrap_or("nobody"),
                lease.counter
            ),
        }
    }
}

/// What to do with an attempt's error.
pub(crate) enum Verdict {
    /// Throttling, a server error or the network: try again.
    Transient,
    /// Nothing another attempt would change.
    Permanent,
}

/// The failed condition of a conditional write.
pub(crate) const CONDITION_FAILED: &str = "ConditionalCheckFailedException";

pub(crate) fn verdict<E, R>(e: &SdkError<E, R>) -> Verdict
where
    E: ProvideErrorMetadata,
{
    if crate::aws::dynamodb::is_transient(e) {
        Verdict::Transient
    } else {
        Verdict::Permanent
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::lease::Checkpoint;

    #[test]
    fn messages_name_the_table_the_lease_and_the_holder() {
        let mut now = Lease::new("shardId-1", Checkpoint::Latest);
        now.owner = Some("w2".into());
        now.counter = 9;
        let lost = LeaseError::Lost {
            table: "t".into(),
            lease_key: "shardId-1".into(),
            op: "renew",
            current: Some(Box::new(now)),
        };
        assert_eq!(
            lost.to_string(),
            "lease shardId-1 in table t: renew refused, the lease moved (now held by w2, counter 9)"
        );
        let failed = LeaseError::Failed {
            table: "t".into(),
            op: "take",
            key: Some("shardId-1".into()),
            message: "ThrottlingException: slow down".into(),
        };
        assert_eq!(
            failed.to_string(),
            "lease table t: take of lease shardId-1: ThrottlingException: slow down"
        );
    }
}
