//! The feature pins in Cargo.toml hold: every crate of the normal build
//! gets the same features as in the test build, where the dev-dependencies
//! (the emulators) turn more on. Without that, `make run` after `make test`
//! (or the reverse) compiles a second variant of each such crate and of
//! everything above it: the AWS SDKs, tokio's dependents, RocksDB.
//!
//! Read from `cargo tree`, offline, from the lock file.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

/// `package version` → its feature sets (a crate built for the host, for
/// build scripts and proc macros, is resolved apart from the same crate
/// built for the target), for the crates reachable over `edges`.
fn features(edges: &str) -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["tree", "--offline", "--locked", "-e", edges])
        .args(["--prefix", "none", "--no-dedupe", "-f", "{p}|{f}"])
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -e {edges}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in String::from_utf8(out.stdout).unwrap().lines() {
        let Some((package, features)) = line.split_once('|') else {
            continue;
        };
        // "name v1.2.3 (path or registry)" → "name v1.2.3"
        let package: String = package
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        map.entry(package)
            .or_default()
            .insert(features.trim().to_owned());
    }
    map
}

#[test]
fn the_normal_build_has_the_test_builds_features() {
    let normal = features("normal,build");
    let with_dev = features("normal,build,dev");
    let differ: Vec<String> = normal
        .iter()
        .filter_map(|(package, f)| {
            let dev = with_dev.get(package)?;
            (dev != f).then(|| format!("{package}: build {f:?}, test {dev:?}"))
        })
        .collect();
    assert!(
        differ.is_empty(),
        "pin these features in Cargo.toml's [dependencies] (see the feature-pins comment there):\n{}",
        differ.join("\n")
    );
}
