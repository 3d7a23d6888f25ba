//! Generates `include/bps.h` from `src/lib.rs` with cbindgen (configured by `cbindgen.toml`).
//!
//! The header lives in the source tree and is committed, so C users need no Rust tool to read
//! it. It is rewritten only when its text changes: an unchanged header keeps its timestamp, and
//! a read-only source tree (a vendored or packaged crate) gets a warning instead of a failed
//! build. A copy always goes to `$OUT_DIR/bps.h`.

use std::path::PathBuf;
use std::{env, fs};

fn main() {
    let dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src = dir.join("src").join("lib.rs");
    let toml = dir.join("cbindgen.toml");
    let header = dir.join("include").join("bps.h");
    for p in [&src, &toml, &header] {
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let config = cbindgen::Config::from_file(&toml)
        .unwrap_or_else(|e| panic!("reading {}: {e}", toml.display()));
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(&src)
        .generate()
        .unwrap_or_else(|e| {
            panic!(
                "cbindgen could not generate bps.h from {}: {e}",
                src.display()
            )
        });
    let mut text = Vec::new();
    bindings.write(&mut text);

    if let Err(e) = fs::write(out_dir.join("bps.h"), &text) {
        panic!("writing {}: {e}", out_dir.join("bps.h").display());
    }
    if fs::read(&header).is_ok_and(|old| old == text) {
        return;
    }
    let written = fs::create_dir_all(header.parent().expect("include/ has a parent"))
        .and_then(|()| fs::write(&header, &text));
    if let Err(e) = written {
        println!(
            "cargo:warning=bps.h is out of date but {} could not be written ({e}); the current header is in {}",
            header.display(),
            out_dir.join("bps.h").display()
        );
    }
}
