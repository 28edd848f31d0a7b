//! Quarantine: changes a copy cannot hold are kept aside with their reason,
//! never applied half (DESIGN.md rule 7).
//!
//! ```text
//!  feed entry ─▶ fits the projection? ──yes──▶ projected, applied
//!                    │ no: a projected field missing, null where required, or of another type
//!                    ▼
//!   CopyStore::hold (fields cut to the projection; once per key and version)
//!                    │  then the position moves past it, so other keys keep flowing,
//!                    ▼  but the copy is no longer fresh: its staleness grows past its budget
//!   status / metrics: "N changes quarantined: <first reason>"
//!                    │  the consumer changes its projection (or the owner republishes)
//!                    ▼
//!   spoke quarantine replay ─▶ fits now? ─▶ applied by the apply rule (an older
//!                                            version is superseded, never rolled back)
//!                                          ─▶ released; once none is left the copy is fresh again
//! ```
//!
//! Holding before the position moves (two steps, not one transaction) is
//! safe: a crash between them reads the same entries again, and holding is
//! idempotent per (key, version).

use serde::Serialize;
use spoke_core::{Change, Op, Version};

use crate::copy::{Advance, CopySpec, CopyStore, Held, StoreError};
use crate::feed::Position;

/// Why `change` cannot be applied to the copy `spec` describes, if it
/// cannot. `known_version` is the schema version of the consumer's manifest.
pub fn misfit(spec: &CopySpec, known_version: u32, change: &Change) -> Option<String> {
    if change.op != Op::Upsert {
        return None;
    }
    let e = spec.projection.check(&change.fields).err()?;
    let schema = if change.schema_version == known_version {
        format!("owner schema v{}", change.schema_version)
    } else {
        format!(
            "owner schema v{}, while this consumer's manifest has v{known_version}",
            change.schema_version
        )
    };
    Some(format!(
        "key '{}' version {} ({schema}) does not fit the projection of {}: {e}",
        change.key, change.version, spec.dataset
    ))
}

