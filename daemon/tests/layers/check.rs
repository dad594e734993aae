//! Reads a crate's source with `syn` and checks the imports between its top-level
//! modules against the layer table written in its `lib.rs` docs.
//!
//! What counts as an import of module `b` by module `a`: a `use` of a path into `b`
//! (trees with groups, globs and renames included), and any path into `b` written
//! inline in code, types or macro arguments (`crate::b::f()`), with `super::` and
//! `self::` resolved from where they are written (files and inline `mod` blocks).
//! Test code counts like any other code.
//!
//! The table is a fenced block in the crate docs, one layer per line, highest first:
//!
//! ```text
//! L2  app
//! L1  gate | admin
//! L0  util < k8s
//! ```
//!
//! A module may import any module of a lower layer. Within a layer, `a < b` means `b`
//! may import `a` (an order), and `a | b` means neither imports the other.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// One module's place in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Place {
    layer: u32,
    /// Position within an ordered layer; `None` in an unordered one.
    rank: Option<usize>,
}

/// The layer table.
#[derive(Debug, Default)]
pub struct Table {
    places: BTreeMap<String, Place>,
}

impl Table {
    /// Parses the first fenced block of the docs whose lines all start with `L<n>`.
    pub fn from_docs(docs: &str) -> Result<Table, String> {
        let mut blocks = Vec::new();
        let mut current: Option<Vec<&str>> = None;
        for line in docs.lines() {
            let t = line.trim();
            if t.starts_with("```") {
                match current.take() {
                    Some(b) => blocks.push(b),
                    None => current = Some(Vec::new()),
                }
            } else if let Some(b) = current.as_mut() {
                b.push(t);
            }
        }
        let is_layer = |l: &str| {
            l.strip_prefix('L')
                .is_some_and(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        };
        let block = blocks
            .into_iter()
            .find(|b| !b.is_empty() && b.iter().all(|l| is_layer(l)))
            .ok_or("no layer table (a fenced block of `L<n> modules` lines) in the crate docs")?;
        let mut table = Table::default();
        for line in block {
            let (head, rest) = line
                .split_once(char::is_whitespace)
                .ok_or_else(|| format!("layer line without modules: `{line}`"))?;
            let layer: u32 = head[1..]
                .parse()
                .map_err(|_| format!("`{head}` is not a layer number"))?;
            let ordered = rest.contains('<');
            if ordered && rest.contains('|') {
                return Err(format!("layer {head} mixes `<` and `|`"));
            }
            let sep = if ordered { '<' } else { '|' };
            for (i, m) in rest.split(sep).map(str::trim).enumerate() {
                if m.is_empty() || !m.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(format!("layer {head}: `{m}` is not a module name"));
                }
                let place = Place {
                    layer,
                    rank: ordered.then_some(i),
                };
                if table.places.insert(m.to_owned(), place).is_some() {
                    return Err(format!("`{m}` is in the table twice"));
                }
            }
        }
        Ok(table)
    }

    /// Whether the table lets `from` import `to`.
    fn allows(&self, from: &str, to: &str) -> bool {
        match (self.places.get(from), self.places.get(to)) {
            (Some(a), Some(b)) if b.layer < a.layer => true,
            (Some(a), Some(b)) if b.layer == a.layer => {
                matches!((a.rank, b.rank), (Some(ra), Some(rb)) if rb < ra)
            }
            _ => false,
        }
    }
}

/// Where an import is written.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Site {
    pub file: PathBuf,
    pub line: usize,
}

/// The import graph between top-level modules.
#[derive(Debug, Default)]
pub struct Graph {
    pub modules: BTreeSet<String>,
    /// (from, to) -> the first place it is written.
    pub edges: BTreeMap<(String, String), Site>,
    /// The crate docs (for the table).
    pub docs: String,
}

