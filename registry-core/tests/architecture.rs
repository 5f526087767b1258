//! The arrows point one way: registry-core depends on no source crate, on no runtime and on
//! no HTTP crate — also not through another dependency. Checked on the workspace lock file,
//! so a new dependency anywhere below registry-core is caught.

use std::collections::{BTreeMap, BTreeSet};

#[test]
fn registry_core_depends_on_no_source_and_no_http_crate() {
    let lock_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock");
    let text = std::fs::read_to_string(lock_path).expect("the workspace has a Cargo.lock");
    let lock: toml::Table = text.parse().expect("Cargo.lock is TOML");
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for package in lock["package"].as_array().expect("packages") {
        let name = package["name"].as_str().unwrap().to_string();
        let list: Vec<String> = package
            .get("dependencies")
            .and_then(|d| d.as_array())
            .map(|a| {
                a.iter()
                    .map(|d| d.as_str().unwrap().split(' ').next().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default();
        deps.entry(name).or_default().extend(list);
    }
    let mut seen = BTreeSet::new();
    let mut todo = vec!["registry-core".to_string()];
    while let Some(name) = todo.pop() {
        if seen.insert(name.clone()) {
            todo.extend(deps.get(&name).cloned().unwrap_or_default());
        }
    }
    let forbidden: Vec<&String> = seen
        .iter()
        .filter(|n| {
            n.starts_with("source-")
                || n.starts_with("hyper")
                || n.starts_with("http")
                || ["worker-runtime", "server-bin", "axum", "reqwest", "tower"]
                    .contains(&n.as_str())
        })
        .collect();
    assert!(
        forbidden.is_empty(),
        "registry-core reaches {forbidden:?}; it must stay free of sources and HTTP"
    );
    assert!(
        seen.contains("tokio"),
        "the walk found registry-core's dependencies"
    );
}
