//! SubscribeToShard runs over HTTP/2 with shardflow's client (AWS refuses it
//! over HTTP/1.1): the emulator behind a TLS listener offering h2 and
//! http/1.1 by ALPN, a client trusting its self-signed certificate, and the
//! server recording the protocol of every request it serves.

mod emulator;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::Request;
use axum::http::Version;
use axum::middleware::Next;
use axum::response::Response;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as AutoBuilder;
use hyper_util::service::TowerToHyperService;
use shardflow::aws::{kinesis::client, ClientSettings};
use tokio_rustls::rustls;

static SEEN: Mutex<Vec<(String, Version)>> = Mutex::new(Vec::new());
static ALPN: Mutex<Vec<Option<Vec<u8>>>> = Mutex::new(Vec::new());

async fn record(req: Request, next: Next) -> Response {
    let target = req
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    SEEN.lock().unwrap().push((target, req.version()));
    next.run(req).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_to_shard_negotiates_http2_over_tls() {
    emulator::init();
    let (app, _store) = ferrokinesis::create_app(emulator::options());
    let app = app.layer(axum::middleware::from_fn(record));

    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            let app = app.clone();
            conns.spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                ALPN.lock()
                    .unwrap()
                    .push(stream.get_ref().1.alpn_protocol().map(|p| p.to_vec()));
                let _ = AutoBuilder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(
                        TokioIo::new(stream),
                        TowerToHyperService::new(app),
                    )
                    .await;
            });
        }
    });

    let client = client(&ClientSettings {
        region: Some("us-east-1".into()),
        endpoint_url: Some(format!("https://{addr}")),
        extra_root_pem: Some(cert.cert.pem().into_bytes()),
        max_attempts: None,
    })
    .await
    .unwrap();
    emulator::create_stream(&client, "h2", 1).await;
    let stream_arn = client
        .describe_stream_summary()
        .stream_name("h2")
        .send()
        .await
        .unwrap()
        .stream_description_summary
        .unwrap()
        .stream_arn;
    let (_stop, mut shutdown) = tokio::sync::watch::channel(false);
    let consumer =
        shardflow::source::kinesis::ensure_consumer(&client, &stream_arn, "h2", &mut shutdown)
            .await
            .unwrap()
            .unwrap();
    emulator::put(&client, "h2", vec![("k".into(), b"{}".to_vec())]).await;
    let mut sub = client
        .subscribe_to_shard()
        .consumer_arn(consumer)
        .shard_id("shardId-000000000000")
        .starting_position(
            aws_sdk_kinesis::types::StartingPosition::builder()
                .r#type(aws_sdk_kinesis::types::ShardIteratorType::TrimHorizon)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), sub.event_stream.recv())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match event {
        aws_sdk_kinesis::types::SubscribeToShardEventStream::SubscribeToShardEvent(e) => {
            assert_eq!(e.records.len(), 1)
        }
        other => panic!("unexpected event {other:?}"),
    }
    drop(sub);
    server.abort();

    let seen = SEEN.lock().unwrap().clone();
    let subscribe: Vec<_> = seen
        .iter()
        .filter(|(t, _)| t.ends_with("SubscribeToShard"))
        .collect();
    assert!(
        !subscribe.is_empty(),
        "SubscribeToShard was served: {seen:?}"
    );
    assert!(
        seen.iter().all(|(_, v)| *v == Version::HTTP_2),
        "every request ran over HTTP/2: {seen:?}"
    );
    assert!(ALPN
        .lock()
        .unwrap()
        .iter()
        .all(|p| p.as_deref() == Some(&b"h2"[..])));
}