impl Graph {
    /// Reads the crate rooted at `src/lib.rs`.
    pub fn read(src: &Path) -> Result<Graph, String> {
        let lib = src.join("lib.rs");
        let file = parse(&lib)?;
        let mut g = Graph {
            docs: docs_of(&file.attrs),
            ..Graph::default()
        };
        for item in &file.items {
            if let syn::Item::Mod(m) = item
                && m.content.is_none()
            {
                g.modules.insert(m.ident.to_string());
            }
        }
        let mut files = Vec::new();
        for m in &g.modules {
            for candidate in [src.join(format!("{m}.rs")), src.join(m).join("mod.rs")] {
                if candidate.is_file() {
                    files.push(candidate);
                }
            }
            let dir = src.join(m);
            if dir.is_dir() {
                rs_files(&dir, &mut files);
            }
        }
        files.sort();
        files.dedup();
        for f in files {
            let module = module_path(src, &f);
            let parsed = parse(&f)?;
            let mut v = Visitor {
                graph: &mut g,
                file: f.clone(),
                module,
            };
            v.visit_file(&parsed);
        }
        Ok(g)
    }

    /// Sets of modules that import each other, directly or not (each with 2+ modules).
    pub fn cycles(&self) -> Vec<Vec<String>> {
        let reach = |from: &str| {
            let mut seen = BTreeSet::new();
            let mut todo = vec![from.to_owned()];
            while let Some(m) = todo.pop() {
                for (a, b) in self.edges.keys() {
                    if *a == m && seen.insert(b.clone()) {
                        todo.push(b.clone());
                    }
                }
            }
            seen
        };
        let reaches: BTreeMap<&String, BTreeSet<String>> =
            self.modules.iter().map(|m| (m, reach(m))).collect();
        let mut done = BTreeSet::new();
        let mut out = Vec::new();
        for m in &self.modules {
            if done.contains(m) {
                continue;
            }
            let scc: Vec<String> = self
                .modules
                .iter()
                .filter(|o| *o == m || (reaches[m].contains(*o) && reaches[*o].contains(m)))
                .cloned()
                .collect();
            done.extend(scc.iter().cloned());
            if scc.len() > 1 {
                out.push(scc);
            }
        }
        out
    }
}

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    pub modules: usize,
    pub edges: usize,
    pub cycles: Vec<Vec<String>>,
    /// `from -> to (file:line)` for each import the table does not allow.
    pub disallowed: Vec<String>,
    /// Modules missing from the table, or table entries that are not modules.
    pub unplaced: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.cycles.is_empty() && self.disallowed.is_empty() && self.unplaced.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} top-level modules, {} import edges, {} cycles, {} disallowed edges",
            self.modules,
            self.edges,
            self.cycles.len(),
            self.disallowed.len()
        )?;
        for c in &self.cycles {
            writeln!(f, "cycle: {}", c.join(" <-> "))?;
        }
        for d in &self.disallowed {
            writeln!(f, "not allowed: {d}")?;
        }
        for u in &self.unplaced {
            writeln!(f, "table: {u}")?;
        }
        Ok(())
    }
}

/// Checks the crate at `src` against the table in its own docs.
pub fn check(src: &Path) -> Result<Report, String> {
    let g = Graph::read(src)?;
    let table = Table::from_docs(&g.docs)?;
    let mut r = Report {
        modules: g.modules.len(),
        edges: g.edges.len(),
        cycles: g.cycles(),
        ..Report::default()
    };
    for m in &g.modules {
        if !table.places.contains_key(m) {
            r.unplaced
                .push(format!("module `{m}` is not in the layer table"));
        }
    }
    for m in table.places.keys() {
        if !g.modules.contains(m) {
            r.unplaced
                .push(format!("`{m}` is in the table but not a module"));
        }
    }
    for ((from, to), site) in &g.edges {
        if !table.allows(from, to) {
            r.disallowed.push(format!(
                "{from} -> {to} ({}:{})",
                site.file.display(),
                site.line
            ));
        }
    }
    Ok(r)
}

