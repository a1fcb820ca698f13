//! Remote checkpoints (`state::remote`) against a real S3-compatible server
//! (s3s-fs, embedded, on 127.0.0.1) and real RocksDB state written by the
//! engine: upload and restore give the same state, uploads are
//! incremental, damaged checkpoints fall back to older ones (or fail
//! naming each), retention keeps exactly what its manifests name, and
//! errors name the store.

mod common;
mod s3;

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Driver, In, Seen, Step};
use s3::S3Server;
use shardflow::config::Config;
use shardflow::engine::Engine;
use shardflow::record::Position;
use shardflow::state::remote::{
    manifest_key, Manifest, ManifestFile, RemoteError, RemoteStore, RestoreReport, UploadReport,
};
use shardflow::state::{KeyCounts, StateStore};

const BUCKET: &str = "checkpoints";
const PREFIX: &str = "shardflow/test";
const STORE: &str = "s3://checkpoints/shardflow/test";
/// Every test finishes well within this.
const LIMIT: Duration = Duration::from_secs(120);

/// Runs a test body, failing it after [`LIMIT`].
async fn bounded<F: Future<Output = ()>>(body: F) {
    tokio::time::timeout(LIMIT, body)
        .await
        .expect("the test did not finish in time");
}

/// State written through the engine, committed like the pipeline does.
struct Writer {
    config: Config,
    driver: Driver,
    /// Holds the state directory and the local checkpoints.
    work: tempfile::TempDir,
    seq: u32,
}

type Res<T> = Result<T, RemoteError>;

/// A commit, as the pipeline makes at a checkpoint barrier.
const COMMIT: Step = Step::Checkpoint { deferred: false };

impl Writer {
    fn new() -> Writer {
        let config = common::config(5, 1_000_000, 30, common::ALL_FEATURES);
        let work = tempfile::tempdir().unwrap();
        let store = common::open(&work.path().join("state"), &config);
        let engine = Engine::new(&config, store.clone()).unwrap();
        Writer {
            driver: Driver::new(engine, store, 0),
            config,
            work,
            seq: 0,
        }
    }

    fn fingerprint(&self) -> String {
        self.config.state_fingerprint()
    }

    fn store(&self) -> &StateStore {
        &self.driver.store
    }

    /// `n` more events over 2 partitions and 40 keys, committed every 50
    /// and at the end.
    fn write(&mut self, n: u32) {
        let mut out = Vec::new();
        for _ in 0..n {
            let seq = self.seq;
            self.seq += 1;
            self.driver.step(
                &Step::Event(In {
                    partition: (seq % 2) as u8,
                    seq,
                    key: (seq * 7 % 40) as u8,
                    time: 1_000 + i64::from(seq) * 2,
                    amount: (!seq.is_multiple_of(11)).then_some((seq % 19) as i32),
                    merchant: (seq % 5) as u8,
                }),
                &mut out,
            );
            if seq % 50 == 49 {
                self.driver.step(&COMMIT, &mut out);
            }
        }
        self.driver.step(&COMMIT, &mut out);
    }

    /// A local RocksDB checkpoint of the committed state, and its id.
    fn checkpoint(&mut self) -> (PathBuf, u64) {
        let id = self.store().committed_checkpoint().unwrap();
        let dir = self.path(&format!("checkpoint-{id}"));
        self.store().create_checkpoint(&dir).unwrap();
        (dir, id)
    }

    /// Uploads the checkpoint `dir` of commit `id`.
    async fn send(&self, remote: &RemoteStore, dir: &Path, id: u64) -> Res<UploadReport> {
        let meta = meta(self.store());
        remote.upload(dir, id, &self.fingerprint(), meta).await
    }

