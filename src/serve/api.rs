//! `run`'s online API ([`crate::online`] computes the answers): HTTP only,
//! the routes, query parameters, status codes and headers.
//!
//! | route | answer |
//! |---|---|
//! | `GET /v1/features/{key}[?at=T]` | 200 [`FeaturesBody`](crate::online::FeaturesBody) (an unknown key too, with `NOT_FOUND` statuses); 400 for a bad `at` |
//! | `POST /v1/get-online-features` | 200 in Feast's shape ([`crate::online::feast`]); 400 for a bad request or more than 1,000 entities |
//! | `POST /v1/score` | 200 [`ScoreBody`](crate::online::ScoreBody); 400 with the decoder's dead-letter reason for a bad event; 502 when the model failed for good (the body still has the vector) |
//!
//! Every route answers 503 with `Retry-After: 1` when the engine's queue
//! is full or it did not answer within `request_timeout`, and 503 when the
//! pipeline has stopped. Errors are `{"error": "..."}`.
//! `shardflow_api_requests_total{endpoint,status}` counts answers,
//! `shardflow_api_request_seconds{endpoint}` times them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::online::{ApiError, Online, QueryError};
use crate::time::parse_time;

/// The online API: a [`super::Part`] of `run`.
pub struct Api {
    online: Arc<Online>,
}

impl Api {
    pub fn new(online: Online) -> Self {
        Api {
            online: Arc::new(online),
        }
    }

    pub(super) fn routes(&self) -> Router {
        Router::new()
            .route("/v1/features/{key}", get(features))
            .route("/v1/get-online-features", post(feast))
            .route("/v1/score", post(score))
            .layer(DefaultBodyLimit::max(self.online.body_limit()))
            .with_state(self.online.clone())
    }

    pub(super) fn announce(&self, bound: SocketAddr) {
        tracing::info!(target: super::LOG_TARGET, %bound, "online API on http://{bound}/v1/");
    }
}

/// Counts and times one answer.
fn done(endpoint: &'static str, started: Instant, response: Response) -> Response {
    let status = response.status().as_u16().to_string();
    metrics::counter!("shardflow_api_requests_total", "endpoint" => endpoint, "status" => status)
        .increment(1);
    metrics::histogram!("shardflow_api_request_seconds", "endpoint" => endpoint)
        .record(started.elapsed().as_secs_f64());
    response
}

fn error(status: StatusCode, message: String) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::BadRequest(reason) => error(StatusCode::BAD_REQUEST, reason),
            ApiError::Query(e @ (QueryError::Busy(_) | QueryError::Timeout(_))) => {
                let mut r = error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            ApiError::Query(e @ QueryError::Stopped) => {
                error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            ApiError::Query(e @ QueryError::Engine(_)) => {
                tracing::warn!(error = %e, "online API: a state read failed");
                error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
            // The handlers turn it into a 307 with the request's own path.
            ApiError::Elsewhere(base) => {
                let mut r = error(
                    StatusCode::TEMPORARY_REDIRECT,
                    format!("another worker serves this key: {base}"),
                );
                if let Ok(v) = HeaderValue::from_str(&base) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                r
            }
            ApiError::Moving(why) => {
                let mut r = error(StatusCode::SERVICE_UNAVAILABLE, why);
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
                r
            }
            ApiError::Model(body, reason) => {
                let mut json = serde_json::to_value(&*body).unwrap_or_default();
                json["error"] = serde_json::Value::String(reason);
                (StatusCode::BAD_GATEWAY, Json(json)).into_response()
            }
        }
    }
}

/// `at` from the query string (`?at=T`, RFC 3339 or epoch ms); no other
/// parameter is known.
fn at_param(query: Option<&str>) -> Result<Option<i64>, ApiError> {
    let mut at = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_decode(value).map_err(ApiError::BadRequest)?;
        match name {
            "at" => {
                at = Some(parse_time(&value).map_err(|e| ApiError::BadRequest(format!("at: {e}")))?)
            }
            other => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}: the only one is `at`"
                )))
            }
        }
    }
    Ok(at)
}

/// `%XX` and `+` decoded (an RFC 3339 offset is `%2B01:00`).
fn percent_decode(text: &str) -> Result<String, String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = text
                    .get(i + 1..i + 3)
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("bad percent-encoding in {text:?}"))?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| format!("{text:?} is not UTF-8 once decoded"))
}

/// Under `[cluster]`, a key another worker serves is answered with a 307
/// to the same path and query on that worker (a 307 keeps the method and
/// body, so a POST is sent again there).
fn redirected<T: serde::Serialize>(answer: Result<T, ApiError>, uri: &axum::http::Uri) -> Response {
    match answer {
        Ok(body) => Json(body).into_response(),
        Err(ApiError::Elsewhere(base)) => {
            let path = uri.path_and_query().map_or("/", |p| p.as_str());
            ApiError::Elsewhere(format!("{}{path}", base.trim_end_matches('/'))).into_response()
        }
        Err(e) => e.into_response(),
    }
}

async fn features(
    State(online): State<Arc<Online>>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    uri: axum::http::Uri,
) -> Response {
    let started = Instant::now();
    let answer = match at_param(query.as_deref()) {
        Ok(at) => online.features(&key, at).await,
        Err(e) => Err(e),
    };
    done("features", started, redirected(answer, &uri))
}

async fn feast(
    State(online): State<Arc<Online>>,
    uri: axum::http::Uri,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> Response {
    let started = Instant::now();
    let forwarded = headers.contains_key(crate::online::forward::FORWARDED);
    let answer = online.feast(&body, forwarded).await;
    done("get-online-features", started, redirected(answer, &uri))
}

async fn score(State(online): State<Arc<Online>>, uri: axum::http::Uri, body: Bytes) -> Response {
    let started = Instant::now();
    let answer = online.score(&body).await;
    done("score", started, redirected(answer, &uri))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_is_the_only_query_parameter() {
        assert_eq!(at_param(None).unwrap(), None);
        assert_eq!(at_param(Some("")).unwrap(), None);
        assert_eq!(
            at_param(Some("at=1700000000000")).unwrap(),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            at_param(Some("at=2023-11-14T22:13:20%2B00:00")).unwrap(),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            at_param(Some("at=2023-11-14T22:13:20Z")).unwrap(),
            Some(1_700_000_000_000)
        );
        let e = |q| match at_param(Some(q)) {
            Err(ApiError::BadRequest(m)) => m,
            other => panic!("{q}: {other:?}"),
        };
        assert!(
            e("at=yesterday").starts_with("at: time \"yesterday\" is neither"),
            "{}",
            e("at=yesterday")
        );
        assert!(e("from=1").contains("unknown query parameter \"from\""));
        assert!(e("at=%zz").contains("percent-encoding"));
    }
}
