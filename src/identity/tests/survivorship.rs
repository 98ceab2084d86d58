//! Survivorship: priority, recency, placeholders, the address unit, status and provenance.

use super::*;

fn golden(records: &[SourceRecord]) -> Golden {
    golden_record(
        &PatientId::from("p1"),
        records,
        &SurvivorshipConfig::default(),
        t0(),
    )
}

fn source_of(g: &Golden, field: &str) -> Option<String> {
    g.provenance
        .iter()
        .find(|f| f.field == field)
        .map(|f| f.key.to_string())
}

#[test]
fn source_priority_then_recency_pick_each_field() {
    let healthie = P::new("Robert", "Smith").rec(Healthie, "h-1");
    let hint = updated(P::new("Bob", "Smith").rec(Hint, "pat-1"), 60);
    let intakeq = updated(P::new("Rob", "Smyth").rec(Intakeq, "iq-1"), 120);
    let g = golden(&[intakeq.clone(), hint.clone(), healthie.clone()]);
    assert_eq!(
        g.row.given_name.as_deref(),
        Some("Robert"),
        "healthie first by default"
    );

    let cfg = SurvivorshipConfig {
        field_priority: [("given_name".to_string(), vec![Intakeq, Hint])].into(),
        ..SurvivorshipConfig::default()
    };
    let g = golden_record(
        &PatientId::from("p1"),
        &[healthie.clone(), hint.clone(), intakeq.clone()],
        &cfg,
        t0(),
    );
    assert_eq!(g.row.given_name.as_deref(), Some("Rob"), "field priority");
    assert_eq!(
        g.row.family_name.as_deref(),
        Some("Smith"),
        "default priority elsewhere"
    );

    // Same source twice: the newest wins, by source time, then by fetch time.
    let old = updated(P::new("Robert", "Smith").rec(Hint, "pat-1"), 10);
    let new = updated(P::new("Bobby", "Smith").rec(Hint, "pat-2"), 20);
    assert_eq!(
        golden(&[new.clone(), old.clone()])
            .row
            .given_name
            .as_deref(),
        Some("Bobby")
    );
    assert_eq!(
        golden(&[old.clone(), new.clone()])
            .row
            .given_name
            .as_deref(),
        Some("Bobby")
    );
    let mut fetched_later = P::new("Rob", "Smith").rec(Hint, "pat-3");
    fetched_later.source_updated_at = new.source_updated_at;
    fetched_later.fetched_at = t0() + Duration::hours(1);
    assert_eq!(
        golden(&[new, fetched_later]).row.given_name.as_deref(),
        Some("Rob")
    );
}

#[test]
fn non_empty_beats_empty_and_real_beats_placeholder() {
    let mut healthie = P::new("Unknown", "Smith")
        .dob("1900-01-01")
        .email("noemail@example.com")
        .phone("212-555-0100")
        .rec(Healthie, "h-1");
    healthie.fields.middle_name = None;
    let intakeq = P::new("Robert", "Smith")
        .middle("James")
        .dob("1980-03-05")
        .email("Rob@Gmail.com")
        .phone("(415) 555-2671 ext 3")
        .sex("m")
        .rec(Intakeq, "iq-1");
    let g = golden(&[healthie, intakeq]);
    assert_eq!(g.row.given_name.as_deref(), Some("Robert"));
    assert_eq!(g.row.middle_name.as_deref(), Some("James"));
    assert_eq!(g.row.family_name.as_deref(), Some("Smith"));
    assert_eq!(
        source_of(&g, "family_name").as_deref(),
        Some("healthie:h-1")
    );
    assert_eq!(g.row.birth_date, NaiveDate::from_ymd_opt(1980, 3, 5));
    assert_eq!(g.row.email.as_deref(), Some("rob@gmail.com"));
    assert_eq!(g.row.phone.as_deref(), Some("+14155552671"));
    assert_eq!(g.row.sex.as_deref(), Some("male"));
    // A placeholder still beats nothing.
    let only = P::new("Unknown", "Smith")
        .email("noemail@example.com")
        .rec(Hint, "pat-1");
    assert_eq!(
        golden(&[only]).row.email.as_deref(),
        Some("noemail@example.com")
    );
}

#[test]
fn phone_is_e164_when_parseable_else_as_given() {
    let g = golden(&[P::new("A", "B")
        .phone("  ")
        .phone("ask front desk")
        .rec(Hint, "pat-1")]);
    assert_eq!(g.row.phone.as_deref(), Some("ask front desk"));
    let g = golden(&[P::new("A", "B")
        .phone("+44 20 7946 0958")
        .rec(Hint, "pat-1")]);
    assert_eq!(g.row.phone.as_deref(), Some("+442079460958"));
}

#[test]
fn address_is_taken_as_a_unit() {
    let mut healthie = P::new("A", "B").rec(Healthie, "h-1");
    healthie.fields.address = Address {
        line1: None,
        line2: None,
        city: Some("Chicago".into()),
        state: None,
        postal_code: None,
        country: None,
    };
    let hint = P::new("A", "B")
        .address("12 Elm St", "62704")
        .rec(Hint, "pat-1");
    let g = golden(&[healthie, hint]);
    // The city-only address is worse than a full one, and no column is mixed in from it.
    assert_eq!(g.row.address_line1.as_deref(), Some("12 Elm St"));
    assert_eq!(g.row.city.as_deref(), Some("Springfield"));
    assert_eq!(g.row.postal_code.as_deref(), Some("62704"));
    assert_eq!(source_of(&g, "address").as_deref(), Some("hint:pat-1"));
    assert!(g
        .provenance
        .iter()
        .all(|f| !f.field.starts_with("address_")));

    let full_healthie = P::new("A", "B")
        .address("9 Oak Ave", "60601")
        .rec(Healthie, "h-1");
    let mut hint = P::new("A", "B")
        .address("12 Elm St", "62704")
        .rec(Hint, "pat-1");
    hint.fields.address.line2 = Some("Apt 4".into());
    let g = golden(&[hint, full_healthie]);
    assert_eq!(g.row.address_line1.as_deref(), Some("9 Oak Ave"));
    assert_eq!(
        g.row.address_line2, None,
        "no line2 borrowed from another record"
    );
}