    /// Writes `n` events, checkpoints and uploads: the checkpoint id.
    async fn upload(&mut self, remote: &RemoteStore, n: u32) -> (u64, UploadReport) {
        self.write(n);
        let (dir, id) = self.checkpoint();
        (id, self.send(remote, &dir, id).await.unwrap())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// Restores the newest usable checkpoint into [`path`](Self::path)`(name)`.
    async fn restore(&self, remote: &RemoteStore, name: &str) -> Res<RestoreReport> {
        let dest = self.path(name);
        remote.restore_newest(&dest, &self.fingerprint()).await
    }

    /// Opens a restored state directory.
    fn open(&self, name: &str) -> StateStore {
        StateStore::open(&self.path(name), &self.fingerprint(), false).unwrap()
    }

    /// Everything `store` holds, as far as the public API shows it: the
    /// commit, the stored slices and counts, and what an engine restored
    /// from it outputs when its input ends (every window's value).
    fn view(&self, store: &StateStore) -> View {
        let mut engine = Engine::new(&self.config, store.clone()).unwrap();
        let mut out = Vec::new();
        engine.finish(&mut out).unwrap();
        View {
            checkpoint: store.committed_checkpoint().unwrap(),
            positions: store.committed_positions().unwrap(),
            created_at: store.created_at().unwrap(),
            slices: store.stored_slices().unwrap(),
            counts: store.key_counts().unwrap(),
            finish: common::by_id(&out),
        }
    }
}

/// What a caller would put beside the files.
fn meta(store: &StateStore) -> serde_json::Value {
    serde_json::json!({ "positions": store.committed_positions().unwrap() })
}

/// What [`Writer::view`] sees.
#[derive(Debug, PartialEq)]
struct View {
    checkpoint: u64,
    positions: Vec<Position>,
    created_at: u64,
    slices: Vec<(u16, String, i64)>,
    counts: KeyCounts,
    finish: BTreeMap<String, Seen>,
}

async fn server() -> S3Server {
    let server = S3Server::start().await;
    server.create_bucket(BUCKET).await;
    server
}

async fn remote(server: &S3Server) -> RemoteStore {
    RemoteStore::new(server.client().await, BUCKET, PREFIX)
}

fn key(rel: &str) -> String {
    format!("{PREFIX}/{rel}")
}

async fn manifest(server: &S3Server, id: u64) -> Manifest {
    let bytes = server.get(BUCKET, &key(&manifest_key(id))).await;
    serde_json::from_slice(&bytes).unwrap()
}

/// The keys under `dir`, relative to the prefix.
async fn keys(server: &S3Server, dir: &str) -> BTreeSet<String> {
    let listed = server.list(BUCKET, &key(dir)).await;
    listed
        .into_iter()
        .map(|(k, _)| k[PREFIX.len() + 1..].to_owned())
        .collect()
}

/// Asserts that `text` says each of `parts`.
#[track_caller]
fn says(text: impl std::fmt::Display, parts: &[&str]) {
    let text = text.to_string();
    for part in parts {
        assert!(text.contains(part), "{text:?} does not say {part:?}");
    }
}

/// An SST file of checkpoint `newer` that checkpoint `older` does not name.
fn own_sst<'m>(newer: &'m Manifest, older: &Manifest) -> &'m ManifestFile {
    newer
        .files
        .iter()
        .find(|f| f.name.ends_with(".sst") && older.files.iter().all(|g| g.key != f.key))
        .expect("the newer checkpoint has an SST file of its own")
}

/// Uploaded, restored into a fresh directory and opened, the state is the
/// same: checkpoint id, positions, every slice, and every window's value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_checkpoint_opens_as_the_same_state() {
    bounded(async {
        let server = server().await;
        let remote = remote(&server).await;
        remote.check().await.expect("the store is reachable");
        assert_eq!(remote.newest_manifest().await.unwrap(), None);
        let mut w = Writer::new();
        let (id, report) = w.upload(&remote, 600).await;
        assert!(id > 1, "several commits were made");
        assert_eq!(
            (report.files_reused, report.files_uploaded),
            (0, report.total_files)
        );
        assert_eq!(report.bytes_uploaded, report.total_bytes);
        assert!(report.total_files >= 4, "{report:?}");
        let newest = remote.newest_manifest().await.unwrap().unwrap();
        assert_eq!(
            (newest.checkpoint_id, newest.fingerprint.clone()),
            (id, w.fingerprint())
        );

        // A new host: a store of its own (slashes around the prefix do not matter).
        let fresh = RemoteStore::new(server.client().await, BUCKET, format!("/{PREFIX}/"));
        let restored = w.restore(&fresh, "restored").await.unwrap();
        assert_eq!(restored.manifest.checkpoint_id, id);
        assert_eq!(restored.manifest.meta, meta(w.store()));
        assert_eq!(restored.bytes, report.total_bytes);
        assert!(restored.skipped.is_empty());

        let original = w.view(w.store());
        assert!(!original.slices.is_empty() && !original.finish.is_empty());
        let store = w.open("restored");
        assert_eq!(w.view(&store), original);
        // And it lives on: commits continue from the restored id.
        let mut engine = Engine::new(&w.config, store.clone()).unwrap();
        let delta = engine.snapshot(id + 1).unwrap();
        store.commit(id + 1, delta, &original.positions).unwrap();
        assert_eq!(store.committed_checkpoint().unwrap(), id + 1);
    })
    .await;
}

