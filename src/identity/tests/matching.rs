//! The evidence ladder, its guards and thresholds, pair scores and blocking keys.

use super::*;

// ---------------------------------------------------------------------------------------------
// The ladder

#[test]
fn explicit_id_from_a_trusted_system_links() {
    // The candidate's data barely resembles the incoming record; the id decides.
    let incoming = P::new("Rob", "Smith")
        .ext("healthie", "h-1")
        .rec(Intakeq, "iq-1");
    let c = cand(
        "p1",
        vec![P::new("Robert", "Smith-Jones").rec(Healthie, "h-1")],
    );
    let d = decide(&incoming, &[c], &MatchConfig::default());
    assert_eq!(
        outcome(&d),
        Outcome::Link("p1", LinkMethod::ExplicitId, Some("explicit_id:healthie"))
    );
}

#[test]
fn explicit_id_works_in_every_direction() {
    let cfg = MatchConfig {
        trusted_id_systems: vec![
            "healthie".into(),
            "intakeq".into(),
            "hint".into(),
            "emr".into(),
        ],
        ..MatchConfig::default()
    };
    let cases = [
        // The candidate's record names the incoming one.
        (
            "candidate names incoming",
            P::new("Ann", "Lee").rec(Intakeq, "iq-1"),
            P::new("Anne", "Lee")
                .ext("INTAKEQ", " iq-1 ")
                .rec(Hint, "pat-1"),
        ),
        // Both carry the same id of a third system.
        (
            "shared emr id",
            P::new("Ann", "Lee").ext("emr", "42").rec(Intakeq, "iq-1"),
            P::new("Anne", "Lee").ext("emr", "42").rec(Hint, "pat-1"),
        ),
    ];
    for (name, incoming, record) in cases {
        let d = decide(&incoming, &[cand("p1", vec![record])], &cfg);
        assert!(
            matches!(
                d.target,
                LinkTarget::Existing {
                    method: LinkMethod::ExplicitId,
                    ..
                }
            ),
            "{name}: {d:?}"
        );
    }
}

#[test]
fn explicit_id_from_an_untrusted_system_is_ignored() {
    let incoming = P::new("Rob", "Smith")
        .ext("emr", "h-1")
        .rec(Intakeq, "iq-1");
    let c = cand(
        "p1",
        vec![P::new("Robert", "Jones")
            .ext("emr", "h-1")
            .rec(Healthie, "h-1")],
    );
    let d = decide(&incoming, &[c], &MatchConfig::default());
    assert_eq!(outcome(&d), Outcome::Nothing);
}

#[test]
fn explicit_id_contradicted_by_given_name_or_birth_date_goes_to_review() {
    let cases = [
        ("daughter", P::new("Sofia", "Lopez").dob("2005-08-22")),
        ("twin", P::new("Ana", "Lopez").dob("1975-02-10")),
        (
            "same name, other birth date",
            P::new("Maria", "Lopez").dob("2001-07-30"),
        ),
    ];
    for (name, named) in cases {
        let incoming = P::new("Maria", "Lopez")
            .dob("1975-02-10")
            .ext("healthie", "h-1")
            .rec(Intakeq, "iq-1");
        let c = cand("p1", vec![named.rec(Healthie, "h-1")]);
        let d = decide(&incoming, &[c], &MatchConfig::default());
        assert_eq!(outcome(&d), Outcome::Review(vec!["p1"]), "{name}");
    }
}

#[test]
fn deterministic_rules_link_and_are_named() {
    let cases = [
        (
            "email, birth date, nickname and typo'd family name",
            P::new("Bob", "Smyth")
                .dob("1980-03-05")
                .email(" Robert.Smith@GMAIL.com"),
            P::new("Robert", "Smith")
                .dob("1980-03-05")
                .email("robert.smith@gmail.com"),
            "email_dob_name",
        ),
        (
            "phone, birth date, hyphenated family name",
            P::new("Kate", "Garcia")
                .dob("1990-07-21")
                .phone("+1 415 555 2671"),
            P::new("Katherine", "García-López")
                .dob("1990-07-21")
                .phone("415.555.2671"),
            "phone_dob_name",
        ),
        (
            "name, birth date and ZIP",
            P::new("Bill", "Jones")
                .dob("1966-12-01")
                .address("4 Oak Rd", "62704-0001"),
            P::new("William", "Jones")
                .dob("1966-12-01")
                .address("99 Pine Ave", "62704"),
            "name_dob_zip",
        ),
    ];
    for (name, incoming, candidate, rule) in cases {
        let d = decide_one(incoming, candidate);
        assert_eq!(
            outcome(&d),
            Outcome::Link("p1", LinkMethod::Rule, Some(rule)),
            "{name}"
        );
    }
}

