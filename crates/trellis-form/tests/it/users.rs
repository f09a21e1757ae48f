//! Users and teams.

use crate::common::t0;
use trellis_form::testing;
use trellis_form::users::{self, TeamInput, UserInput};
use trellis_form::FormError;

fn user(name: &str, email: &str, manager: Option<uuid::Uuid>) -> UserInput {
    UserInput {
        name: Some(name.into()),
        email: Some(email.into()),
        manager_id: Some(manager),
        ..Default::default()
    }
}

#[tokio::test]
async fn managers_and_teams() {
    for t in testing::each().await {
        let mut tx = t.db.begin().await.unwrap();
        let boss = users::create(&mut tx, &user("Boss", "boss@x.example", None), t0())
            .await
            .unwrap();
        let rep = users::create(&mut tx, &user("Rep", "rep@x.example", Some(boss.id)), t0())
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            users::get(&t.db, rep.id).await.unwrap().manager_id,
            Some(boss.id)
        );
        // Duplicate email (case-insensitive), missing name, management cycles.
        let mut tx = t.db.begin().await.unwrap();
        let e = users::create(&mut tx, &user("X", "BOSS@x.example", None), t0())
            .await
            .unwrap_err();
        assert!(
            matches!(&e, FormError::Invalid(ps) if ps[0].path == "/email" && ps[0].code == "unique"),
            "{e:?}"
        );
        let e = users::create(
            &mut tx,
            &UserInput {
                email: Some("n@x.example".into()),
                ..Default::default()
            },
            t0(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, FormError::Invalid(ps) if ps[0].path == "/name"),
            "{e:?}"
        );
        let e = users::update(
            &mut tx,
            boss.id,
            &UserInput {
                manager_id: Some(Some(rep.id)),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, FormError::Invalid(ps) if ps[0].code == "cycle"),
            "{e:?}"
        );
        let e = users::update(
            &mut tx,
            boss.id,
            &UserInput {
                manager_id: Some(Some(uuid::Uuid::now_v7())),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, FormError::Invalid(ps) if ps[0].code == "not_found"),
            "{e:?}"
        );
        // Teams: members replaced as a whole, by key.
        let team = TeamInput {
            key: Some("east".into()),
            name: Some("East".into()),
            lead_id: Some(Some(boss.id)),
            members: Some(vec![rep.id, boss.id]),
        };
        let id = users::upsert_team(&mut tx, &team, t0()).await.unwrap();
        let again = users::upsert_team(
            &mut tx,
            &TeamInput {
                members: Some(vec![rep.id]),
                ..team.clone()
            },
            t0(),
        )
        .await
        .unwrap();
        assert_eq!(id, again);
        let e = users::upsert_team(
            &mut tx,
            &TeamInput {
                key: Some("Bad Key".into()),
                members: Some(vec![uuid::Uuid::now_v7()]),
                ..Default::default()
            },
            t0(),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(&e, FormError::Invalid(ps) if ps.len() == 2),
            "{e:?}"
        );
        tx.commit().await.unwrap();
        let teams = users::teams(&t.db).await.unwrap();
        assert_eq!(teams.len(), 1);
        assert_eq!(
            (
                teams[0].key.as_str(),
                teams[0].lead_id,
                teams[0].members.clone()
            ),
            ("east", Some(boss.id), vec![rep.id])
        );
        t.cleanup().await;
    }
}
