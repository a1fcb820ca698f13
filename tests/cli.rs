//! Drives the `shardflow` binary the way a user does: `check` on shipped and
//! broken configs, `run` over files with good and bad lines, SIGTERM.

mod harness;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shardflow"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c.env_remove("RUST_LOG");
    c
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn read_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", path.display()))
        })
        .collect()
}

/// The complete lines of an NDJSON file a running process is still writing:
/// a last line without its newline is not there yet.
fn read_written_lines(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read(path).unwrap_or_default();
    let complete = text
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(&[][..], |i| &text[..=i]);
    String::from_utf8_lossy(complete)
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: bad line {l:?}: {e}", path.display()))
        })
        .collect()
}

#[test]
fn check_accepts_every_shipped_config() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo("config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = bin()
                .args(["check", "--config"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                stdout.contains("source:") && stdout.contains("sink:"),
                "{stdout}"
            );
            n += 1;
        }
    }
    assert!(n >= 1);
}

/// Each fixture's first line says `# expect: <text the error must contain>`.
#[test]
fn check_refuses_broken_configs_with_a_located_reason() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo("tests/fixtures/bad_configs")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an # expect: line", path.display()));
        let out = bin()
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", path.display());
        assert!(
            stderr.contains(expect),
            "{}: {stderr:?} lacks {expect:?}",
            path.display()
        );
        assert!(
            stderr.contains(&*path.to_string_lossy()),
            "{stderr} does not name the file"
        );
        n += 1;
    }
    assert!(n >= 10, "only {n} broken configs");
}

#[test]
fn broken_configs_are_located_by_line() {
    let path = repo("tests/fixtures/bad_configs/size_not_multiple_of_slide.toml");
    let out = bin()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("size_not_multiple_of_slide.toml:15:"),
        "{stderr}"
    );
    let path = repo("tests/fixtures/bad_configs/unknown_feature_key.toml");
    let out = bin()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown_feature_key.toml:14:1:"),
        "{stderr}"
    );
}

