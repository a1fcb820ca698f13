//! `[api]`: the online API of `run` (features and scores on request, see
//! `crate::online`). Off unless the table is present.

use std::net::SocketAddr;

use serde::Deserialize;

use crate::time::Duration;

/// `[api]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// Where to listen. Loopback by default, like `--metrics-addr`: the
    /// API has no authentication, so exposing it is an explicit choice. An
    /// address shared with `--metrics-addr` is served by one listener.
    pub addr: SocketAddr,
    /// Requests queued for the engine at once; one more is answered 503
    /// with `Retry-After` at once instead of waiting.
    pub max_in_flight: usize,
    /// How long a request waits for the engine's answer (busy with a long
    /// checkpoint snapshot, say) before it is answered 503.
    /// The model call of `/v1/score` comes after and has `[inference]`'s
    /// own timeouts.
    pub request_timeout: Duration,
}

/// The default address of `[api]`.
pub const DEFAULT_API_ADDR: &str = "127.0.0.1:8088";

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            addr: DEFAULT_API_ADDR.parse().expect("a valid address"),
            max_in_flight: 256,
            request_timeout: Duration::from_millis(1_000),
        }
    }
}

impl ApiConfig {
    /// The first inconsistency in these settings, if any.
    pub(super) fn problem(&self) -> Option<String> {
        if self.max_in_flight == 0 {
            return Some("[api] max_in_flight must be at least 1".into());
        }
        if self.request_timeout.millis() <= 0 {
            return Some("[api] request_timeout must be greater than 0".into());
        }
        None
    }
}
