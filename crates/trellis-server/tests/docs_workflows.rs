//! Every complete workflow example in the documentation (a ```json block with a `trigger`)
//! compiles against the CRM app, so the reference cannot drift from the engine.

fn blocks(text: &str) -> Vec<String> {
    let mut out = vec![];
    let mut cur: Option<String> = None;
    for line in text.lines() {
        match (&mut cur, line.trim_start()) {
            (None, l) if l.starts_with("```json") && l.trim_end() == "```json" => {
                cur = Some(String::new())
            }
            (Some(_), l) if l.starts_with("```") => out.push(cur.take().unwrap_or_default()),
            (Some(b), _) => {
                b.push_str(line);
                b.push('\n');
            }
            _ => {}
        }
    }
    out
}

#[test]
fn workflow_examples_in_the_docs_compile_against_the_crm() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut checked = 0;
    for doc in [
        "docs/reference/workflows.md",
        "docs/howto-crm-automations.md",
    ] {
        let text = std::fs::read_to_string(root.join(doc)).unwrap();
        for (i, b) in blocks(&text).iter().enumerate() {
            let v: serde_json::Value = serde_json::from_str(b)
                .unwrap_or_else(|e| panic!("{doc}: json block {i} does not parse: {e}\n{b}"));
            if v.get("trigger").is_none() {
                continue;
            }
            let mut def = trellis_server::crm::definition();
            def["workflows"] = serde_json::json!([v]);
            if let Err(e) = trellis_server::appdef::check(&def) {
                panic!("{doc}: json block {i} does not compile: {e:?}\n{b}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 8, "only {checked} workflow examples found");
}
