//! What the train and eval stages both need to know about the student: its system prompt,
//! the prompt an example becomes, where its model is, and the identity of its local files.

use crate::dataset::Example;
use crate::spec::StudentSpec;
use serde_json::json;
use std::path::Path;

/// The system prompt the student learns with: its own (`""` for none), else the teacher's.
pub fn student_system(student: &StudentSpec, teacher_system: Option<&str>) -> Option<String> {
    match student.system.as_deref() {
        // An empty prompt means none at all: the cheapest to serve.
        Some("") => None,
        Some(own) => Some(own.to_string()),
        None => teacher_system.map(str::to_string),
    }
}

/// The user turn of an example (several user turns are joined: the student is trained on
/// single-turn prompts).
pub fn prompt_of(example: &Example) -> String {
    let users: Vec<&str> = example.messages.iter().filter(|m| m.role == "user").map(|m| m.content.as_str()).collect();
    users.join("\n\n")
}

/// Identity of a local model's files (names, sizes, modification times): cheap for multi-GB
/// weights, and any rewrite changes it. Hub ids are identified by their name.
pub fn local_model_fingerprint(model: &str, spec_dir: &Path) -> serde_json::Value {
    let path = Path::new(&resolve_model_source(model, spec_dir)).to_path_buf();
    let files: Vec<std::path::PathBuf> = if path.is_dir() {
        let mut files: Vec<_> = std::fs::read_dir(&path)
            .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        files
    } else if path.is_file() {
        vec![path]
    } else {
        return json!({ "hub_id": model });
    };
    let described: Vec<serde_json::Value> = files
        .iter()
        .filter_map(|f| {
            let m = std::fs::metadata(f).ok()?;
            let modified = m.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos() as u64;
            Some(json!([f.file_name()?.to_string_lossy(), m.len(), modified]))
        })
        .collect();
    json!({ "files": described })
}

/// A relative student path resolves against the spec's directory; hub ids pass through.
pub fn resolve_model_source(model: &str, spec_dir: &Path) -> String {
    let candidate = crate::spec::resolve_against(spec_dir, &shellexpand_home(model));
    if candidate.exists() {
        candidate.display().to_string()
    } else {
        model.to_string()
    }
}

fn shellexpand_home(path: &str) -> String {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest).display().to_string(),
        _ => path.to_string(),
    }
}
