//! A DynamoDB emulator (dynoxide: SQLite in memory, embedded) served on
//! 127.0.0.1 for tests, and clients for it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Once;
use std::time::Duration;

use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use shardflow::aws::ClientSettings;
use shardflow::cluster::{LeaseTable, Retry};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

/// Dummy credentials and a region for the SDK, through the standard chain
/// (the environment); the emulator checks that requests are signed, not by
/// whom.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        std::env::set_var("AWS_ACCESS_KEY_ID", "shardflow-test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "shardflow-test-secret");
        std::env::set_var("AWS_REGION", "us-east-1");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
        if std::env::var_os("RUST_LOG").is_none() {
            std::env::set_var("RUST_LOG", "warn,dynoxide=error");
        }
        shardflow::telemetry::init_logging(shardflow::telemetry::LogFormat::Human);
    });
}

/// A running emulator with an empty database. Dropping it stops the server.
pub struct DynamoServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<Result<(), String>>,
}

impl DynamoServer {
    pub async fn start() -> DynamoServer {
        init();
        let db = dynoxide::Database::memory().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(dynoxide::server::serve_with_shutdown(
            listener,
            db,
            async move {
                let _ = stopped.await;
            },
        ));
        DynamoServer {
            addr,
            stop: Some(stop),
            server,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client without the SDK's retries: the lease table's own are
    /// what the tests exercise.
    pub async fn client(&self) -> aws_sdk_dynamodb::Client {
        client_for(&self.url()).await
    }

    /// `worker`'s handle on the lease table `name`, retrying quickly.
    pub async fn table(&self, name: &str, worker: &str) -> LeaseTable {
        LeaseTable::new(self.client().await, name, worker).with_retry(quick_retry())
    }
}

impl Drop for DynamoServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Connections still open would hold a graceful shutdown; a test is
        // done with them.
        self.server.abort();
    }
}

pub async fn client_for(url: &str) -> aws_sdk_dynamodb::Client {
    shardflow::aws::dynamodb::client(&ClientSettings {
        endpoint_url: Some(url.to_owned()),
        max_attempts: Some(1),
        ..ClientSettings::default()
    })
    .await
    .unwrap()
}

/// Retries bounded to well under a second in all.
pub fn quick_retry() -> Retry {
    Retry {
        attempts: 3,
        base: Duration::from_millis(10),
        cap: Duration::from_millis(50),
        attempt_timeout: Duration::from_secs(5),
    }
}

/// A row: attribute name to value.
pub type Row = HashMap<String, AttributeValue>;

pub fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

pub fn n(v: &str) -> AttributeValue {
    AttributeValue::N(v.to_owned())
}

pub fn ss(v: &[&str]) -> AttributeValue {
    AttributeValue::Ss(v.iter().map(|x| x.to_string()).collect())
}

pub fn row(pairs: &[(&str, AttributeValue)]) -> Row {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

impl DynamoServer {
    /// A table with these keys (name, HASH or RANGE, type), on demand.
    pub async fn create_table(&self, name: &str, keys: &[(&str, KeyType, ScalarAttributeType)]) {
        let mut request = self
            .client()
            .await
            .create_table()
            .table_name(name)
            .billing_mode(BillingMode::PayPerRequest);
        for (attr, kind, ty) in keys {
            request = request
                .key_schema(
                    KeySchemaElement::builder()
                        .attribute_name(*attr)
                        .key_type(kind.clone())
                        .build()
                        .unwrap(),
                )
                .attribute_definitions(
                    AttributeDefinition::builder()
                        .attribute_name(*attr)
                        .attribute_type(ty.clone())
                        .build()
                        .unwrap(),
                );
        }
        request.send().await.unwrap();
    }

    /// Writes `item` as it is, unconditionally.
    pub async fn put(&self, table: &str, item: Row) {
        self.client()
            .await
            .put_item()
            .table_name(table)
            .set_item(Some(item))
            .send()
            .await
            .unwrap();
    }

    /// The row with hash key `attr = key`, as stored.
    pub async fn get(&self, table: &str, attr: &str, key: &str) -> Option<Row> {
        let out = self
            .client()
            .await
            .get_item()
            .table_name(table)
            .key(attr, s(key))
            .consistent_read(true)
            .send()
            .await
            .unwrap();
        out.item().cloned()
    }
}
