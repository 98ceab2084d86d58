//! Fellegi-Sunter scoring of a pair of records: each field is compared into a level (exact,
//! nickname, typo, disagree, missing, ...) and each level carries the weight log2(m/u), where
//! m = P(level | same person) and u = P(level | different people among blocked pairs). The
//! total is the log2 Bayes factor of "same person". Missing and placeholder values weigh 0.
//!
//! The m/u values below are priors for a US outpatient population, not estimates from data;
//! they were chosen so that the scenarios in the tests land on the intended side of the
//! default thresholds (see `MatchConfig`). Email, phone and address are correlated within a
//! household, so their positive weights are capped together (`CONTACT_CAP_BITS`).
//!
//! Comparison levels also feed the hard guards in `decide`: no automatic link without a
//! compatible given name, an agreeing birth date and no sex disagreement.

use std::collections::BTreeSet;

use chrono::{Datelike, NaiveDate};

use super::decide::MatchConfig;
use super::nicknames;
use super::normalize::{self, GivenName};
use crate::model::PersonFields;

/// An `(m, u)` pair: probability of the level among true matches and among non-matches.
type MU = (f64, f64);

const GIVEN_EXACT: MU = (0.85, 0.006); // +7.15
const GIVEN_ALIAS: MU = (0.06, 0.0015); // +5.32 nickname, spelling variant, preferred/legal
const GIVEN_FUZZY: MU = (0.05, 0.003); // +4.06 Jaro-Winkler >= 0.9
const GIVEN_INITIAL: MU = (0.01, 0.004); // +1.32 one side is an initial
const GIVEN_SIMILAR: MU = (0.04, 0.01); // +2.00 one edit or Jaro-Winkler >= 0.85: review, not a link
const GIVEN_DISAGREE: MU = (0.03, 0.985); // -5.04

const FAMILY_EXACT: MU = (0.85, 0.002); // +8.73
const FAMILY_TOKEN: MU = (0.04, 0.001); // +5.32 shares a word of a multi-part surname
const FAMILY_FUZZY: MU = (0.08, 0.003); // +4.74 Jaro-Winkler >= 0.9 or one edit
const FAMILY_DISAGREE: MU = (0.06, 0.994); // -4.05 (marriage, hyphenation)
const FAMILY_SWAPPED: MU = (0.01, 0.00005); // +7.64 given and family crosswise equal

const DOB_EXACT: MU = (0.92, 0.0002); // +12.17
const DOB_TRANSPOSED: MU = (0.01, 0.0001); // +6.64 day and month swapped
const DOB_DAY_OFF: MU = (0.01, 0.0002); // +5.64 one day apart (time-zone shifted dates)
const DOB_YEAR_OFF: MU = (0.01, 0.0003); // +5.06 same day and month, year +-1
const DOB_ONE_DIGIT: MU = (0.03, 0.002); // +3.91 one digit differs, or two neighbouring ones swapped (not in the century or decade)
const DOB_DISAGREE: MU = (0.02, 0.997); // -5.64

const SEX_AGREE: MU = (0.98, 0.5); // +0.97
const SEX_DISAGREE: MU = (0.02, 0.5); // -4.64

const EMAIL_AGREE: MU = (0.85, 0.0005); // +10.73
const EMAIL_DISAGREE: MU = (0.15, 0.9995); // -2.74
const PHONE_AGREE: MU = (0.8, 0.0005); // +10.64 any number in common
const PHONE_DISAGREE: MU = (0.2, 0.9995); // -2.32 no number in common
const ADDRESS_EXACT: MU = (0.7, 0.0005); // +10.45 same street line (and unit) and ZIP
const ADDRESS_FUZZY: MU = (0.08, 0.001); // +6.32 the same street line written differently (same house number), same ZIP; or the town agreeing and the ZIP mistyped or missing
const ADDRESS_AREA: MU = (0.1, 0.02); // +2.32 same ZIP only, or same building, other unit
const ADDRESS_DISAGREE: MU = (0.12, 0.979); // -3.03

/// Upper bound on the summed positive weight of email, phone and address: one household shares
/// all three, so together they are evidence of the household, not thrice of the person.
pub const CONTACT_CAP_BITS: f64 = 12.0;

const GIVEN_FUZZY_JW: f64 = 0.9;
const GIVEN_SIMILAR_JW: f64 = 0.85;
const FAMILY_FUZZY_JW: f64 = 0.9;
const ADDRESS_FUZZY_JW: f64 = 0.92;

fn weight((m, u): MU) -> f64 {
    (m / u).log2()
}

/// How one field compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum NameLevel {
    Missing,
    Disagree,
    /// For given names: one edit apart or nearly so (Emma/Ella, Liam/Lioam). A typo or a
    /// twin's name, so it counts a little and never allows an automatic link.
    Similar,
    Initial,
    Fuzzy,
    /// Nickname, spelling variant or preferred/legal equivalence.
    Alias,
    /// For family names: one word of a multi-part surname in common.
    Token,
    Exact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DateLevel {
    Missing,
    Exact,
    Transposed,
    DayOff,
    YearOff,
    OneDigit,
    /// Two neighbouring digits swapped (not in the century or decade).
    DigitsSwapped,
    Disagree,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Agreement {
    Missing,
    Agree,
    Disagree,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AddressLevel {
    Missing,
    Exact,
    Fuzzy,
    Area,
    Disagree,
}

/// One field's share of a score.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Contribution {
    /// `given_name`, `family_name`, `birth_date`, `sex`, `email`, `phone`, `address`, or
    /// `contact_cap` (the household cap, a negative adjustment).
    pub field: &'static str,
    /// The comparison level, e.g. `exact`, `nickname`, `transposed`, `disagree`, `missing`.
    pub level: &'static str,
    /// log2(m/u) bits; 0 for missing or placeholder values.
    pub weight: f64,
}

/// A pair's score with its per-field contributions. Carries no field values, only names,
/// levels and weights, so it is safe to log.
#[derive(Debug, Clone, PartialEq)]
pub struct MatchScore {
    pub total: f64,
    pub contributions: Vec<Contribution>,
}

/// Settings derived once from a `MatchConfig`.
pub(crate) struct Context<'a> {
    region: &'a str,
    shared_phones: BTreeSet<String>,
    shared_emails: BTreeSet<String>,
}