fn parse(path: &Path) -> Result<syn::File, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    syn::parse_file(&text).map_err(|e| format!("{}:{}: {e}", path.display(), e.span().start().line))
}

fn docs_of(attrs: &[syn::Attribute]) -> String {
    let mut out = String::new();
    for a in attrs {
        if a.path().is_ident("doc")
            && let syn::Meta::NameValue(nv) = &a.meta
            && let syn::Expr::Lit(syn::ExprLit {
                lit: syn::Lit::Str(s),
                ..
            }) = &nv.value
        {
            out.push_str(&s.value());
            out.push('\n');
        }
    }
    out
}

fn rs_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            rs_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` are module `a::b`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs").to_owned();
        if stem != "mod" {
            parts.push(stem);
        }
    }
    parts
}

struct Visitor<'a> {
    graph: &'a mut Graph,
    file: PathBuf,
    /// The module the code being visited is in.
    module: Vec<String>,
}

impl Visitor<'_> {
    /// Resolves `segments` as written in the current module; notes an edge if it
    /// leads into another top-level module.
    fn reference(&mut self, segments: &[String], line: usize) {
        let Some(first) = segments.first() else {
            return;
        };
        let absolute: Vec<String> = match first.as_str() {
            "crate" => segments[1..].to_vec(),
            "self" => self.module.iter().chain(&segments[1..]).cloned().collect(),
            "super" => {
                let ups = segments.iter().take_while(|s| *s == "super").count();
                if ups > self.module.len() {
                    return;
                }
                self.module[..self.module.len() - ups]
                    .iter()
                    .chain(&segments[ups..])
                    .cloned()
                    .collect()
            }
            // In the crate root a bare name may be a top-level module.
            name if self.module.is_empty() && self.graph.modules.contains(name) => {
                segments.to_vec()
            }
            _ => return,
        };
        let (Some(to), Some(from)) = (absolute.first(), self.module.first()) else {
            return;
        };
        if to != from && self.graph.modules.contains(to) {
            self.graph
                .edges
                .entry((from.clone(), to.clone()))
                .or_insert_with(|| Site {
                    file: self.file.clone(),
                    line,
                });
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree, line: usize) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree, line);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.reference(&prefix.clone(), line);
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.reference(&prefix.clone(), line);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.reference(&prefix.clone(), line),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t, line);
                }
            }
        }
    }

    /// `crate::a`, `self::a` and `super::a` inside a macro's tokens.
    fn tokens(&mut self, tokens: proc_macro2::TokenStream) {
        use proc_macro2::TokenTree;
        let tts: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tts.len() {
            match &tts[i] {
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Ident(id)
                    if matches!(id.to_string().as_str(), "crate" | "self" | "super") =>
                {
                    // ident (`::` ident)*
                    let line = id.span().start().line;
                    let mut segs = vec![id.to_string()];
                    let mut j = i + 1;
                    while j + 2 < tts.len() + 1 {
                        let colons = matches!(
                            (&tts.get(j), &tts.get(j + 1)),
                            (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)))
                                if a.as_char() == ':' && b.as_char() == ':'
                        );
                        match (colons, tts.get(j + 2)) {
                            (true, Some(TokenTree::Ident(next))) => {
                                segs.push(next.to_string());
                                j += 3;
                            }
                            _ => break,
                        }
                    }
                    self.reference(&segs, line);
                    i = j;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

impl<'ast> Visit<'ast> for Visitor<'_> {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let line = u.use_token.span.start().line;
        self.use_tree(&mut Vec::new(), &u.tree, line);
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if m.content.is_some() {
            self.module.push(m.ident.to_string());
            syn::visit::visit_item_mod(self, m);
            self.module.pop();
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segs: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        if let Some(s) = p.segments.first() {
            self.reference(&segs, s.ident.span().start().line);
        }
        syn::visit::visit_path(self, p);
    }

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        self.tokens(m.tokens.clone());
        syn::visit::visit_macro(self, m);
    }
}
