//! The library's modules depend on each other one way only: this test reads
//! every `crate::` and `super::` path in `src/` (folders included) and fails
//! on any cycle between files, so that a new import that closes a loop is
//! caught when it is written. A module is named by its path: `serve/accept`,
//! `limits` (for `limits/mod.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// Module name (file stem) to the modules it names through `crate::`.
type Graph = BTreeMap<String, BTreeSet<String>>;

#[test]
fn paths_resolve_to_the_module_files_they_name() {
    let modules: BTreeSet<String> = ["limits", "limits/rate", "serve", "serve/connection"]
        .map(String::from)
        .into();
    let path = |text: &str| segments(text);
    assert_eq!(
        resolve("", &path("limits::rate::Rate"), &modules),
        "limits/rate"
    );
    assert_eq!(resolve("", &path("limits::Refusal"), &modules), "limits");
    assert_eq!(
        resolve("serve", &path("connection::Timed"), &modules),
        "serve/connection"
    );
    assert_eq!(super_of("serve"), "");
    assert_eq!(super_of("serve/accept"), "serve");
    let graph = library_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(
        graph["service/metrics"].contains("serve/connection"),
        "{graph:?}"
    );
    assert!(graph["serve/connection"].contains("limits"), "{graph:?}");
}

#[test]
fn modules_depend_on_each_other_one_way() {
    let graph = library_graph(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(graph.len() > 5, "no modules found: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "modules depend on each other in a cycle: {}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn the_check_finds_a_cycle_and_reads_grouped_imports() {
    let mut graph = Graph::new();
    for (module, source) in [
        (
            "a",
            "use crate::b::X;\n// crate::c in a comment does not count\n",
        ),
        ("b", "use crate::{\n    c::Y,\n    d,\n};\n"),
        ("c", "fn f() { crate::a::g() }\n"),
        ("d", ""),
    ] {
        let names = dependencies(source, "crate::")
            .into_iter()
            .filter_map(|path| path.first().cloned())
            .collect();
        graph.insert(module.to_string(), names);
    }
    assert_eq!(graph["b"], ["c", "d"].map(String::from).into());
    let cycle = find_cycle(&graph).expect("a -> b -> c -> a");
    assert_eq!(cycle, ["a", "b", "c", "a"]);
    graph.get_mut("c").unwrap().clear();
    assert_eq!(find_cycle(&graph), None);
}

/// Every `.rs` file under `src/` except the binary's own (`main.rs` and
/// its `cli.rs`), with the modules its paths name.
fn library_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    collect(src, src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|(module, _)| module.clone()).collect();
    let mut graph = Graph::new();
    for (module, path) in files {
        if ["main", "cli"].contains(&module.as_str()) {
            continue;
        }
        let source = fs::read_to_string(&path).expect("source file is readable");
        let mut names: BTreeSet<String> = dependencies(&source, "crate::")
            .into_iter()
            .map(|path| resolve("", &path, &modules))
            .chain(
                dependencies(&source, "super::")
                    .into_iter()
                    .map(|path| resolve(super_of(&module), &path, &modules)),
            )
            .filter(|name| !name.is_empty())
            .collect();
        names.remove(&module);
        graph.insert(module, names);
    }
    graph
}

/// The module `super::` names in `module`'s file: its parent (the crate
/// root for a top-level module).
fn super_of(module: &str) -> &str {
    module.rsplit_once('/').map_or("", |(parent, _)| parent)
}

/// The longest module named by `path` (segments `a::b::C`) from `base`.
fn resolve(base: &str, path: &[String], modules: &BTreeSet<String>) -> String {
    let mut best = String::new();
    let mut name = base.to_string();
    for segment in path {
        name = if name.is_empty() {
            segment.clone()
        } else {
            format!("{name}/{segment}")
        };
        if modules.contains(&name) {
            best = name.clone();
        }
    }
    best
}

/// (module, file) for every `.rs` file under `dir`.
fn collect(src: &Path, dir: &Path, files: &mut Vec<(String, std::path::PathBuf)>) {
    for entry in fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("src/ entry").path();
        if path.is_dir() {
            collect(src, &path, files);
            continue;
        }
        if path.extension().is_none_or(|ext| ext != "rs") {
            continue;
        }
        let relative = path
            .strip_prefix(src)
            .expect("under src/")
            .with_extension("");
        let mut module = relative.to_string_lossy().into_owned();
        if let Some(folder) = module.strip_suffix("/mod") {
            module = folder.to_string();
        }
        files.push((module, path));
    }
}

/// The paths after `prefix` (`crate::` or `super::`), as segments, in
/// plain paths and in `use prefix{a::X, b, c::{Y, Z}};` groups (on one line
/// or several), outside comment lines.
fn dependencies(source: &str, prefix: &str) -> BTreeSet<Vec<String>> {
    let code: String = source
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n");
    let mut paths = BTreeSet::new();
    for (at, _) in code.match_indices(prefix) {
        // `super::super::` is read from its first `super::`.
        if code[..at].ends_with("super::") {
            continue;
        }
        let rest = &code[at + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => start = true,
                    c if start && (c.is_alphanumeric() || c == '_') => {
                        paths.insert(segments(&group[i..]));
                        start = false;
                    }
                    _ => {}
                }
            }
        } else {
            paths.insert(segments(rest));
        }
    }
    paths.retain(|path| !path.is_empty());
    paths
}

/// `a::b::C` at the start of `text`, as its lower-case segments (module
/// names) up to the first item name.
fn segments(text: &str) -> Vec<String> {
    let mut path = Vec::new();
    let mut rest = text;
    loop {
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() || !name.chars().next().is_some_and(char::is_lowercase) {
            return path;
        }
        rest = &rest[name.len()..];
        path.push(name);
        match rest.strip_prefix("::") {
            Some(after) => rest = after,
            None => return path,
        }
    }
}

/// A cycle as the path that closes it (`a -> b -> a`), if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        module: &str,
        graph: &Graph,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|m| m == module) {
            let mut cycle = path[start..].to_vec();
            cycle.push(module.to_string());
            return Some(cycle);
        }
        if done.contains(module) {
            return None;
        }
        path.push(module.to_string());
        for next in graph.get(module).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(module.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|module| visit(module, graph, &mut Vec::new(), &mut done))
}