impl<'a> Context<'a> {
    pub fn new(cfg: &'a MatchConfig) -> Self {
        let region = cfg.default_region.as_str();
        Context {
            region,
            shared_phones: cfg
                .shared_phones
                .iter()
                .filter_map(|p| normalize::phone_e164(p, region))
                .collect(),
            shared_emails: cfg
                .shared_emails
                .iter()
                .filter_map(|e| normalize::normalize_email(e))
                .collect(),
        }
    }

    /// A usable email: valid, not a placeholder, not a clinic's shared address.
    pub fn email(&self, raw: &str) -> Option<String> {
        normalize::normalize_email(raw)
            .filter(|e| !normalize::is_placeholder_email(e) && !self.shared_emails.contains(e))
    }

    /// A usable phone in E.164: valid, not a placeholder, not a clinic's shared number.
    pub fn phone(&self, raw: &str) -> Option<String> {
        if normalize::is_placeholder_phone(raw) {
            return None;
        }
        normalize::phone_e164(raw, self.region)
            .filter(|p| !normalize::is_placeholder_phone(p) && !self.shared_phones.contains(p))
    }
}

/// The matching view of one record: normalized, placeholders and shared contacts removed.
///
/// Packed, since a rebuild keeps one per record: every string sits in one allocation behind a
/// header of lengths; [`Profile::view`] reads it back as borrowed strings.
pub(crate) struct Profile {
    /// The header (numbers written by [`put_num`]) and then the strings, in this order: given
    /// names (count; per name the length of its first word and of the joined form), family
    /// name (0 for none, else 1 + word count; joined length; per word its offset and length in
    /// the joined form), email (0 or 1 + length), phones (count; lengths), address (0 for none,
    /// else 1; then line1, unit, city and zip, each 0 or 1 + length).
    data: Box<str>,
    /// Where the strings start in `data`.
    text_start: u32,
    pub birth_date: Option<NaiveDate>,
    /// 0 none, 1 male, 2 female.
    sex: u8,
}

/// Appends `n` to a header in bytes below 0x80 (so the header is valid UTF-8): six bits a
/// byte, low bits first, 0x40 set on every byte but the last.
fn put_num(out: &mut String, mut n: usize) {
    loop {
        let low = (n & 0x3f) as u8;
        n >>= 6;
        if n == 0 {
            out.push(char::from(low));
            return;
        }
        out.push(char::from(low | 0x40));
    }
}

/// Appends an optional string: 0 in the header for none, else 1 + its length.
fn put_opt(head: &mut String, text: &mut String, v: Option<&str>) {
    match v {
        None => put_num(head, 0),
        Some(v) => {
            put_num(head, 1 + v.len());
            text.push_str(v);
        }
    }
}

/// Reads numbers written by [`put_num`].
#[derive(Clone, Copy)]
struct Nums<'a>(&'a [u8]);

impl Nums<'_> {
    fn next(&mut self) -> usize {
        let mut n = 0usize;
        let mut shift = 0;
        loop {
            let (&b, rest) = self.0.split_first().expect("a complete profile header");
            self.0 = rest;
            n |= usize::from(b & 0x3f) << shift;
            if b & 0x40 == 0 {
                return n;
            }
            shift += 6;
        }
    }
}

/// A given name of a [`View`]: see [`normalize::GivenName`].
#[derive(Clone, Copy)]
pub(crate) struct GivenRef<'a> {
    pub first: &'a str,
    pub joined: &'a str,
}

/// A family name of a [`View`]: see [`normalize::FamilyName`].
#[derive(Clone, Copy)]
pub(crate) struct FamilyRef<'a> {
    pub joined: &'a str,
    /// Offset and length of each word in `joined`.
    words: Nums<'a>,
    count: usize,
}

impl<'a> FamilyRef<'a> {
    /// Distinctive words, as in [`normalize::FamilyName::tokens`].
    pub fn tokens(&self) -> impl Iterator<Item = &'a str> + Clone + 'a {
        let joined = self.joined;
        let mut words = self.words;
        (0..self.count).map(move |_| {
            let at = words.next();
            let len = words.next();
            &joined[at..at + len]
        })
    }
}

/// An address of a [`View`]: see [`normalize::AddressKey`].
#[derive(Clone, Copy)]
pub(crate) struct AddressRef<'a> {
    pub line1: Option<&'a str>,
    pub unit: Option<&'a str>,
    pub city: Option<&'a str>,
    pub zip: Option<&'a str>,
}

/// A [`Profile`] read back: its strings borrowed.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    given: [GivenRef<'a>; 2],
    given_count: usize,
    pub family: Option<FamilyRef<'a>>,
    pub birth_date: Option<NaiveDate>,
    pub sex: Option<&'static str>,
    pub email: Option<&'a str>,
    /// The phones, one after another, with their lengths.
    phone_text: &'a str,
    phone_lens: Nums<'a>,
    phone_count: usize,
    pub address: Option<AddressRef<'a>>,
}

impl<'a> View<'a> {
    /// Legal given name, then the preferred one when it differs.
    pub fn given(&self) -> &[GivenRef<'a>] {
        &self.given[..self.given_count]
    }