#[test]
fn score_thresholds_decide_link_review_or_nothing() {
    let base = || P::new("Robert", "Smith").dob("1980-03-05").sex("M");
    let cases = [
        // Nickname + family + birth date + sex: 27.2 bits.
        (
            "nickname and exact birth date",
            P::new("Bob", "Smith").dob("1980-03-05").sex("male"),
            base(),
            Outcome::Link("p1", LinkMethod::Score, None),
        ),
        // Exact names, birth date, sex, but every contact field disagrees: 20.9 bits.
        (
            "contacts all disagree",
            base()
                .email("rs@work.com")
                .phone("415-555-2671")
                .address("1 A St", "10001"),
            base()
                .email("bob@home.com")
                .phone("212-555-0200")
                .address("9 B Ave", "62704"),
            Outcome::Review(vec!["p1"]),
        ),
        // Day and month swapped, no contact data: 23.5 bits.
        (
            "transposed birth date alone",
            P::new("Robert", "Smith").dob("1980-05-03").sex("M"),
            base(),
            Outcome::Review(vec!["p1"]),
        ),
        // Day and month swapped, phone agrees: the score clears the threshold.
        (
            "transposed birth date with phone",
            P::new("Robert", "Smith")
                .dob("1980-05-03")
                .sex("M")
                .phone("415-555-2671"),
            base().phone("+14155552671"),
            Outcome::Link("p1", LinkMethod::Score, None),
        ),
        // Legal name against a nickname (and an unrelated preferred name).
        (
            "legal name against nickname",
            P::new("Elizabeth", "Smith").dob("1980-03-05").sex("F"),
            P::new("Liz", "Smith")
                .preferred("Beth")
                .dob("1980-03-05")
                .sex("F")
                .address("1 Elm St", "62704"),
            Outcome::Link("p1", LinkMethod::Score, None),
        ),
        // Namesake with another birth date: 11.2 bits.
        (
            "namesake",
            P::new("Robert", "Smith").dob("1975-11-20").sex("M"),
            base(),
            Outcome::Nothing,
        ),
        // Nothing in common but a surname.
        (
            "stranger",
            P::new("Alice", "Smith").dob("1991-01-09").sex("F"),
            base(),
            Outcome::Nothing,
        ),
    ];
    for (name, incoming, candidate, want) in cases {
        assert_eq!(outcome(&decide_one(incoming, candidate)), want, "{name}");
    }
}

#[test]
fn review_proposals_carry_the_score() {
    let d = decide_one(
        P::new("Robert", "Smith").dob("1980-05-03").sex("M"),
        P::new("Robert", "Smith").dob("1980-03-05").sex("M"),
    );
    assert_eq!(d.target, LinkTarget::NewPatient);
    assert_eq!(d.reviews.len(), 1);
    let want = explain(
        &P::new("Robert", "Smith").dob("1980-05-03").sex("M").0,
        &P::new("Robert", "Smith").dob("1980-03-05").sex("M").0,
        &MatchConfig::default(),
    )
    .total;
    assert_eq!(d.reviews[0].score, want);
}

#[test]
fn highest_rung_wins_over_a_higher_score() {
    let incoming = robert().ext("healthie", "h-1").rec(Intakeq, "iq-1");
    let by_id = cand("p9", vec![P::new("R", "Smith").rec(Healthie, "h-1")]);
    let by_rule = cand("p1", vec![robert().rec(Hint, "pat-1")]);
    let d = decide(&incoming, &[by_rule, by_id], &MatchConfig::default());
    assert_eq!(
        outcome(&d),
        Outcome::Link("p9", LinkMethod::ExplicitId, Some("explicit_id:healthie"))
    );
    assert_eq!(
        d.reviews
            .iter()
            .map(|r| r.patient_id.as_str())
            .collect::<Vec<_>>(),
        ["p1"]
    );
}

#[test]
fn clearly_better_candidate_on_the_same_rung_wins() {
    let incoming = robert().rec(Intakeq, "iq-1");
    let strong = cand("p2", vec![robert().rec(Healthie, "h-1")]);
    // Same rule fires, but with a nickname, a typo and no address: many bits lower.
    let weaker = cand(
        "p1",
        vec![P::new("Bob", "Smyth")
            .dob("1980-03-05")
            .email("robert.smith@gmail.com")
            .rec(Hint, "pat-1")],
    );
    let d = decide(&incoming, &[weaker, strong], &MatchConfig::default());
    assert_eq!(
        outcome(&d),
        Outcome::Link("p2", LinkMethod::Rule, Some("email_dob_name"))
    );
    assert_eq!(d.reviews.len(), 1);
}

#[test]
fn two_candidates_qualifying_with_close_scores_go_to_review() {
    let incoming = robert().rec(Intakeq, "iq-1");
    let a = cand("p1", vec![robert().rec(Healthie, "h-1")]);
    let b = cand("p2", vec![robert().rec(Hint, "pat-1")]);
    let d = decide(&incoming, &[b, a], &MatchConfig::default());
    assert_eq!(outcome(&d), Outcome::Review(vec!["p1", "p2"]));
}

#[test]
fn two_explicit_ids_to_different_patients_go_to_review() {
    let incoming = P::new("Ann", "Lee")
        .ext("healthie", "h-1")
        .ext("hint", "pat-1")
        .rec(Intakeq, "iq-1");
    let a = cand("p1", vec![P::new("Ann", "Lee").rec(Healthie, "h-1")]);
    let b = cand("p2", vec![P::new("Ann", "Moe").rec(Hint, "pat-1")]);
    let d = decide(&incoming, &[a, b], &MatchConfig::default());
    assert_eq!(outcome(&d), Outcome::Review(vec!["p1", "p2"]));
}

// ---------------------------------------------------------------------------------------------
// Guards

