//! `shardflow serve-model` and `shardflow run` as a user runs them: the
//! model server from the shipped SageMaker config, and a pipeline scoring
//! against it with credentials and region from the environment (the standard
//! AWS chain), then SIGTERM.

mod inference_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use inference_support::FEATURES;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_shardflow"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c.env_remove("RUST_LOG");
    c
}

#[test]
fn serve_model_answers_a_pipeline_and_stops_on_sigterm() {
    let mut server = bin()
        .args([
            "serve-model",
            "--config",
            "config/sagemaker.toml",
            "--addr",
            "127.0.0.1:0",
            "--variant",
            "green",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(server.stderr.take().unwrap());
    let mut addr = String::new();
    for _ in 0..50 {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        if let Some(a) = line.trim().strip_prefix("listening on http://") {
            addr = a.to_string();
            break;
        }
    }
    assert!(!addr.is_empty(), "serve-model did not print its address");
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));

    // GET /ping, the container health check.
    let mut tcp = std::net::TcpStream::connect(&addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        tcp,
        "GET /ping HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    tcp.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.ndjson");
    let config = format!(
        r#"
[pipeline]
state_dir = "{state}"

[source]
type = "generator"
rate = 0
count = 3000
bad_fraction = 0.01
start_time = 1700000000000

[schema]
key = "userId"
timestamp = "timestamp"
fields = {{ amount = "f64", merchant = "string" }}

{FEATURES}

[inference]
backend = "sagemaker"
endpoint_name = "fraud-prod"
endpoint_url = "http://{addr}"
content_type = "text/csv"
csv_output_columns = ["score", "label"]

[[sinks]]
type = "file"
path = "{out}"
kinds = ["prediction", "dead_letter", "late"]
"#,
        state = dir.path().join("state").display(),
        out = out.display(),
    );
    let path = dir.path().join("run.toml");
    std::fs::write(&path, config).unwrap();
    let status = bin()
        .args(["run", "--quiet", "--metrics-addr", "off", "--config"])
        .arg(&path)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "{status}");
    let text = std::fs::read_to_string(&out).unwrap();
    let (mut predictions, mut dead, mut late) = (0, 0, 0);
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        match v["kind"].as_str().unwrap() {
            "prediction" => {
                assert_eq!(v["variant"], "green");
                assert_eq!(v["model"], "fraud-prod");
                assert!(v["prediction"]["score"].is_f64(), "{v}");
                predictions += 1;
            }
            "dead_letter" => dead += 1,
            _ => late += 1,
        }
    }
    assert!(dead > 0, "bad_fraction gives a few decode dead letters");
    assert_eq!(
        predictions + dead + late,
        3000,
        "{predictions} + {dead} + {late}"
    );

    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = server.wait().unwrap();
    assert!(status.success(), "serve-model exits 0 on SIGTERM: {status}");
}
