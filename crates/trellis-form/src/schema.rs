//! Each entity compiles to one JSON Schema (draft 2020-12), validated with the `jsonschema`
//! crate. Its errors are turned into sentences a business user understands, each with the JSON
//! pointer of the offending value, and every error is reported, never only the first.
//!
//! Checks that JSON Schema cannot express well (decimal digits, date bounds, stage entry
//! criteria, references that must exist, uniqueness) run afterwards in [`crate::values`] and
//! [`crate::store`], with the same [`Problem`] shape.

use crate::def::FieldType;
use crate::error::{pointer_segment, Problem};
use crate::model::{Entity, Field};
use jsonschema::error::{TypeKind, ValidationErrorKind};
use serde_json::{json, Map, Value};

/// Pattern of a decimal in its JSON string form.
pub const DECIMAL_PATTERN: &str = r"^-?[0-9]+(\.[0-9]+)?$";
/// Pattern of a phone number: digits, spaces, dashes, dots, parentheses, an optional leading `+`.
pub const PHONE_PATTERN: &str = r"^\+?[0-9][0-9 ().\-]{2,31}$";
/// Pattern of an ISO 4217 currency code.
pub const CURRENCY_PATTERN: &str = "^[A-Z]{3}$";
/// Pattern of an `http(s)` URL.
pub const URL_PATTERN: &str = r"^https?://[^\s/$.?#][^\s]*$";

/// A retriever that refuses every external `$ref`: validation never reads a file or the network.
pub(crate) struct NoRetrieval;

impl jsonschema::Retrieve for NoRetrieval {
    fn retrieve(
        &self,
        uri: &jsonschema::Uri<String>,
    ) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
        Err(format!(
            "external $ref `{}` is not allowed: only local references (#/…) are",
            uri.as_str()
        )
        .into())
    }
}

/// Build a validator that never fetches anything and checks formats.
pub(crate) fn build_validator(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::options()
        .with_retriever(NoRetrieval)
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| e.to_string())
}

/// The JSON Schema of one field's value (without null).
pub(crate) fn field_schema(
    f: &crate::def::FieldDef,
    options: &[String],
    stages: &[String],
) -> Value {
    let mut s = Map::new();
    let text = |s: &mut Map<String, Value>| {
        s.insert("type".into(), json!("string"));
        if let Some(n) = f.min_length {
            s.insert("minLength".into(), json!(n));
        }
        if let Some(n) = f.max_length {
            s.insert("maxLength".into(), json!(n));
        }
    };
    match f.ty {
        FieldType::Text | FieldType::LongText => {
            text(&mut s);
            if f.required && f.min_length.is_none() {
                // A required text must not be blank.
                s.insert("minLength".into(), json!(1));
            }
            if f.max_length.is_none() {
                let max = if f.ty == FieldType::Text {
                    1000
                } else {
                    100_000
                };
                s.insert("maxLength".into(), json!(max));
            }
            if let Some(p) = &f.pattern {
                // JSON Schema patterns match anywhere; a definition's pattern must match whole.
                s.insert("pattern".into(), json!(format!("^(?:{p})$")));
            }
        }
        FieldType::Email => {
            text(&mut s);
            s.insert("format".into(), json!("email"));
            s.entry("maxLength").or_insert(json!(254));
        }
        FieldType::Phone => {
            text(&mut s);
            s.insert("pattern".into(), json!(PHONE_PATTERN));
        }
        FieldType::Url => {
            text(&mut s);
            s.insert("pattern".into(), json!(URL_PATTERN));
            s.entry("maxLength").or_insert(json!(2048));
        }
        FieldType::Integer => {
            s.insert("type".into(), json!("integer"));
            if let Some(m) = &f.min {
                s.insert("minimum".into(), m.clone());
            }
            if let Some(m) = &f.max {
                s.insert("maximum".into(), m.clone());
            }
        }
        FieldType::Decimal => {
            s.insert("type".into(), json!(["string", "number"]));
            s.insert("pattern".into(), json!(DECIMAL_PATTERN));
        }
        FieldType::Money => {
            s.insert(
                "anyOf".into(),
                json!([
                    {"type": "string", "pattern": DECIMAL_PATTERN},
                    {"type": "number"},
                    {"type": "object",
                     "properties": {
                        "amount": {"type": ["string", "number"], "pattern": DECIMAL_PATTERN},
                        "currency": {"type": "string", "pattern": CURRENCY_PATTERN}
                     },
                     "required": ["amount"],
                     "additionalProperties": false}
                ]),
            );
        }
        FieldType::Boolean => {
            s.insert("type".into(), json!("boolean"));
        }
        FieldType::Date => {
            s.insert("type".into(), json!("string"));
            s.insert("format".into(), json!("date"));
        }
        FieldType::Datetime | FieldType::Summary => {
            s.insert("type".into(), json!("string"));
            s.insert("format".into(), json!("date-time"));
        }
        FieldType::Select => {
            s.insert("type".into(), json!("string"));
            s.insert("enum".into(), json!(options));
        }
        FieldType::Stage => {
            s.insert("type".into(), json!("string"));
            s.insert("enum".into(), json!(stages));
        }
        FieldType::Multiselect => {
            s.insert("type".into(), json!("array"));
            s.insert("items".into(), json!({"type": "string", "enum": options}));
            s.insert("uniqueItems".into(), json!(true));
            match f.min_length {
                Some(n) => s.insert("minItems".into(), json!(n)),
                // A required multiselect needs at least one choice.
                None if f.required => s.insert("minItems".into(), json!(1)),
                None => None,
            };
            if let Some(n) = f.max_length {
                s.insert("maxItems".into(), json!(n));
            }
        }
        FieldType::User | FieldType::Relation => {
            s.insert("type".into(), json!("string"));
            s.insert("format".into(), json!("uuid"));
        }
        // The optional user schema of a json field is compiled as its own validator, so that its
        // local `$ref`s resolve against itself.
        FieldType::Json | FieldType::Formula => {}
    }
    Value::Object(s)
}