/// The held form of `change`: only the projection's fields are kept, so a
/// field the consumer never asked for is not stored by quarantine either.
pub fn held(
    spec: &CopySpec,
    mut change: Change,
    position: Option<Position>,
    reason: String,
    now_ms: u64,
) -> Held {
    let names: Vec<&str> = spec.projection.names().collect();
    change.fields.retain(|k, _| names.contains(&k.as_str()));
    Held {
        change,
        position,
        reason,
        held_at_ms: now_ms,
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReplayReport {
    pub dataset: String,
    /// Held changes that now fit and changed the copy.
    pub applied: u64,
    /// Held changes that now fit but were older than what the copy holds.
    pub superseded: u64,
    /// Held changes that still do not fit, each with today's reason.
    pub still_held: Vec<Held>,
}

/// Applies every held change of `spec`'s copy that fits its projection now
/// and releases it; leaves the others held with an updated reason.
pub async fn replay(
    store: &dyn CopyStore,
    spec: &CopySpec,
    known_version: u32,
) -> Result<ReplayReport, StoreError> {
    let ds = &spec.dataset;
    let held = store.held(ds, usize::MAX).await?;
    let mut fits: Vec<Change> = Vec::new();
    let mut still_held = Vec::new();
    for mut h in held {
        match misfit(spec, known_version, &h.change) {
            None => fits.push(h.change),
            Some(reason) => {
                h.reason = reason;
                still_held.push(h);
            }
        }
    }
    let mut report = ReplayReport {
        dataset: ds.clone(),
        still_held,
        ..ReplayReport::default()
    };
    if fits.is_empty() {
        return Ok(report);
    }
    let released: Vec<(String, Version)> =
        fits.iter().map(|c| (c.key.clone(), c.version)).collect();
    let projected: Vec<Change> = fits.into_iter().map(|c| spec.project(c)).collect();
    let out = store
        .apply(
            ds,
            &projected,
            Advance {
                position: None,
                fresh_as_of_ms: None,
                from_feed: false,
            },
        )
        .await?;
    report.applied = out.applied;
    report.superseded = out.ignored;
    store.release(ds, &released).await?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::copy::memory::MemoryCopyStore;
    use serde_json::{json, Value};
    use spoke_core::{Projection, Schema};

    fn spec(fields: &[&str]) -> CopySpec {
        let mut s = Schema::new(1, Default::default());
        s.fields.insert("name".into(), "string".parse().unwrap());
        s.fields.insert("email".into(), "string".parse().unwrap());
        let names: Vec<String> = fields.iter().map(|f| f.to_string()).collect();
        CopySpec {
            dataset: "customers".into(),
            owner: "customer-service".into(),
            key_name: "id".into(),
            projection: Projection::new(&s, &names).unwrap(),
        }
    }

    fn change(key: &str, version: u64, fields: serde_json::Value) -> Change {
        Change {
            dataset: "customers".into(),
            key: key.into(),
            version,
            op: Op::Upsert,
            fields: fields.as_object().cloned().unwrap(),
            owner: "customer-service".into(),
            ts: 1,
            schema_version: 2,
        }
    }

    #[tokio::test]
    async fn held_changes_replay_once_they_fit_and_never_roll_back() {
        let wide = spec(&["name", "email"]);
        let store = MemoryCopyStore::new();
        store.ensure_copy(&wide).await.unwrap();
        let no_email = change("c1", 2, json!({"name": "Ada", "secret": "x"}));
        let reason = misfit(&wide, 1, &no_email).expect("email is projected and required");
        assert_eq!(
            reason,
            "key 'c1' version 2 (owner schema v2, while this consumer's manifest has v1) does not fit the projection of customers: required field 'email' is missing"
        );
        let old = change("c2", 1, json!({"name": "Bob"}));
        let h = held(&wide, no_email.clone(), Some(7), reason, 10);
        assert!(
            !h.change.fields.contains_key("secret"),
            "only projected fields are held"
        );
        let h2 = held(&wide, old.clone(), Some(8), "r".into(), 11);
        store
            .hold("customers", &[h.clone(), h2.clone()])
            .await
            .unwrap();
        store
            .hold("customers", std::slice::from_ref(&h))
            .await
            .unwrap();
        assert_eq!(
            store.held_count("customers").await.unwrap(),
            2,
            "held once per key and version"
        );

        // Same projection: nothing fits, nothing changes.
        let r = replay(&store, &wide, 1).await.unwrap();
        assert_eq!((r.applied, r.superseded, r.still_held.len()), (0, 0, 2));
        assert!(store.dump("customers").await.unwrap().is_empty());

        // c2 already holds a newer version in the copy: replay supersedes it.
        let narrow = spec(&["name"]);
        store
            .apply(
                "customers",
                &[change("c2", 5, json!({"name": "Bobby"}))],
                Advance {
                    position: None,
                    fresh_as_of_ms: None,
                    from_feed: false,
                },
            )
            .await
            .unwrap();
        let r = replay(&store, &narrow, 2).await.unwrap();
        assert_eq!((r.applied, r.superseded, r.still_held.len()), (1, 1, 0));
        let dump = store.dump("customers").await.unwrap();
        assert_eq!(dump["c1"].0, 2);
        assert_eq!(dump["c2"].0, 5, "never rolled back");
        assert_eq!(store.held_count("customers").await.unwrap(), 0);
    }

    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Any record an owner (or anyone on the bus) sends: either the copy
        /// can hold its projection, and every projected value has its
        /// declared type, or it is held with a reason. Never a panic.
        #[test]
        fn a_change_either_fits_its_projection_or_is_held_with_a_reason(
            fields in proptest::collection::btree_map("name|email|.{0,4}", crate::feed::props::json_value(), 0..4),
        ) {
            let s = spec(&["name", "email"]);
            let c = change("k", 1, Value::Object(fields.into_iter().collect()));
            match misfit(&s, 2, &c) {
                None => {
                    let projected = s.projection.apply(&c.fields);
                    prop_assert!(s.projection.check(&projected).is_ok());
                    prop_assert_eq!(projected.len(), 2);
                }
                Some(reason) => prop_assert!(reason.starts_with("key 'k' version 1 (owner schema v2)")),
            }
        }
    }
}