    /// Sorted, deduplicated E.164 numbers.
    pub fn phones(&self) -> impl Iterator<Item = &'a str> + Clone + 'a {
        let text = self.phone_text;
        let mut lens = self.phone_lens;
        let mut at = 0;
        (0..self.phone_count).map(move |_| {
            let len = lens.next();
            at += len;
            &text[at - len..at]
        })
    }

    pub fn has_phones(&self) -> bool {
        self.phone_count > 0
    }
}

impl Profile {
    pub fn new(f: &PersonFields, ctx: &Context<'_>) -> Self {
        let placeholder_person = match (f.given_name.as_deref(), f.family_name.as_deref()) {
            (Some(g), Some(fam)) => normalize::is_placeholder_full_name(g, fam),
            _ => false,
        };
        let mut given: Vec<GivenName> = Vec::new();
        let mut family = None;
        if !placeholder_person {
            for name in [f.given_name.as_deref(), f.preferred_name.as_deref()]
                .into_iter()
                .flatten()
            {
                if normalize::is_placeholder_given(name) {
                    continue;
                }
                if let Some(g) = normalize::given_name(name) {
                    if !given.contains(&g) {
                        given.push(g);
                    }
                }
            }
            family = f
                .family_name
                .as_deref()
                .filter(|s| !normalize::is_placeholder_family(s))
                .and_then(normalize::family_name);
        }
        let sex = f
            .sex
            .as_deref()
            .map(normalize::normalize_sex)
            .filter(|s| matches!(*s, "male" | "female"));
        let mut phones: Vec<String> = f.phones.iter().filter_map(|p| ctx.phone(p)).collect();
        phones.sort();
        phones.dedup();
        let address = Some(normalize::normalize_address(&f.address))
            .filter(|a| a.line1.is_some() || a.zip.is_some());
        let email = f.email.as_deref().and_then(|e| ctx.email(e));

        let mut head = String::new();
        let mut text = String::new();
        put_num(&mut head, given.len());
        for g in &given {
            debug_assert!(g.joined.starts_with(&g.first));
            put_num(&mut head, g.first.len());
            put_num(&mut head, g.joined.len());
            text.push_str(&g.joined);
        }
        match &family {
            None => put_num(&mut head, 0),
            Some(fam) => {
                put_num(&mut head, 1 + fam.tokens.len());
                put_num(&mut head, fam.joined.len());
                for t in &fam.tokens {
                    // Every word is one of the words joined (or the whole when none is
                    // distinctive).
                    let at = fam
                        .joined
                        .find(t.as_str())
                        .expect("a word of the joined name");
                    put_num(&mut head, at);
                    put_num(&mut head, t.len());
                }
                text.push_str(&fam.joined);
            }
        }
        put_opt(&mut head, &mut text, email.as_deref());
        put_num(&mut head, phones.len());
        for p in &phones {
            put_num(&mut head, p.len());
            text.push_str(p);
        }
        match &address {
            None => put_num(&mut head, 0),
            Some(a) => {
                put_num(&mut head, 1);
                for v in [&a.line1, &a.unit, &a.city, &a.zip] {
                    put_opt(&mut head, &mut text, v.as_deref());
                }
            }
        }
        let text_start = u32::try_from(head.len()).expect("a profile header under 4 GiB");
        head.push_str(&text);
        Profile {
            data: head.into_boxed_str(),
            text_start,
            birth_date: f
                .birth_date
                .filter(|d| !normalize::is_placeholder_birth_date(*d)),
            sex: match sex {
                Some("male") => 1,
                Some("female") => 2,
                _ => 0,
            },
        }
    }

    /// The profile's fields, borrowed.
    pub fn view(&self) -> View<'_> {
        let start = self.text_start as usize;
        let mut nums = Nums(&self.data.as_bytes()[..start]);
        let text = &self.data[start..];
        let mut at = 0usize;
        let mut take = |len: usize| {
            at += len;
            &text[at - len..at]
        };
        let empty = GivenRef {
            first: "",
            joined: "",
        };
        let mut given = [empty; 2];
        let given_count = nums.next();
        for g in given.iter_mut().take(given_count) {
            let first = nums.next();
            let joined = take(nums.next());
            *g = GivenRef {
                first: &joined[..first],
                joined,
            };
        }
        let family = match nums.next() {
            0 => None,
            n => {
                let joined_len = nums.next();
                let words = nums;
                for _ in 0..2 * (n - 1) {
                    nums.next();
                }
                Some(FamilyRef {
                    joined: take(joined_len),
                    words,
                    count: n - 1,
                })
            }
        };
        let email = match nums.next() {
            0 => None,
            n => Some(take(n - 1)),
        };
        let phone_count = nums.next();
        let phone_lens = nums;
        let mut phones_len = 0;
        for _ in 0..phone_count {
            phones_len += nums.next();
        }
        let phone_text = take(phones_len);
        let address = match nums.next() {
            0 => None,
            _ => {
                let mut opt = || match nums.next() {
                    0 => None,
                    n => Some(take(n - 1)),
                };
                Some(AddressRef {
                    line1: opt(),
                    unit: opt(),
                    city: opt(),
                    zip: opt(),
                })
            }
        };
        View {
            given,
            given_count,
            family,
            birth_date: self.birth_date,
            sex: match self.sex {
                1 => Some("male"),
                2 => Some("female"),
                _ => None,
            },
            email,
            phone_text,
            phone_lens,
            phone_count,
            address,
        }
    }
}

