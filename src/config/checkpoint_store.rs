//! `[checkpoint_store]`: where checkpoints are also kept, off the machine,
//! so that state survives it (see `state::remote`).

use serde::Deserialize;

use super::s3::{bucket_problem, default_s3_attempts, S3ClientConfig};

/// `[checkpoint_store]`; one kind today, tagged for more.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum CheckpointStoreConfig {
    /// An S3 bucket (or an S3-compatible server).
    S3(S3CheckpointStoreConfig),
}

/// `[checkpoint_store] type = "s3"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3CheckpointStoreConfig {
    pub bucket: String,
    /// Every object of this pipeline's checkpoints starts with this: one
    /// pipeline per bucket and prefix.
    #[serde(default)]
    pub prefix: String,
    /// Every `every`-th local checkpoint is also made remote.
    #[serde(default = "default_every")]
    pub every: u32,
    /// Remote checkpoints kept; files only older ones use are deleted.
    #[serde(default = "default_retain")]
    pub retain: u32,
    /// Overrides the endpoint (S3-compatible servers); omit (or leave empty) for AWS.
    #[serde(default)]
    pub endpoint_url: Option<String>,
    /// Overrides the region of the AWS chain.
    #[serde(default)]
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`); default: on with
    /// `endpoint_url`, off for AWS.
    #[serde(default)]
    pub force_path_style: Option<bool>,
    /// Attempts per S3 request (the SDK's standard retry with backoff).
    #[serde(default = "default_s3_attempts")]
    pub max_attempts: u32,
}

fn default_every() -> u32 {
    1
}
fn default_retain() -> u32 {
    3
}

impl CheckpointStoreConfig {
    /// The first inconsistency in these settings, if any.
    pub(super) fn problem(&self) -> Option<String> {
        let CheckpointStoreConfig::S3(c) = self;
        let problem = bucket_problem(&c.bucket)
            .or_else(|| {
                c.prefix.starts_with('/').then(|| {
                    format!(
                        "prefix {:?} must not start with '/' (keys have no leading slash)",
                        c.prefix
                    )
                })
            })
            .or_else(|| (c.every == 0).then(|| "every must be at least 1".into()))
            .or_else(|| (c.retain == 0).then(|| "retain must be at least 1".into()))
            .or_else(|| c.client().problem());
        problem.map(|p| format!("[checkpoint_store] type = \"s3\": {p}"))
    }

    /// Names the store in messages: `s3://bucket/prefix`.
    pub fn describe(&self) -> String {
        let CheckpointStoreConfig::S3(c) = self;
        format!("s3://{}/{}", c.bucket, c.prefix)
    }
}

impl S3CheckpointStoreConfig {
    pub fn client(&self) -> S3ClientConfig {
        S3ClientConfig {
            endpoint_url: self.endpoint_url.clone(),
            region: self.region.clone(),
            force_path_style: self.force_path_style,
            max_attempts: self.max_attempts,
        }
    }
}