#[test]
fn twins_never_auto_link() {
    let home = |p: P| {
        p.phone("415-555-2671")
            .email("nguyen.family@gmail.com")
            .address("7 Bay Rd", "94110")
    };
    let cases = [
        (
            "different given names",
            home(P::new("Liam", "Nguyen").dob("2010-06-01").sex("M")),
            home(P::new("Noah", "Nguyen").dob("2010-06-01").sex("M")),
        ),
        (
            "other-gender form, sex unknown",
            home(P::new("Adrian", "Nguyen").dob("2010-06-01")),
            home(P::new("Adriana", "Nguyen").dob("2010-06-01")),
        ),
        (
            "other-gender form, sex differs",
            home(P::new("Daniel", "Nguyen").dob("2010-06-01").sex("M")),
            home(P::new("Danielle", "Nguyen").dob("2010-06-01").sex("F")),
        ),
        (
            "close spelling, sex differs",
            home(P::new("Mark", "Nguyen").dob("2010-06-01").sex("M")),
            home(P::new("Mary", "Nguyen").dob("2010-06-01").sex("F")),
        ),
        (
            "double first names",
            home(P::new("Mary Ann", "Nguyen").dob("2010-06-01").sex("F")),
            home(P::new("Mary Beth", "Nguyen").dob("2010-06-01").sex("F")),
        ),
        (
            "samuel and samantha",
            home(P::new("Samuel", "Nguyen").dob("2010-06-01")),
            home(P::new("Samantha", "Nguyen").dob("2010-06-01")),
        ),
        (
            "one letter apart, same sex",
            home(P::new("Mila", "Nguyen").dob("2010-06-01").sex("F")),
            home(P::new("Mina", "Nguyen").dob("2010-06-01").sex("F")),
        ),
    ];
    for (name, a, b) in cases {
        let d = decide_one(a, b);
        assert_eq!(d.target, LinkTarget::NewPatient, "{name}");
    }
}

#[test]
fn family_members_sharing_email_or_phone_never_auto_link() {
    let home = |p: P| {
        p.phone("415-555-2671")
            .email("lopez.home@gmail.com")
            .address("7 Bay Rd", "94110")
    };
    let cases = [
        (
            "mother and daughter",
            home(P::new("Maria", "Lopez").dob("1975-02-10").sex("F")),
            home(P::new("Sofia", "Lopez").dob("2005-08-22").sex("F")),
        ),
        (
            "mother and daughter with one name",
            home(P::new("Maria", "Lopez").dob("1975-02-10").sex("F")),
            home(P::new("Maria", "Lopez").dob("2001-07-30").sex("F")),
        ),
        (
            "father and junior, same birthday",
            home(P::new("John", "Smith").dob("1950-04-04").sex("M")),
            home(P::new("John", "Smith Jr.").dob("1980-04-04").sex("M")),
        ),
        (
            "spouses",
            home(P::new("Maria", "Lopez").dob("1975-02-10").sex("F")),
            home(P::new("Jorge", "Lopez").dob("1973-09-15").sex("M")),
        ),
        (
            "sibling without a birth date",
            home(P::new("Maria", "Lopez").dob("1975-02-10").sex("F")),
            home(P::new("Maria", "Lopez").sex("F")),
        ),
    ];
    for (name, a, b) in cases {
        let d = decide_one(a, b);
        assert_eq!(d.target, LinkTarget::NewPatient, "{name}");
    }
}

#[test]
fn birth_date_typos_go_to_review_even_with_strong_evidence() {
    // Same name, household contacts, birth years one digit apart: a typo or a relative.
    let home = |p: P| {
        p.phone("415-555-2671")
            .email("home@gmail.com")
            .address("7 Bay Rd", "94110")
    };
    let cases = [
        ("year digit", "1997-03-08", "1992-03-08"),
        ("year off by one", "1990-03-08", "1991-03-08"),
        ("month digit", "1990-03-08", "1990-08-08"),
        ("neighbouring digits swapped", "1990-03-12", "1990-03-21"),
    ];
    for (name, a, b) in cases {
        let d = decide_one(
            home(P::new("Diane", "Lee").dob(a).sex("F")),
            home(P::new("Diane", "Lee").dob(b).sex("F")),
        );
        assert_eq!(outcome(&d), Outcome::Review(vec!["p1"]), "{name}");
    }
    // Swapped day and month, or a day apart, are the same date written differently.
    for b in ["1990-08-03", "1990-03-09"] {
        let d = decide_one(
            home(P::new("Diane", "Lee").dob("1990-03-08").sex("F")),
            home(P::new("Diane", "Lee").dob(b).sex("F")),
        );
        assert!(
            matches!(
                d.target,
                LinkTarget::Existing {
                    method: LinkMethod::Score,
                    ..
                }
            ),
            "{b}"
        );
    }
}

#[test]
fn a_live_record_from_the_same_source_blocks_auto_link() {
    let incoming = robert().rec(Intakeq, "iq-2");
    let c = cand(
        "p1",
        vec![robert().rec(Intakeq, "iq-1"), robert().rec(Healthie, "h-1")],
    );
    let d = decide(&incoming, &[c], &MatchConfig::default());
    assert_eq!(outcome(&d), Outcome::Review(vec!["p1"]));

    let archived = cand(
        "p1",
        vec![with_status(
            robert().rec(Intakeq, "iq-1"),
            RecordStatus::Archived,
        )],
    );
    let d = decide(&incoming, &[archived], &MatchConfig::default());
    assert_eq!(outcome(&d), Outcome::Review(vec!["p1"]));
}

#[test]
fn same_source_guard_ignores_deleted_merged_and_missing_records() {
    let incoming = robert().rec(Intakeq, "iq-2");
    for status in [
        RecordStatus::Deleted,
        RecordStatus::Merged,
        RecordStatus::Missing,
    ] {
        let c = cand(
            "p1",
            vec![
                with_status(robert().rec(Intakeq, "iq-1"), status),
                robert().rec(Healthie, "h-1"),
            ],
        );
        let d = decide(&incoming, &[c], &MatchConfig::default());
        assert_eq!(
            outcome(&d),
            Outcome::Link("p1", LinkMethod::Rule, Some("email_dob_name")),
            "{status:?}"
        );
    }
}

