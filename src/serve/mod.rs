//! HTTP serving: every endpoint shardflow answers, one axum `Router` per
//! address.
//!
//! A command names the [`Part`]s it serves and the address of each:
//!
//! | part | routes | served by |
//! |---|---|---|
//! | [`Part::Telemetry`] ([`telemetry`]) | `GET /metrics`, `/healthz`, `/readyz` | `run --metrics-addr` |
//! | [`Part::Model`] ([`model`]) | `GET /ping`, `POST /invocations`, `POST /endpoints/{name}/invocations` | `serve-model --addr` |
//! | [`Part::Api`] ([`api`]) | `GET /v1/features/{key}`, `POST /v1/get-online-features`, `POST /v1/score` | `run` with `[api] addr` |
//!
//! [`by_address`] merges the parts that share an address into one [`Site`]
//! (one `Router`, so one listener answers all their routes; [`router`] is
//! that merge). [`serve`] binds a site, logs what it serves on the bound
//! address (each part writes its own startup line) and runs it in the
//! background until [`Server::stop`] or the end of the process. A new group
//! of endpoints is one more variant of [`Part`]: its routes and its startup
//! line; merging, binding and serving stay as they are. Parts own disjoint
//! paths (`Router::merge` panics on an overlap, a bug rather than an input).
//!
//! The handlers are HTTP only: what a request computes belongs to the module
//! that owns it (the model's request bodies are `crate::inference::invocations`,
//! the metrics recorder is `crate::telemetry`, the online API's answers
//! `crate::online`).

pub mod api;
pub mod model;
pub mod telemetry;

use std::future::Future;
use std::net::SocketAddr;

use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use api::Api;
pub use model::Container;
pub use telemetry::Telemetry;

/// The target of the startup lines: the binary's, as when the commands
/// logged them, so that log lines and `RUST_LOG` filters stay as they were.
const LOG_TARGET: &str = "shardflow";

/// One group of routes a command serves.
pub enum Part {
    /// `/metrics`, `/healthz`, `/readyz`.
    Telemetry(Telemetry),
    /// The SageMaker container contract.
    Model(Container),
    /// The online API: features and scores on request.
    Api(Api),
}

impl Part {
    fn routes(&self) -> Router {
        match self {
            Part::Telemetry(t) => t.routes(),
            Part::Model(m) => m.routes(),
            Part::Api(a) => a.routes(),
        }
    }

    /// Its startup line, once listening on `bound`.
    fn announce(&self, bound: SocketAddr) {
        match self {
            Part::Telemetry(t) => t.announce(bound),
            Part::Model(m) => m.announce(bound),
            Part::Api(a) => a.announce(bound),
        }
    }

    /// What it is named for in "cannot listen for … on ADDR", if anything.
    fn purpose(&self) -> Option<&'static str> {
        match self {
            Part::Telemetry(_) => Some("metrics"),
            Part::Model(_) => None,
            Part::Api(_) => Some("the online API"),
        }
    }
}

impl From<Telemetry> for Part {
    fn from(t: Telemetry) -> Part {
        Part::Telemetry(t)
    }
}

impl From<Api> for Part {
    fn from(a: Api) -> Part {
        Part::Api(a)
    }
}

impl From<Container> for Part {
    fn from(m: Container) -> Part {
        Part::Model(m)
    }
}

/// What one address serves: the merged routes of its parts, and the parts
/// (for the startup lines and the bind error).
pub struct Site {
    router: Router,
    parts: Vec<Part>,
}

impl Site {
    /// The routes alone, to serve with [`serve_on`] or to wrap.
    pub fn into_router(self) -> Router {
        self.router
    }

    /// What the site is for ("metrics"), from the parts that name themselves.
    fn purpose(&self) -> Option<String> {
        let named: Vec<&str> = self.parts.iter().filter_map(Part::purpose).collect();
        (!named.is_empty()).then(|| named.join(" and "))
    }
}

/// Merges `parts` into one router: one listener answers the routes of all.
pub fn router(parts: impl IntoIterator<Item = Part>) -> Site {
    let parts: Vec<Part> = parts.into_iter().collect();
    let router = parts
        .iter()
        .fold(Router::new(), |router, part| router.merge(part.routes()));
    Site { router, parts }
}

/// Groups parts by address, in the order the addresses first appear: the
/// parts at one address (port 0 included: one free port for all of them)
/// become one [`Site`], served by one listener.
pub fn by_address(parts: impl IntoIterator<Item = (SocketAddr, Part)>) -> Vec<(SocketAddr, Site)> {
    let mut groups: Vec<(SocketAddr, Vec<Part>)> = Vec::new();
    for (addr, part) in parts {
        match groups.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, group)) => group.push(part),
            None => groups.push((addr, vec![part])),
        }
    }
    groups
        .into_iter()
        .map(|(addr, group)| (addr, router(group)))
        .collect()
}

/// A site being served. Dropping it leaves the site served until the
/// process ends; [`Server::stop`] stops it.
pub struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// The bound address (the free port chosen for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections, lets the requests in flight finish,
    /// and returns once the server has stopped.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task
            .await
            .map_err(|e| anyhow::anyhow!("the HTTP server on {} failed: {e}", self.addr))??;
        Ok(())
    }
}

