//! Compiles in every published schema version kept under `schemas/history/<topic>/v<N>.avsc`, so
//! that decoders accept records written with any of them (see `schema_history`). The directory is
//! scanned rather than listed by hand: adding a version (or a topic) is adding a file.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    // Read when the script runs, not baked in with env!: cargo reuses a built script across
    // checkouts of the workspace that share a target directory, and env! would keep the first
    // checkout's path.
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR for build scripts");
    let history = Path::new(&manifest_dir).join("../../schemas/history");
    // A directory given to rerun-if-changed is scanned for any change to its files.
    println!("cargo:rerun-if-changed={}", history.display());
    let mut versions = Vec::new();
    for topic in std::fs::read_dir(&history).unwrap_or_else(|e| panic!("cannot read {}: {e}", history.display())) {
        let topic = topic.expect("readable directory entry").path();
        if !topic.is_dir() {
            continue;
        }
        let name = topic.file_name().and_then(|n| n.to_str()).expect("UTF-8 topic directory").to_string();
        for file in std::fs::read_dir(&topic).expect("readable topic directory") {
            let path = file.expect("readable directory entry").path();
            let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let version = file_name
                .strip_prefix('v')
                .and_then(|rest| rest.strip_suffix(".avsc"))
                .and_then(|n| n.parse::<u32>().ok())
                .unwrap_or_else(|| panic!("{}: history files are named v<N>.avsc", path.display()));
            let path = path.canonicalize().expect("canonical path");
            versions.push((name.clone(), version, file_name, path));
        }
    }
    versions.sort();
    let mut out = String::from("&[\n");
    for (topic, version, file, path) in versions {
        writeln!(
            out,
            "    SchemaVersion {{ topic: {topic:?}, version: {version}, file: concat!(\"history/\", {topic:?}, \"/\", {file:?}), text: include_str!({path:?}) }},"
        )
        .expect("write to a string");
    }
    out.push(']');
    let dest = Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo")).join("schema_history.rs");
    std::fs::write(&dest, out).unwrap_or_else(|e| panic!("cannot write {}: {e}", dest.display()));
}