/// Field-by-field comparison of two profiles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Comparison {
    pub given: NameLevel,
    pub family: NameLevel,
    pub birth_date: DateLevel,
    pub sex: Agreement,
    pub email: Agreement,
    pub phone: Agreement,
    pub address: AddressLevel,
    /// Both ZIP codes present and equal.
    pub zip_agrees: bool,
    /// Given and family name were entered in each other's fields on one side; `given` and
    /// `family` then hold the crosswise levels.
    pub names_swapped: bool,
}

impl Comparison {
    pub fn new(a: &Profile, b: &Profile) -> Self {
        let (a, b) = (&a.view(), &b.view());
        let zip_agrees = matches!(
            (a.address.and_then(|x| x.zip), b.address.and_then(|x| x.zip)),
            (Some(x), Some(y)) if x == y
        );
        let mut given = compare_given(a.given(), b.given());
        let mut family = compare_family(a.family.as_ref(), b.family.as_ref());
        let straight_fails = matches!(given, NameLevel::Disagree | NameLevel::Similar)
            && family == NameLevel::Disagree;
        let cross = if straight_fails {
            (names_cross(a, b), names_cross(b, a))
        } else {
            (Cross::No, Cross::No)
        };
        let names_swapped = match cross {
            (Cross::Exact, Cross::Exact) => {
                // Exact crosswise agreement of both names; scored a notch below a plain match.
                given = NameLevel::Alias;
                family = NameLevel::Exact;
                true
            }
            // One name crosswise exact, the other one typo away: fuzzy on both.
            (Cross::Exact, Cross::Close) | (Cross::Close, Cross::Exact) => {
                given = NameLevel::Fuzzy;
                family = NameLevel::Fuzzy;
                true
            }
            _ => false,
        };
        Comparison {
            given,
            family,
            names_swapped,
            birth_date: compare_dates(a.birth_date, b.birth_date),
            sex: agreement(a.sex, b.sex),
            email: agreement(a.email, b.email),
            phone: if !a.has_phones() || !b.has_phones() {
                Agreement::Missing
            } else if a.phones().any(|p| b.phones().any(|q| q == p)) {
                Agreement::Agree
            } else {
                Agreement::Disagree
            },
            address: compare_addresses(a.address, b.address),
            zip_agrees,
        }
    }

    /// Given names that may belong to one person (exact, alias, typo or initial).
    pub fn given_compatible(&self) -> bool {
        matches!(
            self.given,
            NameLevel::Exact | NameLevel::Alias | NameLevel::Fuzzy | NameLevel::Initial
        )
    }

    pub fn family_compatible(&self) -> bool {
        matches!(
            self.family,
            NameLevel::Exact | NameLevel::Token | NameLevel::Fuzzy
        )
    }

    /// Birth dates present on both sides that are the same date, possibly written differently
    /// (day and month swapped, or a day apart from a time-zone shift). A year or digit typo
    /// scores, but is not agreement: a relative with the same name differs just so.
    pub fn birth_date_agrees(&self) -> bool {
        matches!(
            self.birth_date,
            DateLevel::Exact | DateLevel::Transposed | DateLevel::DayOff
        )
    }

    /// The guard every automatic link must pass: compatible given names, agreeing birth dates
    /// and no sex disagreement. Twins (incompatible given names) and relatives sharing a
    /// phone or email (different given names or birth dates) fail it, whatever the score.
    pub fn allows_auto_link(&self) -> bool {
        self.given_compatible() && self.birth_date_agrees() && self.sex != Agreement::Disagree
    }