/// Runs a bounded config to its end; it must exit 0.
fn run_to_end(config: &Path) {
    let out = bin()
        .args(["run", "--quiet", "--metrics-addr", "off", "--config"])
        .arg(config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `shardflow run` child, killed if the test fails before it exits: a
/// followed file or an endless generator would otherwise keep it running,
/// holding the test harness's output open.
struct Running(std::process::Child);

impl std::ops::Deref for Running {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Running {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Sends SIGTERM and waits; the process must exit within 10 s.
fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let sent = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let stopped = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "no exit within 10 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn file_config(dir: &Path, input: &Path, extra: &str) -> PathBuf {
    let config = format!(
        r#"
[pipeline]
state_dir = "{dir}/state"
checkpoint_interval = "200ms"

[source]
type = "file"
path = "{input}"

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ amount = "f64" }}

[[sinks]]
type = "file"
path = "{dir}/features.ndjson"
kinds = ["features"]

[[sinks]]
type = "file"
path = "{dir}/dead.ndjson"
kinds = ["dead_letter"]
{extra}
"#,
        dir = dir.display(),
        input = input.display()
    );
    let path = dir.join("shardflow.toml");
    std::fs::write(&path, config).unwrap();
    path
}

#[test]
fn file_run_sends_good_lines_on_and_bad_lines_to_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.ndjson");
    let lines = [
        r#"{"userId":"u1","timestamp":1700000000000,"amount":1.5}"#,
        r#"{"userId":"u2","timestamp":"2023-11-14T22:13:21Z","amount":2}"#,
        r#"{"userId":"u1","timestamp":1700000002000"#,
        r#"{"timestamp":1700000003000,"amount":1}"#,
        r#"{"userId":"u3","timestamp":1700000004000,"amount":"lots"}"#,
        "",
        r#"{"userId":"u3","timestamp":99999999999999999,"amount":1}"#,
        r#"{"userId":"u4","timestamp":1700000005000,"amount":4}"#,
        "\u{1}\u{2} binary junk",
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let config = file_config(dir.path(), &input, "");
    run_to_end(&config);

    let features = read_lines(&dir.path().join("features.ndjson"));
    let ids: Vec<&str> = features.iter().map(|f| f["id"].as_str().unwrap()).collect();
    let input_name = input.to_string_lossy();
    assert_eq!(ids, [1, 2, 8].map(|n| format!("{input_name}/{n}")));
    assert_eq!(features[1]["event_time"], 1_700_000_001_000i64);

    let dead = read_lines(&dir.path().join("dead.ndjson"));
    let reasons: Vec<(String, String)> = dead
        .iter()
        .map(|d| {
            (
                d["position"].as_str().unwrap().to_string(),
                d["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let expect = [
        (3, "malformed JSON"),
        (4, "missing field userId"),
        (5, "field amount must be f64, got a string"),
        (7, "outside the accepted range"),
        (9, "malformed JSON"),
    ];
    assert_eq!(reasons.len(), expect.len(), "{reasons:?}");
    for ((position, reason), (line, want)) in reasons.iter().zip(expect) {
        assert_eq!(position, &format!("{input_name}/{line}"));
        assert!(
            reason.contains(want),
            "line {line}: {reason:?} lacks {want:?}"
        );
    }
    // The raw bytes survive in the dead letter.
    use base64::Engine as _;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(dead[4]["raw_base64"].as_str().unwrap())
        .unwrap();
    assert_eq!(raw, lines[8].as_bytes());

    // A second run resumes after the committed checkpoint: nothing new.
    run_to_end(&config);
    assert_eq!(read_lines(&dir.path().join("features.ndjson")).len(), 3);
    assert_eq!(read_lines(&dir.path().join("dead.ndjson")).len(), 5);
}

#[test]
fn sigterm_drains_flushes_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        r#"
[pipeline]
state_dir = "{dir}/state"
checkpoint_interval = "300ms"

[source]
type = "generator"
rate = 2000
keys = 50
start_time = 1700000000000

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ amount = "f64" }}

[[features]]
name = "amount_sum_1m"
agg = "sum"
field = "amount"
window = {{ type = "tumbling", size = "1m" }}

[inference]
backend = "embedded"
model = "{dir}/model.toml"

[[sinks]]
type = "file"
path = "{dir}/predictions.ndjson"
kinds = ["prediction"]
"#,
        dir = dir.path().display()
    );
    std::fs::write(
        dir.path().join("model.toml"),
        "name = \"m\"\ntype = \"logistic\"\n[weights]\namount_sum_1m = 0.001\n[impute]\namount_sum_1m = 0.0\n",
    )
    .unwrap();
    let config_path = dir.path().join("shardflow.toml");
    std::fs::write(&config_path, config).unwrap();

    let run_once = |expect_resume: bool| -> Vec<serde_json::Value> {
        let mut child = Running(
            bin()
                .args([
                    "run",
                    "--quiet",
                    "--metrics-addr",
                    "127.0.0.1:0",
                    "--config",
                ])
                .arg(&config_path)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let stderr = child.stderr.take().unwrap();
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let log = std::thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("metrics on http://") {
                    let rest = &line[at + "metrics on http://".len()..];
                    let _ = addr_tx.send(rest.split('/').next().unwrap_or("").to_string());
                }
                lines.push(line);
            }
            lines.join("\n")
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the metrics address is logged");
        // Let it produce and checkpoint: 2,000 predictions written and a
        // checkpoint committed (as /metrics counts it) before the SIGTERM.
        let predictions = dir.path().join("predictions.ndjson");
        let started = Instant::now();
        let mut polls = 0;
        loop {
            let written = read_written_lines(&predictions).len();
            let committed = harness::metric_sum(
                &http_get(&addr, "/metrics").1,
                "shardflow_checkpoints_total",
            );
            if written >= 2_000 && committed >= 1.0 {
                break;
            }
            polls += 1;
            assert!(
                polls < 600 && started.elapsed() < Duration::from_secs(60),
                "within {:?}: {written} of 2000 predictions written, {committed} checkpoints committed",
                started.elapsed()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let before = read_written_lines(&predictions).len();
        let (status, body) = http_get(&addr, "/metrics");
        assert_eq!(status, 200);
        for name in [
            "shardflow_records_in_total",
            "shardflow_outputs_total",
            "shardflow_checkpoints_total",
            "shardflow_inference_batch_size",
        ] {
            assert!(body.contains(name), "{name} missing from /metrics:\n{body}");
        }
        assert_eq!(http_get(&addr, "/healthz").0, 200);
        assert_eq!(http_get(&addr, "/readyz").0, 200);
        let exit = terminate(&mut child);
        let log = log.join().unwrap();
        assert!(exit.success(), "exit {exit:?}\n{log}");
        assert_eq!(
            log.contains("restoring from the last checkpoint"),
            expect_resume,
            "{log}"
        );
        let after = read_lines(&predictions);
        assert!(after.len() >= before && !after.is_empty(), "{log}");
        after
    };
    let first = run_once(false);
    let ids: std::collections::HashSet<String> = first
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), first.len(), "duplicate ids in one run");
    assert!(first
        .iter()
        .all(|p| p["model"] == "m" && p["prediction"]["score"].is_f64()));

    // The second run continues the generator after the committed index.
    let both = run_once(true);
    let max_seq = |rows: &[serde_json::Value]| {
        rows.iter()
            .map(|p| {
                p["id"]
                    .as_str()
                    .unwrap()
                    .rsplit('/')
                    .next()
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            })
            .max()
            .unwrap()
    };
    assert!(max_seq(&both) > max_seq(&first));
    let unique: std::collections::HashSet<&str> =
        both.iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(
        unique.len(),
        both.len(),
        "a clean stop and restart repeats nothing"
    );
}

