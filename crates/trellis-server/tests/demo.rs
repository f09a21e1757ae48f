//! The sample organisation of `trellis serve --demo`, on SQLite and PostgreSQL.

use std::sync::Arc;
use trellis_form::testing;

#[tokio::test]
async fn the_sample_organisation_installs_once_with_a_full_funnel() {
    for t in testing::each().await {
        let (state, _) = trellis_server::cli::prepare(
            t.db.clone(),
            Arc::new(trellis_form::SystemClock),
            None,
            Some("t"),
        )
        .await
        .unwrap();
        let app = state.app("crm").unwrap().app;
        let now = trellis_form::Clock::now(&trellis_form::SystemClock);
        let s = trellis_server::demo::install(&t.db, &app, state.admin_user, now)
            .await
            .unwrap();
        assert_eq!((s.users, s.teams), (14, 6), "{}", t.backend);
        assert_eq!(
            s.records,
            [
                ("account".to_owned(), 12),
                ("lead".to_owned(), 30),
                ("opportunity".to_owned(), 24)
            ]
        );
        // A second run adds nothing.
        let again = trellis_server::demo::install(&t.db, &app, state.admin_user, now)
            .await
            .unwrap();
        assert_eq!((again.users, again.records.len()), (0, 0));
        // Every sample user is marked as such, and managers form a hierarchy under the director.
        let users = trellis_form::users::list(&t.db).await.unwrap();
        let sample: Vec<_> = users
            .iter()
            .filter(|u| u.email.ends_with(trellis_server::demo::SAMPLE_DOMAIN))
            .collect();
        assert_eq!(sample.len(), 14);
        assert!(sample.iter().all(|u| u.name.ends_with("(sample)")));
        assert_eq!(sample.iter().filter(|u| u.manager_id.is_none()).count(), 1);
        // Every sample user has a role in the CRM.
        let sql = trellis_form::db::Sql::new("SELECT \"role\", COUNT(*) FROM \"app_members\" WHERE \"app\" = 'crm' GROUP BY \"role\" ORDER BY \"role\"");
        let rows =
            t.db.fetch_all(
                &sql,
                &[
                    trellis_form::model::ColKind::Text,
                    trellis_form::model::ColKind::Int,
                ],
            )
            .await
            .unwrap();
        let roles: Vec<(String, i64)> = rows
            .into_iter()
            .map(|r| match (&r[0], &r[1]) {
                (trellis_form::db::Value::Text(s), trellis_form::db::Value::Int(n)) => {
                    (s.clone(), *n)
                }
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(
            roles,
            [
                ("manager".to_owned(), 4),
                ("sales_rep".to_owned(), 6),
                ("viewer".to_owned(), 4)
            ]
        );
        // The funnel has records in several stages, including closed ones with their history.
        let opp = app.entity("opportunity").unwrap();
        let page = trellis_form::query::list(
            &t.db,
            opp,
            &trellis_form::query::ListQuery {
                limit: Some(100),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let stages: std::collections::BTreeSet<String> = page
            .records
            .iter()
            .map(|r| r.fields["stage"].as_str().unwrap().to_owned())
            .collect();
        assert!(stages.len() >= 4, "{stages:?}");
        assert!(page
            .records
            .iter()
            .all(|r| !r.stage_times["stage__entered_mql"].is_null()));
        t.cleanup().await;
    }
}