/// The JSON Schema of a whole record of `fields` (system columns are stripped before).
pub(crate) fn entity_schema(fields: &[Field]) -> Value {
    let mut props = Map::new();
    let mut required = vec![];
    for f in fields {
        let inner = field_schema(
            &f.def,
            &f.options,
            &f.stages.iter().map(|s| s.key.clone()).collect::<Vec<_>>(),
        );
        let schema = if f.ty == FieldType::Json && f.def.required {
            required.push(f.key.clone());
            json!({"type": ["object", "array", "string", "number", "boolean"]})
        } else if f.ty == FieldType::Json {
            inner
        } else if f.def.required {
            required.push(f.key.clone());
            inner
        } else {
            json!({"anyOf": [{"type": "null"}, inner]})
        };
        props.insert(f.key.clone(), schema);
    }
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": props,
        "required": required,
        "additionalProperties": false,
    })
}

/// Validate a record object against the entity's schema; every error becomes a [`Problem`].
pub(crate) fn validate(entity: &Entity, record: &Value) -> Vec<Problem> {
    // Most records are valid: the boolean check stops at the first failure and builds no errors.
    if entity.validator.is_valid(record) {
        return vec![];
    }
    let mut out: Vec<Problem> = vec![];
    for err in entity.validator.iter_errors(record) {
        let path = err.instance_path.as_str().to_owned();
        let field = path
            .trim_start_matches('/')
            .split('/')
            .next()
            .and_then(|k| entity.field(k));
        out.extend(describe(entity, field, &path, &err.kind, &err.instance));
    }
    // anyOf reports one error per branch; keep one problem per path and code.
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.dedup_by(|a, b| a.path == b.path && a.code == b.code);
    out
}

