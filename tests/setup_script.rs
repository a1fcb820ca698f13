//! `scripts/setup.sh` decides what to install the way bindgen's loader
//! (clang-sys) looks for libclang. Run on folder trees standing in for `/`
//! (SHARDFLOW_SETUP_ROOT) in dry-run mode: the tree of a fresh machine of
//! this project's kind (LLVM's `libclang-cpp.so.14`, no `libclang.so`)
//! must make it install `libclang-dev`; the trees with a loadable libclang
//! must not. On the machine itself, `make test` then runs it for real.

use std::path::Path;
use std::process::Command;

fn setup_says(root: &Path) -> String {
    let out = Command::new("bash")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/setup.sh"))
        .env("SHARDFLOW_SETUP_ROOT", root)
        .env("SHARDFLOW_SETUP_DRY_RUN", "1")
        .env_remove("LIBCLANG_PATH")
        .output()
        .expect("bash runs scripts/setup.sh");
    assert!(
        out.status.success(),
        "setup.sh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn tree(files: &[&str]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for f in files {
        let path = root.path().join(f);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }
    root
}

#[test]
fn libclang_cpp_alone_is_not_libclang() {
    // What the fresh image ships: LLVM 14's C++ API library, no libclang.
    let fresh = tree(&[
        "usr/lib/llvm-14/lib/libclang-cpp.so.14",
        "usr/lib/x86_64-linux-gnu/libclang-cpp.so.14",
        "usr/lib/x86_64-linux-gnu/libLLVM-14.so.1",
    ]);
    let said = setup_says(fresh.path());
    assert!(
        said.contains("would install") && said.contains("libclang-dev"),
        "{said}"
    );
}

#[test]
fn a_loadable_libclang_is_found_where_clang_sys_looks() {
    for file in [
        "usr/lib/llvm-14/lib/libclang.so",
        "usr/lib/llvm-14/lib/libclang.so.1",
        "usr/lib/llvm-14/lib/libclang-14.so.1",
        "usr/lib/x86_64-linux-gnu/libclang-14.so.1",
        "usr/local/lib/libclang.so",
    ] {
        let root = tree(&[file, "usr/lib/llvm-14/lib/libclang-cpp.so.14"]);
        let said = setup_says(root.path());
        assert!(!said.contains("libclang-dev"), "{file}: {said}");
    }
}