/// A second upload sends only the files the first did not: the SST files
/// of the first are named again, by this store and by a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_upload_sends_only_new_files() {
    bounded(async {
        let server = server().await;
        let remote = remote(&server).await;
        let mut w = Writer::new();
        let (first, _) = w.upload(&remote, 600).await;
        let (second, report) = w.upload(&remote, 100).await;
        assert!(report.files_reused > 0, "{report:?}");
        assert!(report.bytes_uploaded < report.total_bytes, "{report:?}");
        assert_eq!(
            report.files_uploaded + report.files_reused,
            report.total_files
        );
        let (a, b) = (
            manifest(&server, first).await,
            manifest(&server, second).await,
        );
        let shared: Vec<_> = b.files.iter().filter(|f| a.files.contains(f)).collect();
        assert_eq!(shared.len(), report.files_reused);
        assert!(shared.iter().any(|f| f.name.ends_with(".sst")));

        // A store that did not upload them learns them from the bucket.
        w.write(100);
        let (dir, third) = w.checkpoint();
        let other = RemoteStore::new(server.client().await, BUCKET, PREFIX);
        let report = w.send(&other, &dir, third).await.unwrap();
        assert!(report.files_reused > 0, "{report:?}");
        assert!(report.bytes_uploaded < report.total_bytes, "{report:?}");
        let restored = w.restore(&remote, "restored").await.unwrap();
        assert_eq!(restored.manifest.checkpoint_id, third);
        assert_eq!(w.view(&w.open("restored")), w.view(w.store()));
    })
    .await;
}

/// Files larger than the multipart threshold go up in parts (of S3's
/// smallest size, 5 MiB, so a file of 11 MiB put beside the RocksDB files
/// takes three) and come back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_files_go_up_in_parts() {
    bounded(async {
        const PART: u64 = 5 << 20;
        let server = server().await;
        let remote = remote(&server)
            .await
            .with_multipart(1024, PART)
            .with_concurrency(2);
        let mut w = Writer::new();
        w.write(600);
        let (dir, id) = w.checkpoint();
        // Bytes that do not repeat at the part size (a multiplicative hash).
        let big: Vec<u8> = (0..2 * PART + (1 << 20))
            .map(|i: u64| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8)
            .collect();
        assert_ne!(big[..PART as usize], big[PART as usize..2 * PART as usize]);
        std::fs::write(dir.join("padding.bin"), &big).unwrap();
        let report = w.send(&remote, &dir, id).await.unwrap();
        assert_eq!(report.files_uploaded, report.total_files);
        let m = manifest(&server, id).await;
        assert!(m
            .files
            .iter()
            .any(|f| f.name == "padding.bin" && f.size == big.len() as u64));
        w.restore(&remote, "restored").await.unwrap();
        assert!(std::fs::read(w.path("restored").join("padding.bin")).unwrap() == big);
        assert_eq!(w.view(&w.open("restored")), w.view(w.store()));
    })
    .await;
}

/// A file of the newest checkpoint deleted from the bucket: the previous
/// checkpoint is restored, and the newest is reported skipped with why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_file_falls_back_to_the_previous_checkpoint() {
    bounded(async {
        let server = server().await;
        let remote = remote(&server).await;
        let mut w = Writer::new();
        let (first, _) = w.upload(&remote, 400).await;
        let at_first = w.view(w.store());
        let (second, _) = w.upload(&remote, 200).await;
        let (a, b) = (
            manifest(&server, first).await,
            manifest(&server, second).await,
        );
        let victim = own_sst(&b, &a);
        let client = server.client().await;
        client
            .delete_object()
            .bucket(BUCKET)
            .key(key(&victim.key))
            .send()
            .await
            .unwrap();

        let restored = w.restore(&remote, "restored").await.unwrap();
        assert_eq!(restored.manifest.checkpoint_id, first);
        assert_eq!(restored.skipped.len(), 1);
        let (id, reason) = &restored.skipped[0];
        assert_eq!(*id, second);
        says(reason, &[&victim.name, "missing"]);
        assert_eq!(w.view(&w.open("restored")), at_first);
        // No temporary directory is left beside the destination.
        let left: Vec<_> = std::fs::read_dir(w.work.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".restore-"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    })
    .await;
}

