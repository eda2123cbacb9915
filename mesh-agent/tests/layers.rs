//! The agent's modules form layers: no import cycle between top-level modules, none
//! between the sibling submodules of one module, and `config` stands on nothing above
//! it. Read from the `crate::` and `super::` paths of the sources (test code left out:
//! a test may use any layer). `docs/ARCHITECTURE.md` draws the layers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules `config` must never import: it is the bottom layer every other one reads.
const ABOVE_CONFIG: &[&str] = &["cli", "settings", "state", "snapshot", "proxy", "l7", "traffic", "app", "admin"];

/// One source file: its module path (`["proxy", "outbound"]`) and its non-test text.
struct Source {
    module: Vec<String>,
    text: String,
    path: PathBuf,
}

fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = Vec::new();
    let mut test_only = BTreeSet::new();
    walk(&root, &mut |path| {
        let rel = path.strip_prefix(&root).unwrap();
        let rel_str = rel.to_string_lossy();
        if rel_str.starts_with("bin/") || rel_str == "lib.rs" || rel_str == "main.rs" {
            return;
        }
        let mut module: Vec<String> =
            rel.with_extension("").components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
        if module.last().is_some_and(|m| m == "mod") {
            module.pop();
        }
        let raw = std::fs::read_to_string(path).unwrap();
        // Children declared `#[cfg(test)] mod x;` are test code.
        let lines: Vec<&str> = raw.lines().collect();
        for w in lines.windows(2) {
            if w[0].trim() == "#[cfg(test)]"
                && let Some(name) =
                    w[1].trim().trim_start_matches("pub(crate) ").strip_prefix("mod ").and_then(|r| r.strip_suffix(';'))
            {
                let mut child = module.clone();
                child.push(name.to_string());
                test_only.insert(child);
            }
        }
        out.push(Source { module, text: production_code(&raw), path: path.to_path_buf() });
    });
    out.retain(|s| !test_only.contains(&s.module));
    out
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path)) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            walk(&p, f);
        } else if p.extension().is_some_and(|e| e == "rs") {
            f(&p);
        }
    }
}

/// The text without line comments and without the trailing `#[cfg(test)] mod tests`.
fn production_code(raw: &str) -> String {
    let mut out = String::new();
    let mut lines = raw.lines().peekable();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]" && lines.peek().is_some_and(|n| n.trim_start().starts_with("mod tests")) {
            break;
        }
        let code = line.split("//").next().unwrap_or("");
        out.push_str(code);
        out.push('\n');
    }
    out
}

/// Every module path the text names through `crate::` or `super::`, resolved from
/// `module` (the file's own module path).
fn imports(module: &[String], text: &str) -> BTreeSet<Vec<String>> {
    let mut found = BTreeSet::new();
    for (anchor, base) in [("crate::", Vec::new()), ("super::", module[..module.len().saturating_sub(1)].to_vec())] {
        let mut rest = text;
        while let Some(i) = rest.find(anchor) {
            // `a::crate::x` cannot occur; `self::super::` is not used here.
            let after = &rest[i + anchor.len()..];
            for path in paths_at(after) {
                let mut full = base.clone();
                full.extend(path);
                found.insert(full);
            }
            rest = after;
        }
    }
    found
}

/// The module paths written at the start of `s`: `a::b::C` gives `[a, b]` (lowercase
/// segments only), and a `{x, y::z}` group gives one path per member.
fn paths_at(s: &str) -> Vec<Vec<String>> {
    if let Some(group) = s.strip_prefix('{') {
        let mut depth = 1;
        let mut end = 0;
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                end = i;
                break;
            }
        }
        let inner = &group[..end];
        let mut members = Vec::new();
        let (mut depth, mut start) = (0, 0);
        for (i, c) in inner.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    members.push(&inner[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        members.push(&inner[start..]);
        return members
            .into_iter()
            .flat_map(|m| {
                let m = m.trim();
                if m == "self" { vec![Vec::new()] } else { paths_at(m) }
            })
            .collect();
    }
    let mut path = Vec::new();
    let mut rest = s;
    loop {
        let len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        let seg = &rest[..len];
        if seg.is_empty() || !seg.starts_with(|c: char| c.is_ascii_lowercase()) {
            break;
        }
        let next = &rest[len..];
        if let Some(tail) = next.strip_prefix("::") {
            path.push(seg.to_string());
            if tail.starts_with('{') {
                let mut out = Vec::new();
                for sub in paths_at(tail) {
                    let mut p = path.clone();
                    p.extend(sub);
                    out.push(p);
                }
                return out;
            }
            rest = tail;
        } else {
            // The last lowercase segment is a module (`use crate::l7;`) or a function;
            // either way the module it lives in is already in `path`, and a module
            // named last is kept.
            path.push(seg.to_string());
            break;
        }
    }
    vec![path]
}

