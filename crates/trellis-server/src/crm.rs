//! The bundled CRM app (`examples/crm`), compiled into the binary so `trellis serve` can
//! install it from anywhere on a fresh database.

/// The files of `examples/crm`, as (path inside the folder, content).
pub const FILES: &[(&str, &str)] = &[
    ("app.json", include_str!("../../../examples/crm/app.json")),
    (
        "entities/01-lead.json",
        include_str!("../../../examples/crm/entities/01-lead.json"),
    ),
    (
        "entities/02-account.json",
        include_str!("../../../examples/crm/entities/02-account.json"),
    ),
    (
        "entities/03-contact.json",
        include_str!("../../../examples/crm/entities/03-contact.json"),
    ),
    (
        "entities/04-opportunity.json",
        include_str!("../../../examples/crm/entities/04-opportunity.json"),
    ),
    (
        "entities/05-activity.json",
        include_str!("../../../examples/crm/entities/05-activity.json"),
    ),
    (
        "entities/06-task.json",
        include_str!("../../../examples/crm/entities/06-task.json"),
    ),
    (
        "entities/07-review.json",
        include_str!("../../../examples/crm/entities/07-review.json"),
    ),
    (
        "workflows/01-new-lead.json",
        include_str!("../../../examples/crm/workflows/01-new-lead.json"),
    ),
    (
        "workflows/02-idle-opportunity.json",
        include_str!("../../../examples/crm/workflows/02-idle-opportunity.json"),
    ),
    (
        "workflows/03-proposal.json",
        include_str!("../../../examples/crm/workflows/03-proposal.json"),
    ),
    (
        "workflows/04-quoted-approval.json",
        include_str!("../../../examples/crm/workflows/04-quoted-approval.json"),
    ),
    (
        "workflows/05-closed-review.json",
        include_str!("../../../examples/crm/workflows/05-closed-review.json"),
    ),
    (
        "workflows/06-won-to-erp.json",
        include_str!("../../../examples/crm/workflows/06-won-to-erp.json"),
    ),
    (
        "workflows/07-lead-welcome.json",
        include_str!("../../../examples/crm/workflows/07-lead-welcome.json"),
    ),
    (
        "roles/01-admin.json",
        include_str!("../../../examples/crm/roles/01-admin.json"),
    ),
    (
        "roles/02-manager.json",
        include_str!("../../../examples/crm/roles/02-manager.json"),
    ),
    (
        "roles/03-sales_rep.json",
        include_str!("../../../examples/crm/roles/03-sales_rep.json"),
    ),
    (
        "roles/04-sdr.json",
        include_str!("../../../examples/crm/roles/04-sdr.json"),
    ),
    (
        "workflows/08-funnel-alert.json",
        include_str!("../../../examples/crm/workflows/08-funnel-alert.json"),
    ),
    (
        "reports/sales.json",
        include_str!("../../../examples/crm/reports/sales.json"),
    ),
];

/// The CRM definition as one JSON document.
pub fn definition() -> serde_json::Value {
    let files = FILES
        .iter()
        .map(|(n, c)| (n.to_string(), c.to_string()))
        .collect();
    trellis_form::bundle::from_files(files)
        .expect("the bundled CRM is valid JSON")
        .definition
}