fn describe(
    entity: &Entity,
    field: Option<&Field>,
    path: &str,
    kind: &ValidationErrorKind,
    instance: &Value,
) -> Vec<Problem> {
    let name = field.map(|f| f.label.as_str()).unwrap_or("This value");
    let p = |code, msg: String| vec![Problem::new(path, code, msg)];
    match kind {
        ValidationErrorKind::Required { property } => {
            let key = property.as_str().unwrap_or_default();
            let label = entity.field(key).map(|f| f.label.as_str()).unwrap_or(key);
            vec![Problem::new(
                format!("{path}/{}", pointer_segment(key)),
                "required",
                format!("{label} is required."),
            )]
        }
        ValidationErrorKind::AdditionalProperties { unexpected } => unexpected
            .iter()
            .map(|k| {
                Problem::new(
                    format!("{path}/{}", pointer_segment(k)),
                    "unknown_field",
                    format!("`{k}` is not a field of {}.", entity.label),
                )
            })
            .collect(),
        ValidationErrorKind::Type { kind } => {
            if path.is_empty() {
                return p("not_an_object", "A record must be a JSON object.".into());
            }
            if instance.is_null() && field.is_some_and(|f| f.def.required) {
                return p("required", format!("{name} is required."));
            }
            let wanted = match kind {
                TypeKind::Single(t) => t.to_string(),
                TypeKind::Multiple(ts) => ts
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" or "),
            };
            p(
                "wrong_type",
                format!("{name} must be {}.", type_phrase(field, &wanted)),
            )
        }
        ValidationErrorKind::AnyOf => {
            let f = match field {
                Some(f) => f,
                None => return p("invalid", format!("{name} is not valid.")),
            };
            if f.ty == FieldType::Money {
                return p(
                    "wrong_type",
                    format!("{name} must be an amount such as \"1200.50\" or {{\"amount\": \"1200.50\", \"currency\": \"{}\"}}.", f.currency),
                );
            }
            // A nullable field: re-run the inner schema to say what is wrong with the value.
            let inner = field_schema(
                &f.def,
                &f.options,
                &f.stages.iter().map(|s| s.key.clone()).collect::<Vec<_>>(),
            );
            match build_validator(&inner) {
                Ok(v) => v
                    .iter_errors(instance)
                    .flat_map(|e| {
                        let sub = format!("{path}{}", e.instance_path.as_str());
                        describe(entity, field, &sub, &e.kind, &e.instance)
                    })
                    .collect(),
                Err(_) => p("invalid", format!("{name} is not valid.")),
            }
        }
        ValidationErrorKind::Enum { .. } => {
            let f = field;
            let (code, choices) = match f {
                Some(f) if f.ty == FieldType::Stage => (
                    "unknown_stage",
                    f.stages
                        .iter()
                        .map(|s| format!("{} ({})", s.key, s.label))
                        .collect::<Vec<_>>(),
                ),
                Some(f) => (
                    "unknown_option",
                    f.options
                        .iter()
                        .zip(&f.def.options)
                        .map(|(k, o)| match &o.label {
                            Some(l) => format!("{k} ({})", l.get("en", k)),
                            None => k.clone(),
                        })
                        .collect(),
                ),
                None => ("unknown_option", vec![]),
            };
            p(
                code,
                format!(
                    "{name}: {instance} is not one of the allowed values: {}.",
                    choices.join(", ")
                ),
            )
        }
        ValidationErrorKind::Minimum { limit }
        | ValidationErrorKind::ExclusiveMinimum { limit } => {
            p("out_of_range", format!("{name} must be at least {limit}."))
        }
        ValidationErrorKind::Maximum { limit }
        | ValidationErrorKind::ExclusiveMaximum { limit } => {
            p("out_of_range", format!("{name} must be at most {limit}."))
        }
        ValidationErrorKind::MinLength { limit: 1 }
        | ValidationErrorKind::MinItems { limit: 1 }
            if field.is_some_and(|f| f.def.required && f.def.min_length.is_none()) =>
        {
            p("required", format!("{name} is required."))
        }
        ValidationErrorKind::MinLength { limit } => p(
            "too_short",
            format!("{name} must be at least {limit} characters long."),
        ),
        ValidationErrorKind::MaxLength { limit } => p(
            "too_long",
            format!("{name} must be at most {limit} characters long."),
        ),
        ValidationErrorKind::MinItems { limit } => p(
            "too_few",
            format!("{name} needs at least {limit} choice(s)."),
        ),
        ValidationErrorKind::MaxItems { limit } => p(
            "too_many",
            format!("{name} allows at most {limit} choice(s)."),
        ),
        ValidationErrorKind::UniqueItems => {
            p("duplicate_option", format!("{name} lists an option twice."))
        }
        ValidationErrorKind::Pattern { .. } => {
            let what = match field.map(|f| f.ty) {
                Some(FieldType::Phone) => "a phone number such as +86 138 0000 0000".to_owned(),
                Some(FieldType::Url) => {
                    "a web address starting with http:// or https://".to_owned()
                }
                Some(FieldType::Decimal | FieldType::Money) => {
                    "a decimal number such as \"1200.50\"".to_owned()
                }
                _ => format!(
                    "text matching the pattern {}",
                    field
                        .and_then(|f| f.def.pattern.clone())
                        .unwrap_or_default()
                ),
            };
            p("pattern", format!("{name} must be {what}."))
        }
        ValidationErrorKind::Format { format } => {
            let what = match format.as_str() {
                "email" => "an email address such as name@example.com",
                "date" => "a date such as 2026-03-31",
                "date-time" => "a date and time such as 2026-03-31T09:30:00Z",
                "uuid" => "an id (UUID)",
                _ => "well formed",
            };
            p("format", format!("{name} must be {what}."))
        }
        other => p("invalid", format!("{name} is not valid: {other:?}.")),
    }
}

fn type_phrase(field: Option<&Field>, wanted: &str) -> String {
    match field.map(|f| f.ty) {
        Some(FieldType::Integer) => "a whole number".into(),
        Some(FieldType::Decimal) => "a decimal number such as \"1200.50\"".into(),
        Some(FieldType::Boolean) => "true or false".into(),
        Some(FieldType::Multiselect) => "a list of option keys".into(),
        Some(FieldType::Date) => "a date such as 2026-03-31".into(),
        Some(FieldType::Datetime) => "a date and time such as 2026-03-31T09:30:00Z".into(),
        Some(FieldType::User | FieldType::Relation) => "an id (UUID) as a string".into(),
        Some(_) => "text".into(),
        None => format!("of type {wanted}"),
    }
}

/// Validate a json field's value against its own schema, if it has one.
pub(crate) fn validate_json_field(field: &Field, value: &Value, path: &str) -> Vec<Problem> {
    let Some(v) = &field.json_validator else {
        return vec![];
    };
    v.iter_errors(value)
        .map(|e| {
            Problem::new(
                format!("{path}{}", e.instance_path.as_str()),
                "json_schema",
                format!("{}: {}", field.label, e),
            )
        })
        .collect()
}
