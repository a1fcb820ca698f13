//! The reliability harness: the real `shardflow` binary as a child process
//! (started, SIGKILLed, SIGTERMed, its RSS sampled), NDJSON outputs read the
//! way a downstream reader must read them (deduplicated by id, a partial last
//! line of a running writer ignored), and the knobs that make `make soak`
//! run the same tests longer than `make test`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A knob from the environment (`make soak` sets them), or its default for
/// the bounded `make test` run.
pub fn knob(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

/// Where a test writes what `make soak` collects (CSV series, reports); a
/// temporary directory's path when unset.
pub fn report_dir() -> Option<PathBuf> {
    std::env::var_os("SHARDFLOW_REPORT_DIR").map(|d| {
        let d = PathBuf::from(d);
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

/// Appends one line to `report.txt` in the report directory and prints it,
/// so `make test` shows the numbers too.
pub fn report(line: &str) {
    eprintln!("[reliability] {line}");
    append_report(line);
}

/// Appends `line` to `report.txt` in the report directory, if there is one.
pub fn append_report(line: &str) {
    if let Some(dir) = report_dir() {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("report.txt"))
            .unwrap();
        writeln!(f, "{line}").unwrap();
    }
}

/// `[schema]` of the events the reliability tests produce: the generator's
/// shape (key `userId`, `timestamp`, `amount`, `merchant`).
pub const SCHEMA: &str = r#"
[schema]
key = "userId"
timestamp = "timestamp"
fields = { amount = "f64", merchant = "string" }
"#;

/// `[watermark]` with idleness off (1 h) and no allowed lateness, so that
/// processing time (restarts, stalls, a loaded machine) changes no result.
pub fn watermark(out_of_orderness: &str) -> String {
    format!(
        "\n[watermark]\nmax_out_of_orderness = \"{out_of_orderness}\"\nidle_timeout = \"1h\"\nallowed_lateness = \"0s\"\n"
    )
}

/// A `[[sinks]]` table for an NDJSON file.
pub fn file_sink(path: &str, kinds: &[&str]) -> String {
    format!("\n[[sinks]]\ntype = \"file\"\npath = \"{path}\"\nkinds = {kinds:?}\n")
}

/// A `shardflow run` child process. Its stderr goes to `log` so a test can
/// show it when something fails and check the error a user would read.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub peak_rss_kib: u64,
}

/// Environment for runs against the emulator: dummy credentials through the
/// standard chain, nothing read from the network.
pub const AWS_ENV: [(&str, &str); 4] = [
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

impl Proc {
    /// `shardflow run --config <config>` in `dir`, metrics on `metrics`
    /// (`"off"` or an address), stderr appended to `dir/<log_name>`.
    pub fn run(dir: &Path, config: &Path, metrics: &str, log_name: &str) -> Proc {
        let level = std::env::var("SHARDFLOW_TEST_LOG").unwrap_or_else(|_| "warn".into());
        Proc::run_with_log_level(dir, config, metrics, log_name, &level)
    }

    /// [`Proc::run`] with `RUST_LOG` set to `level`.
    pub fn run_with_log_level(
        dir: &Path,
        config: &Path,
        metrics: &str,
        log_name: &str,
        level: &str,
    ) -> Proc {
        Proc::run_with(dir, config, metrics, log_name, level, &[], &[])
    }

    /// [`Proc::run_with_log_level`] with more arguments after the config
    /// and metrics address, and environment variables set after (and so
    /// over) [`AWS_ENV`].
    pub fn run_with(
        dir: &Path,
        config: &Path,
        metrics: &str,
        log_name: &str,
        level: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proc {
        Proc::spawn(
            dir,
            config,
            metrics,
            log_name,
            level,
            args,
            env,
            Stdio::null(),
        )
    }

    /// [`Proc::run_with`] with stdout appended to `dir/<stdout_name>` (a
    /// `stdout` sink writes each batch at once; a file sink only flushes at
    /// checkpoints).
    #[allow(clippy::too_many_arguments)]
    pub fn run_with_stdout(
        dir: &Path,
        config: &Path,
        metrics: &str,
        log_name: &str,
        level: &str,
        args: &[&str],
        env: &[(&str, &str)],
        stdout_name: &str,
    ) -> Proc {
        let stdout = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(stdout_name))
            .unwrap();
        Proc::spawn(
            dir,
            config,
            metrics,
            log_name,
            level,
            args,
            env,
            stdout.into(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        dir: &Path,
        config: &Path,
        metrics: &str,
        log_name: &str,
        level: &str,
        args: &[&str],
        env: &[(&str, &str)],
        stdout: Stdio,
    ) -> Proc {
        let log = dir.join(log_name);
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_shardflow"))
            .current_dir(dir)
            .args(["run", "--config"])
            .arg(config)
            .args(["--metrics-addr", metrics])
            .args(args)
            .envs(AWS_ENV)
            .envs(env.iter().copied())
            .env("RUST_LOG", level)
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("shardflow starts");
        Proc {
            child,
            log,
            peak_rss_kib: 0,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's resident set size now (0 once it exited), and the peak so far.
    pub fn sample_rss(&mut self) -> u64 {
        let kib = rss_kib(self.pid());
        self.peak_rss_kib = self.peak_rss_kib.max(kib);
        kib
    }

    /// The exit status if the child has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Panics with the log if the child exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exited() {
            panic!(
                "shardflow exited unexpectedly ({status}):\n{}",
                self.stderr()
            );
        }
    }

    /// What the child wrote on stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no drain, no final checkpoint, buffers lost, as in a crash.
    pub fn kill9(mut self) -> u64 {
        self.sample_rss();
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.peak_rss_kib
    }

    /// SIGTERM, then waits for a clean exit (0) within `secs`.
    pub async fn terminate(mut self, secs: u64) -> u64 {
        self.sample_rss();
        signal(self.pid(), "TERM");
        let status = self.wait(secs).await;
        assert!(
            status.success(),
            "exit status {status} after SIGTERM:\n{}",
            self.stderr()
        );
        self.peak_rss_kib
    }

    /// Waits for the child to exit within `secs` (killing it and panicking
    /// otherwise), sampling its RSS meanwhile.
    pub async fn wait(&mut self, secs: u64) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            self.sample_rss();
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("shardflow did not exit within {secs} s:\n{}", self.stderr());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A failing test must not leave the child running.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid}");
}

/// VmRSS of a process in KiB (0 when it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

/// A free port on 127.0.0.1 for `--metrics-addr`.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// `GET http://addr/metrics`, or `None` while the server is not up.
pub fn scrape(addr: &str) -> Option<String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    Some(body.split_once("\r\n\r\n")?.1.to_owned())
}

/// The sum of every sample of a metric (over its labels) in a Prometheus text page.
pub fn metric_sum(page: &str, name: &str) -> f64 {
    page.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Every complete line of an NDJSON file a writer may still be appending to:
/// a last line without its newline is not there yet. Any complete line that
/// is not JSON fails the test (a torn record a reader would choke on).
pub fn ndjson(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read(path).unwrap_or_default();
    let complete = match text.iter().rposition(|&b| b == b'\n') {
        Some(i) => &text[..=i],
        None => &[][..],
    };
    String::from_utf8_lossy(complete)
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!(
                    "{} line {}: not JSON ({e}): {l:.200}",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

/// Outputs deduplicated by id, as a downstream reader keeps them. An id seen
/// again must carry the same content (`strip` removes fields that may
/// legitimately differ, such as a prediction's latency); how many copies were
/// dropped is returned too.
pub fn dedup(
    records: &[serde_json::Value],
    strip: &[&str],
) -> (BTreeMap<String, serde_json::Value>, usize) {
    let mut by_id = BTreeMap::new();
    let mut repeated = 0;
    for r in records {
        let id = r["id"]
            .as_str()
            .unwrap_or_else(|| panic!("an output without an id: {r}"))
            .to_owned();
        let mut r = r.clone();
        for f in strip {
            r.as_object_mut().unwrap().remove(*f);
        }
        match by_id.get(&id) {
            Some(prev) => {
                assert_eq!(
                    prev, &r,
                    "id {id} produced twice with different content (counted twice?)"
                );
                repeated += 1;
            }
            None => {
                by_id.insert(id, r);
            }
        }
    }
    (by_id, repeated)
}

/// Asserts two deduplicated outputs are the same, naming the first few differences.
pub fn assert_same(
    what: &str,
    got: &BTreeMap<String, serde_json::Value>,
    want: &BTreeMap<String, serde_json::Value>,
) {
    let missing: Vec<_> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let differ: Vec<_> = want
        .iter()
        .filter_map(|(k, v)| got.get(k).filter(|g| *g != v).map(|g| (k, g, v)))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && differ.is_empty(),
        "{what}: {} missing (first {:?}), {} extra (first {:?}), differing (got, want): {differ:?}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        extra.len(),
        extra.iter().take(5).collect::<Vec<_>>(),
    );
}

/// For a known sequence of `(key, event time)`: each event's tumbling-window
/// count including itself (what its `count` feature must be with
/// exactly-once state), and every `(key, window end)`'s final count.
pub fn tumbling_counts(
    events: impl IntoIterator<Item = (String, i64)>,
    size: i64,
) -> (Vec<i64>, HashMap<(String, i64), i64>) {
    let mut windows: HashMap<(String, i64), i64> = HashMap::new();
    let mut per_event = Vec::new();
    for (key, t) in events {
        let end = t.div_euclid(size) * size + size;
        let c = windows.entry((key, end)).or_insert(0);
        *c += 1;
        per_event.push(*c);
    }
    (per_event, windows)
}

/// A small tmpfs mounted on a fresh directory for disk-fault tests; unmounted
/// on drop. Mounting needs root (CAP_SYS_ADMIN): without it this panics with
/// a message that says so, rather than letting the test pass untested.
pub struct Tmpfs {
    pub path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&path)
            .output();
        match out {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "DISK FAULT TESTS NOT RUN: cannot mount a tmpfs ({}); they need root or \
                 CAP_SYS_ADMIN (e.g. `docker run --privileged`)",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("DISK FAULT TESTS NOT RUN: cannot run mount: {e}"),
        }
        Tmpfs { path, _dir: dir }
    }

    /// Remounts read-only (`true`) or read-write.
    pub fn set_read_only(&self, ro: bool) {
        let opt = if ro { "remount,ro" } else { "remount,rw" };
        let status = Command::new("mount")
            .args(["-o", opt])
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(status.success(), "mount -o {opt} {}", self.path.display());
    }

    /// Fills the file system with `filler` until it is full (ENOSPC).
    pub fn fill(&self) -> PathBuf {
        use std::io::Write as _;
        let filler = self.path.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0x5Au8; 64 << 10];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling {}: {e}", filler.display()),
            }
        }
        let _ = f.sync_all();
        filler
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}
