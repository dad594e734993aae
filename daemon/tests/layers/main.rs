//! The daemon's layers, checked: every import between its top-level modules must be
//! one the table in `src/lib.rs` allows, and no two modules may import each other,
//! directly or through others. A small fake crate (`tests/fixtures/bad_layers`) that
//! breaks both rules must fail the same check.
mod check;

use std::path::Path;

fn crate_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn the_daemon_keeps_to_its_layer_table() {
    let report = check::check(&crate_dir().join("src")).unwrap_or_else(|e| panic!("{e}"));
    println!("{report}");
    assert!(report.ok(), "{report}");
}

#[test]
fn a_tree_that_breaks_the_table_fails_the_check() {
    let src = crate_dir().join("tests/fixtures/bad_layers/src");
    let report = check::check(&src).unwrap_or_else(|e| panic!("{e}"));
    assert!(!report.ok());
    // L0 importing L1, through a `use` group with a rename.
    assert!(
        report
            .disallowed
            .iter()
            .any(|d| d.starts_with("util -> config (") && d.contains("util.rs")),
        "{report}"
    );
    // gate and admin share a layer without an order: neither may import the other
    // (here admin does, inline in an expression, and gate does through `super::`).
    for edge in ["admin -> gate (", "gate -> admin ("] {
        assert!(
            report.disallowed.iter().any(|d| d.starts_with(edge)),
            "{edge}: {report}"
        );
    }
    // An earlier domain importing a later one, from a macro argument.
    assert!(
        report
            .disallowed
            .iter()
            .any(|d| d.starts_with("audit -> policy (")),
        "{report}"
    );
    // ... which closes a cycle audit -> policy -> audit.
    assert!(
        report
            .cycles
            .contains(&vec!["audit".to_string(), "policy".to_string()]),
        "{report}"
    );
    assert!(
        report
            .cycles
            .contains(&vec!["admin".to_string(), "gate".to_string()]),
        "{report}"
    );
    // A module the table forgot.
    assert!(
        report.unplaced.iter().any(|u| u.contains("`stray`")),
        "{report}"
    );
    // Allowed imports are not reported.
    assert!(
        !report
            .disallowed
            .iter()
            .any(|d| d.starts_with("gate -> audit") || d.starts_with("policy -> audit")),
        "{report}"
    );
}

/// `PORTCULLIS_LAYERS_SRC=DIR cargo test -p portcullis --test layers -- --ignored
/// --nocapture`: the module graph of another tree (e.g. an older commit), with or
/// without a table.
#[test]
#[ignore]
fn graph_of_another_tree() {
    let Some(src) = std::env::var_os("PORTCULLIS_LAYERS_SRC") else {
        return;
    };
    let g = check::Graph::read(Path::new(&src)).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "{} top-level modules, {} import edges",
        g.modules.len(),
        g.edges.len()
    );
    for c in g.cycles() {
        println!("cycle ({} modules): {}", c.len(), c.join(" <-> "));
    }
    for ((a, b), site) in &g.edges {
        println!("{a} -> {b}  ({}:{})", site.file.display(), site.line);
    }
}