/// A minimal HTTP/1.1 GET, enough for the metrics endpoint.
fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[test]
fn file_run_fires_windows_and_reports_late_events() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.ndjson");
    let t0: i64 = 1_699_999_980_000; // a minute boundary
    let events = [
        ("u1", 0),
        ("u1", 30_000),
        ("u2", 61_000),
        ("u1", 5_000),
        ("u1", 65_000),
    ];
    let text: String = events
        .iter()
        .map(|(k, dt)| {
            format!(
                "{{\"userId\":\"{k}\",\"timestamp\":{},\"amount\":1}}\n",
                t0 + dt
            )
        })
        .collect();
    std::fs::write(&input, text).unwrap();
    let extra = r#"
[watermark]
max_out_of_orderness = "0s"
allowed_lateness = "0s"

[[features]]
name = "count_1m"
agg = "count"
window = { type = "tumbling", size = "1m" }

[[sinks]]
type = "file"
path = "OUT/windows.ndjson"
kinds = ["window", "late"]
"#
    .replace("OUT", &dir.path().display().to_string());
    let config = file_config(dir.path(), &input, &extra);
    run_to_end(&config);

    let features = read_lines(&dir.path().join("features.ndjson"));
    let counts: Vec<i64> = features
        .iter()
        .map(|f| f["features"]["count_1m"].as_i64().unwrap())
        .collect();
    assert_eq!(counts, [1, 2, 1, 1], "the late 4th event gets no vector");

    let outputs = read_lines(&dir.path().join("windows.ndjson"));
    let summary: Vec<String> = outputs
        .iter()
        .map(|o| match o["kind"].as_str().unwrap() {
            "window" => format!(
                "window {} {} {}",
                o["key"].as_str().unwrap(),
                o["window_start"].as_i64().unwrap() - t0,
                o["value"]
            ),
            "late" => format!(
                "late {} watermark {}",
                o["id"].as_str().unwrap().rsplit('/').next().unwrap(),
                o["watermark"].as_i64().unwrap() - t0
            ),
            other => panic!("unexpected kind {other}"),
        })
        .collect();
    // u1's first minute fires when u2 at 61 s moves the watermark to 60.999 s;
    // the event at 5 s then finds its window purged; the end of the file fires the rest.
    let mut tail = summary[2..].to_vec();
    tail.sort();
    assert_eq!(summary[..2], ["window u1 0 2", "late 4 watermark 60999"]);
    assert_eq!(tail, ["window u1 60000 1", "window u2 60000 1"]);
}

