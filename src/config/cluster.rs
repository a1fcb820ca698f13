//! `[cluster]`: several `shardflow run` processes sharing one Kinesis
//! stream through a lease table in DynamoDB (see `crate::cluster`).

use serde::Deserialize;

use crate::time::Duration;

/// `[cluster]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The DynamoDB table of leases; created when missing, with KCL's schema.
    pub lease_table: String,
    /// This worker's name in the leases; default: the host name and a
    /// random suffix per process start.
    #[serde(default)]
    pub worker_id: Option<String>,
    /// A lease not renewed for this long is expired and may be taken.
    #[serde(default = "default_failover_time")]
    pub failover_time: Duration,
    /// A graceful handoff that takes longer is forced (the taker takes the
    /// lease as if it had expired).
    #[serde(default = "default_handoff_timeout")]
    pub handoff_timeout: Duration,
    /// Overrides the DynamoDB endpoint (emulators); omit for AWS.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Overrides the region of the AWS chain.
    #[serde(default)]
    pub region: Option<String>,
}

fn default_failover_time() -> Duration {
    Duration::from_millis(10_000)
}

fn default_handoff_timeout() -> Duration {
    Duration::from_millis(30_000)
}

impl ClusterConfig {
    /// The first inconsistency in these settings, if any.
    pub(super) fn problem(&self) -> Option<String> {
        let problem = if self.lease_table.trim().is_empty() {
            Some("lease_table must name a DynamoDB table".to_owned())
        } else if !table_name_ok(&self.lease_table) {
            Some(format!(
                "lease_table {:?} is not a DynamoDB table name (3-255 of a-z A-Z 0-9 _ - .)",
                self.lease_table
            ))
        } else if self
            .worker_id
            .as_deref()
            .is_some_and(|w| w.trim().is_empty())
        {
            Some("worker_id must not be empty (omit it for host name + random suffix)".into())
        } else if self.failover_time.millis() < 1_000 {
            Some(format!(
                "failover_time must be at least 1s (got {} ms): leases are renewed every third of it",
                self.failover_time.millis()
            ))
        } else if self.handoff_timeout.millis() <= 0 {
            Some("handoff_timeout must be positive".into())
        } else {
            None
        };
        problem.map(|p| format!("[cluster]: {p}"))
    }

    /// How often leases are renewed: a third of `failover_time`, so two
    /// renewals may fail before the lease expires.
    pub fn renew_interval(&self) -> std::time::Duration {
        self.failover_time.std() / 3
    }
}

fn table_name_ok(name: &str) -> bool {
    (3..=255).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    const REST: &str = "[schema]\nkey = \"k\"\ntimestamp = \"t\"\n[[sinks]]\ntype = \"stdout\"\nkinds = [\"features\"]\n";
    const KINESIS: &str = "[source]\ntype = \"kinesis\"\nstream_name = \"s\"\n";
    const STORE: &str = "[checkpoint_store]\ntype = \"s3\"\nbucket = \"bucket\"\n";

    fn error(text: &str) -> String {
        match Config::from_str_at(text, Path::new("c.toml"), |_| None) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_cluster_needs_a_kinesis_source_and_a_checkpoint_store() {
        let cluster = "[cluster]\nlease_table = \"leases\"\n";
        assert_eq!(error(&format!("{REST}{KINESIS}{STORE}{cluster}")), "");
        let e = error(&format!(
            "{REST}[source]\ntype = \"generator\"\n{STORE}{cluster}"
        ));
        assert!(e.contains("needs [source] type = \"kinesis\""), "{e}");
        let e = error(&format!("{REST}{KINESIS}{cluster}"));
        assert!(e.contains("needs a [checkpoint_store]"), "{e}");
    }

    #[test]
    fn bad_cluster_settings_are_refused_with_the_reason() {
        for (bad, says) in [
            ("lease_table = \"a b\"", "is not a DynamoDB table name"),
            (
                "lease_table = \"t12\"\nfailover_time = \"100ms\"",
                "at least 1s",
            ),
            (
                "lease_table = \"t12\"\nworker_id = \" \"",
                "worker_id must not be empty",
            ),
        ] {
            let e = error(&format!("{REST}{KINESIS}{STORE}[cluster]\n{bad}\n"));
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