#[test]
fn the_incoming_record_is_not_evidence_for_itself() {
    // Re-deciding a record already linked to p1: its own stored copy is ignored.
    let incoming = robert().rec(Intakeq, "iq-1");
    let c = cand("p1", vec![robert().rec(Intakeq, "iq-1")]);
    let d = decide(&incoming, &[c], &MatchConfig::default());
    assert_eq!(outcome(&d), Outcome::Nothing);
    // With another record it links there, and its own copy does not trip the same-source guard.
    let c = cand(
        "p1",
        vec![robert().rec(Intakeq, "iq-1"), robert().rec(Hint, "pat-1")],
    );
    let d = decide(&incoming, &[c], &MatchConfig::default());
    assert!(matches!(d.target, LinkTarget::Existing { .. }), "{d:?}");
}

#[test]
fn rejected_candidates_are_never_linked_or_proposed() {
    let incoming = robert().ext("healthie", "h-1").rec(Intakeq, "iq-1");
    let mut c = cand("p1", vec![robert().rec(Healthie, "h-1")]);
    c.rejected = true;
    let d = decide(&incoming, &[c], &MatchConfig::default());
    assert_eq!(outcome(&d), Outcome::Nothing);
}

#[test]
fn no_automatic_link_without_a_birth_date() {
    let d = decide_one(
        P::new("Robert", "Smith")
            .email("robert.smith@gmail.com")
            .phone("415-555-2671"),
        robert(),
    );
    assert_eq!(outcome(&d), Outcome::Review(vec!["p1"]));
}

#[test]
fn placeholders_and_shared_contacts_carry_no_weight() {
    let cfg = MatchConfig {
        shared_phones: vec!["(217) 555-3000".into()],
        shared_emails: vec!["FrontDesk@clinic.com".into()],
        ..MatchConfig::default()
    };
    let weight = |a: &P, b: &P, field: &str| {
        explain(&a.0, &b.0, &cfg)
            .contributions
            .iter()
            .find(|c| c.field == field)
            .map(|c| c.weight)
            .unwrap()
    };
    let cases = [
        (
            "email",
            P::new("A", "B").email("noemail@gmail.com"),
            P::new("C", "D").email("noemail@gmail.com"),
        ),
        (
            "email",
            P::new("A", "B").email("jo@example.com"),
            P::new("C", "D").email("jo@example.com"),
        ),
        (
            "email",
            P::new("A", "B").email("frontdesk@clinic.com"),
            P::new("C", "D").email("frontdesk@clinic.com"),
        ),
        (
            "phone",
            P::new("A", "B").phone("212-555-0123"),
            P::new("C", "D").phone("212-555-0123"),
        ),
        (
            "phone",
            P::new("A", "B").phone("217.555.3000"),
            P::new("C", "D").phone("+1 217 555 3000"),
        ),
        (
            "phone",
            P::new("A", "B").phone("1111111111"),
            P::new("C", "D").phone("1111111111"),
        ),
        (
            "birth_date",
            P::new("A", "B").dob("1900-01-01"),
            P::new("C", "D").dob("1900-01-01"),
        ),
        (
            "birth_date",
            P::new("A", "B").dob("1901-01-01"),
            P::new("C", "D").dob("1980-01-01"),
        ),
        ("given_name", P::new("John", "Doe"), P::new("John", "Doe")),
        ("family_name", P::new("Jane", "Doe"), P::new("Jane", "Doe")),
        (
            "given_name",
            P::new("Unknown", "Smith"),
            P::new("Unknown", "Smith"),
        ),
        (
            "family_name",
            P::new("Test", "Patient"),
            P::new("Test", "Patient"),
        ),
        (
            "address",
            P::new("A", "B").address("Unknown", "00000"),
            P::new("C", "D").address("unknown", "00000"),
        ),
    ];
    for (field, a, b) in cases {
        assert_eq!(weight(&a, &b, field), 0.0, "{field}");
    }
    // Two strangers sharing only placeholders do not even reach review.
    let a = P::new("John", "Doe")
        .dob("1900-01-01")
        .email("test@test.com")
        .phone("555-555-5555");
    let d = decide(
        &a.clone().rec(Intakeq, "iq-1"),
        &[cand("p1", vec![a.rec(Hint, "pat-1")])],
        &cfg,
    );
    assert_eq!(outcome(&d), Outcome::Nothing);
}

// ---------------------------------------------------------------------------------------------
// Scores

#[test]
fn explain_lists_every_field_and_sums_to_the_total() {
    let s = explain(
        &robert().0,
        &P::new("Bob", "Smith").dob("1980-05-03").0,
        &MatchConfig::default(),
    );
    let fields: Vec<&str> = s.contributions.iter().map(|c| c.field).collect();
    assert_eq!(
        fields,
        [
            "given_name",
            "family_name",
            "birth_date",
            "sex",
            "email",
            "phone",
            "address"
        ]
    );
    let levels: Vec<&str> = s.contributions.iter().map(|c| c.level).collect();
    assert_eq!(
        levels,
        [
            "nickname",
            "exact",
            "transposed",
            "missing",
            "missing",
            "missing",
            "missing"
        ]
    );
    let sum: f64 = s.contributions.iter().map(|c| c.weight).sum();
    assert!((s.total - sum).abs() < 1e-12);
}