/// Files overwritten in the bucket (another content of the same length,
/// then a truncated one): the newest checkpoint falls back; with every
/// checkpoint damaged the error names each id and its problem.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_files_fall_back_and_with_none_usable_the_error_lists_each() {
    bounded(async {
        let server = server().await;
        let remote = remote(&server).await;
        let mut w = Writer::new();
        let (first, _) = w.upload(&remote, 300).await;
        let (second, _) = w.upload(&remote, 200).await;
        let (third, _) = w.upload(&remote, 200).await;
        let a = manifest(&server, first).await;
        let b = manifest(&server, second).await;
        let c = manifest(&server, third).await;
        // The newest: same length, other content.
        let flipped = own_sst(&c, &b);
        let mut bytes = server.get(BUCKET, &key(&flipped.key)).await;
        let at = bytes.len() / 2;
        bytes[at] ^= 0xff;
        server.put(BUCKET, &key(&flipped.key), bytes).await;
        let restored = w.restore(&remote, "restored").await.unwrap();
        assert_eq!(restored.manifest.checkpoint_id, second);
        let reason = &restored.skipped[0].1;
        says(reason, &[&flipped.name, "sha256"]);

        // The one before: truncated. The oldest: its manifest is not JSON.
        let truncated = own_sst(&b, &a);
        let bytes = server.get(BUCKET, &key(&truncated.key)).await;
        let half = bytes[..bytes.len() / 2].to_vec();
        server.put(BUCKET, &key(&truncated.key), half).await;
        let first_key = key(&manifest_key(first));
        server
            .put(BUCKET, &first_key, b"{\"format\":".to_vec())
            .await;
        let err = w
            .restore(&remote, "again")
            .await
            .expect_err("no checkpoint is usable");
        let RemoteError::NoUsableCheckpoint { store, tried } = &err else {
            panic!("not NoUsableCheckpoint: {err}");
        };
        assert_eq!(store, STORE);
        let ids: Vec<u64> = tried.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [third, second, first]);
        says(&tried[1].1, &[&truncated.name, "bytes"]);
        says(&tried[2].1, &["not JSON"]);
        let each: Vec<String> = ids.iter().map(|id| format!("checkpoint {id}: ")).collect();
        says(
            &err,
            &[STORE, &each[0], &each[1], &each[2], &truncated.name],
        );
        assert!(!w.path("again").exists(), "nothing is left there");
    })
    .await;
}

/// After five uploads, `retain(2)` leaves exactly the two newest
/// manifests and the files they name, and the newest still restores.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_keeps_the_newest_manifests_and_only_their_files() {
    bounded(async {
        let server = server().await;
        let remote = remote(&server).await;
        let mut w = Writer::new();
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.push(w.upload(&remote, 200).await.0);
        }
        // An upload that died after sending a file: an orphan, older than
        // the newest manifest.
        let orphan = key("files/000999.sst.0123456789abcdef");
        server.put(BUCKET, &orphan, vec![1; 10]).await;
        let (newest, _) = w.upload(&remote, 100).await;
        ids.push(newest);
        let report = remote.retain(2).await.unwrap();
        assert_eq!((report.manifests_kept, report.manifests_deleted), (2, 3));
        assert!(report.files_deleted > 1, "{report:?}");
        let kept: BTreeSet<String> = ids[3..].iter().map(|&id| manifest_key(id)).collect();
        assert_eq!(keys(&server, "manifests/").await, kept);
        let mut named = BTreeSet::new();
        for &id in &ids[3..] {
            named.extend(manifest(&server, id).await.files.into_iter().map(|f| f.key));
        }
        assert_eq!(keys(&server, "files/").await, named);

        let restored = w.restore(&remote, "restored").await.unwrap();
        assert_eq!(restored.manifest.checkpoint_id, newest);
        assert_eq!(w.view(&w.open("restored")), w.view(w.store()));
        // Uploads after retention still only send what is new, and restore.
        let (after, report) = w.upload(&remote, 100).await;
        assert!(report.files_reused > 0, "{report:?}");
        let restored = w.restore(&remote, "after").await.unwrap();
        assert_eq!(restored.manifest.checkpoint_id, after);
        assert_eq!(remote.retain(1).await.unwrap().manifests_deleted, 2);
    })
    .await;
}

