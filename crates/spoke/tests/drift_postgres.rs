//! Drift between an owner's PostgreSQL table and its feed (real
//! PostgreSQL): the feed is fed by publishing the table's rows, then the
//! table is changed behind the feed's back — a row inserted, one deleted,
//! one updated with a bumped version — and the check finds exactly those
//! three, reading only the buckets that differ. Without a version column
//! (commit-LSN versions) it compares presence only and says so.

use serde_json::json;
use spoke::cdc::TableMapping;
use spoke::drift::{check, Compare, DriftKind, OwnerRows};
use spoke::feed::conformance::manifest;
use spoke::feed::memory::MemoryFeed;
use spoke::feed::{ChangeInput, Publisher};
use spoke::testing::{postgres_exec, postgres_or_skip, unique_name};

fn differences(report: &spoke::drift::DriftReport) -> Vec<(String, DriftKind)> {
    report
        .differences
        .iter()
        .map(|d| (d.key.clone(), d.kind))
        .collect()
}

#[tokio::test]
async fn drift_between_an_owner_table_and_its_feed_is_found_exactly() {
    let Some(url) = postgres_or_skip("drift against postgres").await else {
        return;
    };
    let schema = unique_name("spoke_drift");
    postgres_exec(
        &url,
        &format!(
            "CREATE SCHEMA {schema};
             CREATE TABLE {schema}.items (id text PRIMARY KEY, version bigint NOT NULL, n int NOT NULL);
             INSERT INTO {schema}.items SELECT 'k' || lpad(i::text, 3, '0'), 1, i FROM generate_series(0, 299) i;"
        ),
    )
    .await;

    // The feed, fed by publishing the rows (and a key deleted long ago,
    // whose tombstone the table cannot have).
    let feed = MemoryFeed::new(&manifest());
    let rows: Vec<ChangeInput> = (0..300)
        .map(|i| {
            let fields = json!({ "n": i }).as_object().cloned().unwrap_or_default();
            ChangeInput::upsert(format!("k{i:03}"), 1, fields)
        })
        .collect();
    feed.publish("items", rows).await.expect("publish");
    let fields = json!({ "n": 1 }).as_object().cloned().unwrap_or_default();
    feed.publish(
        "items",
        vec![
            ChangeInput::upsert("old", 1, fields),
            ChangeInput::delete("old", 2),
        ],
    )
    .await
    .expect("publish");

    let table = format!("{schema}.items");
    let versioned = OwnerRows::table(
        &TableMapping::new("items", &table, "id", Some("version".into())).expect("mapping"),
        url.clone(),
        "test.owner_postgres",
    );
    let report = check(&feed, "items", &versioned, &|_| {})
        .await
        .expect("check");
    assert!(report.in_sync, "{:?}", report.differences);
    assert_eq!(report.owner_rows, 300);
    assert_eq!(report.compare, Compare::Versions);

    // Behind the feed's back.
    postgres_exec(
        &url,
        &format!(
            "INSERT INTO {schema}.items VALUES ('k900', 1, 900);
             DELETE FROM {schema}.items WHERE id = 'k005';
             UPDATE {schema}.items SET version = 2, n = -10 WHERE id = 'k010';"
        ),
    )
    .await;
    let report = check(&feed, "items", &versioned, &|_| {})
        .await
        .expect("check");
    assert_eq!(
        differences(&report),
        vec![
            ("k005".to_owned(), DriftKind::GoneFromOwner),
            ("k010".to_owned(), DriftKind::StaleInFeed),
            ("k900".to_owned(), DriftKind::MissingFromFeed),
        ],
        "exactly the three changes made behind the feed's back"
    );
    assert_eq!(report.counts.total(), 3);
    assert!(!report.in_sync);
    let k010 = &report.differences[1];
    assert_eq!((k010.owner_version, k010.feed_version), (Some(2), Some(1)));
    assert!(
        report.buckets_read <= 4,
        "only the differing buckets (and the tombstone's) are read, not {}",
        report.buckets_read
    );

    // Commit-LSN versions: the table cannot say which version was captured.
    let presence = OwnerRows::table(
        &TableMapping::new("items", &table, "id", None).expect("mapping"),
        url.clone(),
        "test.owner_postgres",
    );
    let report = check(&feed, "items", &presence, &|_| {})
        .await
        .expect("check");
    assert_eq!(report.compare, Compare::PresenceOnly);
    assert_eq!(report.buckets_read, report.buckets_total);
    assert_eq!(
        differences(&report),
        vec![
            ("k005".to_owned(), DriftKind::GoneFromOwner),
            ("k900".to_owned(), DriftKind::MissingFromFeed),
        ],
        "presence only: the bumped version is not visible"
    );
    assert_eq!(report.differences[1].owner_version, None);

    // A mapping to a table that is not there names the source, not the password.
    let missing = OwnerRows::table(
        &TableMapping::new("items", &format!("{schema}.nope"), "id", None).expect("mapping"),
        url.clone(),
        "test.owner_postgres",
    );
    let e = check(&feed, "items", &missing, &|_| {})
        .await
        .expect_err("no such table")
        .to_string();
    assert!(
        e.contains("test.owner_postgres") && e.contains("nope") && e.contains("items"),
        "{e}"
    );
    postgres_exec(&url, &format!("DROP SCHEMA {schema} CASCADE")).await;
}