#[test]
fn birth_date_levels_reward_plausible_typos_only() {
    let level = |a: &str, b: &str| {
        explain(
            &P::new("A", "B").dob(a).0,
            &P::new("A", "B").dob(b).0,
            &MatchConfig::default(),
        )
        .contributions[2]
            .level
    };
    let cases = [
        ("1980-03-05", "1980-03-05", "exact"),
        ("1980-03-05", "1980-05-03", "transposed"),
        ("1980-03-05", "1980-03-06", "day_off_by_one"),
        ("1980-03-05", "1981-03-05", "year_off_by_one"),
        ("1989-03-05", "1990-03-05", "year_off_by_one"),
        ("1980-03-05", "1980-03-15", "one_digit"),
        ("1980-03-05", "1980-08-05", "one_digit"),
        ("1980-03-05", "1983-03-05", "one_digit"),
        ("1984-10-05", "1984-01-05", "digits_swapped"),
        ("1950-04-04", "1905-04-04", "disagree"), // decade and year: a parent and child
        ("1980-03-12", "1980-03-21", "digits_swapped"),
        ("1950-04-04", "1980-04-04", "disagree"),
        ("1980-03-05", "1975-11-20", "disagree"),
    ];
    for (a, b, want) in cases {
        assert_eq!(level(a, b), want, "{a} vs {b}");
    }
}

#[test]
fn name_levels_handle_nicknames_multi_part_names_and_typos() {
    let levels = |a: P, b: P| {
        let s = explain(&a.0, &b.0, &MatchConfig::default());
        (s.contributions[0].level, s.contributions[1].level)
    };
    let cases = [
        (
            P::new("Bill", "Smith"),
            P::new("William", "Smith"),
            ("nickname", "exact"),
        ),
        (
            P::new("Jim", "Smith"),
            P::new("James", "Smith"),
            ("nickname", "exact"),
        ),
        (
            P::new("Michael", "Smith"),
            P::new("Micheal", "Smith"),
            ("nickname", "exact"),
        ),
        (
            P::new("Jennifer", "Smith"),
            P::new("Jenifer", "Smith"),
            ("nickname", "exact"),
        ),
        (
            P::new("Johnathan", "Smith"),
            P::new("Jonathon", "Smith"),
            ("nickname", "exact"),
        ),
        (
            P::new("Gwendolyn", "Smith"),
            P::new("Gwendolin", "Smith"),
            ("fuzzy", "exact"),
        ),
        (
            P::new("J", "Smith"),
            P::new("John", "Smith"),
            ("initial", "exact"),
        ),
        (
            P::new("Mary", "Smith"),
            P::new("Mary Ann", "Smith"),
            ("exact", "exact"),
        ),
        (
            P::new("Maryann", "Smith"),
            P::new("Mary-Ann", "Smith"),
            ("exact", "exact"),
        ),
        (
            P::new("José", "García"),
            P::new("JOSE", "Garcia-Lopez"),
            ("exact", "token"),
        ),
        (
            P::new("Ana", "De La Cruz"),
            P::new("Ana", "Delacruz"),
            ("exact", "exact"),
        ),
        (
            P::new("Ana", "Smith"),
            P::new("Ana", "Smyth"),
            ("exact", "fuzzy"),
        ),
        (
            P::new("Ana", "O'Brien"),
            P::new("Ana", "OBrien"),
            ("exact", "exact"),
        ),
        (
            P::new("Ana", "Smith"),
            P::new("Ana", "Jones"),
            ("exact", "disagree"),
        ),
        (
            P::new("Paul", "Smith"),
            P::new("Paula", "Smith"),
            ("disagree", "exact"),
        ),
        (
            P::new("Mila", "Smith"),
            P::new("Mina", "Smith"),
            ("similar", "exact"),
        ),
        (
            P::new("Lily", "Smith"),
            P::new("Lilq", "Smith"),
            ("similar", "exact"),
        ),
        (
            P::new("Liz", "Smith"),
            P::new("Elizabeth", "Smith"),
            ("nickname", "exact"),
        ),
        (
            P::new("Liz", "Smith").preferred("Liz"),
            P::new("Elizabeth", "Smith").preferred("Liz"),
            ("exact", "exact"),
        ),
        (
            P::new("Jennifer", "Smith").preferred("Alex"),
            P::new("Alex", "Smith"),
            ("exact", "exact"),
        ),
    ];
    for (a, b, want) in cases {
        let (ga, gb) = (a.0.given_name.clone(), b.0.given_name.clone());
        assert_eq!(levels(a, b), want, "{ga:?} vs {gb:?}");
    }
}

#[test]
fn household_contact_evidence_is_capped() {
    let home = |p: P| {
        p.phone("415-555-2671")
            .email("home@gmail.com")
            .address("7 Bay Rd", "94110")
    };
    let s = explain(
        &home(P::new("A", "B")).0,
        &home(P::new("C", "D")).0,
        &MatchConfig::default(),
    );
    let contact: f64 = s
        .contributions
        .iter()
        .filter(|c| matches!(c.field, "email" | "phone" | "address" | "contact_cap"))
        .map(|c| c.weight)
        .sum();
    assert!((contact - 12.0).abs() < 1e-9, "{contact}");
    assert_eq!(s.contributions.last().unwrap().field, "contact_cap");
}

#[test]
fn middle_name_does_not_change_the_score() {
    let a = robert().middle("James");
    let b = robert().middle("Lee");
    let cfg = MatchConfig::default();
    assert_eq!(
        explain(&a.0, &b.0, &cfg),
        explain(&robert().0, &robert().0, &cfg)
    );
}

// ---------------------------------------------------------------------------------------------
// Determinism and PHI

