//! An S3-compatible server (s3s-fs over a temp dir, embedded) on
//! 127.0.0.1 for tests, and helpers to fill and read buckets.
#![allow(dead_code)]

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Once;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as AutoBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use shardflow::config::S3ClientConfig;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

pub const ACCESS_KEY: &str = "shardflow-test";
pub const SECRET_KEY: &str = "shardflow-test-secret";

/// Dummy credentials for the SDK, through the standard chain (the
/// environment); the server accepts exactly these.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
        std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        if std::env::var_os("RUST_LOG").is_none() {
            std::env::set_var("RUST_LOG", "warn,s3s=error,s3s_fs=error");
        }
        shardflow::telemetry::init_logging(shardflow::telemetry::LogFormat::Human);
    });
}

/// A running server. Dropping it stops the listener and its connections.
pub struct S3Server {
    pub addr: SocketAddr,
    pub root: tempfile::TempDir,
    server: tokio::task::JoinHandle<()>,
}

impl S3Server {
    pub async fn start() -> S3Server {
        init();
        let root = tempfile::tempdir().unwrap();
        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        let mut builder = S3ServiceBuilder::new(fs);
        builder.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
        let service = builder.build();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let mut connections = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let service = service.clone();
                connections.spawn(async move {
                    let _ = AutoBuilder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        S3Server { addr, root, server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn client_config(&self) -> S3ClientConfig {
        S3ClientConfig {
            endpoint_url: Some(self.url()),
            region: None,
            force_path_style: None,
            max_attempts: 3,
        }
    }

    pub async fn client(&self) -> Client {
        shardflow::aws::s3::client(&self.client_config())
            .await
            .unwrap()
    }

    pub async fn create_bucket(&self, bucket: &str) {
        self.client()
            .await
            .create_bucket()
            .bucket(bucket)
            .send()
            .await
            .unwrap();
    }

    pub async fn put(&self, bucket: &str, key: &str, body: Vec<u8>) {
        self.client()
            .await
            .put_object()
            .bucket(bucket)
            .key(key)
            .body(ByteStream::from(body))
            .send()
            .await
            .unwrap();
    }

    /// Keys and sizes under `prefix`, in key order.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Vec<(String, u64)> {
        let client = self.client().await;
        let mut pages = client
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            for o in page.unwrap().contents() {
                out.push((o.key().unwrap().to_owned(), o.size().unwrap_or(0) as u64));
            }
        }
        out
    }

    pub async fn get(&self, bucket: &str, key: &str) -> Vec<u8> {
        let out = self
            .client()
            .await
            .get_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .unwrap();
        out.body.collect().await.unwrap().into_bytes().to_vec()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.server.abort();
    }
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

pub fn gunzip(bytes: &[u8]) -> Vec<u8> {
    use std::io::Read as _;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .unwrap();
    out
}