/// Binds `addr` (an error names what the site is for: "cannot listen for
/// metrics on ADDR: …"), logs each part's startup line with the bound
/// address, and serves `site` in the background.
pub async fn serve(addr: SocketAddr, site: Site) -> anyhow::Result<Server> {
    let purpose = site.purpose();
    let listener = TcpListener::bind(addr).await.map_err(|e| match &purpose {
        Some(purpose) => anyhow::anyhow!("cannot listen for {purpose} on {addr}: {e}"),
        None => anyhow::anyhow!("cannot listen on {addr}: {e}"),
    })?;
    let bound = listener.local_addr()?;
    for part in &site.parts {
        part.announce(bound);
    }
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        if stopped.await.is_err() {
            // The handle was dropped: serve until the process ends.
            std::future::pending::<()>().await;
        }
    };
    let task = tokio::spawn(async move {
        let result = serve_on(listener, site.router, shutdown).await;
        if let Err(e) = &result {
            let name = purpose.as_deref().unwrap_or("HTTP");
            tracing::error!(error = %e, "{name} endpoint stopped");
        }
        result
    });
    Ok(Server {
        addr: bound,
        stop,
        task,
    })
}

/// Serves `router` on an already bound `listener` until `shutdown`
/// resolves, then lets the requests in flight finish.
pub async fn serve_on(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;
    use crate::flow::Stats;
    use crate::inference::embedded::EmbeddedModel;

    fn telemetry() -> Part {
        let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        Telemetry::new(metrics, Arc::new(Stats::default())).into()
    }

    fn model() -> Part {
        let spec = toml::from_str(
            "name = \"m\"\ntype = \"logistic\"\nbias = -1.0\n[weights]\na = 2.0\nb = 0.5\n",
        )
        .unwrap();
        let model = EmbeddedModel::from_spec(spec, &["a", "b"]).unwrap();
        let names: crate::record::FeatureNames = vec![Arc::from("a"), Arc::from("b")].into();
        Container::new(model, names, "blue").unwrap().into()
    }

    /// One request over plain TCP (`Connection: close`), within 5 s: the
    /// status code and the whole answer.
    async fn request(addr: SocketAddr, head: &str, body: &str) -> (u16, String) {
        let exchange = async {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let request = format!(
                "{head} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(request.as_bytes()).await.unwrap();
            let mut answer = String::new();
            tcp.read_to_string(&mut answer).await.unwrap();
            answer
        };
        let answer = tokio::time::timeout(Duration::from_secs(5), exchange)
            .await
            .expect("answered within 5 s");
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {answer:?}"));
        (status, answer)
    }

    #[tokio::test]
    async fn parts_sharing_an_address_answer_on_one_listener() {
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut sites = by_address([(any, telemetry()), (any, model())]);
        assert_eq!(sites.len(), 1, "one address, one site");
        let (addr, site) = sites.pop().unwrap();
        let server = serve(addr, site).await.unwrap();
        let bound = server.addr();
        assert_ne!(bound.port(), 0);

        let (status, answer) = request(bound, "GET /healthz", "").await;
        assert_eq!(status, 200);
        assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
        let (status, answer) = request(bound, "GET /readyz", "").await;
        assert_eq!(status, 503);
        assert!(answer.ends_with("\r\n\r\nnot ready\n"), "{answer}");
        assert_eq!(request(bound, "GET /metrics", "").await.0, 200);

        assert_eq!(request(bound, "GET /ping", "").await.0, 200);
        let (status, answer) = request(bound, "POST /invocations", "[[1, 2]]").await;
        assert_eq!(status, 200);
        assert!(answer.contains("\"predictions\":[{"), "{answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("x-amzn-invoked-production-variant: blue"),
            "{answer}"
        );
        let (status, answer) = request(bound, "POST /endpoints/e/invocations", "[[1]]").await;
        assert_eq!(status, 400);
        assert!(answer.contains("ValidationError"), "{answer}");
        assert_eq!(request(bound, "GET /nowhere", "").await.0, 404);

        tokio::time::timeout(Duration::from_secs(5), server.stop())
            .await
            .expect("stops within 5 s")
            .unwrap();
        assert!(tokio::net::TcpStream::connect(bound).await.is_err());
    }

    #[tokio::test]
    async fn parts_at_other_addresses_get_listeners_of_their_own() {
        let a: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:0".parse().unwrap();
        let sites = by_address([(a, telemetry()), (b, model())]);
        let addrs: Vec<SocketAddr> = sites.iter().map(|(addr, _)| *addr).collect();
        assert_eq!(addrs, [a, b]);

        let mut servers = Vec::new();
        for (addr, site) in sites {
            servers.push(serve(addr, site).await.unwrap());
        }
        let (telemetry, model) = (servers[0].addr(), servers[1].addr());
        assert_eq!(request(telemetry, "GET /healthz", "").await.0, 200);
        assert_eq!(request(telemetry, "GET /ping", "").await.0, 404);
        assert_eq!(request(model, "GET /ping", "").await.0, 200);
        assert_eq!(request(model, "GET /healthz", "").await.0, 404);
        // A dropped handle leaves its site served.
        drop(servers);
        assert_eq!(request(model, "GET /ping", "").await.0, 200);
    }

    #[tokio::test]
    async fn a_taken_address_names_what_it_was_for() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let e = serve(addr, router([telemetry()])).await.err().unwrap();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot listen for metrics on {addr}: ")),
            "{e}"
        );
        let e = serve(addr, router([model()])).await.err().unwrap();
        assert!(
            e.to_string()
                .starts_with(&format!("cannot listen on {addr}: ")),
            "{e}"
        );
    }
}