#[test]
fn shuffled_candidates_give_the_same_decision() {
    let incoming = robert().rec(Intakeq, "iq-1");
    let candidates = vec![
        cand(
            "p3",
            vec![P::new("Robert", "Smith")
                .dob("1980-03-05")
                .rec(Hint, "pat-3")],
        ),
        cand(
            "p1",
            vec![
                robert().rec(Healthie, "h-1"),
                P::new("Bobby", "Smith").rec(Hint, "pat-1"),
            ],
        ),
        cand(
            "p2",
            vec![P::new("Rob", "Smith")
                .dob("1980-05-03")
                .sex("M")
                .rec(Healthie, "h-2")],
        ),
        cand(
            "p4",
            vec![P::new("Roberta", "Smith")
                .dob("1980-03-05")
                .sex("F")
                .email("robert.smith@gmail.com")
                .rec(Healthie, "h-4")],
        ),
    ];
    let cfg = MatchConfig::default();
    let first = decide(&incoming, &candidates, &cfg);
    assert!(
        matches!(first.target, LinkTarget::Existing { .. }),
        "{first:?}"
    );
    assert!(!first.reviews.is_empty());
    let mut shuffled = candidates.clone();
    for round in 0..8 {
        shuffled.rotate_left(1);
        if round % 3 == 0 {
            shuffled.reverse();
        }
        for c in &mut shuffled {
            c.records.reverse();
        }
        assert_eq!(decide(&incoming, &shuffled, &cfg), first, "round {round}");
    }
}

