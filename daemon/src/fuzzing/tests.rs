//! Every seed of every target's corpus (`fuzz/corpus/<target>/`), through the same
//! function the fuzzer calls: the unit tier runs them on stable.
use std::path::{Path, PathBuf};

use super::{TARGETS, run};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir().join(target);
    let mut out: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| {
            let p = e.path();
            let b = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, b)
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_target_has_a_corpus_and_every_corpus_a_target() {
    for t in TARGETS {
        assert!(seeds(t).len() >= 5, "{t}: fewer than 5 seeds");
    }
    for e in std::fs::read_dir(corpus_dir()).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            TARGETS.contains(&name.as_str()),
            "corpus {name} has no target"
        );
    }
}

#[test]
fn every_seed_of_every_target_runs() {
    let mut failed = Vec::new();
    for t in TARGETS {
        for (p, b) in seeds(t) {
            // Every seed runs; the failures are named together at the end.
            if !matches!(std::panic::catch_unwind(|| run(t, &b)), Ok(true)) {
                failed.push(format!("{t}: {}", p.display()));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "seeds that failed:\n{}",
        failed.join("\n")
    );
}

#[test]
fn an_unknown_target_is_refused() {
    assert!(!run("no_such_target", b""));
}