#[test]
fn unlinking_a_record_removes_its_influence() {
    let healthie = P::new("Robert", "Smith")
        .email("rob@gmail.com")
        .rec(Healthie, "h-1");
    let intakeq = P::new("Rob", "Smith")
        .dob("1980-03-05")
        .phone("415-555-2671")
        .rec(Intakeq, "iq-1");
    let both = golden(&[healthie.clone(), intakeq.clone()]);
    assert_eq!(both.row.intakeq_id.as_deref(), Some("iq-1"));
    assert!(both.row.birth_date.is_some() && both.row.phone.is_some());

    let after = golden(std::slice::from_ref(&healthie));
    assert_eq!(after, golden(&[healthie]));
    assert_eq!(after.row.birth_date, None);
    assert_eq!(after.row.phone, None);
    assert_eq!(after.row.intakeq_id, None);
    assert!(after.provenance.iter().all(|f| f.key.source == Healthie));
}

#[test]
fn only_live_records_contribute_unless_none_is_live() {
    let deleted = with_status(
        P::new("Robert", "Smith")
            .dob("1980-03-05")
            .rec(Healthie, "h-1"),
        RecordStatus::Deleted,
    );
    let archived = with_status(
        P::new("Bob", "Smith").rec(Hint, "pat-1"),
        RecordStatus::Archived,
    );
    let g = golden(&[deleted.clone(), archived.clone()]);
    assert_eq!(g.row.given_name.as_deref(), Some("Bob"));
    assert_eq!(g.row.birth_date, None);
    assert_eq!(g.row.healthie_id, None);
    assert_eq!(g.row.hint_id.as_deref(), Some("pat-1"));
    assert_eq!(g.row.status, "archived");

    let g = golden(std::slice::from_ref(&deleted));
    assert_eq!(g.row.given_name.as_deref(), Some("Robert"));
    assert_eq!(g.row.healthie_id.as_deref(), Some("h-1"));
    assert_eq!(g.row.status, "deleted");
}

#[test]
fn status_follows_the_records() {
    let r = |s| with_status(P::new("A", "B").rec(Hint, "pat-1"), s);
    let cases = [
        (
            vec![r(RecordStatus::Active), r(RecordStatus::Archived)],
            "active",
        ),
        (
            vec![r(RecordStatus::Archived), r(RecordStatus::Deleted)],
            "archived",
        ),
        (
            vec![r(RecordStatus::Merged), r(RecordStatus::Missing)],
            "deleted",
        ),
        (vec![], "deleted"),
    ];
    for (records, want) in cases {
        assert_eq!(golden(&records).row.status, want, "{records:?}");
    }
}

#[test]
fn source_ids_come_from_the_newest_live_record_of_each_source() {
    let a = updated(P::new("A", "B").rec(Hint, "pat-1"), 10);
    let b = updated(P::new("A", "B").rec(Hint, "pat-2"), 20);
    let c = with_status(
        updated(P::new("A", "B").rec(Hint, "pat-3"), 30),
        RecordStatus::Merged,
    );
    let d = P::new("A", "B").rec(Intakeq, "iq-1");
    let g = golden(&[c, b, a, d]);
    assert_eq!(g.row.hint_id.as_deref(), Some("pat-2"));
    assert_eq!(g.row.intakeq_id.as_deref(), Some("iq-1"));
    assert_eq!(g.row.healthie_id, None);
}

#[test]
fn golden_row_carries_id_time_and_provenance_for_non_empty_fields() {
    let r = updated(robert().preferred("Bob").rec(Healthie, "h-1"), 5);
    let g = golden(std::slice::from_ref(&r));
    assert_eq!(g.row.patient_id, PatientId::from("p1"));
    assert_eq!(
        (g.row.first_seen_at, g.row.updated_at, g.row.version),
        (t0(), t0(), 0)
    );
    let fields: Vec<&str> = g.provenance.iter().map(|f| f.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "given_name",
            "family_name",
            "preferred_name",
            "birth_date",
            "sex",
            "email",
            "phone",
            "address"
        ]
    );
    assert!(g
        .provenance
        .iter()
        .all(|f| f.key == r.key && f.source_updated_at == r.source_updated_at));
    assert_eq!(golden(&[r.clone(), r]).provenance.len(), fields.len());
}

#[test]
fn golden_debug_never_shows_phi() {
    let g = golden(&[robert().rec(Healthie, "h-1")]);
    let printed = format!("{g:?}");
    assert!(printed.contains("p1") && printed.contains("h-1"));
    for value in [
        "Robert",
        "Smith",
        "1980",
        "gmail",
        "2671",
        "Elm",
        "62704",
        "Springfield",
    ] {
        assert!(!printed.contains(value), "{value} leaked in {printed}");
    }
}
