//! Faults between shardflow and the emulator, in test code only: a
//! middleware that answers some calls with Kinesis' throttling errors, and a
//! TCP proxy that resets every open connection on demand (a subscription
//! cut mid-stream, as a load balancer or a network blip does).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Injected error answers for the consumer's control-plane calls.
#[derive(Default)]
pub struct Throttle {
    /// Probability that a matching call is refused with LimitExceededException.
    pub probability: Mutex<f64>,
    /// Operations (the `X-Amz-Target` suffix) the probability applies to.
    pub operations: Vec<&'static str>,
    /// Error codes for the next SubscribeToShard calls, one each, first.
    pub script: Mutex<VecDeque<&'static str>>,
    /// Errors answered, and SubscribeToShard calls that reached the emulator.
    pub injected: AtomicU64,
    pub subscribes: AtomicU64,
}

impl Throttle {
    pub fn new(probability: f64, operations: &[&'static str]) -> Arc<Throttle> {
        Arc::new(Throttle {
            probability: Mutex::new(probability),
            operations: operations.to_vec(),
            ..Throttle::default()
        })
    }

    pub fn set_probability(&self, p: f64) {
        *self.probability.lock().unwrap() = p;
    }

    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    pub fn subscribes(&self) -> u64 {
        self.subscribes.load(Ordering::SeqCst)
    }

    /// The error to answer `operation` with, if any.
    fn decide(&self, operation: &str) -> Option<&'static str> {
        if operation == "SubscribeToShard" {
            if let Some(code) = self.script.lock().unwrap().pop_front() {
                return Some(code);
            }
        }
        let p = *self.probability.lock().unwrap();
        (self.operations.contains(&operation) && rand::random::<f64>() < p)
            .then_some("LimitExceededException")
    }
}

/// `app`, with `throttle` in front of it when given.
pub fn wrap(app: axum::Router, throttle: Option<Arc<Throttle>>) -> axum::Router {
    match throttle {
        Some(t) => app.layer(axum::middleware::from_fn_with_state(t, throttled)),
        None => app,
    }
}

async fn throttled(State(t): State<Arc<Throttle>>, request: Request, next: Next) -> Response {
    let operation = request
        .headers()
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit('.').next())
        .unwrap_or("")
        .to_owned();
    if let Some(code) = t.decide(&operation) {
        t.injected.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::BAD_REQUEST,
            [("content-type", "application/x-amz-json-1.1")],
            format!(r#"{{"__type":"{code}","message":"injected {code} for {operation}"}}"#),
        )
            .into_response();
    }
    if operation == "SubscribeToShard" {
        t.subscribes.fetch_add(1, Ordering::SeqCst);
    }
    next.run(request).await
}

/// A TCP proxy to `target` whose `reset` aborts every open connection with
/// an RST. The target may restart on the same port; new connections follow.
pub struct ResetProxy {
    pub addr: SocketAddr,
    generation: watch::Sender<u64>,
    pub resets: Arc<AtomicU64>,
    /// An outage: every connection is reset as soon as it is accepted.
    down: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl ResetProxy {
    pub async fn start(target: SocketAddr) -> ResetProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (generation, rx) = watch::channel(0u64);
        let resets = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(accept(listener, target, rx, resets.clone(), down.clone()));
        ResetProxy {
            addr,
            generation,
            resets,
            down,
            task,
        }
    }

    /// Starts (`true`) or ends an outage: while it lasts, open connections
    /// are reset and new ones refused with an RST.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.reset();
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Resets every connection open now.
    pub fn reset(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    /// Connections reset so far.
    pub fn resets(&self) -> u64 {
        self.resets.load(Ordering::SeqCst)
    }
}

impl Drop for ResetProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(
    listener: TcpListener,
    target: SocketAddr,
    generation: watch::Receiver<u64>,
    resets: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if down.load(Ordering::SeqCst) {
            resets.fetch_add(1, Ordering::SeqCst);
            let _ = client.set_zero_linger();
            continue;
        }
        let mut generation = generation.clone();
        generation.mark_unchanged();
        let resets = resets.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(target).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let (mut client_read, mut client_write) = tokio::io::split(client);
            let (mut server_read, mut server_write) = server.into_split();
            let pipe = async {
                tokio::select! {
                    _ = tokio::io::copy(&mut client_read, &mut server_write) => {}
                    _ = tokio::io::copy(&mut server_read, &mut client_write) => {}
                }
            };
            let reset = tokio::select! {
                _ = pipe => false,
                _ = generation.changed() => true,
            };
            if reset {
                resets.fetch_add(1, Ordering::SeqCst);
                // SO_LINGER 0: closing sends an RST, not a FIN.
                let client = client_read.unsplit(client_write);
                let _ = client.set_zero_linger();
            }
        });
    }
}