/// A missing bucket, refused credentials and an unreachable endpoint fail
/// with errors that name the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_store_is_named_in_its_errors() {
    bounded(async {
        const MISSING: &str = "s3://no-such-bucket/shardflow/test";
        let server = server().await;
        let missing = RemoteStore::new(server.client().await, "no-such-bucket", PREFIX);
        says(
            missing.check().await.unwrap_err(),
            &[MISSING, "NoSuchBucket"],
        );
        let mut w = Writer::new();
        w.write(50);
        let (dir, id) = w.checkpoint();
        let upload = w.send(&missing, &dir, id).await.unwrap_err();
        let restore = w.restore(&missing, "restored").await.unwrap_err();
        let newest = missing.newest_manifest().await.unwrap_err();
        for text in [upload.to_string(), restore.to_string(), newest.to_string()] {
            says(text, &[MISSING, "NoSuchBucket"]);
        }

        let base = server.client().await.config().to_builder();
        let wrong = aws_sdk_s3::config::Credentials::new(
            s3::ACCESS_KEY,
            "not-the-secret",
            None,
            None,
            "test",
        );
        let client = aws_sdk_s3::Client::from_conf(base.credentials_provider(wrong).build());
        let refused = RemoteStore::new(client, BUCKET, PREFIX);
        says(
            refused.check().await.unwrap_err(),
            &[STORE, "SignatureDoesNotMatch"],
        );

        // A port nothing listens on (bound, then closed).
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut settings = server.client_config();
        settings.endpoint_url = Some(format!("http://127.0.0.1:{port}"));
        settings.max_attempts = 1;
        let client = shardflow::aws::s3::client(&settings).await.unwrap();
        let unreachable = RemoteStore::new(client, BUCKET, PREFIX);
        says(
            unreachable.check().await.unwrap_err(),
            &[STORE, "ListObjectsV2"],
        );
    })
    .await;
}

/// State of another configuration is refused, clearly, not skipped; an
/// empty store and a destination that holds files are errors too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_fingerprint_and_bad_destinations_are_refused() {
    bounded(async {
        let server = server().await;
        let remote = remote(&server).await;
        let mut w = Writer::new();
        let err = w.restore(&remote, "restored").await.unwrap_err();
        let empty =
            matches!(&err, RemoteError::NoUsableCheckpoint { tried, .. } if tried.is_empty());
        assert!(empty, "{err}");
        says(&err, &[STORE, "holds no manifest"]);

        let (id, _) = w.upload(&remote, 200).await;
        let dest = w.path("restored");
        let err = remote
            .restore_newest(&dest, "another-fingerprint")
            .await
            .expect_err("another fingerprint is refused");
        let RemoteError::FingerprintMismatch { checkpoint_id, .. } = &err else {
            panic!("not FingerprintMismatch: {err}");
        };
        assert_eq!(*checkpoint_id, id);
        says(
            &err,
            &[STORE, "another-fingerprint", &w.fingerprint(), "refusing"],
        );
        assert!(!dest.exists());

        std::fs::create_dir_all(&dest).unwrap();
        std::fs::write(dest.join("keep.txt"), "mine").unwrap();
        let err = w.restore(&remote, "restored").await.unwrap_err();
        assert!(matches!(err, RemoteError::DestinationNotEmpty { .. }));
        says(&err, &[STORE, "not an empty directory"]);
        let kept = std::fs::read_to_string(dest.join("keep.txt")).unwrap();
        assert_eq!(kept, "mine");
        // An empty directory is fine.
        std::fs::remove_file(dest.join("keep.txt")).unwrap();
        let restored = w.restore(&remote, "restored").await.unwrap();
        assert_eq!(restored.manifest.checkpoint_id, id);

        // A directory that is not a checkpoint is not uploaded, and no
        // checkpoint is made over an existing directory.
        let empty = w.path("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let err = w.send(&remote, &empty, id + 1).await.unwrap_err();
        assert!(matches!(err, RemoteError::NotACheckpoint { .. }), "{err}");
        assert!(w.store().create_checkpoint(&empty).is_err());
    })
    .await;
}