#[test]
fn decisions_never_show_phi_in_debug() {
    let incoming = robert().ext("healthie", "h-1").rec(Intakeq, "iq-1");
    let candidates = [
        cand("p1", vec![robert().rec(Healthie, "h-1")]),
        cand("p2", vec![robert().rec(Hint, "pat-2")]),
        cand("p3", vec![robert().rec(Intakeq, "iq-9")]),
    ];
    let d = decide(&incoming, &candidates, &MatchConfig::default());
    assert!(matches!(d.target, LinkTarget::Existing { .. }) && !d.reviews.is_empty());
    let score = explain(&robert().0, &robert().0, &MatchConfig::default());
    let printed = [
        format!("{d:?}"),
        format!("{d:#?}"),
        format!("{score:?}"),
        format!("{:?}", candidates[0]),
    ];
    let phi = [
        "Robert",
        "robert",
        "Smith",
        "smith",
        "1980",
        "gmail",
        "2671",
        "Elm",
        "elm",
        "62704",
        "Springfield",
    ];
    for text in printed {
        for value in phi {
            assert!(!text.contains(value), "{value} leaked in {text}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Blocking

fn share_a_key(a: &P, b: &P) -> bool {
    let cfg = MatchConfig::default();
    let ka = blocking_keys(&a.0, &cfg);
    let kb = blocking_keys(&b.0, &cfg);
    ka.iter().any(|k| kb.contains(k))
}

#[test]
fn true_matches_share_a_blocking_key() {
    let base = P::new("Robert", "Smith").dob("1980-03-05");
    let cases = [
        ("family typo", P::new("Robert", "Smyth").dob("1980-03-05")),
        (
            "family first-letter typo",
            P::new("Robert", "Xmith").dob("1980-03-05"),
        ),
        ("given typo", P::new("Rboert", "Smith").dob("1980-03-05")),
        ("nickname", P::new("Bob", "Smith").dob("1980-03-05")),
        (
            "nickname and family typo",
            P::new("Bob", "Smithe").dob("1980-03-05"),
        ),
        (
            "preferred name",
            P::new("Zed", "Smith").preferred("Robert").dob("1980-03-05"),
        ),
        (
            "day and month swapped",
            P::new("Robert", "Smith").dob("1980-05-03"),
        ),
        (
            "birth date typo",
            P::new("Robert", "Smith").dob("1980-03-06"),
        ),
        ("birth date missing", P::new("Robert", "Smith")),
        (
            "multi-part family name",
            P::new("Robert", "Smith-Jones").dob("1980-03-05"),
        ),
        ("particles", P::new("Robert", "de Smith").dob("1980-03-05")),
    ];
    for (name, other) in cases {
        assert!(share_a_key(&base, &other), "{name}");
    }
    // A name typo together with a missing or mistyped birth date shares no key by name: the
    // `nm:` keys are exact, since phonetic ones reach thousands of records at scale.
    assert!(!share_a_key(&base, &P::new("Robert", "Smyth")));
    // Contact keys carry records whose names and dates both changed.
    let a = P::new("Jennifer", "Smith")
        .dob("1980-03-05")
        .email("j@gmail.com")
        .phone("415-555-2671");
    assert!(share_a_key(
        &a,
        &P::new("Jenny", "Jones")
            .dob("1980-03-06")
            .email("J@GMAIL.COM")
    ));
    assert!(share_a_key(
        &a,
        &P::new("Jenny", "Jones").phone("+1 415 555 2671")
    ));
    // Both names changed, no contact: the birth date and ZIP.
    assert!(share_a_key(
        &P::new("Robert", "Smith")
            .dob("1980-03-05")
            .address("1 Elm St", "62704"),
        &P::new("Rupert", "Jones")
            .dob("1980-03-05")
            .address("9 Oak Ave", "62704")
    ));
}

#[test]
fn unrelated_people_share_no_blocking_key() {
    let a = P::new("Robert", "Smith")
        .dob("1980-03-05")
        .email("rs@gmail.com")
        .phone("415-555-2671");
    let cases = [
        P::new("Alice", "Brown")
            .dob("1990-01-02")
            .email("ab@gmail.com")
            .phone("212-555-0200"),
        P::new("Robert", "Brown").dob("1990-01-02"),
        P::new("Alice", "Smith").dob("1975-03-05"),
    ];
    for b in cases {
        assert!(!share_a_key(&a, &b), "{:?}", b.0.given_name);
    }
}

#[test]
fn blocking_keys_have_the_documented_shape() {
    let p = P::new("Bob", "Garcia-Lopez")
        .dob("1980-05-03")
        .email(" Bob@Gmail.com ")
        .phone("(415) 555-2671 x12")
        .ext("healthie", "h-1")
        .ext("emr", "42")
        .ext("hint", "pat-1");
    let cfg = MatchConfig {
        trusted_id_systems: vec!["healthie".into(), "emr".into()],
        ..MatchConfig::default()
    };
    let keys = blocking_keys(&p.0, &cfg);
    let want = [
        "df:1980-03-05|b100", // the given name, for a record with the names swapped
        "df:1980-03-05|g624",
        "df:1980-03-05|g620",
        "df:1980-03-05|l120",
        "dg:1980-03-05|b",
        "dg:1980-03-05|r",
        "em:bob@gmail.com",
        "nm:garcia|robert",
        "nm:garcia|roberto",
        "nm:garcialopez|robert",
        "nm:garcialopez|roberto",
        "nm:lopez|robert",
        "nm:lopez|roberto",
        "ph:+14155552671",
        "src:healthie:h-1",
        "xid:emr:42",
    ];
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(keys, want);
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "sorted and unique");
    assert_eq!(blocking_keys(&p.0, &cfg), keys, "stable");
    // With a ZIP, the birth date and ZIP key too.
    let keys = blocking_keys(&p.address("1 Elm St", "62704-0001").0, &cfg);
    assert!(keys.contains(&"dz:1980-03-05|62704".to_string()));
}

#[test]
fn blocking_keys_skip_placeholders_and_shared_contacts() {
    let cfg = MatchConfig {
        shared_phones: vec!["217-555-3000".into()],
        shared_emails: vec!["desk@clinic.com".into()],
        ..MatchConfig::default()
    };
    let p = P::new("John", "Doe")
        .dob("1900-01-01")
        .email("noemail@example.com")
        .phone("212-555-0100")
        .phone("2175553000");
    assert!(blocking_keys(&p.0, &cfg).is_empty());
    let p = P::new("Ann", "Lee")
        .email("Desk@Clinic.com")
        .phone("(217) 555-3000");
    assert_eq!(blocking_keys(&p.0, &cfg), ["nm:lee|anne"]);
}

#[test]
fn a_record_meets_the_records_that_name_it() {
    let cfg = MatchConfig::default();
    let named = P::new("Ann", "Lee").rec(Healthie, "h-1");
    let naming = P::new("Zed", "Moe")
        .ext("Healthie", "h-1")
        .rec(Intakeq, "iq-1");
    let a = record_blocking_keys(&named, &cfg);
    let b = record_blocking_keys(&naming, &cfg);
    assert!(a.contains(&"src:healthie:h-1".to_string()));
    assert!(b.contains(&"src:healthie:h-1".to_string()));
    assert!(b.contains(&"src:intakeq:iq-1".to_string()));
}

#[test]
fn given_and_family_name_swapped_still_link() {
    let d = decide_one(
        P::new("Smith", "Robert")
            .dob("1980-03-05")
            .email("robert.smith@gmail.com"),
        robert(),
    );
    assert_eq!(
        outcome(&d),
        Outcome::Link("p1", LinkMethod::Rule, Some("email_dob_name"))
    );
    let s = explain(
        &P::new("Smith", "Robert").dob("1980-03-05").0,
        &robert().0,
        &MatchConfig::default(),
    );
    let levels: Vec<_> = s.contributions.iter().map(|c| c.level).take(2).collect();
    assert_eq!(levels, vec!["swapped", "swapped"]);
    // Only a full crosswise match counts: one name in the other's field is not a swap.
    let s = explain(
        &P::new("Smith", "Jones").dob("1980-03-05").0,
        &robert().0,
        &MatchConfig::default(),
    );
    assert_eq!(s.contributions[0].level, "disagree");
}

#[test]
fn swapped_names_share_a_blocking_key() {
    assert!(share_a_key(
        &P::new("Smith", "Robert").dob("1980-03-05"),
        &P::new("Robert", "Smith").dob("1980-03-05")
    ));
}

#[test]
fn a_changed_surname_links_on_given_name_birth_date_and_a_personal_contact() {
    let cases = [
        (
            "married name, same phone",
            P::new("Robert", "Jones")
                .dob("1980-03-05")
                .phone("415 555 2671")
                .email("rsj@outlook.com"),
            true,
        ),
        (
            "old surname, same email",
            P::new("Robert", "Miller")
                .dob("1980-03-05")
                .email("robert.smith@gmail.com"),
            true,
        ),
        (
            "nickname is not enough with another surname",
            P::new("Bob", "Miller")
                .dob("1980-03-05")
                .phone("415 555 2671"),
            false,
        ),
        (
            "another surname, only the address",
            P::new("Robert", "Miller")
                .dob("1980-03-05")
                .address("12 North Elm Street", "62704"),
            false,
        ),
        (
            "another surname, birth date a day off",
            P::new("Robert", "Miller")
                .dob("1980-03-06")
                .phone("415 555 2671"),
            false,
        ),
    ];
    for (name, incoming, links) in cases {
        let d = decide_one(incoming, robert());
        if links {
            assert_eq!(
                outcome(&d),
                Outcome::Link("p1", LinkMethod::Rule, Some("given_dob_contact")),
                "{name}"
            );
        } else {
            assert_eq!(d.target, LinkTarget::NewPatient, "{name}");
        }
    }
}

#[test]
fn linking_without_a_birth_date_is_opt_in_and_needs_name_email_and_one_more_contact() {
    let cfg = MatchConfig {
        link_without_birth_date: true,
        ..MatchConfig::default()
    };
    let run = |incoming: P| {
        let incoming = incoming.rec(Intakeq, "iq-1");
        decide(
            &incoming,
            &[cand("p1", vec![robert().rec(Healthie, "h-1")])],
            &cfg,
        )
    };
    let d = run(P::new("Robert", "Smith")
        .email("robert.smith@gmail.com")
        .phone("415-555-2671"));
    assert_eq!(
        outcome(&d),
        Outcome::Link("p1", LinkMethod::Rule, Some("name_email_contact"))
    );
    for (name, incoming) in [
        (
            "phone and address without the email",
            P::new("Robert", "Smith")
                .phone("415-555-2671")
                .address("12 North Elm Street", "62704"),
        ),
        (
            "another given name (a relative)",
            P::new("Michael", "Smith")
                .email("robert.smith@gmail.com")
                .phone("415-555-2671"),
        ),
        (
            "sex differs",
            P::new("Robert", "Smith")
                .sex("F")
                .email("robert.smith@gmail.com")
                .phone("415-555-2671"),
        ),
    ] {
        assert_eq!(run(incoming).target, LinkTarget::NewPatient, "{name}");
    }
    // A namesake father and son both in the store: two candidates qualify, so a human decides.
    let senior = robert().rec(Healthie, "h-1");
    let junior = robert().dob("2004-11-20").rec(Healthie, "h-2");
    let incoming = P::new("Robert", "Smith")
        .email("robert.smith@gmail.com")
        .phone("415-555-2671")
        .rec(Intakeq, "iq-1");
    let d = decide(
        &incoming,
        &[cand("p1", vec![senior]), cand("p2", vec![junior])],
        &cfg,
    );
    assert_eq!(outcome(&d), Outcome::Review(vec!["p1", "p2"]));
}

/// The address comparison level `explain` reports for two people.
fn address_level(a: &P, b: &P) -> &'static str {
    explain(&a.0, &b.0, &MatchConfig::default())
        .contributions
        .iter()
        .find(|c| c.field == "address")
        .map(|c| c.level)
        .unwrap()
}

#[test]
fn a_mistyped_zip_in_the_same_city_is_a_fuzzy_address_and_another_city_disagrees() {
    let level = address_level;
    let home = P::new("Ana", "Lopez").address("12 North Elm Street", "62704");
    let zip_typo = P::new("Ana", "Lopez").address("12 N Elm St", "62740");
    assert_eq!(level(&home, &zip_typo), "fuzzy");
    let mut elsewhere = P::new("Ana", "Lopez").address("12 North Elm Street", "62740");
    elsewhere.0.address.city = Some("Peoria".into());
    assert_eq!(level(&home, &elsewhere), "disagree");
    let other_street = P::new("Ana", "Lopez").address("480 Lake Shore Drive", "62740");
    assert_eq!(level(&home, &other_street), "disagree");
}

#[test]
fn street_lines_written_differently_are_a_fuzzy_address_and_other_houses_are_not() {
    let level = address_level;
    let with_line2 = |line1: &str, line2: Option<&str>, city: &str, zip: &str| {
        let mut p = P::new("Ana", "Lopez").address(line1, zip);
        p.0.address.line2 = line2.map(String::from);
        p.0.address.city = Some(city.into());
        p
    };
    let home = with_line2("69 Giblin Street", Some("Killarney"), "Bittern", "4814");
    let fuzzy = [
        (
            "building name left out",
            with_line2("69 Giblin Street", None, "Bittern", "4814"),
        ),
        (
            "parts in the other order",
            with_line2("69 Killarney", Some("Giblin Street"), "Bittern", "4814"),
        ),
        (
            "misplaced space",
            with_line2("69 Giblin S treet", Some("Kil larney"), "Bittern", "4814"),
        ),
        (
            "postcode digits swapped",
            with_line2("69 Giblin Street", Some("Killarney"), "Bittern", "4841"),
        ),
        (
            "postcode and town typos",
            with_line2("69 Giblin Street", Some("Killarney"), "Bitern", "4841"),
        ),
    ];
    for (name, other) in &fuzzy {
        assert_eq!(level(&home, other), "fuzzy", "{name}");
    }
    let not_fuzzy = [
        (
            "another house",
            with_line2("71 Giblin Street", Some("Killarney"), "Bittern", "4814"),
            "same_area",
        ),
        (
            "another street",
            with_line2("69 Marconi Crescent", None, "Bittern", "4814"),
            "same_area",
        ),
        (
            "another town",
            with_line2("69 Giblin Street", Some("Killarney"), "Malvern", "4841"),
            "disagree",
        ),
        (
            "far away",
            with_line2("69 Giblin Street", Some("Killarney"), "Bittern", "2600"),
            "fuzzy",
        ),
    ];
    for (name, other, want) in &not_fuzzy {
        assert_eq!(level(&home, other), *want, "{name}");
    }
}

#[test]
fn swapped_names_with_a_typo_compare_as_swapped_and_score_less() {
    let levels = |a: &P, b: &P| {
        let s = explain(&a.0, &b.0, &MatchConfig::default());
        (
            s.contributions[0].level,
            s.contributions[1].level,
            s.contributions[0].weight + s.contributions[1].weight,
        )
    };
    let exact = levels(&P::new("Smith", "Robert"), &robert());
    let typo = levels(&P::new("Smith", "Robrt"), &robert());
    assert_eq!((exact.0, exact.1), ("swapped", "swapped"));
    assert_eq!((typo.0, typo.1), ("swapped", "swapped"));
    assert!(typo.2 > 0.0 && typo.2 < exact.2);
    // Both names mistyped as well as swapped: no swap.
    let s = levels(&P::new("Smyth", "Robrt"), &robert());
    assert_eq!(s.0, "disagree");
    // Twins share the family name, so a swap is never how they compare.
    let d = decide_one(
        P::new("Liam", "Nguyen").dob("2010-06-01"),
        P::new("Noah", "Nguyen").dob("2010-06-01"),
    );
    assert_eq!(d.target, LinkTarget::NewPatient);
}
