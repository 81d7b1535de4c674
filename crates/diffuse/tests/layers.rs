//! The library's layers only look down: this test reads `src/` and fails when a module names
//! (through a `crate::` path, in `use` or in code) a module it must not depend on.
//!
//! `ops` ← `models` ← `pipelines` ← `training` ← `evaluation`, with `schedulers`, `loading`
//! and `tokenizers` beside the models (never importing them or anything above), `lora` and
//! `prompts` between the models and the pipelines, and `error`, `files`, `rng`, `configs` and
//! `device` at the bottom, for everyone. A new top-level module must be given its place in [`LAYERS`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each top-level module and the modules it may import (besides itself). `crate::Error`,
/// `crate::Result` and `crate::bail` are the `error` module's.
const LAYERS: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("files", &["error"]),
    ("rng", &["error"]),
    ("configs", &["error"]),
    ("device", &["error"]),
    ("default_model", &["error", "files"]),
    ("ops", &["error"]),
    ("loading", &["error", "files", "configs"]),
    ("tokenizers", &["error", "files", "configs", "loading"]),
    ("schedulers", &["error", "rng", "configs", "loading"]),
    ("models", &["error", "rng", "configs", "ops"]),
    ("prompts", &["error", "rng", "configs", "ops", "loading", "tokenizers", "models"]),
    ("lora", &["error", "files", "rng", "configs", "ops", "loading", "tokenizers", "models", "prompts"]),
    (
        "pipelines",
        &["error", "files", "rng", "configs", "default_model", "ops", "loading", "tokenizers", "schedulers", "models", "prompts", "lora"],
    ),
    (
        "training",
        &[
            "error", "files", "rng", "configs", "default_model", "ops", "loading", "tokenizers", "schedulers", "models", "prompts", "lora",
            "pipelines",
        ],
    ),
    (
        "evaluation",
        &[
            "error", "files", "rng", "configs", "default_model", "ops", "loading", "tokenizers", "schedulers", "models", "prompts", "lora",
            "pipelines", "training",
        ],
    ),
];

/// The root's re-exports of the error module.
const ERROR_ITEMS: &[&str] = &["Error", "Result", "bail"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The text without `//` comments (doc links are not dependencies) and string literals (a
/// message may quote a path).
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    let mut in_string = false;
    while let Some(c) = chars.next() {
        if in_string {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => in_string = false,
                '\n' => out.push('\n'),
                _ => {}
            }
            continue;
        }
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            // A char literal '"' must not open a string.
            '\'' if chars.peek() == Some(&'"') => {
                chars.next();
                out.push_str("'\"");
            }
            '"' => in_string = true,
            _ => out.push(c),
        }
    }
    out
}

/// The top-level names each `crate::` path in `code` starts with (`use crate::{a, b::c}`
/// gives both), with the line they are on; `super::` chains that reach a top-level module
/// by name too.
fn crate_paths(code: &str, top_modules: &BTreeSet<&str>) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            let before = &rest[..at];
            rest = &rest[at + "crate::".len()..];
            // `$crate::` (in macros) is the crate too; `mycrate::` is not.
            if before.chars().last().is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            if let Some(group) = rest.strip_prefix('{') {
                // Only the first level matters: `{a, b::{c, d}}` names a and b.
                let mut depth = 0;
                let mut item = String::new();
                let mut items = Vec::new();
                for c in group.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => items.push(std::mem::take(&mut item)),
                        _ => item.push(c),
                    }
                }
                items.push(item);
                for item in items {
                    let name: String = item.trim().chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                    if !name.is_empty() {
                        found.push((number + 1, name));
                    }
                }
            } else {
                let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
                found.push((number + 1, name));
            }
        }
        // `super::super::models::...` reaches another module without `crate::`.
        let mut rest = line;
        while let Some(at) = rest.find("super::") {
            rest = &rest[at..];
            while let Some(next) = rest.strip_prefix("super::") {
                rest = next;
            }
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if top_modules.contains(name.as_str()) {
                found.push((number + 1, name));
            }
        }
    }
    found
}

/// The module a path's first name belongs to.
fn module_of(name: &str) -> &str {
    if ERROR_ITEMS.contains(&name) {
        "error"
    } else {
        name
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every import that breaks the layers, as `file:line: module imports other`.
fn violations() -> Vec<String> {
    let src = src();
    let top_modules: BTreeSet<&str> = LAYERS.iter().map(|(m, _)| *m).collect();
    let mut found = Vec::new();
    for (module, allowed) in LAYERS {
        let mut files = Vec::new();
        let single = src.join(format!("{module}.rs"));
        if single.is_file() {
            files.push(single);
        }
        rust_files(&src.join(module), &mut files);
        assert!(!files.is_empty(), "module `{module}` has no source under {}", src.display());
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (line, name) in crate_paths(&code_only(&text), &top_modules) {
                let target = module_of(&name);
                if target == *module || allowed.contains(&target) {
                    continue;
                }
                let relative = file.strip_prefix(&src).unwrap_or(&file).display().to_string();
                if top_modules.contains(target) {
                    found.push(format!("src/{relative}:{line}: `{module}` imports `{target}`, a layer it must not depend on"));
                } else {
                    found.push(format!("src/{relative}:{line}: `{module}` names `crate::{name}`, which is not a module in the layer table"));
                }
            }
        }
    }
    found
}

#[test]
fn lower_layers_never_import_higher_ones() {
    let violations = violations();
    assert!(violations.is_empty(), "layer violations:\n{}", violations.join("\n"));
}

#[test]
fn every_module_of_the_crate_has_a_layer() {
    let lib = code_only(&std::fs::read_to_string(src().join("lib.rs")).unwrap());
    let declared: BTreeSet<String> = lib
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod ").or_else(|| l.trim().strip_prefix("mod ")))
        .map(|m| m.trim_end_matches(';').trim().to_string())
        .collect();
    let placed: BTreeSet<String> = LAYERS.iter().map(|(m, _)| m.to_string()).collect();
    assert_eq!(declared, placed, "lib.rs's modules and the layer table differ");
}

/// The scanner itself finds the forms of import the source uses (so that the check cannot
/// pass by reading nothing).
#[test]
fn the_scanner_sees_every_form_of_import() {
    let top: BTreeSet<&str> = LAYERS.iter().map(|(m, _)| *m).collect();
    let code = code_only(
        "use crate::{bail, lora::adapters::{A, B}, Result};\n\
         let x = crate::training::checkpoint::save(); // crate::pipelines in a comment\n\
         let s = \"crate::evaluation in a string\"; let q = '\"';\n\
         use super::super::models::Linear;\n\
         let e = $crate::Error::invalid(); let n = notcrate::x;\n",
    );
    let names: Vec<(usize, String)> = crate_paths(&code, &top);
    let expected: Vec<(usize, String)> =
        [(1, "bail"), (1, "lora"), (1, "Result"), (2, "training"), (4, "models"), (5, "Error")].iter().map(|(l, n)| (*l, n.to_string())).collect();
    assert_eq!(names, expected);
}