    /// The first deterministic rule this pair satisfies.
    pub fn rule(&self) -> Option<&'static str> {
        // No birth date on one side: the same full name, the same personal email and one more
        // contact in common. Relatives sharing contacts differ in given name; the ambiguity
        // guard in `decide` sends a namesake father and son (two candidates) to review.
        let no_dob_names = self.birth_date == DateLevel::Missing
            && matches!(self.given, NameLevel::Exact | NameLevel::Alias)
            && self.family == NameLevel::Exact
            && !self.names_swapped
            && self.sex != Agreement::Disagree;
        let names_dob = self.given_compatible()
            && self.family_compatible()
            && self.birth_date == DateLevel::Exact
            && self.sex != Agreement::Disagree;
        if names_dob && self.email == Agreement::Agree {
            return Some(RULE_EMAIL_DOB_NAME);
        }
        if names_dob && self.phone == Agreement::Agree {
            return Some(RULE_PHONE_DOB_NAME);
        }
        let strict_names = matches!(self.given, NameLevel::Exact | NameLevel::Alias)
            && self.family == NameLevel::Exact;
        if strict_names && names_dob && self.zip_agrees {
            return Some(RULE_NAME_DOB_ZIP);
        }
        // A changed or hyphenated surname: the same given name and birth date with a personal
        // contact in common. Twins differ in given name, other relatives in birth date. An
        // address alone is not enough: care homes and shelters house many people at one.
        if self.given == NameLevel::Exact
            && !self.names_swapped
            && self.birth_date == DateLevel::Exact
            && self.sex != Agreement::Disagree
            && (self.email == Agreement::Agree || self.phone == Agreement::Agree)
        {
            return Some(RULE_GIVEN_DOB_CONTACT);
        }
        if no_dob_names
            && self.email == Agreement::Agree
            && (self.phone == Agreement::Agree || self.address == AddressLevel::Exact)
        {
            return Some(RULE_NAME_EMAIL_CONTACT);
        }
        None
    }

    /// Demographics that an explicit id cannot override: given names or birth dates that
    /// disagree outright (a mistyped id pointing at a twin or a relative).
    pub fn contradicts(&self) -> bool {
        matches!(self.given, NameLevel::Disagree | NameLevel::Similar)
            || self.birth_date == DateLevel::Disagree
    }

    pub fn score(&self) -> MatchScore {
        let mut contributions = Vec::with_capacity(8);
        let mut push = |field: &'static str, level: &'static str, mu: Option<MU>| {
            contributions.push(Contribution {
                field,
                level,
                weight: mu.map_or(0.0, weight),
            });
        };
        let (level, mu) = match self.given {
            NameLevel::Fuzzy if self.names_swapped => ("swapped", Some(GIVEN_FUZZY)),
            _ if self.names_swapped => ("swapped", Some(GIVEN_ALIAS)),
            NameLevel::Exact => ("exact", Some(GIVEN_EXACT)),
            NameLevel::Alias => ("nickname", Some(GIVEN_ALIAS)),
            NameLevel::Fuzzy => ("fuzzy", Some(GIVEN_FUZZY)),
            NameLevel::Initial => ("initial", Some(GIVEN_INITIAL)),
            NameLevel::Similar => ("similar", Some(GIVEN_SIMILAR)),
            NameLevel::Disagree => ("disagree", Some(GIVEN_DISAGREE)),
            NameLevel::Token | NameLevel::Missing => ("missing", None),
        };
        push("given_name", level, mu);
        let (level, mu) = match self.family {
            NameLevel::Fuzzy if self.names_swapped => ("swapped", Some(FAMILY_FUZZY)),
            _ if self.names_swapped => ("swapped", Some(FAMILY_SWAPPED)),
            NameLevel::Exact => ("exact", Some(FAMILY_EXACT)),
            NameLevel::Token => ("token", Some(FAMILY_TOKEN)),
            NameLevel::Fuzzy | NameLevel::Alias | NameLevel::Initial | NameLevel::Similar => {
                ("fuzzy", Some(FAMILY_FUZZY))
            }
            NameLevel::Disagree => ("disagree", Some(FAMILY_DISAGREE)),
            NameLevel::Missing => ("missing", None),
        };
        push("family_name", level, mu);
        let (level, mu) = match self.birth_date {
            DateLevel::Exact => ("exact", Some(DOB_EXACT)),
            DateLevel::Transposed => ("transposed", Some(DOB_TRANSPOSED)),
            DateLevel::DayOff => ("day_off_by_one", Some(DOB_DAY_OFF)),
            DateLevel::YearOff => ("year_off_by_one", Some(DOB_YEAR_OFF)),
            DateLevel::OneDigit => ("one_digit", Some(DOB_ONE_DIGIT)),
            DateLevel::DigitsSwapped => ("digits_swapped", Some(DOB_ONE_DIGIT)),
            DateLevel::Disagree => ("disagree", Some(DOB_DISAGREE)),
            DateLevel::Missing => ("missing", None),
        };
        push("birth_date", level, mu);
        let (level, mu) = agreement_weight(self.sex, SEX_AGREE, SEX_DISAGREE);
        push("sex", level, mu);
        let (level, mu) = agreement_weight(self.email, EMAIL_AGREE, EMAIL_DISAGREE);
        push("email", level, mu);
        let (level, mu) = agreement_weight(self.phone, PHONE_AGREE, PHONE_DISAGREE);
        push("phone", level, mu);
        let (level, mu) = match self.address {
            AddressLevel::Exact => ("exact", Some(ADDRESS_EXACT)),
            AddressLevel::Fuzzy => ("fuzzy", Some(ADDRESS_FUZZY)),
            AddressLevel::Area => ("same_area", Some(ADDRESS_AREA)),
            AddressLevel::Disagree => ("disagree", Some(ADDRESS_DISAGREE)),
            AddressLevel::Missing => ("missing", None),
        };
        push("address", level, mu);

        let contact: f64 = contributions
            .iter()
            .filter(|c| matches!(c.field, "email" | "phone" | "address") && c.weight > 0.0)
            .map(|c| c.weight)
            .sum();
        if contact > CONTACT_CAP_BITS {
            contributions.push(Contribution {
                field: "contact_cap",
                level: "household",
                weight: CONTACT_CAP_BITS - contact,
            });
        }
        let total = contributions.iter().map(|c| c.weight).sum();
        MatchScore {
            total,
            contributions,
        }
    }
}

pub(crate) const RULE_EMAIL_DOB_NAME: &str = "email_dob_name";
pub(crate) const RULE_PHONE_DOB_NAME: &str = "phone_dob_name";
pub(crate) const RULE_NAME_DOB_ZIP: &str = "name_dob_zip";
pub(crate) const RULE_NAME_EMAIL_CONTACT: &str = "name_email_contact";
pub(crate) const RULE_GIVEN_DOB_CONTACT: &str = "given_dob_contact";

/// How `a`'s given name (legal or preferred) compares with `b`'s family name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cross {
    No,
    /// One typo apart (Jaro-Winkler >= 0.9, or one edit in names of four letters or more).
    Close,
    Exact,
}

/// `a`'s given name (legal or preferred) written as `b`'s family name, exactly or with a typo.
fn names_cross(a: &View<'_>, b: &View<'_>) -> Cross {
    let Some(f) = b.family.as_ref() else {
        return Cross::No;
    };
    let mut best = Cross::No;
    for g in a.given() {
        let (p, q) = (g.joined, f.joined);
        if p == q {
            return Cross::Exact;
        }
        if p.len() > 2
            && q.len() > 2
            && ((p.len().min(q.len()) >= 4 && within_one_edit(p, q).is_some())
                || strsim::jaro_winkler(p, q) >= FAMILY_FUZZY_JW)
        {
            best = Cross::Close;
        }
    }
    best
}

fn agreement_weight(a: Agreement, agree: MU, disagree: MU) -> (&'static str, Option<MU>) {
    match a {
        Agreement::Agree => ("agree", Some(agree)),
        Agreement::Disagree => ("disagree", Some(disagree)),
        Agreement::Missing => ("missing", None),
    }
}

