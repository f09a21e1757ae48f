//! App definitions as folders: `app.json` plus one file per entity (and, later, per workflow,
//! report and role), merged into one JSON document. A map from JSON pointer prefixes back to file
//! names lets `trellis app check` say in which file each problem is.

use serde_json::Value;
use std::path::Path;

/// The sub-folders of an app folder and the definition key each one fills, in order.
pub const SECTIONS: [&str; 5] = ["entities", "workflows", "reports", "roles", "calendars"];

/// A merged definition and where each part came from.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// The merged definition.
    pub definition: Value,
    /// (JSON pointer prefix, file name), e.g. (`/entities/2`, `entities/03-contact.json`).
    pub sources: Vec<(String, String)>,
}

impl Bundle {
    /// The file a JSON pointer points into.
    pub fn file_of(&self, pointer: &str) -> &str {
        self.sources
            .iter()
            .filter(|(prefix, _)| pointer == prefix || pointer.starts_with(&format!("{prefix}/")))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, f)| f.as_str())
            .unwrap_or("app.json")
    }
}

/// A file that could not be read or parsed.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct BundleError {
    /// The file.
    pub file: String,
    /// What is wrong.
    pub message: String,
}

/// Build a bundle from `(relative path, content)` pairs: `app.json` and `<section>/<name>.json`.
/// Files of a section are taken in name order.
pub fn from_files(mut files: Vec<(String, String)>) -> Result<Bundle, BundleError> {
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let parse = |name: &str, text: &str| -> Result<Value, BundleError> {
        serde_json::from_str(text).map_err(|e| BundleError {
            file: name.to_owned(),
            message: format!("not valid JSON: {e}"),
        })
    };
    let (app_name, app_text) =
        files
            .iter()
            .find(|(n, _)| n == "app.json")
            .ok_or_else(|| BundleError {
                file: "app.json".into(),
                message: "missing: an app folder needs an app.json".into(),
            })?;
    let mut root = match parse(app_name, app_text)? {
        Value::Object(m) => m,
        _ => {
            return Err(BundleError {
                file: "app.json".into(),
                message: "must hold a JSON object".into(),
            })
        }
    };
    let mut sources = vec![];
    for section in SECTIONS {
        let mut items = match root.remove(section) {
            Some(Value::Array(a)) => a,
            Some(_) => {
                return Err(BundleError {
                    file: "app.json".into(),
                    message: format!("`{section}` must be a list"),
                })
            }
            None => vec![],
        };
        for (name, text) in files
            .iter()
            .filter(|(n, _)| n.starts_with(&format!("{section}/")) && n.ends_with(".json"))
        {
            sources.push((format!("/{section}/{}", items.len()), name.clone()));
            items.push(parse(name, text)?);
        }
        if !items.is_empty() || section == "entities" {
            root.insert(section.to_owned(), Value::Array(items));
        }
    }
    Ok(Bundle {
        definition: Value::Object(root),
        sources,
    })
}

/// Read an app folder (or a single JSON file holding the whole definition).
pub fn load(path: &Path) -> Result<Bundle, BundleError> {
    let err = |p: &Path, e: std::io::Error| BundleError {
        file: p.display().to_string(),
        message: e.to_string(),
    };
    if path.is_file() {
        let text = std::fs::read_to_string(path).map_err(|e| err(path, e))?;
        return from_files(vec![("app.json".into(), text)]);
    }
    let mut files = vec![];
    let app = path.join("app.json");
    files.push((
        "app.json".to_owned(),
        std::fs::read_to_string(&app).map_err(|e| err(&app, e))?,
    ));
    for section in SECTIONS {
        let dir = path.join(section);
        if !dir.is_dir() {
            continue;
        }
        for entry in std::fs::read_dir(&dir).map_err(|e| err(&dir, e))? {
            let p = entry.map_err(|e| err(&dir, e))?.path();
            if p.extension().is_some_and(|x| x == "json") {
                let name = format!(
                    "{section}/{}",
                    p.file_name().unwrap_or_default().to_string_lossy()
                );
                files.push((name, std::fs::read_to_string(&p).map_err(|e| err(&p, e))?));
            }
        }
    }
    from_files(files)
}

/// Split a definition into the files of an app folder: `app.json` and one file per item of each
/// section, numbered so that name order is definition order (`entities/01-lead.json`).
pub fn to_files(definition: &Value) -> Vec<(String, String)> {
    let mut root = definition.as_object().cloned().unwrap_or_default();
    let mut files = vec![];
    for section in SECTIONS {
        let Some(Value::Array(items)) = root.remove(section) else {
            continue;
        };
        let width = items.len().to_string().len().max(2);
        for (i, item) in items.iter().enumerate() {
            let key = item.get("key").and_then(Value::as_str).unwrap_or("item");
            let text = serde_json::to_string_pretty(item).expect("JSON serializes") + "\n";
            files.push((format!("{section}/{:0width$}-{key}.json", i + 1), text));
        }
    }
    files.insert(
        0,
        (
            "app.json".to_owned(),
            serde_json::to_string_pretty(&Value::Object(root)).expect("JSON serializes") + "\n",
        ),
    );
    files
}