/// Edges between the children of `parent` (top level when empty): `a -> b` when code in
/// `parent::a` names `parent::b`, with the files that do.
fn edges(sources: &[Source], parent: &[String]) -> BTreeMap<String, BTreeMap<String, BTreeSet<String>>> {
    let mut out: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let depth = parent.len();
    let children: BTreeSet<String> = sources
        .iter()
        .filter(|s| s.module.len() > depth && s.module[..depth] == *parent)
        .map(|s| s.module[depth].clone())
        .collect();
    for s in sources.iter().filter(|s| s.module.len() > depth && s.module[..depth] == *parent) {
        let from = &s.module[depth];
        for target in imports(&s.module, &s.text) {
            if target.len() > depth && target[..depth] == *parent {
                let to = &target[depth];
                if to != from && children.contains(to) {
                    let file = s.path.file_name().unwrap().to_string_lossy().into_owned();
                    out.entry(from.clone()).or_default().entry(to.clone()).or_default().insert(file);
                }
            }
        }
    }
    out
}

/// A cycle in `graph`, as the list of its modules, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for next in graph.get(n).into_iter().flat_map(|m| m.keys()) {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == next).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0
            && let Some(c) = visit(n, graph, &mut state, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

fn describe(graph: &BTreeMap<String, BTreeMap<String, BTreeSet<String>>>, cycle: &[String]) -> String {
    cycle
        .windows(2)
        .map(|w| format!("{} -> {} (in {:?})", w[0], w[1], graph[&w[0]][&w[1]]))
        .collect::<Vec<_>>()
        .join("\n  ")
}

#[test]
fn top_level_modules_have_no_import_cycle() {
    let sources = sources();
    let graph = edges(&sources, &[]);
    assert!(graph.len() > 5, "the import reader found too few modules: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!("import cycle between the agent's modules:\n  {}", describe(&graph, &cycle));
    }
}

#[test]
fn submodules_of_one_module_have_no_import_cycle() {
    let sources = sources();
    let parents: BTreeSet<Vec<String>> =
        sources.iter().filter(|s| s.module.len() > 1).map(|s| s.module[..s.module.len() - 1].to_vec()).collect();
    let cycles: Vec<String> = parents
        .iter()
        .filter_map(|parent| {
            let graph = edges(&sources, parent);
            find_cycle(&graph).map(|c| format!("inside {}:\n  {}", parent.join("::"), describe(&graph, &c)))
        })
        .collect();
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn config_imports_nothing_above_it() {
    let sources = sources();
    let graph = edges(&sources, &[]);
    let uses: Vec<_> = graph
        .get("config")
        .into_iter()
        .flat_map(|m| m.iter())
        .filter(|(to, _)| ABOVE_CONFIG.contains(&to.as_str()))
        .collect();
    assert!(uses.is_empty(), "config imports modules above it: {uses:?}");
}

#[test]
fn the_reader_sees_groups_nested_paths_and_super() {
    let module = vec!["proxy".to_string(), "outbound".to_string()];
    let text = "use crate::{l7::{self, server}, state::Workload};\nuse super::inpod::accept_loop;\nlet x = crate::telemetry::Metrics::new();";
    let found: BTreeSet<String> = imports(&module, text).into_iter().map(|p| p.join("::")).collect();
    for want in ["l7", "l7::server", "state", "proxy::inpod::accept_loop", "telemetry"] {
        assert!(found.iter().any(|f| f == want || f.starts_with(&format!("{want}::"))), "{want} not in {found:?}");
    }
}