fn agreement<T: PartialEq>(a: Option<T>, b: Option<T>) -> Agreement {
    match (a, b) {
        (Some(x), Some(y)) if x == y => Agreement::Agree,
        (Some(_), Some(_)) => Agreement::Disagree,
        _ => Agreement::Missing,
    }
}

/// Best level over every pair of given-name forms (legal and preferred on both sides).
fn compare_given(a: &[GivenRef<'_>], b: &[GivenRef<'_>]) -> NameLevel {
    let mut best = NameLevel::Missing;
    for x in a {
        for y in b {
            best = best.max(given_pair(x, y));
        }
    }
    best
}

fn given_pair(x: &GivenRef<'_>, y: &GivenRef<'_>) -> NameLevel {
    if x.joined == y.joined {
        return NameLevel::Exact;
    }
    if x.first == y.first {
        // "Mary" vs "Mary Ann" is the same name written shorter; "Mary Ann" vs "Mary Beth"
        // is two names.
        let x_single = x.first == x.joined;
        let y_single = y.first == y.joined;
        return if x_single || y_single {
            NameLevel::Exact
        } else {
            NameLevel::Disagree
        };
    }
    if nicknames::are_aliases(x.first, y.first) || nicknames::are_aliases(x.joined, y.joined) {
        return NameLevel::Alias;
    }
    if (x.joined.len() == 1 || y.joined.len() == 1) && x.first[..1] == y.first[..1] {
        return NameLevel::Initial;
    }
    let fuzzy = |p: &str, q: &str| {
        p.len() > 1
            && q.len() > 1
            && strsim::jaro_winkler(p, q) >= GIVEN_FUZZY_JW
            && !gendered_variant(p, q)
    };
    if fuzzy(x.joined, y.joined) || fuzzy(x.first, y.first) {
        return NameLevel::Fuzzy;
    }
    let similar = |p: &str, q: &str| {
        p.len() > 2
            && q.len() > 2
            && (within_one_edit(p, q).is_some() || strsim::jaro_winkler(p, q) >= GIVEN_SIMILAR_JW)
            && !gendered_variant(p, q)
    };
    if similar(x.joined, y.joined) || similar(x.first, y.first) {
        return NameLevel::Similar;
    }
    NameLevel::Disagree
}

/// Endings that turn a name into its other-gender form (Paul/Paula, Daniel/Danielle,
/// Francis/Frances, Julian/Julia): close in spelling, yet two people.
const GENDERED_ENDINGS: &[&str] = &[
    "", "a", "e", "o", "ie", "ia", "ina", "ine", "ette", "elle", "le", "lle", "is", "es", "us",
    "n", "na", "ne",
];

fn gendered_variant(a: &str, b: &str) -> bool {
    let prefix = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    if prefix < 3 {
        return false;
    }
    let (ta, tb) = (&a[prefix..], &b[prefix..]);
    ta != tb && GENDERED_ENDINGS.contains(&ta) && GENDERED_ENDINGS.contains(&tb)
}

fn compare_family(a: Option<&FamilyRef<'_>>, b: Option<&FamilyRef<'_>>) -> NameLevel {
    let (Some(a), Some(b)) = (a, b) else {
        return NameLevel::Missing;
    };
    if a.joined == b.joined {
        return NameLevel::Exact;
    }
    if a.tokens().any(|t| b.tokens().any(|u| u == t)) {
        return NameLevel::Token;
    }
    let close = |p: &str, q: &str| {
        (p.len().min(q.len()) >= 4 && within_one_edit(p, q).is_some())
            || strsim::jaro_winkler(p, q) >= FAMILY_FUZZY_JW
    };
    let token_close = a.tokens().any(|p| {
        b.tokens()
            .any(|q| p.len() >= 4 && q.len() >= 4 && close(p, q))
    });
    if close(a.joined, b.joined) || token_close {
        return NameLevel::Fuzzy;
    }
    NameLevel::Disagree
}

fn compare_dates(a: Option<NaiveDate>, b: Option<NaiveDate>) -> DateLevel {
    let (Some(a), Some(b)) = (a, b) else {
        return DateLevel::Missing;
    };
    if a == b {
        return DateLevel::Exact;
    }
    if a.year() == b.year() && a.month() == b.day() && a.day() == b.month() {
        return DateLevel::Transposed;
    }
    if (a - b).num_days().abs() == 1 {
        return DateLevel::DayOff;
    }
    if a.month() == b.month() && a.day() == b.day() && (a.year() - b.year()).abs() == 1 {
        return DateLevel::YearOff;
    }
    let da = a.format("%Y%m%d").to_string();
    let db = b.format("%Y%m%d").to_string();
    let diffs: Vec<usize> = da
        .bytes()
        .zip(db.bytes())
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .collect();
    // A slip in the century or decade digit would make a parent and child "close".
    if diffs.len() == 1 && diffs[0] >= 3 {
        return DateLevel::OneDigit;
    }
    // Two neighbouring digits typed the other way round (1984-10-05 as 1984-01-05), again
    // not in the century or decade.
    if let [i, j] = diffs[..] {
        if i >= 3
            && j == i + 1
            && da.as_bytes()[i] == db.as_bytes()[j]
            && da.as_bytes()[j] == db.as_bytes()[i]
        {
            return DateLevel::DigitsSwapped;
        }
    }
    DateLevel::Disagree
}

