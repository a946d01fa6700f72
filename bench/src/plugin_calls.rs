//! The cost of one plugin call, per language: runs `edgehub plugin test
//! --bench` on each build of the example field filter (the same filter in
//! Rust, C, Python and JavaScript) over the shared test messages, first
//! without a compiled cache (compile time), then with it (load time).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// (language, file name, rounds over the 10 test messages)
const BUILDS: [(&str, &str, usize); 4] = [
    ("Rust", "field-filter.wasm", 5000),
    ("C", "field-filter-c.wasm", 5000),
    ("Python", "field-filter-python.wasm", 1000),
    ("JavaScript", "field-filter-js.wasm", 200),
];

struct Row {
    language: &'static str,
    size_kib: u64,
    compile_ms: String,
    cached_ms: String,
    per_call_ns: String,
    batched_ns: String,
}

pub fn run(edgehub: &Path, plugins: &Path, work: &Path) -> Result<()> {
    if !edgehub.is_file() {
        bail!("edgehub binary not found at {}", edgehub.display());
    }
    let messages = plugins.join("../testdata/messages.jsonl");
    let mut rows = Vec::new();
    for (language, file, rounds) in BUILDS {
        let wasm = plugins.join(file);
        if !wasm.is_file() {
            println!("{language}: {} not built, skipped", wasm.display());
            continue;
        }
        let cache = work.join(format!("cache-{language}"));
        let cold = call(edgehub, &wasm, &messages, &cache, 0)?;
        let warm = call(edgehub, &wasm, &messages, &cache, rounds)?;
        rows.push(Row {
            language,
            size_kib: std::fs::metadata(&wasm)?.len() / 1024,
            compile_ms: field(&cold, "compiled in ", " ms"),
            cached_ms: field(&warm, "loaded from cache in ", " ms"),
            per_call_ns: field(&warm, "bench: ", " ns per call"),
            batched_ns: field(&warm, "bench: ", " ns per message in batches"),
        });
    }
    println!("\n| language | component | compile | load from cache | per call | per message, batch of 10 |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} KiB | {} ms | {} ms | {} ns | {} |",
            r.language,
            r.size_kib,
            r.compile_ms,
            r.cached_ms,
            r.per_call_ns,
            if r.batched_ns == "-" {
                "-".to_string()
            } else {
                format!("{} ns", r.batched_ns)
            }
        );
    }
    if let Some(rust) = rows.iter().find(|r| r.language == "Rust") {
        if let Ok(base) = rust.per_call_ns.parse::<f64>() {
            println!("\nPer-call cost relative to Rust:");
            for r in &rows {
                if let Ok(ns) = r.per_call_ns.parse::<f64>() {
                    println!("  {:<10} {:.2}x", r.language, ns / base);
                }
            }
        }
    }
    Ok(())
}

/// Runs one `plugin test`; returns its stderr.
fn call(edgehub: &Path, wasm: &Path, input: &Path, cache: &Path, rounds: usize) -> Result<String> {
    let out = Command::new(edgehub)
        .args(["plugin", "test"])
        .arg(wasm)
        .arg("--input")
        .arg(input)
        .arg("--cache")
        .arg(cache)
        .arg("--bench")
        .arg(rounds.to_string())
        .output()
        .with_context(|| format!("running {}", edgehub.display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("{} failed:\n{stderr}", wasm.display());
    }
    Ok(stderr)
}

/// The text between `before` and `after` on the first line holding both.
fn field(text: &str, before: &str, after: &str) -> String {
    text.lines()
        .find_map(|l| {
            let start = l.find(before)? + before.len();
            let len = l[start..].find(after)?;
            Some(l[start..start + len].trim().to_string())
        })
        .unwrap_or_else(|| "-".into())
}