#[test]
fn followed_file_is_tailed_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("events.ndjson");
    // A second followed file: the source reads its files round-robin, so its
    // lines coming out show that the first file has been read again.
    let other = dir.path().join("other.ndjson");
    let line = |key: &str, i: i64| {
        format!(
            "{{\"userId\":\"{key}\",\"timestamp\":{},\"amount\":1}}\n",
            1_700_000_000_000 + i
        )
    };
    std::fs::write(&input, line("u1", 1)).unwrap();
    std::fs::write(&other, "").unwrap();
    let config = file_config(dir.path(), &input, "");
    let text = std::fs::read_to_string(&config).unwrap().replacen(
        &format!("type = \"file\"\npath = \"{}\"", input.display()),
        &format!(
            "type = \"file\"\nfollow = true\npoll_interval = \"50ms\"\npaths = [\"{}\", \"{}\"]",
            input.display(),
            other.display()
        ),
        1,
    );
    assert!(text.contains("paths = ["), "{text}");
    std::fs::write(&config, text).unwrap();
    let mut child = Running(
        bin()
            .args(["run", "--quiet", "--metrics-addr", "off", "--config"])
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let features = dir.path().join("features.ndjson");
    // Feature records of one file, in output order.
    let of = |file: &Path| {
        let prefix = format!("{}/", file.display());
        read_written_lines(&features)
            .into_iter()
            .filter(|f| f["id"].as_str().unwrap().starts_with(&prefix))
            .collect::<Vec<_>>()
    };
    let wait_for = |child: &mut std::process::Child, file: &Path, n: usize| {
        let started = Instant::now();
        let mut polls = 0;
        loop {
            let have = of(file).len();
            if have >= n {
                return;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "shardflow exited ({status}) with {have} of {n} lines of {}",
                    file.display()
                );
            }
            polls += 1;
            assert!(
                polls < 400 && started.elapsed() < Duration::from_secs(20),
                "only {have} of {n} lines of {} arrived within {:?}",
                file.display(),
                started.elapsed()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_for(&mut child, &input, 1);
    // Append two lines, the second in two writes (a partial line must wait for its newline).
    use std::io::Write as _;
    let append = |path: &Path| std::fs::OpenOptions::new().append(true).open(path).unwrap();
    let mut f = append(&input);
    f.write_all(line("u2", 2).as_bytes()).unwrap();
    let third = line("u3", 3);
    f.write_all(&third.as_bytes()[..10]).unwrap();
    f.flush().unwrap();
    wait_for(&mut child, &input, 2);
    // Proof that the partial line was read and held back, not just not read
    // yet. Each pass of the source reads the first file, then the other, and
    // sends their records in that order. A line written to the other file now
    // comes out of a pass that may have read the first file before the
    // partial write; a second one, written once the first came out, of a
    // later pass, whose read of the first file saw the partial line: had that
    // read produced a record, it would have come out before this line.
    let mut g = append(&other);
    for (n, i) in [(1, 10), (2, 11)] {
        g.write_all(line("o", i).as_bytes()).unwrap();
        g.flush().unwrap();
        wait_for(&mut child, &other, n);
    }
    assert_eq!(of(&input).len(), 2, "a partial line was read early");
    f.write_all(&third.as_bytes()[10..]).unwrap();
    f.flush().unwrap();
    wait_for(&mut child, &input, 3);
    let status = terminate(&mut child);
    assert!(status.success());
    let keys: Vec<String> = of(&input)
        .iter()
        .map(|f| f["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys, ["u1", "u2", "u3"]);
    assert_eq!(of(&other).len(), 2);
    assert_eq!(read_lines(&features).len(), 5);
    let dead = read_lines(&dir.path().join("dead.ndjson"));
    assert!(dead.is_empty(), "the partial line was cut off: {dead:?}");
}

/// `shardflow run | head -1`: the reader goes away, shardflow stops on its
/// own, says why in one line and exits 0, as a pipe's writer should.
#[test]
fn closed_stdout_stops_the_run_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("stdout.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[pipeline]
state_dir = "{dir}/state"

[source]
type = "generator"
rate = 2000
keys = 10

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ amount = "f64" }}

[[features]]
name = "n_1m"
agg = "count"
window = {{ type = "tumbling", size = "1m" }}

[[sinks]]
type = "stdout"
kinds = ["features"]
"#,
            dir = dir.path().display()
        ),
    )
    .unwrap();
    let mut child = Running(
        bin()
            .args(["run", "--quiet", "--metrics-addr", "off", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert!(first.contains("\"kind\":\"features\""), "{first}");
    // The reader is dropped here: the next write fails with EPIPE.
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("shardflow kept running after its stdout was closed");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(stderr.contains("closed by its reader"), "{stderr}");
    assert!(!stderr.contains("ERROR"), "{stderr}");
}