/// Street line, town and ZIP together: `Exact` the same line and ZIP; `Fuzzy` the same line
/// written differently ([`street_lines_close`]) under the same ZIP, or the town agreeing and the
/// ZIP mistyped, different or missing; `Area` the same ZIP only, or the same building with
/// another unit.
fn compare_addresses(a: Option<AddressRef<'_>>, b: Option<AddressRef<'_>>) -> AddressLevel {
    let (Some(a), Some(b)) = (a, b) else {
        return AddressLevel::Missing;
    };
    let zips = match (a.zip, b.zip) {
        (Some(x), Some(y)) if x == y => Some(Closeness::Same),
        (Some(x), Some(y)) if one_slip(x, y) => Some(Closeness::Close),
        (Some(_), Some(_)) => Some(Closeness::Different),
        _ => None,
    };
    let city = match (a.city, b.city) {
        (Some(x), Some(y)) if x == y => Some(Closeness::Same),
        (Some(x), Some(y)) if words_close(x, y) => Some(Closeness::Close),
        (Some(_), Some(_)) => Some(Closeness::Different),
        _ => None,
    };
    let city_agrees = matches!(city, Some(Closeness::Same | Closeness::Close));
    let other_unit = matches!((a.unit, b.unit), (Some(x), Some(y)) if x != y);
    match (a.line1, b.line1) {
        (Some(x), Some(y)) => {
            if x == y && matches!(zips, None | Some(Closeness::Same)) {
                return if other_unit {
                    AddressLevel::Area
                } else {
                    AddressLevel::Exact
                };
            }
            let line_close = x == y || street_lines_close(x, y);
            match zips {
                Some(Closeness::Same) if line_close && !other_unit => AddressLevel::Fuzzy,
                Some(Closeness::Same) => AddressLevel::Area,
                // A ZIP one slip away, or another or none in the same town: the same street
                // line is a typo, not a move. Another town is another address.
                Some(Closeness::Close) if city != Some(Closeness::Different) => {
                    if line_close && !other_unit {
                        AddressLevel::Fuzzy
                    } else {
                        AddressLevel::Disagree
                    }
                }
                Some(Closeness::Different) | None if city_agrees && line_close && !other_unit => {
                    AddressLevel::Fuzzy
                }
                _ => AddressLevel::Disagree,
            }
        }
        _ => match zips {
            Some(Closeness::Same) => AddressLevel::Area,
            Some(_) => AddressLevel::Disagree,
            None => AddressLevel::Missing,
        },
    }
}

/// How close two short values are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closeness {
    Same,
    Close,
    Different,
}

/// Two codes of one length that differ in one character or in two neighbouring ones swapped
/// (a mistyped ZIP or postcode).
fn one_slip(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.len() >= 3 && within_one_edit(a, b) == Some(1)
}

/// Town names that are one typo or a misplaced space apart.
fn words_close(a: &str, b: &str) -> bool {
    let squeeze = |s: &str| s.replace(' ', "");
    let (x, y) = (squeeze(a), squeeze(b));
    x == y
        || (x.len().min(y.len()) >= 5 && within_one_edit(&x, &y).is_some())
        || strsim::jaro_winkler(&x, &y) >= ADDRESS_FUZZY_JW
}

/// Street lines that are the same address written with a typo, a misplaced space, its parts in
/// another order or one part left out: the house numbers agree (or one side has none) and the
/// letters of the shorter line nearly all occur, as neighbouring pairs, in the longer one.
fn street_lines_close(a: &str, b: &str) -> bool {
    if strsim::jaro_winkler(a, b) >= ADDRESS_FUZZY_JW {
        return numbers_agree(a, b);
    }
    if !numbers_agree(a, b) {
        return false;
    }
    let letters = |s: &str| -> Vec<u8> { s.bytes().filter(|c| c.is_ascii_alphabetic()).collect() };
    let (x, y) = (letters(a), letters(b));
    let (short, long) = if x.len() <= y.len() { (x, y) } else { (y, x) };
    if short.len() < 6 {
        return false;
    }
    let mut pool: Vec<[u8; 2]> = long.windows(2).map(|w| [w[0], w[1]]).collect();
    pool.sort_unstable();
    let mut found = 0usize;
    let total = short.len() - 1;
    for w in short.windows(2) {
        if let Ok(i) = pool.binary_search(&[w[0], w[1]]) {
            pool.remove(i);
            found += 1;
        }
    }
    found * 10 >= total * 8
}

/// The house numbers (words with digits) of two street lines are the same, or one line has
/// none.
fn numbers_agree(a: &str, b: &str) -> bool {
    let numbers = |s: &str| -> Vec<String> {
        let mut v: Vec<String> = s
            .split(' ')
            .filter(|w| w.bytes().any(|c| c.is_ascii_digit()))
            .map(String::from)
            .collect();
        v.sort();
        v
    };
    let (x, y) = (numbers(a), numbers(b));
    x.is_empty() || y.is_empty() || x == y
}

/// Scores two sets of person fields against each other, for explaining a decision (the review
/// screen) or tuning. The same comparison `decide` uses.
pub fn explain(a: &PersonFields, b: &PersonFields, cfg: &MatchConfig) -> MatchScore {
    let ctx = Context::new(cfg);
    Comparison::new(&Profile::new(a, &ctx), &Profile::new(b, &ctx)).score()
}

/// `strsim::osa_distance(a, b)` when it is 0 or 1, else `None`: one insertion, deletion,
/// substitution or swap of neighbours at most, found in one pass without the distance matrix
/// (most compared names are further apart, and the matrix was the costliest part of scoring).
fn within_one_edit(a: &str, b: &str) -> Option<usize> {
    if a.is_ascii() && b.is_ascii() {
        within_one(a.as_bytes(), b.as_bytes())
    } else {
        let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
        within_one(&a, &b)
    }
}

