//! Under `[cluster]`, a Feast request whose entities several workers own is
//! split by owner: this worker answers its own keys, and sends each other
//! owner its keys as a Feast request of their own, to the API address its
//! lease rows name (plain HTTP/1.1 on the cluster's network, as the API
//! serves). The answers are put back in the request's order.
//!
//! A forwarded request carries [`FORWARDED`]; its receiver answers only
//! keys it owns itself (or 503: ownership moved meanwhile), so a request is
//! never passed on twice.

use std::time::Duration;

use axum::body::Body;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use super::feast;

/// The header of a request one worker forwards to another.
pub const FORWARDED: &str = "x-shardflow-forwarded";

/// Largest answer read from another worker: 1,000 entities of many
/// features fit well within it.
const MAX_ANSWER_BYTES: usize = 64 << 20;

/// Sends Feast requests to other workers.
#[derive(Clone)]
pub struct Forwarder {
    client: Client<HttpConnector, Body>,
    timeout: Duration,
}

impl Forwarder {
    /// Each exchange may take `timeout` (the API's `request_timeout`).
    pub fn new(timeout: Duration) -> Forwarder {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        connector.set_nodelay(true);
        Forwarder {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    /// `POST {base}/v1/get-online-features` with `body`; the owner's answer,
    /// or why there is none.
    pub async fn feast(&self, base: &str, body: Vec<u8>) -> Result<feast::Response, String> {
        let url = format!("{}/v1/get-online-features", base.trim_end_matches('/'));
        let request = hyper::Request::post(&url)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(FORWARDED, "1")
            .body(Body::from(body))
            .map_err(|e| format!("{url}: {e}"))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| format!("{url}: {e}"))?;
            let status = response.status();
            let bytes = axum::body::to_bytes(Body::new(response.into_body()), MAX_ANSWER_BYTES)
                .await
                .map_err(|e| format!("{url}: reading the answer: {e}"))?;
            if !status.is_success() {
                return Err(format!(
                    "{url} answered {status}: {}",
                    String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
                ));
            }
            serde_json::from_slice(&bytes).map_err(|e| format!("{url}: not a Feast answer: {e}"))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(format!("{url}: no answer within {:?}", self.timeout)),
        }
    }
}