fn within_one<T: PartialEq>(a: &[T], b: &[T]) -> Option<usize> {
    // The distance is symmetric: `a` is the longer.
    let (a, b) = if a.len() >= b.len() { (a, b) } else { (b, a) };
    if a.len() - b.len() > 1 {
        return None;
    }
    let same = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    if same == b.len() {
        // Equal, or one more at the end.
        return Some(a.len() - b.len());
    }
    let one = if a.len() > b.len() {
        a[same + 1..] == b[same..]
    } else {
        a[same + 1..] == b[same + 1..]
            || (same + 1 < a.len()
                && a[same] == b[same + 1]
                && a[same + 1] == b[same]
                && a[same + 2..] == b[same + 2..])
    };
    one.then_some(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Address;

    /// The packed profile reads back exactly what the normalizers give.
    #[test]
    fn packed_profiles_read_back_the_normalized_fields() {
        let cfg = MatchConfig::default();
        let ctx = Context::new(&cfg);
        let long = "Ab".repeat(70);
        let cases = [
            PersonFields::default(),
            PersonFields {
                given_name: Some("Dr. Mary Ann".into()),
                preferred_name: Some("Molly".into()),
                family_name: Some("de la Cruz-García Van Der Berg Jr.".into()),
                birth_date: NaiveDate::from_ymd_opt(1980, 3, 5),
                sex: Some("F".into()),
                email: Some(" Zoë.O'Brien+x@Example.ORG ".into()),
                phones: vec![
                    "(415) 555-2671".into(),
                    "+44 20 7946 0958".into(),
                    "415.555.2671".into(),
                    "555-0100".into(),
                ],
                address: Address {
                    line1: Some("123 N. Main St., Apt. 4B".into()),
                    city: Some("São Paulo".into()),
                    postal_code: Some("62704-1234".into()),
                    ..Address::default()
                },
                ..PersonFields::default()
            },
            PersonFields {
                given_name: Some(long.clone()),
                family_name: Some(format!("{long} {long} x")),
                sex: Some("male".into()),
                email: Some(format!("{long}@clinic.com")),
                address: Address {
                    postal_code: Some("K1A 0B6".into()),
                    country: Some("CA".into()),
                    ..Address::default()
                },
                ..PersonFields::default()
            },
        ];
        for f in cases {
            let p = Profile::new(&f, &ctx);
            let v = p.view();
            let mut given = Vec::new();
            for name in [f.given_name.as_deref(), f.preferred_name.as_deref()]
                .into_iter()
                .flatten()
            {
                if let Some(g) = normalize::given_name(name) {
                    if !given.contains(&g) {
                        given.push(g);
                    }
                }
            }
            let read: Vec<(String, String)> = v
                .given()
                .iter()
                .map(|g| (g.first.to_string(), g.joined.to_string()))
                .collect();
            let want: Vec<(String, String)> =
                given.into_iter().map(|g| (g.first, g.joined)).collect();
            assert_eq!(read, want);
            let family = f.family_name.as_deref().and_then(normalize::family_name);
            assert_eq!(
                v.family
                    .map(|x| (x.joined.to_string(), x.tokens().map(String::from).collect())),
                family.map(|x| (x.joined, x.tokens)),
            );
            assert_eq!(
                v.email.map(String::from),
                f.email.as_deref().and_then(|e| ctx.email(e))
            );
            let mut phones: Vec<String> = f.phones.iter().filter_map(|p| ctx.phone(p)).collect();
            phones.sort();
            phones.dedup();
            assert_eq!(v.phones().map(String::from).collect::<Vec<_>>(), phones);
            assert_eq!(v.has_phones(), !phones.is_empty());
            let address = Some(normalize::normalize_address(&f.address))
                .filter(|a| a.line1.is_some() || a.zip.is_some());
            assert_eq!(
                v.address.map(|a| normalize::AddressKey {
                    line1: a.line1.map(String::from),
                    unit: a.unit.map(String::from),
                    city: a.city.map(String::from),
                    zip: a.zip.map(String::from),
                }),
                address
            );
            assert_eq!(v.birth_date, f.birth_date);
            assert_eq!(
                v.sex,
                f.sex
                    .as_deref()
                    .map(normalize::normalize_sex)
                    .filter(|s| matches!(*s, "male" | "female"))
            );
        }
    }

    #[test]
    fn within_one_edit_agrees_with_the_full_distance() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let alphabet: Vec<char> = "abcé ".chars().collect();
        let word = |rng: &mut rand::rngs::StdRng| -> String {
            let n = rng.gen_range(0..7);
            (0..n)
                .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                .collect()
        };
        let mut within = 0;
        for _ in 0..200_000 {
            let a = word(&mut rng);
            // Often a small edit of `a`, so that distances 0, 1 and 2 all come up.
            let b = if rng.gen_bool(0.5) {
                word(&mut rng)
            } else {
                let mut chars: Vec<char> = a.chars().collect();
                for _ in 0..rng.gen_range(0..3) {
                    let at = rng.gen_range(0..=chars.len());
                    match rng.gen_range(0..4) {
                        0 => chars.insert(at, alphabet[rng.gen_range(0..alphabet.len())]),
                        1 if at < chars.len() => {
                            chars.remove(at);
                        }
                        2 if at < chars.len() => {
                            chars[at] = alphabet[rng.gen_range(0..alphabet.len())]
                        }
                        3 if at + 1 < chars.len() => chars.swap(at, at + 1),
                        _ => {}
                    }
                }
                chars.into_iter().collect()
            };
            let full = strsim::osa_distance(&a, &b);
            let expected = (full <= 1).then_some(full);
            assert_eq!(within_one_edit(&a, &b), expected, "{a:?} {b:?}");
            within += usize::from(full == 1);
        }
        assert!(within > 10_000, "only {within} pairs one edit apart");
    }
}
