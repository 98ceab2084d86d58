//! A deterministic synthetic patient population with ground truth. Each person appears in one, two
//! or three of Healthie, IntakeQ and Hint, with the differences real systems show (nicknames,
//! typos, lost accents, partial surnames, swapped dates, placeholders, families, twins), and each
//! record is kept as the exact wire JSON its API returns. Mutations (touch, move, archive, merge,
//! create) drive the fake servers and webhook storms; benchmarks score matches against the truth.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use chrono::{DateTime, Datelike, Duration, FixedOffset, NaiveDate, TimeZone, Utc};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::model::{SourceKey, SourceKind};

/// Ground-truth identity of a synthetic person.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PersonId(pub u32);

impl fmt::Display for PersonId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "person-{:06}", self.0)
    }
}

/// Shares of people by the systems they appear in (normalised, so they need not sum to 1).
#[derive(Debug, Clone, PartialEq)]
pub struct Membership {
    pub healthie_only: f64,
    pub intakeq_only: f64,
    pub hint_only: f64,
    pub healthie_intakeq: f64,
    pub healthie_hint: f64,
    pub intakeq_hint: f64,
    pub all_three: f64,
}

impl Default for Membership {
    /// Healthie is the primary EHR (80% of people); half of everyone is in two or three systems.
    fn default() -> Self {
        Self {
            healthie_only: 0.40,
            intakeq_only: 0.05,
            hint_only: 0.05,
            healthie_intakeq: 0.20,
            healthie_hint: 0.15,
            intakeq_hint: 0.03,
            all_three: 0.12,
        }
    }
}

impl Membership {
    fn draw(&self, rng: &mut StdRng) -> Vec<SourceKind> {
        use SourceKind::*;
        let options: [(f64, &[SourceKind]); 7] = [
            (self.healthie_only, &[Healthie]),
            (self.intakeq_only, &[Intakeq]),
            (self.hint_only, &[Hint]),
            (self.healthie_intakeq, &[Healthie, Intakeq]),
            (self.healthie_hint, &[Healthie, Hint]),
            (self.intakeq_hint, &[Intakeq, Hint]),
            (self.all_three, &[Healthie, Intakeq, Hint]),
        ];
        let total: f64 = options.iter().map(|(w, _)| w.max(0.0)).sum();
        let mut x = rng.gen::<f64>() * total.max(f64::MIN_POSITIVE);
        for (w, systems) in options {
            if x < w.max(0.0) {
                return systems.to_vec();
            }
            x -= w.max(0.0);
        }
        vec![Healthie]
    }
}

/// Per-record probabilities of the differences between systems. `Noise::none()` gives clean copies.
#[derive(Debug, Clone, PartialEq)]
pub struct Noise {
    /// A nickname (Bob for Robert) as the first name, when the name has one.
    pub nickname: f64,
    /// One keyboard slip in the first or last name.
    pub typo: f64,
    /// Accents stripped, when the name has any (IntakeQ and Hint; Healthie at a fifth of this).
    pub accent_loss: f64,
    /// Only part of a compound surname (García for García López, Cruz for de la Cruz).
    pub partial_surname: f64,
    /// Names typed in capitals (legacy imports).
    pub upper_case: f64,
    /// Day and month swapped in the date of birth (when the day is 12 or less).
    pub swapped_dob: f64,
    /// Date of birth one day off.
    pub dob_off_by_one: f64,
    /// Each of date of birth, email, phone, address, sex left empty.
    pub missing_field: f64,
    /// Email with different letter case (John.Smith@Gmail.com).
    pub email_case: f64,
    /// Placeholder values: test@example.com, 1900-01-01, 0000000000.
    pub placeholder: f64,
    /// For people who changed surname or email: the record keeps the old one.
    pub stale_value: f64,
    /// Given and family name entered in each other's fields.
    pub swapped_names: f64,
}

impl Default for Noise {
    fn default() -> Self {
        Self {
            nickname: 0.15,
            typo: 0.04,
            accent_loss: 0.6,
            partial_surname: 0.5,
            upper_case: 0.03,
            swapped_dob: 0.02,
            dob_off_by_one: 0.01,
            missing_field: 0.06,
            email_case: 0.10,
            placeholder: 0.02,
            stale_value: 0.5,
            swapped_names: 0.01,
        }
    }
}

impl Noise {
    /// Every system holds the same clean values (formats still differ per API).
    pub fn none() -> Self {
        Self {
            nickname: 0.0,
            typo: 0.0,
            accent_loss: 0.0,
            partial_surname: 0.0,
            upper_case: 0.0,
            swapped_dob: 0.0,
            dob_off_by_one: 0.0,
            missing_field: 0.0,
            email_case: 0.0,
            placeholder: 0.0,
            stale_value: 0.0,
            swapped_names: 0.0,
        }
    }
}

/// What to generate. Same config and seed, same population, byte for byte.
#[derive(Debug, Clone, PartialEq)]
pub struct PopulationConfig {
    pub people: usize,
    pub seed: u64,
    pub membership: Membership,
    pub noise: Noise,
    /// Share of people living in a household of 2 to 5 (shared address, home phone, often email).
    pub family_share: f64,
    /// Share of households with children that have twins.
    pub twin_share: f64,
    /// Share of adults whose surname changed (one system may keep the old one).
    pub surname_change_share: f64,
    /// Share of people whose email changed.
    pub email_change_share: f64,
    /// Share of person-in-system pairs with a second record in the same system (a duplicate).
    pub duplicate_share: f64,
    /// Share of IntakeQ/Hint records of people also in Healthie that carry the Healthie id
    /// (IntakeQ `ExternalClientId`, Hint `integration_record_id`).
    pub cross_id_share: f64,
    /// Share of those cross-system ids that point at the wrong person (a family member).
    pub wrong_cross_id_share: f64,
    /// Share of records archived in their system.
    pub archived_share: f64,
    /// Share of IntakeQ dates of birth whose epoch milliseconds fall on the previous UTC day.
    pub intakeq_dob_previous_day_share: f64,
    /// The population's "now": records were created over the six years before it. Mutations move
    /// a simulated clock forward from here, so output never depends on the wall clock.
    pub now: DateTime<Utc>,
}

impl Default for PopulationConfig {
    fn default() -> Self {
        Self {
            people: 1000,
            seed: 1,
            membership: Membership::default(),
            noise: Noise::default(),
            family_share: 0.25,
            twin_share: 0.08,
            surname_change_share: 0.06,
            email_change_share: 0.08,
            duplicate_share: 0.02,
            cross_id_share: 0.30,
            wrong_cross_id_share: 0.01,
            archived_share: 0.07,
            intakeq_dob_previous_day_share: 0.03,
            now: Utc.with_ymd_and_hms(2026, 3, 2, 17, 0, 0).unwrap(),
        }
    }
}

/// A difference between a record and the person it describes, as the generator applied it.
/// Benchmarks group missed matches by these.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Perturbation {
    Nickname,
    /// The record also carries the legal first name next to the nickname.
    NicknameWithLegal,
    StaleSurname,
    PartialSurname,
    AccentLoss,
    GivenTypo,
    FamilyTypo,
    UpperCase,
    SwappedNames,
    MissingBirthDate,
    PlaceholderBirthDate,
    SwappedDayMonth,
    BirthDateOffByOne,
    StaleEmail,
    MissingEmail,
    PlaceholderEmail,
    EmailCase,
    MissingMobile,
    PlaceholderMobile,
    MissingAddress,
    MissingSex,
}

impl Perturbation {
    pub fn as_str(self) -> &'static str {
        use Perturbation::*;
        match self {
            Nickname => "nickname",
            NicknameWithLegal => "nickname_with_legal",
            StaleSurname => "stale_surname",
            PartialSurname => "partial_surname",
            AccentLoss => "accent_loss",
            GivenTypo => "given_typo",
            FamilyTypo => "family_typo",
            UpperCase => "upper_case",
            SwappedNames => "swapped_names",
            MissingBirthDate => "missing_birth_date",
            PlaceholderBirthDate => "placeholder_birth_date",
            SwappedDayMonth => "swapped_day_month",
            BirthDateOffByOne => "birth_date_off_by_one",
            StaleEmail => "stale_email",
            MissingEmail => "missing_email",
            PlaceholderEmail => "placeholder_email",
            EmailCase => "email_case",
            MissingMobile => "missing_mobile",
            PlaceholderMobile => "placeholder_mobile",
            MissingAddress => "missing_address",
            MissingSex => "missing_sex",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sex {
    Female,
    Male,
}

/// A person as they really are. The records in each system are derived from this.
#[derive(Debug, Clone, PartialEq)]
pub struct Person {
    pub id: PersonId,
    pub given_name: String,
    pub middle_name: Option<String>,
    pub family_name: String,
    /// Surname before a change (marriage); some records still carry it.
    pub previous_family_name: Option<String>,
    pub birth_date: NaiveDate,
    pub sex: Sex,
    pub email: Option<String>,
    pub previous_email: Option<String>,
    /// 10 digits, no formatting.
    pub mobile_phone: Option<String>,
    pub home_phone: Option<String>,
    pub address: PostalAddress,
    pub household: Option<u32>,
    pub twin_of: Option<PersonId>,
    /// Every record of this person, in creation order.
    pub records: Vec<SourceKey>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PostalAddress {
    pub number: u32,
    pub direction: Option<usize>,
    pub street: usize,
    pub street_type: usize,
    pub unit: Option<String>,
    pub city: usize,
    pub zip: String,
}

/// One record of a source, as its API returns it.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRecord {
    pub id: String,
    pub json: Value,
    /// Set when deleted upstream (IntakeQ delete, Hint `patient.destroyed`); Healthie never deletes.
    pub deleted_at: Option<DateTime<Utc>>,
}

/// The records of one source, in creation order, with an index by id.
#[derive(Debug, Clone, Default)]
pub struct SourceTable {
    records: Vec<StoredRecord>,
    index: HashMap<String, usize>,
}

impl SourceTable {
    /// Every record ever created, deleted ones included, in creation order.
    pub fn all(&self) -> &[StoredRecord] {
        &self.records
    }

    /// Records not deleted, in creation order.
    pub fn live(&self) -> impl Iterator<Item = &StoredRecord> {
        self.records.iter().filter(|r| r.deleted_at.is_none())
    }

    pub fn get(&self, id: &str) -> Option<&StoredRecord> {
        self.index.get(id).map(|&i| &self.records[i])
    }

    /// Position of a record in `all()`, stable for the life of the population.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut StoredRecord> {
        let i = *self.index.get(id)?;
        Some(&mut self.records[i])
    }

    fn push(&mut self, id: String, json: Value) {
        self.index.insert(id.clone(), self.records.len());
        self.records.push(StoredRecord {
            id,
            json,
            deleted_at: None,
        });
    }
}

/// Pairwise precision and recall of predicted same-person pairs against the ground truth.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairScores {
    pub true_positives: usize,
    pub false_positives: usize,
    pub false_negatives: usize,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
}

/// A person created after generation, and their new records.
#[derive(Debug, Clone, PartialEq)]
pub struct NewPerson {
    pub person: PersonId,
    pub records: Vec<SourceKey>,
}

/// The population: people, the records of each source and the ground truth.
pub struct Population {
    config: PopulationConfig,
    rng: StdRng,
    clock: DateTime<Utc>,
    version: u64,
    persons: Vec<Person>,
    healthie: SourceTable,
    intakeq: SourceTable,
    hint: SourceTable,
    truth: BTreeMap<SourceKey, PersonId>,
    /// The differences each record got from its person, for analysing missed matches.
    perturbations: BTreeMap<SourceKey, Vec<Perturbation>>,
    /// A second random stream for noise added later, so that adding it left the main stream
    /// (and every population generated before) unchanged where it does not apply.
    extra_rng: StdRng,
    next_healthie_id: u64,
    next_location_id: u64,
    next_policy_id: u64,
    next_intakeq_id: u64,
    households: u32,
    /// Hint keeps `integration_record_id` unique per object type (reference B5).
    hint_integration_ids: HashSet<String>,
}

// ---------------------------------------------------------------------------------------------
// Reference data. Area codes are real and never 555; exchanges avoid 555 and N11.

struct GivenName {
    name: &'static str,
    sex: Sex,
    nicknames: &'static [&'static str],
}

const fn g(name: &'static str, sex: Sex, nicknames: &'static [&'static str]) -> GivenName {
    GivenName {
        name,
        sex,
        nicknames,
    }
}

use Sex::{Female as F, Male as M};

const GIVEN_NAMES: &[GivenName] = &[
    g("Robert", M, &["Bob", "Rob", "Bobby"]),
    g("William", M, &["Bill", "Will", "Billy"]),
    g("James", M, &["Jim", "Jimmy", "Jamie"]),
    g("John", M, &["Jack", "Johnny"]),
    g("Michael", M, &["Mike"]),
    g("David", M, &["Dave"]),
    g("Richard", M, &["Rick", "Rich", "Dick"]),
    g("Joseph", M, &["Joe", "Joey"]),
    g("Thomas", M, &["Tom", "Tommy"]),
    g("Charles", M, &["Charlie", "Chuck"]),
    g("Christopher", M, &["Chris"]),
    g("Daniel", M, &["Dan", "Danny"]),
    g("Matthew", M, &["Matt"]),
    g("Anthony", M, &["Tony"]),
    g("Steven", M, &["Steve"]),
    g("Andrew", M, &["Andy", "Drew"]),
    g("Edward", M, &["Ed", "Eddie", "Ted"]),
    g("Nicholas", M, &["Nick"]),
    g("Jonathan", M, &["Jon"]),
    g("Benjamin", M, &["Ben"]),
    g("Samuel", M, &["Sam"]),
    g("Alexander", M, &["Alex"]),
    g("Zachary", M, &["Zach"]),
    g("Timothy", M, &["Tim"]),
    g("Gregory", M, &["Greg"]),
    g("Patrick", M, &["Pat"]),
    g("Lawrence", M, &["Larry"]),
    g("Francis", M, &["Frank"]),
    g("Kevin", M, &[]),
    g("Brian", M, &[]),
    g("Jason", M, &[]),
    g("Ryan", M, &[]),
    g("Eric", M, &[]),
    g("Tyler", M, &[]),
    g("Ethan", M, &[]),
    g("Noah", M, &[]),
    g("Liam", M, &[]),
    g("Mason", M, &[]),
    g("José", M, &["Pepe"]),
    g("Jesús", M, &["Chuy"]),
    g("Raúl", M, &[]),
    g("André", M, &[]),
    g("Joaquín", M, &[]),
    g("Héctor", M, &[]),
    g("François", M, &[]),
    g("Minh", M, &[]),
    g("Wei", M, &[]),
    g("Arjun", M, &[]),
    g("Mohammed", M, &["Mo"]),
    g("Elizabeth", F, &["Liz", "Beth", "Betsy"]),
    g("Katherine", F, &["Kate", "Katie", "Kathy"]),
    g("Catherine", F, &["Cathy", "Cat"]),
    g("Margaret", F, &["Maggie", "Peggy", "Meg"]),
    g("Jennifer", F, &["Jen", "Jenny"]),
    g("Patricia", F, &["Pat", "Patty", "Trish"]),
    g("Susan", F, &["Sue", "Susie"]),
    g("Deborah", F, &["Debbie", "Deb"]),
    g("Rebecca", F, &["Becky"]),
    g("Victoria", F, &["Vicky", "Tori"]),
    g("Jessica", F, &["Jess"]),
    g("Abigail", F, &["Abby"]),
    g("Alexandra", F, &["Alex", "Sasha"]),
    g("Samantha", F, &["Sam"]),
    g("Christina", F, &["Chris", "Tina"]),
    g("Kimberly", F, &["Kim"]),
    g("Jacqueline", F, &["Jackie"]),
    g("Theresa", F, &["Terry", "Tess"]),
    g("Cynthia", F, &["Cindy"]),
    g("Isabella", F, &["Bella", "Izzy"]),
    g("Sophia", F, &["Sophie"]),
    g("Olivia", F, &["Liv"]),
    g("Mary", F, &[]),
    g("Linda", F, &[]),
    g("Sarah", F, &[]),
    g("Karen", F, &[]),
    g("Nancy", F, &[]),
    g("Emily", F, &[]),
    g("Emma", F, &[]),
    g("Ava", F, &[]),
    g("Mia", F, &[]),
    g("María", F, &[]),
    g("Sofía", F, &[]),
    g("Lucía", F, &[]),
    g("Inés", F, &[]),
    g("Mónica", F, &[]),
    g("Zoë", F, &["Zoe"]),
    g("Chloé", F, &[]),
    g("Renée", F, &[]),
    g("Priya", F, &[]),
    g("Mei", F, &[]),
    g("Aaliyah", F, &[]),
];

const FAMILY_NAMES: &[&str] = &[
    "Smith",
    "Johnson",
    "Williams",
    "Brown",
    "Jones",
    "Miller",
    "Davis",
    "Wilson",
    "Anderson",
    "Taylor",
    "Thomas",
    "Moore",
    "Jackson",
    "Martin",
    "Lee",
    "Thompson",
    "White",
    "Harris",
    "Clark",
    "Lewis",
    "Robinson",
    "Walker",
    "Young",
    "Allen",
    "King",
    "Wright",
    "Scott",
    "Hill",
    "Green",
    "Adams",
    "Baker",
    "Nelson",
    "Carter",
    "Mitchell",
    "Roberts",
    "Turner",
    "Phillips",
    "Campbell",
    "Parker",
    "Evans",
    "Edwards",
    "Collins",
    "Stewart",
    "Morris",
    "Murphy",
    "Cook",
    "Rogers",
    "Morgan",
    "Peterson",
    "Cooper",
    "Reed",
    "Bailey",
    "Bell",
    "Kelly",
    "Howard",
    "Ward",
    "Richardson",
    "Watson",
    "Brooks",
    "Bennett",
    "Gray",
    "Hughes",
    "Price",
    "Foster",
    "Nguyen",
    "Tran",
    "Pham",
    "Kim",
    "Park",
    "Chen",
    "Wang",
    "Zhang",
    "Liu",
    "Patel",
    "Shah",
    "Singh",
    "Kumar",
    "Khan",
    "Cohen",
    "Levy",
    "Schmidt",
    "Müller",
    "Schröder",
    "O'Brien",
    "O'Connor",
    "McDonald",
    "MacDonald",
    "D'Angelo",
    "García",
    "Rodríguez",
    "Martínez",
    "Hernández",
    "López",
    "González",
    "Pérez",
    "Sánchez",
    "Ramírez",
    "Torres",
    "Flores",
    "Rivera",
    "Gómez",
    "Díaz",
    "Reyes",
    "Morales",
    "Ortiz",
    "Gutiérrez",
    "Chávez",
    "Ramos",
    "Ruiz",
    "Álvarez",
    "Castillo",
    "Jiménez",
    "Vásquez",
    "Moreno",
    "Romero",
    "Herrera",
    "Medina",
    "Aguilar",
    "Peña",
    "Muñoz",
    "Núñez",
    "Ibáñez",
    "Côté",
    "Bélanger",
    "Lefèvre",
];

/// Surnames with particles: one system may keep only the last word or glue them together.
const PARTICLE_NAMES: &[&str] = &[
    "de la Cruz",
    "del Río",
    "Van der Berg",
    "van Dijk",
    "De Luca",
    "da Silva",
    "dos Santos",
    "St. Clair",
];

const MIDDLE_NAMES: &[&str] = &[
    "Ann", "Marie", "Lynn", "Rose", "Grace", "Jean", "Louise", "Michael", "James", "Lee", "Allen",
    "Paul", "Ray", "Edward", "Joseph", "Elena", "Luis", "Carlos", "A.", "J.", "M.",
];

const STREETS: &[&str] = &[
    "Main",
    "Oak",
    "Maple",
    "Cedar",
    "Pine",
    "Elm",
    "Washington",
    "Lake",
    "Hill",
    "Park",
    "Walnut",
    "Sunset",
    "Highland",
    "Jefferson",
    "Lincoln",
    "Madison",
    "Franklin",
    "Chestnut",
    "Spruce",
    "Willow",
    "Mill",
    "Church",
    "River",
    "Center",
    "Ridge",
    "Meadow",
    "Forest",
    "Spring",
    "Valley",
    "Harbor",
    "Prospect",
    "Summit",
    "Magnolia",
    "Dogwood",
    "Birch",
];

const STREET_TYPES: &[(&str, &str)] = &[
    ("St", "Street"),
    ("Ave", "Avenue"),
    ("Rd", "Road"),
    ("Blvd", "Boulevard"),
    ("Dr", "Drive"),
    ("Ln", "Lane"),
    ("Ct", "Court"),
    ("Pl", "Place"),
    ("Way", "Way"),
    ("Ter", "Terrace"),
];

const DIRECTIONS: &[(&str, &str)] = &[("N", "North"), ("S", "South"), ("E", "East"), ("W", "West")];

struct City {
    name: &'static str,
    state: &'static str,
    state_name: &'static str,
    zip3: &'static str,
    area_codes: &'static [u16],
    timezone: &'static str,
}

const fn city(
    name: &'static str,
    state: &'static str,
    state_name: &'static str,
    zip3: &'static str,
    area_codes: &'static [u16],
    timezone: &'static str,
) -> City {
    City {
        name,
        state,
        state_name,
        zip3,
        area_codes,
        timezone,
    }
}

const NY: &str = "America/New_York";
const CHI: &str = "America/Chicago";
const DEN: &str = "America/Denver";
const PHX: &str = "America/Phoenix";
const LA: &str = "America/Los_Angeles";

const CITIES: &[City] = &[
    city("Boston", "MA", "Massachusetts", "021", &[617, 857], NY),
    city("Worcester", "MA", "Massachusetts", "016", &[508, 774], NY),
    city("New York", "NY", "New York", "100", &[212, 646, 917], NY),
    city("Brooklyn", "NY", "New York", "112", &[718, 347, 929], NY),
    city("Buffalo", "NY", "New York", "142", &[716], NY),
    city("Philadelphia", "PA", "Pennsylvania", "191", &[215, 267], NY),
    city("Pittsburgh", "PA", "Pennsylvania", "152", &[412], NY),
    city("Baltimore", "MD", "Maryland", "212", &[410, 443], NY),
    city(
        "Washington",
        "DC",
        "District of Columbia",
        "200",
        &[202],
        NY,
    ),
    city("Atlanta", "GA", "Georgia", "303", &[404, 470, 678], NY),
    city("Miami", "FL", "Florida", "331", &[305, 786], NY),
    city("Orlando", "FL", "Florida", "328", &[407, 321], NY),
    city("Charlotte", "NC", "North Carolina", "282", &[704, 980], NY),
    city("Raleigh", "NC", "North Carolina", "276", &[919, 984], NY),
    city("Nashville", "TN", "Tennessee", "372", &[615, 629], CHI),
    city("Chicago", "IL", "Illinois", "606", &[312, 773, 872], CHI),
    city("Detroit", "MI", "Michigan", "482", &[313], NY),
    city("Minneapolis", "MN", "Minnesota", "554", &[612], CHI),
    city("Columbus", "OH", "Ohio", "432", &[614], NY),
    city("Houston", "TX", "Texas", "770", &[713, 281, 832], CHI),
    city("Dallas", "TX", "Texas", "752", &[214, 469, 972], CHI),
    city("Austin", "TX", "Texas", "787", &[512, 737], CHI),
    city("Denver", "CO", "Colorado", "802", &[303, 720], DEN),
    city("Phoenix", "AZ", "Arizona", "850", &[602, 480], PHX),
    city("Salt Lake City", "UT", "Utah", "841", &[801, 385], DEN),
    city(
        "Los Angeles",
        "CA",
        "California",
        "900",
        &[213, 310, 323],
        LA,
    ),
    city("San Diego", "CA", "California", "921", &[619, 858], LA),
    city("San Francisco", "CA", "California", "941", &[415, 628], LA),
    city("Oakland", "CA", "California", "946", &[510], LA),
    city("Portland", "OR", "Oregon", "972", &[503, 971], LA),
    city("Seattle", "WA", "Washington", "981", &[206], LA),
];

const EMAIL_DOMAINS: &[&str] = &[
    "gmail.com",
    "gmail.com",
    "gmail.com",
    "yahoo.com",
    "outlook.com",
    "hotmail.com",
    "icloud.com",
    "aol.com",
    "proton.me",
    "comcast.net",
];

const PLACEHOLDER_EMAILS: &[&str] = &["test@example.com", "noemail@example.com", "none@none.com"];
const PLACEHOLDER_DOB: (i32, u32, u32) = (1900, 1, 1);
const PLACEHOLDER_PHONE: &str = "0000000000";

const PAYERS: &[(&str, &str)] = &[
    ("Aetna", "60054"),
    ("Blue Cross Blue Shield of Massachusetts", "SB700"),
    ("Cigna", "62308"),
    ("UnitedHealthcare", "87726"),
    ("Humana", "61101"),
    ("Kaiser Permanente", "94134"),
];

const HEALTHIE_PROVIDER_IDS: &[&str] = &["100412", "100413", "100587", "101022"];
const INTAKEQ_PRACTITIONER_IDS: &[&str] = &[
    "5f1a9c2e7b3d4a0012c8e4f1",
    "5f1a9c2e7b3d4a0012c8e4f2",
    "60b2e41d9a7c3f0015d2a9b7",
];
const HINT_PRACTITIONERS: &[(&str, &str)] = &[
    ("pct-4XzbQ2mK7PdA", "Dana Whitfield"),
    ("pct-9LrTe3VnB1cS", "Omar Haddad"),
];

// ---------------------------------------------------------------------------------------------
// Time helpers: US zones with the 2007+ DST rule, enough for realistic offsets without tzdata.

fn us_standard_offset_hours(timezone: &str) -> i32 {
    match timezone {
        CHI => -6,
        DEN | PHX => -7,
        LA => -8,
        _ => -5,
    }
}

fn nth_sunday(year: i32, month: u32, n: u32) -> NaiveDate {
    let first = NaiveDate::from_ymd_opt(year, month, 1).expect("valid month");
    let to_sunday = (7 - first.weekday().num_days_from_sunday()) % 7;
    first + Duration::days(i64::from(to_sunday + 7 * (n - 1)))
}

/// The UTC offset of a US zone at an instant (DST from the second Sunday of March to the first
/// Sunday of November, 2 a.m. local; Arizona has none).
fn us_offset(timezone: &str, at: DateTime<Utc>) -> FixedOffset {
    let standard = us_standard_offset_hours(timezone);
    let year = at.year();
    let starts =
        nth_sunday(year, 3, 2).and_hms_opt(2, 0, 0).unwrap() - Duration::hours(standard.into());
    let ends = nth_sunday(year, 11, 1).and_hms_opt(2, 0, 0).unwrap()
        - Duration::hours((standard + 1).into());
    let naive = at.naive_utc();
    let dst = timezone != PHX && naive >= starts && naive < ends;
    FixedOffset::east_opt((standard + i32::from(dst)) * 3600).expect("valid offset")
}

/// Healthie's ISO8601DateTime: seconds precision with the org's offset, e.g. `2025-06-01T09:30:00-04:00`.
fn healthie_time(at: DateTime<Utc>) -> String {
    at.with_timezone(&us_offset(NY, at))
        .format("%Y-%m-%dT%H:%M:%S%:z")
        .to_string()
}

/// Hint's timestamps: microseconds with the practice's offset, e.g. `2017-02-05T06:23:00.000000-08:00`.
fn hint_time(at: DateTime<Utc>) -> String {
    at.with_timezone(&us_offset(LA, at))
        .format("%Y-%m-%dT%H:%M:%S%.6f%:z")
        .to_string()
}

fn epoch_ms(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

fn age_on(dob: NaiveDate, on: NaiveDate) -> i64 {
    let mut age = i64::from(on.year() - dob.year());
    if (on.month(), on.day()) < (dob.month(), dob.day()) {
        age -= 1;
    }
    age.max(0)
}

// ---------------------------------------------------------------------------------------------
// Per-record view of a person, after noise, before rendering into a wire shape.

#[derive(Debug, Clone)]
struct View {
    first: String,
    legal_first: Option<String>,
    middle: Option<String>,
    family: String,
    dob: Option<NaiveDate>,
    sex: Option<Sex>,
    email: Option<String>,
    mobile: Option<String>,
    home: Option<String>,
    address: Option<AddressView>,
    archived: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    timezone: &'static str,
    perturbations: Vec<Perturbation>,
}

#[derive(Debug, Clone)]
struct AddressView {
    line1: String,
    line2: Option<String>,
    city: String,
    state: String,
    state_name: String,
    zip: String,
}

fn typo(rng: &mut StdRng, s: &str) -> String {
    let chars: Vec<char> = s.chars().collect();
    if chars.len() < 3 {
        return s.to_string();
    }
    let i = rng.gen_range(1..chars.len() - 1);
    let mut out = chars.clone();
    match rng.gen_range(0..4) {
        0 => out.swap(i, i + 1),
        1 => {
            out.remove(i);
        }
        2 => out.insert(i, chars[i]),
        _ => {
            const NEAR: &[(char, char)] = &[
                ('a', 's'),
                ('e', 'r'),
                ('i', 'o'),
                ('o', 'p'),
                ('n', 'm'),
                ('t', 'r'),
                ('s', 'd'),
                ('l', 'k'),
                ('r', 'e'),
                ('c', 'v'),
                ('h', 'j'),
                ('y', 'u'),
            ];
            let c = out[i];
            if let Some((_, b)) = NEAR.iter().find(|(a, _)| *a == c) {
                out[i] = *b;
            } else {
                out.swap(i, i + 1);
            }
        }
    }
    out.into_iter().collect()
}

fn strip_accents(s: &str) -> String {
    deunicode::deunicode(s)
}

/// A partial or reshaped form of a compound surname, as another system might hold it.
fn partial_surname(rng: &mut StdRng, family: &str) -> String {
    if let Some((a, b)) = family.split_once('-') {
        return match rng.gen_range(0..3) {
            0 => a.to_string(),
            1 => b.to_string(),
            _ => format!("{a} {b}"),
        };
    }
    let lower = family.to_lowercase();
    if PARTICLE_NAMES.iter().any(|p| p.to_lowercase() == lower) {
        let last = family.rsplit(' ').next().unwrap_or(family).to_string();
        return match rng.gen_range(0..3) {
            0 => last,
            1 => family.replace([' ', '.'], ""),
            _ => family
                .split(' ')
                .map(|w| {
                    let mut c = w.chars();
                    c.next()
                        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>()
                .join(" "),
        };
    }
    if family.contains('\'') {
        return if rng.gen_bool(0.5) {
            family.replace('\'', "")
        } else {
            family.replace('\'', " ")
        };
    }
    if let Some((a, _)) = family.split_once(' ') {
        return a.to_string();
    }
    family.to_string()
}

fn is_compound(family: &str) -> bool {
    family.contains(['-', ' ', '\''])
}

fn email_local(rng: &mut StdRng, given: &str, family: &str, year: i32) -> String {
    let given = strip_accents(given)
        .to_lowercase()
        .replace([' ', '\'', '.'], "");
    let family = strip_accents(family)
        .to_lowercase()
        .replace([' ', '\'', '.', '-'], "");
    match rng.gen_range(0..6) {
        0 => format!("{given}.{family}"),
        1 => format!("{given}{family}"),
        2 => format!("{}{family}", &given[..1.min(given.len())]),
        3 => format!("{given}.{family}{}", year % 100),
        4 => format!("{given}_{family}{}", rng.gen_range(1..999)),
        _ => format!("{family}.{given}"),
    }
}

fn random_case(rng: &mut StdRng, email: &str) -> String {
    let (local, domain) = email.split_once('@').unwrap_or((email, ""));
    let local = match rng.gen_range(0..3) {
        0 => local.to_uppercase(),
        _ => local
            .split('.')
            .map(|w| {
                let mut c = w.chars();
                c.next()
                    .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("."),
    };
    let domain = if rng.gen_bool(0.5) {
        let mut c = domain.chars();
        c.next()
            .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
            .unwrap_or_default()
    } else {
        domain.to_string()
    };
    format!("{local}@{domain}")
}

fn phone_digits(rng: &mut StdRng, area_codes: &[u16]) -> String {
    let area = area_codes.choose(rng).copied().unwrap_or(617);
    let exchange = loop {
        let e: u16 = rng.gen_range(201..1000);
        if e != 555 && e % 100 != 11 {
            break e;
        }
    };
    format!("{area}{exchange}{:04}", rng.gen_range(0..10000))
}

/// `(617) 823-4410`, `617-823-4410`, `617.823.4410`, `6178234410` or `+16178234410`.
fn format_phone(digits: &str, style: u8) -> String {
    if digits.len() != 10 {
        return digits.to_string();
    }
    let (a, b, c) = (&digits[..3], &digits[3..6], &digits[6..]);
    match style {
        0 => format!("({a}) {b}-{c}"),
        1 => format!("{a}-{b}-{c}"),
        2 => format!("{a}.{b}.{c}"),
        3 => digits.to_string(),
        _ => format!("+1{digits}"),
    }
}

fn pick_style(rng: &mut StdRng, weights: [u32; 5]) -> u8 {
    let total: u32 = weights.iter().sum();
    let mut x = rng.gen_range(0..total);
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i as u8;
        }
        x -= w;
    }
    3
}

fn render_address(rng: &mut StdRng, a: &PostalAddress, messy: bool) -> AddressView {
    let c = &CITIES[a.city];
    let long = messy && rng.gen_bool(0.4);
    let (short_type, long_type) = STREET_TYPES[a.street_type];
    let street_type = if long { long_type } else { short_type };
    let direction = a.direction.map(|d| {
        if long {
            DIRECTIONS[d].1
        } else {
            DIRECTIONS[d].0
        }
    });
    let mut line1 = match direction {
        Some(d) => format!("{} {d} {} {street_type}", a.number, STREETS[a.street]),
        None => format!("{} {} {street_type}", a.number, STREETS[a.street]),
    };
    if messy && rng.gen_bool(0.1) {
        line1.push('.');
    }
    let mut line2 = a.unit.as_ref().map(|u| {
        if messy {
            match rng.gen_range(0..3) {
                0 => format!("Apt {u}"),
                1 => format!("#{u}"),
                _ => format!("Unit {u}"),
            }
        } else {
            format!("Apt {u}")
        }
    });
    if messy && line2.is_some() && rng.gen_bool(0.3) {
        line1 = format!("{line1} {}", line2.take().unwrap_or_default());
    }
    let mut zip = a.zip.clone();
    if messy && rng.gen_bool(0.1) {
        zip = format!("{zip}-{:04}", rng.gen_range(1..10000));
    }
    AddressView {
        line1,
        line2,
        city: c.name.to_string(),
        state: c.state.to_string(),
        state_name: c.state_name.to_string(),
        zip,
    }
}

fn alnum(rng: &mut StdRng, n: usize) -> String {
    const CHARS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz0123456789";
    (0..n)
        .map(|_| CHARS[rng.gen_range(0..CHARS.len())] as char)
        .collect()
}

fn uuid_from(rng: &mut StdRng) -> String {
    uuid::Builder::from_random_bytes(rng.gen())
        .into_uuid()
        .to_string()
}

/// Joins two JSON objects (json! literals this long exceed the macro recursion limit).
fn merge_objects(mut head: Value, rest: Value) -> Value {
    if let (Value::Object(h), Value::Object(r)) = (&mut head, rest) {
        h.extend(r);
    }
    head
}

fn sex_word(sex: Option<Sex>) -> Option<&'static str> {
    sex.map(|s| match s {
        Sex::Female => "Female",
        Sex::Male => "Male",
    })
}

// ---------------------------------------------------------------------------------------------

impl Population {
    /// Generates the population. Deterministic: the same config gives the same records.
    pub fn generate(config: &PopulationConfig) -> Population {
        let mut pop = Population {
            config: config.clone(),
            rng: StdRng::seed_from_u64(config.seed),
            clock: config.now,
            version: 0,
            persons: Vec::with_capacity(config.people),
            healthie: SourceTable::default(),
            intakeq: SourceTable::default(),
            hint: SourceTable::default(),
            truth: BTreeMap::new(),
            perturbations: BTreeMap::new(),
            extra_rng: StdRng::seed_from_u64(config.seed ^ 0x005e_ed0f_ba5e),
            next_healthie_id: 3_204_117,
            next_location_id: 812_340,
            next_policy_id: 95_210,
            next_intakeq_id: 1,
            households: 0,
            hint_integration_ids: HashSet::new(),
        };
        while pop.persons.len() < config.people {
            let remaining = config.people - pop.persons.len();
            if remaining >= 2 && pop.rng.gen_bool(config.family_share.clamp(0.0, 1.0) / 2.5) {
                pop.generate_household(remaining.min(5));
            } else {
                pop.generate_single(None);
            }
        }
        // Records are created in time order so that ids grow with created_at, as upstream.
        let mut plans: Vec<(DateTime<Utc>, PersonId, SourceKind)> = Vec::new();
        let span_secs = 6 * 365 * 86_400;
        for i in 0..pop.persons.len() {
            let person = pop.persons[i].id;
            for system in pop.config.membership.draw(&mut pop.rng) {
                let created = config.now
                    - Duration::seconds(pop.rng.gen_range(86_400..span_secs))
                    - Duration::milliseconds(pop.rng.gen_range(0..1000));
                plans.push((created, person, system));
                if pop.rng.gen_bool(config.duplicate_share.clamp(0.0, 1.0)) {
                    let later = created + Duration::seconds(pop.rng.gen_range(600..86_400 * 400));
                    plans.push((later.min(config.now - Duration::hours(1)), person, system));
                }
            }
        }
        plans.sort_by_key(|(at, person, system)| (*at, *person, *system));
        // Healthie first, so IntakeQ and Hint can carry Healthie ids.
        for kind in SourceKind::ALL {
            for (at, person, system) in &plans {
                if *system == kind {
                    pop.create_record(*person, kind, *at, false);
                }
            }
        }
        pop
    }

    fn new_person_id(&self) -> PersonId {
        PersonId(self.persons.len() as u32 + 1)
    }

    fn random_given(&mut self, sex: Sex) -> &'static str {
        loop {
            let g = &GIVEN_NAMES[self.rng.gen_range(0..GIVEN_NAMES.len())];
            if g.sex == sex {
                return g.name;
            }
        }
    }

    fn random_family(&mut self) -> String {
        let r: f64 = self.rng.gen();
        if r < 0.04 {
            PARTICLE_NAMES.choose(&mut self.rng).unwrap().to_string()
        } else if r < 0.08 {
            let a = *FAMILY_NAMES.choose(&mut self.rng).unwrap();
            let b = loop {
                let b = *FAMILY_NAMES.choose(&mut self.rng).unwrap();
                if b != a {
                    break b;
                }
            };
            if self.rng.gen_bool(0.5) {
                format!("{a}-{b}")
            } else {
                format!("{a} {b}")
            }
        } else {
            FAMILY_NAMES.choose(&mut self.rng).unwrap().to_string()
        }
    }

    fn random_address(&mut self) -> PostalAddress {
        let city = self.rng.gen_range(0..CITIES.len());
        PostalAddress {
            number: self.rng.gen_range(1..9999),
            direction: self
                .rng
                .gen_bool(0.15)
                .then(|| self.rng.gen_range(0..DIRECTIONS.len())),
            street: self.rng.gen_range(0..STREETS.len()),
            street_type: self.rng.gen_range(0..STREET_TYPES.len()),
            unit: self.rng.gen_bool(0.3).then(|| {
                format!(
                    "{}{}",
                    self.rng.gen_range(1..40),
                    ["", "A", "B", "C", "D"].choose(&mut self.rng).unwrap()
                )
            }),
            city,
            zip: format!("{}{:02}", CITIES[city].zip3, self.rng.gen_range(1..99)),
        }
    }

    fn birth_date(&mut self, min_age: i64, max_age: i64) -> NaiveDate {
        let today = self.config.now.date_naive();
        let days = self.rng.gen_range(min_age * 365..=max_age * 365 + 364);
        today - Duration::days(days)
    }

    fn make_email(&mut self, given: &str, family: &str, dob: NaiveDate) -> String {
        let local = email_local(&mut self.rng, given, family, dob.year());
        let domain = *EMAIL_DOMAINS.choose(&mut self.rng).unwrap();
        format!("{local}@{domain}")
    }

    /// A person on their own, or a member of a household when `household` is given.
    fn generate_single(&mut self, household: Option<(u32, &Person, i64, i64)>) -> PersonId {
        let id = self.new_person_id();
        let sex = if self.rng.gen_bool(0.52) { F } else { M };
        let given = self.random_given(sex).to_string();
        let (family, address, home, dob) = match household {
            Some((_, head, min_age, max_age)) => {
                let family = if self.rng.gen_bool(0.85) {
                    head.family_name.clone()
                } else {
                    self.random_family()
                };
                (
                    family,
                    head.address.clone(),
                    head.home_phone.clone(),
                    self.birth_date(min_age, max_age),
                )
            }
            None => {
                let address = self.random_address();
                let home = self
                    .rng
                    .gen_bool(0.25)
                    .then(|| phone_digits(&mut self.rng, CITIES[address.city].area_codes));
                (self.random_family(), address, home, self.birth_date(18, 92))
            }
        };
        let age = age_on(dob, self.config.now.date_naive());
        let middle = self
            .rng
            .gen_bool(0.35)
            .then(|| MIDDLE_NAMES.choose(&mut self.rng).unwrap().to_string());
        let previous_family_name = (age >= 22
            && self
                .rng
                .gen_bool(self.config.surname_change_share.clamp(0.0, 1.0)))
        .then(|| self.random_family());
        let email = (age >= 13 && self.rng.gen_bool(0.92)).then(|| {
            let family_for_email = previous_family_name.as_deref().unwrap_or(&family);
            self.make_email(&given, family_for_email, dob)
        });
        let previous_email = (email.is_some()
            && (previous_family_name.is_some()
                || self
                    .rng
                    .gen_bool(self.config.email_change_share.clamp(0.0, 1.0))))
        .then(|| email.clone())
        .flatten();
        let email = match &previous_email {
            Some(_) => Some(self.make_email(&given, &family, dob)),
            None => email,
        };
        let mobile = (age >= 12 && self.rng.gen_bool(0.93)).then(|| {
            let codes = if self.rng.gen_bool(0.8) {
                CITIES[address.city].area_codes
            } else {
                CITIES[self.rng.gen_range(0..CITIES.len())].area_codes
            };
            phone_digits(&mut self.rng, codes)
        });
        self.persons.push(Person {
            id,
            given_name: given,
            middle_name: middle,
            family_name: family,
            previous_family_name,
            birth_date: dob,
            sex,
            email,
            previous_email,
            mobile_phone: mobile,
            home_phone: home,
            address,
            household: household.map(|(h, ..)| h),
            twin_of: None,
            records: Vec::new(),
        });
        id
    }

    /// An adult, maybe a partner, and children (maybe twins) sharing an address and often an
    /// email or phone.
    fn generate_household(&mut self, max_size: usize) {
        self.households += 1;
        let household = self.households;
        self.generate_single(None);
        let head_index = self.persons.len() - 1;
        self.persons[head_index].household = Some(household);
        if self.persons[head_index].home_phone.is_none() && self.rng.gen_bool(0.5) {
            let codes = CITIES[self.persons[head_index].address.city].area_codes;
            self.persons[head_index].home_phone = Some(phone_digits(&mut self.rng, codes));
        }
        let head = self.persons[head_index].clone();
        let head_age = age_on(head.birth_date, self.config.now.date_naive());
        let size = self.rng.gen_range(2..=max_size.max(2));
        let mut members = 1;
        if self.rng.gen_bool(0.6) && members < size {
            let lo = (head_age - 6).max(18);
            self.generate_single(Some((household, &head, lo, (head_age + 6).max(lo))));
            let i = self.persons.len() - 1;
            if self.rng.gen_bool(0.2) {
                self.persons[i].email = head.email.clone();
            }
            members += 1;
        }
        let kid_max = (head_age - 18).clamp(0, 17);
        let mut twins_done = false;
        while members < size {
            let kid = self.generate_single(Some((household, &head, 0, kid_max)));
            let i = self.persons.len() - 1;
            self.persons[i].family_name = head.family_name.clone();
            let kid_age = age_on(self.persons[i].birth_date, self.config.now.date_naive());
            if kid_age < 18 && self.rng.gen_bool(0.6) {
                self.persons[i].email = head.email.clone();
                self.persons[i].previous_email = None;
            }
            if kid_age < 13 && self.rng.gen_bool(0.7) {
                self.persons[i].mobile_phone = head.mobile_phone.clone();
            }
            members += 1;
            if !twins_done
                && members < size
                && self.rng.gen_bool(self.config.twin_share.clamp(0.0, 1.0))
            {
                twins_done = true;
                let first = self.persons[i].clone();
                let twin = self.generate_single(Some((household, &head, 0, 0)));
                let j = self.persons.len() - 1;
                let mut given = self.persons[j].given_name.clone();
                while given == first.given_name {
                    given = self.random_given(self.persons[j].sex).to_string();
                }
                let p = &mut self.persons[j];
                p.given_name = given;
                p.family_name = first.family_name.clone();
                p.birth_date = first.birth_date;
                p.email = if self.rng.gen_bool(0.5) {
                    first.email.clone()
                } else {
                    p.email.clone()
                };
                p.twin_of = Some(kid);
                self.persons[i].twin_of = Some(twin);
                members += 1;
            }
        }
    }

    /// Applies per-record noise to a person, for one system.
    fn view(&mut self, person: PersonId, system: SourceKind, created_at: DateTime<Utc>) -> View {
        let p = self.persons[(person.0 - 1) as usize].clone();
        let n = self.config.noise.clone();
        let rng = &mut self.rng;
        let mut tags = Vec::new();
        let mut first = p.given_name.clone();
        let mut legal_first = None;
        if let Some(g) = GIVEN_NAMES.iter().find(|g| g.name == p.given_name) {
            if !g.nicknames.is_empty() && rng.gen_bool(n.nickname) {
                first = g.nicknames.choose(rng).unwrap().to_string();
                if rng.gen_bool(0.6) {
                    legal_first = Some(p.given_name.clone());
                    tags.push(Perturbation::NicknameWithLegal);
                } else {
                    tags.push(Perturbation::Nickname);
                }
            }
        }
        let mut family = match &p.previous_family_name {
            Some(old) if rng.gen_bool(n.stale_value) => {
                tags.push(Perturbation::StaleSurname);
                old.clone()
            }
            _ => p.family_name.clone(),
        };
        if is_compound(&family) && rng.gen_bool(n.partial_surname) {
            family = partial_surname(rng, &family);
            tags.push(Perturbation::PartialSurname);
        }
        let accent_p = match system {
            SourceKind::Healthie => n.accent_loss / 5.0,
            _ => n.accent_loss,
        };
        if rng.gen_bool(accent_p) {
            if strip_accents(&first) != first || strip_accents(&family) != family {
                tags.push(Perturbation::AccentLoss);
            }
            first = strip_accents(&first);
            family = strip_accents(&family);
            legal_first = legal_first.map(|l| strip_accents(&l));
        }
        if rng.gen_bool(n.typo) {
            if rng.gen_bool(0.5) {
                first = typo(rng, &first);
                tags.push(Perturbation::GivenTypo);
            } else {
                family = typo(rng, &family);
                tags.push(Perturbation::FamilyTypo);
            }
        }
        if rng.gen_bool(n.upper_case) {
            first = first.to_uppercase();
            family = family.to_uppercase();
            tags.push(Perturbation::UpperCase);
        }
        let mut dob = Some(p.birth_date);
        if rng.gen_bool(n.missing_field) {
            dob = None;
            tags.push(Perturbation::MissingBirthDate);
        } else if rng.gen_bool(n.placeholder / 2.0) {
            dob = NaiveDate::from_ymd_opt(PLACEHOLDER_DOB.0, PLACEHOLDER_DOB.1, PLACEHOLDER_DOB.2);
            tags.push(Perturbation::PlaceholderBirthDate);
        } else if p.birth_date.day() <= 12
            && p.birth_date.day() != p.birth_date.month()
            && rng.gen_bool(n.swapped_dob)
        {
            dob = NaiveDate::from_ymd_opt(
                p.birth_date.year(),
                p.birth_date.day(),
                p.birth_date.month(),
            );
            tags.push(Perturbation::SwappedDayMonth);
        } else if rng.gen_bool(n.dob_off_by_one) {
            dob = Some(p.birth_date + Duration::days(if rng.gen_bool(0.5) { 1 } else { -1 }));
            tags.push(Perturbation::BirthDateOffByOne);
        }
        let mut email = match &p.previous_email {
            Some(old) if rng.gen_bool(n.stale_value) => {
                tags.push(Perturbation::StaleEmail);
                Some(old.clone())
            }
            _ => p.email.clone(),
        };
        if rng.gen_bool(n.missing_field) {
            if email.is_some() {
                tags.push(Perturbation::MissingEmail);
            }
            email = None;
        } else if rng.gen_bool(n.placeholder) {
            email = Some(PLACEHOLDER_EMAILS.choose(rng).unwrap().to_string());
            tags.push(Perturbation::PlaceholderEmail);
        } else if let Some(e) = &email {
            if rng.gen_bool(n.email_case) {
                email = Some(random_case(rng, e));
                tags.push(Perturbation::EmailCase);
            }
        }
        let mut mobile = p.mobile_phone.clone();
        if rng.gen_bool(n.missing_field) {
            if mobile.is_some() {
                tags.push(Perturbation::MissingMobile);
            }
            mobile = None;
        } else if rng.gen_bool(n.placeholder / 2.0) {
            mobile = Some(PLACEHOLDER_PHONE.to_string());
            tags.push(Perturbation::PlaceholderMobile);
        }
        let home = p.home_phone.clone().filter(|_| !rng.gen_bool(0.3));
        let address = (!rng.gen_bool(n.missing_field * 1.5))
            .then(|| render_address(rng, &p.address, n != Noise::none()));
        if address.is_none() {
            tags.push(Perturbation::MissingAddress);
        }
        let sex = (!rng.gen_bool(n.missing_field)).then_some(p.sex);
        if sex.is_none() {
            tags.push(Perturbation::MissingSex);
        }
        let archived = rng.gen_bool(self.config.archived_share.clamp(0.0, 1.0));
        let age_days = (self.config.now - created_at).num_seconds().max(1);
        let updated_at = created_at + Duration::seconds(rng.gen_range(0..age_days));
        // Noise added later draws from its own stream (see `extra_rng`).
        if self.extra_rng.gen_bool(n.swapped_names.clamp(0.0, 1.0)) {
            std::mem::swap(&mut first, &mut family);
            legal_first = None;
            tags.push(Perturbation::SwappedNames);
        }
        View {
            first,
            legal_first,
            middle: p.middle_name.clone(),
            family,
            dob,
            sex,
            email,
            mobile,
            home,
            address,
            archived,
            created_at,
            updated_at: updated_at.min(self.config.now),
            timezone: CITIES[p.address.city].timezone,
            perturbations: tags,
        }
    }

    /// Healthie id of some record of this person (for cross-system ids), or a family member's
    /// when the id is deliberately wrong.
    fn cross_healthie_id(&mut self, person: PersonId) -> Option<String> {
        if !self
            .rng
            .gen_bool(self.config.cross_id_share.clamp(0.0, 1.0))
        {
            return None;
        }
        let p = &self.persons[(person.0 - 1) as usize];
        let mut target = p.id;
        if self
            .rng
            .gen_bool(self.config.wrong_cross_id_share.clamp(0.0, 1.0))
        {
            if let Some(h) = p.household {
                let others: Vec<PersonId> = self
                    .persons
                    .iter()
                    .filter(|o| o.household == Some(h) && o.id != p.id)
                    .map(|o| o.id)
                    .collect();
                if let Some(o) = others.choose(&mut self.rng) {
                    target = *o;
                }
            }
        }
        self.persons[(target.0 - 1) as usize]
            .records
            .iter()
            .find(|k| k.source == SourceKind::Healthie)
            .map(|k| k.id.to_string())
    }

    fn create_record(
        &mut self,
        person: PersonId,
        system: SourceKind,
        created_at: DateTime<Utc>,
        fresh: bool,
    ) -> SourceKey {
        let mut view = self.view(person, system, created_at);
        if fresh {
            view.archived = false;
            view.updated_at = created_at;
        }
        let key = match system {
            SourceKind::Healthie => {
                self.next_healthie_id += self.rng.gen_range(1..40);
                let id = self.next_healthie_id.to_string();
                let json = self.healthie_json(&id, &view);
                self.healthie.push(id.clone(), json);
                SourceKey::new(SourceKind::Healthie, id)
            }
            SourceKind::Intakeq => {
                self.next_intakeq_id += self.rng.gen_range(1..3);
                let id = self.next_intakeq_id;
                let json = self.intakeq_json(person, id, &view);
                self.intakeq.push(id.to_string(), json);
                SourceKey::new(SourceKind::Intakeq, id.to_string())
            }
            SourceKind::Hint => {
                let id = loop {
                    let id = format!("pat-{}", alnum(&mut self.rng, 12));
                    if self.hint.get(&id).is_none() {
                        break id;
                    }
                };
                let json = self.hint_json(person, &id, &view);
                self.hint.push(id.clone(), json);
                SourceKey::new(SourceKind::Hint, id)
            }
        };
        self.persons[(person.0 - 1) as usize]
            .records
            .push(key.clone());
        self.truth.insert(key.clone(), person);
        self.perturbations.insert(key.clone(), view.perturbations);
        self.version += 1;
        key
    }

    fn healthie_location(&mut self, user_id: &str, a: &AddressView) -> Value {
        self.next_location_id += self.rng.gen_range(1..25);
        let oneline = match &a.line2 {
            Some(l2) => format!("{}, {l2}, {}, {} {}", a.line1, a.city, a.state, a.zip),
            None => format!("{}, {}, {} {}", a.line1, a.city, a.state, a.zip),
        };
        json!({
            "id": self.next_location_id.to_string(),
            "name": null,
            "line1": a.line1,
            "line2": a.line2,
            "city": a.city,
            "state": a.state,
            "zip": a.zip,
            "country": "US",
            "to_oneline": oneline,
            "user_id": user_id,
            "npi": null,
            "other_id": null,
            "other_id_qual": null,
            "place_of_service_id": null,
        })
    }

    fn healthie_json(&mut self, id: &str, v: &View) -> Value {
        let rng = &mut self.rng;
        let phone_style = pick_style(rng, [3, 0, 0, 5, 2]);
        let phone = v.mobile.as_ref().map(|d| format_phone(d, phone_style));
        let additional = v.home.as_ref().map(|d| format_phone(d, phone_style));
        let adult = v
            .dob
            .is_some_and(|d| age_on(d, self.config.now.date_naive()) >= 18);
        let rng = &mut self.rng;
        let gender = v
            .sex
            .map(|s| match (s, if adult { rng.gen_range(0..6) } else { 2 }) {
                (Sex::Female, 0) => "female",
                (Sex::Female, 1) => "Woman",
                (Sex::Female, _) => "Female",
                (Sex::Male, 0) => "male",
                (Sex::Male, 1) => "Man",
                (Sex::Male, _) => "Male",
            });
        let gender_identity = v
            .sex
            .filter(|_| adult && rng.gen_bool(0.4))
            .map(|s| match s {
                Sex::Female => "Woman",
                Sex::Male => "Man",
            });
        let pronouns = v.sex.filter(|_| rng.gen_bool(0.2)).map(|s| match s {
            Sex::Female => "she/her",
            Sex::Male => "he/him",
        });
        let record_identifier = rng
            .gen_bool(0.25)
            .then(|| format!("MRN-{:06}", rng.gen_range(1..999_999)));
        let dietitian = *HEALTHIE_PROVIDER_IDS.choose(rng).unwrap();
        let user_group = rng.gen_bool(0.3).then(|| {
            if rng.gen_bool(0.5) {
                ("2231", "Weight Management")
            } else {
                ("2240", "Diabetes Prevention")
            }
        });
        let language = if rng.gen_bool(0.5) {
            Value::Null
        } else if rng.gen_bool(0.85) {
            json!("English")
        } else {
            json!("Spanish")
        };
        let metadata = match rng.gen_range(0..4) {
            0 => Value::Null,
            1 => json!("{}"),
            2 => json!(format!(
                r#"{{"source":"import","legacy_id":"{}"}}"#,
                rng.gen_range(1000..99999)
            )),
            _ => json!(r#"{"referral":"website"}"#),
        };
        let with_policy = rng.gen_bool(0.35);
        let location = v
            .address
            .as_ref()
            .map(|a| self.healthie_location(id, a))
            .unwrap_or(Value::Null);
        let locations = if location.is_null() {
            json!([])
        } else {
            json!([location.clone()])
        };
        let policies = if with_policy {
            self.next_policy_id += self.rng.gen_range(1..9);
            let (payer, payer_id) = *PAYERS.choose(&mut self.rng).unwrap();
            json!([{
                "id": self.next_policy_id.to_string(),
                "name": payer,
                "num": format!("{}{:08}", alnum(&mut self.rng, 3).to_uppercase(), self.rng.gen_range(0..99_999_999)),
                "group_num": format!("{:06}", self.rng.gen_range(0..999_999)),
                "priority_type": "Primary",
                "holder_relationship": "Self",
                "holder_first": v.first,
                "holder_last": v.family,
                "holder_dob": v.dob.map(|d| d.to_string()),
                "holder_gender": sex_word(v.sex),
                "effective_start": healthie_time(v.created_at),
                "effective_end": null,
                "created_at": healthie_time(v.created_at),
                "updated_at": healthie_time(v.created_at),
                "type_string": "Primary",
                "user_id": id,
                "insurance_plan_id": payer_id,
                "insurance_plan": {"id": payer_id, "payer_name": payer, "payer_id": payer_id, "name_and_id": format!("{payer} ({payer_id})")},
            }])
        } else {
            json!([])
        };
        let primary_policy = policies.get(0).cloned().unwrap_or(Value::Null);
        let now = self.config.now.date_naive();
        let last_initial = v
            .family
            .chars()
            .next()
            .map(|c| format!("{c}."))
            .unwrap_or_default();
        let full_legal = format!(
            "{} {}",
            v.legal_first.as_deref().unwrap_or(&v.first),
            v.family
        );
        let head = json!({
            "id": id,
            "shard_aware_id": id,
            "first_name": v.first,
            "last_name": v.family,
            "legal_name": v.legal_first,
            "full_name": format!("{} {}", v.first, v.family),
            "name": format!("{} {}", v.first, v.family),
            "full_legal_name": full_legal,
            "first_name_last_initial": format!("{} {last_initial}", v.first),
            "dob": v.dob.map(|d| d.to_string()),
            "age": v.dob.map(|d| age_on(d, now)),
            "gender": gender,
            "gender_identity": gender_identity,
            "sex": sex_word(v.sex),
            "pronouns": pronouns,
            "email": v.email,
            "skipped_email": v.email.is_none(),
            "phone_number": phone,
            "additional_phone_number": additional,
            "record_identifier": record_identifier,
            "additional_record_identifier": null,
        });
        let rest = json!({
            "active": !v.archived,
            "archived_at": v.archived.then(|| healthie_time(v.updated_at)),
            "is_patient": true,
            "created_at": healthie_time(v.created_at),
            "updated_at": healthie_time(v.updated_at),
            "timezone": v.timezone,
            "dietitian_id": dietitian,
            "other_provider_ids": [],
            "user_group_id": user_group.map(|g| g.0),
            "group_name": user_group.map(|g| g.1),
            "preferred_language": language,
            "metadata": metadata,
            "organization_id": "100400",
            "auto_charge_enabled": false,
            "location": location,
            "locations": locations,
            "policies": policies,
            "primary_insurance_policy": primary_policy,
            "active_tags": [],
            "last_sign_in_at": null,
        });
        merge_objects(head, rest)
    }

    /// IntakeQ's `DateOfBirth`: the practice's local midnight as epoch milliseconds, so not a
    /// UTC midnight (04:00Z or 05:00Z for US Eastern); a few fall on the previous UTC day.
    fn intakeq_dob(&mut self, dob: NaiveDate) -> i64 {
        let midnight_utc = dob.and_hms_opt(0, 0, 0).unwrap().and_utc();
        if self
            .rng
            .gen_bool(self.config.intakeq_dob_previous_day_share.clamp(0.0, 1.0))
        {
            return epoch_ms(midnight_utc - Duration::hours(1));
        }
        let offset = us_offset(NY, midnight_utc + Duration::hours(5));
        epoch_ms(midnight_utc - Duration::seconds(offset.local_minus_utc().into()))
    }

    /// For a minor, the IntakeQ `ClientId` of the household's first adult, if they have one yet.
    fn intakeq_parent(&self, person: PersonId) -> Option<u64> {
        let i = (person.0 - 1) as usize;
        let p = &self.persons[i];
        let household = p.household?;
        if age_on(p.birth_date, self.config.now.date_naive()) >= 18 {
            return None;
        }
        let head = self.persons[..i]
            .iter()
            .rev()
            .take_while(|o| o.household == Some(household))
            .last()?;
        head.records
            .iter()
            .find(|k| k.source == SourceKind::Intakeq)
            .and_then(|k| k.id.as_str().parse().ok())
    }

    fn intakeq_json(&mut self, person: PersonId, client_id: u64, v: &View) -> Value {
        let external = self.cross_healthie_id(person);
        let parent = self.intakeq_parent(person);
        let dob = v.dob.map(|d| self.intakeq_dob(d));
        let rng = &mut self.rng;
        let style = pick_style(rng, [5, 3, 1, 1, 0]);
        let phone = v
            .mobile
            .as_ref()
            .or(v.home.as_ref())
            .map(|d| format_phone(d, style));
        let mobile = v.mobile.as_ref().map(|d| format_phone(d, style));
        let home = v.home.as_ref().map(|d| format_phone(d, style));
        let name = format!("{} {}", v.first, v.family);
        let (street, unit, city, state, state_short, zip, full_address, country) = match &v.address
        {
            Some(a) => (
                Some(a.line1.clone()),
                a.line2.clone(),
                Some(a.city.clone()),
                Some(a.state_name.clone()),
                Some(a.state.clone()),
                Some(a.zip.clone()),
                Some(match &a.line2 {
                    Some(u) => format!("{} {u}, {}, {} {}", a.line1, a.city, a.state, a.zip),
                    None => format!("{}, {}, {} {}", a.line1, a.city, a.state, a.zip),
                }),
                Some("USA".to_string()),
            ),
            None => (None, None, None, None, None, None, None, None),
        };
        let practitioner = *INTAKEQ_PRACTITIONER_IDS.choose(rng).unwrap();
        let last_activity = v.updated_at - Duration::minutes(rng.gen_range(0..600));
        let billing = rng.gen_range(0..3);
        let guid = uuid_from(rng);
        let tags: Vec<&str> = match rng.gen_range(0..6) {
            0 => vec!["New Client"],
            1 => vec!["Telehealth"],
            _ => vec![],
        };
        let profile = json!({
            "ClientId": client_id,
            "Guid": guid,
            "Name": name,
            "FirstName": v.first,
            "MiddleName": v.middle,
            "LastName": v.family,
            "Email": v.email,
            "Phone": phone,
            "DateOfBirth": dob,
            "MaritalStatus": null,
            "Gender": sex_word(v.sex),
            "Tags": tags,
            "Archived": v.archived,
            "HomePhone": home,
            "WorkPhone": null,
            "MobilePhone": mobile,
            "Address": full_address,
            "UnitNumber": unit,
            "StreetAddress": street,
            "City": city,
            "State": state,
            "StateShort": state_short,
            "PostalCode": zip,
            "Country": country,
        });
        let rest = json!({
            "AdditionalInformation": null,
            "BillingType": billing,
            "PrimaryInsuranceCompany": null,
            "PrimaryInsurancePolicyNumber": null,
            "PrimaryInsuranceGroupNumber": null,
            "PrimaryInsuranceHolderName": null,
            "PrimaryInsuranceRelationship": null,
            "PrimaryInsuranceHolderDateOfBirth": null,
            "SecondaryInsuranceCompany": null,
            "SecondaryInsurancePolicyNumber": null,
            "SecondaryInsuranceGroupNumber": null,
            "SecondaryInsuranceHolderName": null,
            "SecondaryInsuranceRelationship": null,
            "SecondaryInsuranceHolderDateOfBirth": null,
            "DateCreated": epoch_ms(v.created_at),
            "LastActivityDate": epoch_ms(last_activity.max(v.created_at)),
            "LastActivityName": "Client Updated",
            "LastUpdateDate": epoch_ms(v.updated_at),
            "PractitionerId": practitioner,
            "ExternalClientId": external,
            "CreditBalance": 0.0,
            "StripeCustomerId": null,
            "SquareCustomerId": null,
            "ParentClientId": parent,
            "LinkedClients": parent.map_or_else(Vec::new, |p| vec![json!({"ClientNumber": p, "RelationshipType": 1})]),
            "CustomFields": [],
        });
        merge_objects(profile, rest)
    }

    fn hint_json(&mut self, person: PersonId, id: &str, v: &View) -> Value {
        let integration_record_id = self
            .cross_healthie_id(person)
            .filter(|id| self.hint_integration_ids.insert(id.clone()));
        let rng = &mut self.rng;
        let mut phones = Vec::new();
        if let Some(m) = &v.mobile {
            let plus = rng.gen_bool(0.1);
            phones.push(json!({
                "number": if plus { format!("+1{m}") } else { m.clone() },
                "type": "mobile",
                "us_formattable": true,
            }));
        }
        if let Some(h) = &v.home {
            phones.push(json!({"number": h, "type": "home", "us_formattable": true}));
        }
        let (first, chosen) = match &v.legal_first {
            Some(legal) => (legal.clone(), Some(v.first.clone())),
            None => (v.first.clone(), None),
        };
        let name = match &v.middle {
            Some(m) => format!("{first} {m} {}", v.family),
            None => format!("{first} {}", v.family),
        };
        let sex = v.sex.map(|s| match s {
            Sex::Female => "female",
            Sex::Male => "male",
        });
        let status = if v.archived {
            *["archived", "inactive"].choose(rng).unwrap()
        } else {
            *["active", "active", "active", "active", "pending"]
                .choose(rng)
                .unwrap()
        };
        let (pract_id, pract_name) = *HINT_PRACTITIONERS.choose(rng).unwrap();
        let a = v.address.as_ref();
        let now = self.config.now.date_naive();
        let head = json!({
            "id": id,
            "address_city": a.map(|a| a.city.clone()),
            "address_country": a.map(|_| "United States"),
            "address_line1": a.map(|a| a.line1.clone()),
            "address_line2": a.and_then(|a| a.line2.clone()),
            "address_state": a.map(|a| a.state.clone()),
            "address_zip": a.map(|a| a.zip.clone()),
            "age": v.dob.map(|d| age_on(d, now)),
            "chosen_first_name": chosen,
            "chosen_last_name": null,
            "chosen_middle_name": null,
            "chosen_suffix": null,
            "chosen_title": null,
            "created_at": hint_time(v.created_at),
            "dob": v.dob.map(|d| d.to_string()),
            "email": v.email,
            "engaged": !v.archived,
            "external_link_id": null,
            "first_name": first,
            "gender": sex,
            "gender_identity": null,
            "gender_other": null,
            "import_id": null,
            "import_source": null,
            "joined_practice_date": v.created_at.date_naive().to_string(),
            "last_engagement_date": null,
            "last_name": v.family,
        });
        let rest = json!({
            "membership_status": status,
            "middle_name": v.middle,
            "name": name,
            "preferred_language": "en",
            "pronouns": null,
            "provider_web_link": format!("https://app.hint.com/patients/{id}"),
            "sex": sex,
            "suffix": null,
            "updated_at": hint_time(v.updated_at),
            "company": null,
            "emergency_contact": null,
            "external_records": [],
            "location": null,
            "memberships": [],
            "membership_members": [],
            "merged_into": null,
            "phones": phones,
            "practitioner": {"id": pract_id, "name": pract_name, "integration_record_id": null},
            "sponsorships": [],
            "ssn": null,
            "integration_error_message": null,
            "integration_last_synced_at": null,
            "integration_record_id": integration_record_id,
            "integration_sync_status": "enabled",
            "integration_web_link": null,
        });
        merge_objects(head, rest)
    }

    // -----------------------------------------------------------------------------------------
    // Read access.

    pub fn config(&self) -> &PopulationConfig {
        &self.config
    }

    /// Bumped by every change; caches keyed on it stay valid while it is unchanged.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The simulated clock: the time of the latest change.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock
    }

    pub fn persons(&self) -> &[Person] {
        &self.persons
    }

    pub fn person(&self, id: PersonId) -> Option<&Person> {
        self.persons.get((id.0 as usize).checked_sub(1)?)
    }

    pub fn table(&self, source: SourceKind) -> &SourceTable {
        match source {
            SourceKind::Healthie => &self.healthie,
            SourceKind::Intakeq => &self.intakeq,
            SourceKind::Hint => &self.hint,
        }
    }

    /// Healthie `User` objects (patients), in creation order. Healthie never deletes.
    pub fn healthie_users(&self) -> impl Iterator<Item = &Value> {
        self.healthie.live().map(|r| &r.json)
    }

    pub fn healthie_user(&self, id: &str) -> Option<&Value> {
        self.healthie.get(id).map(|r| &r.json)
    }

    /// IntakeQ full client profiles (`includeProfile=true` / `/clients/profile/{id}`).
    pub fn intakeq_clients(&self) -> impl Iterator<Item = &Value> {
        self.intakeq.live().map(|r| &r.json)
    }

    pub fn intakeq_client(&self, client_id: u64) -> Option<&Value> {
        self.intakeq
            .get(&client_id.to_string())
            .filter(|r| r.deleted_at.is_none())
            .map(|r| &r.json)
    }

    /// Hint patients (`GET /api/provider/patients/{id}`).
    pub fn hint_patients(&self) -> impl Iterator<Item = &Value> {
        self.hint.live().map(|r| &r.json)
    }

    pub fn hint_patient(&self, id: &str) -> Option<&Value> {
        self.hint
            .get(id)
            .filter(|r| r.deleted_at.is_none())
            .map(|r| &r.json)
    }

    /// Ground truth: the person behind every record ever created.
    pub fn ground_truth(&self) -> &BTreeMap<SourceKey, PersonId> {
        &self.truth
    }

    /// The differences the generator gave a record (empty for clean copies).
    pub fn perturbations(&self, key: &SourceKey) -> &[Perturbation] {
        self.perturbations.get(key).map_or(&[], Vec::as_slice)
    }

    pub fn person_of(&self, key: &SourceKey) -> Option<PersonId> {
        self.truth.get(key).copied()
    }

    /// Every unordered pair of records of the same person, each as `(a, b)` with `a < b`.
    pub fn ground_truth_pairs(&self) -> BTreeSet<(SourceKey, SourceKey)> {
        let mut pairs = BTreeSet::new();
        for p in &self.persons {
            let mut keys = p.records.clone();
            keys.sort();
            for i in 0..keys.len() {
                for j in i + 1..keys.len() {
                    pairs.insert((keys[i].clone(), keys[j].clone()));
                }
            }
        }
        pairs
    }

    /// Scores predicted same-person pairs (any order inside a pair) against the ground truth.
    pub fn score_pairs<I>(&self, predicted: I) -> PairScores
    where
        I: IntoIterator<Item = (SourceKey, SourceKey)>,
    {
        let truth = self.ground_truth_pairs();
        let predicted: BTreeSet<(SourceKey, SourceKey)> = predicted
            .into_iter()
            .filter(|(a, b)| a != b)
            .map(|(a, b)| if a < b { (a, b) } else { (b, a) })
            .collect();
        let tp = predicted.intersection(&truth).count();
        let fp = predicted.len() - tp;
        let fn_ = truth.len() - tp;
        let precision = if predicted.is_empty() {
            1.0
        } else {
            tp as f64 / predicted.len() as f64
        };
        let recall = if truth.is_empty() {
            1.0
        } else {
            tp as f64 / truth.len() as f64
        };
        let f1 = if precision + recall == 0.0 {
            0.0
        } else {
            2.0 * precision * recall / (precision + recall)
        };
        PairScores {
            true_positives: tp,
            false_positives: fp,
            false_negatives: fn_,
            precision,
            recall,
            f1,
        }
    }

    /// Same-person pairs implied by a clustering (`record -> cluster label`), for `score_pairs`.
    pub fn pairs_from_clusters<L: Ord + Clone>(
        assignments: impl IntoIterator<Item = (SourceKey, L)>,
    ) -> Vec<(SourceKey, SourceKey)> {
        let mut clusters: BTreeMap<L, Vec<SourceKey>> = BTreeMap::new();
        for (key, label) in assignments {
            clusters.entry(label).or_default().push(key);
        }
        let mut pairs = Vec::new();
        for keys in clusters.values() {
            for i in 0..keys.len() {
                for j in i + 1..keys.len() {
                    pairs.push((keys[i].clone(), keys[j].clone()));
                }
            }
        }
        pairs
    }

    // -----------------------------------------------------------------------------------------
    // Mutations. Each advances the simulated clock and bumps the version.

    /// Moves the simulated clock forward.
    pub fn advance_clock(&mut self, by: Duration) {
        self.clock += by.max(Duration::zero());
    }

    fn tick(&mut self) -> DateTime<Utc> {
        self.clock += Duration::seconds(self.rng.gen_range(1..90));
        self.version += 1;
        self.clock
    }

    /// Changes one or two fields of a Healthie user and bumps `updated_at`. Returns the changed
    /// field names as a `patient.updated` webhook lists them (never `updated_at`).
    pub fn touch_healthie(&mut self, id: &str) -> Option<Vec<String>> {
        self.healthie.get(id)?;
        let at = self.tick();
        let choice = self.rng.gen_range(0..6);
        let phone = phone_digits(&mut self.rng, &[617, 312, 415, 206, 512]);
        let local = alnum(&mut self.rng, 6).to_lowercase();
        let rec = self.healthie.get_mut(id)?;
        let user = rec.json.as_object_mut()?;
        let changed: Vec<&str> = match choice {
            0 => {
                user.insert("phone_number".into(), json!(format_phone(&phone, 3)));
                vec!["phone_number"]
            }
            1 => {
                // A new address at the same provider, or a first one for a patient without email.
                let new = match user.get("email").and_then(Value::as_str) {
                    Some(old) => match old.to_lowercase().split_once('@') {
                        Some((l, d)) => format!("{l}.{local}@{d}"),
                        None => format!("{local}@gmail.com"),
                    },
                    None => format!("{local}@gmail.com"),
                };
                user.insert("email".into(), json!(new));
                user.insert("skipped_email".into(), json!(false));
                vec!["email"]
            }
            2 => {
                user.insert(
                    "additional_phone_number".into(),
                    json!(format_phone(&phone, 0)),
                );
                vec!["additional_phone_number"]
            }
            3 => {
                let lang = if user.get("preferred_language") == Some(&json!("Spanish")) {
                    "English"
                } else {
                    "Spanish"
                };
                user.insert("preferred_language".into(), json!(lang));
                vec!["preferred_language"]
            }
            4 => {
                user.insert(
                    "metadata".into(),
                    json!(format!(r#"{{"touched":"{local}"}}"#)),
                );
                vec!["metadata"]
            }
            _ => {
                let first = user
                    .get("first_name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let last = user
                    .get("last_name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let fixed = strip_accents(&first);
                let fixed = if fixed == first {
                    let mut c = first.to_lowercase().chars().collect::<Vec<_>>();
                    if let Some(f) = c.first_mut() {
                        *f = f.to_ascii_uppercase();
                    }
                    c.into_iter().collect()
                } else {
                    fixed
                };
                user.insert("first_name".into(), json!(fixed));
                user.insert("full_name".into(), json!(format!("{fixed} {last}")));
                user.insert("name".into(), json!(format!("{fixed} {last}")));
                vec!["first_name"]
            }
        };
        user.insert("updated_at".into(), json!(healthie_time(at)));
        Some(changed.into_iter().map(String::from).collect())
    }

    /// Archives a Healthie user (`active: false`, `archived_at` set).
    pub fn archive_healthie(&mut self, id: &str) -> bool {
        if self.healthie.get(id).is_none() {
            return false;
        }
        let at = self.tick();
        let user = &mut self.healthie.get_mut(id).expect("checked").json;
        user["active"] = json!(false);
        user["archived_at"] = json!(healthie_time(at));
        user["updated_at"] = json!(healthie_time(at));
        true
    }

    /// Gives a Healthie user a new address (the `location.updated` case). Returns the location id.
    pub fn move_healthie(&mut self, id: &str) -> Option<String> {
        self.healthie.get(id)?;
        let at = self.tick();
        let address = self.random_address();
        let view = render_address(&mut self.rng, &address, false);
        let existing = self.healthie.get(id)?.json["location"]["id"]
            .as_str()
            .map(String::from);
        let mut location = self.healthie_location(id, &view);
        if let Some(existing) = existing {
            location["id"] = json!(existing);
        }
        let location_id = location["id"].as_str().unwrap_or_default().to_string();
        let user = &mut self.healthie.get_mut(id)?.json;
        user["location"] = location.clone();
        user["locations"] = json!([location]);
        user["updated_at"] = json!(healthie_time(at));
        Some(location_id)
    }

    /// Applies a tag to a Healthie user (`applied_tag.created`). Returns the tag id.
    pub fn tag_healthie(&mut self, id: &str) -> Option<String> {
        self.healthie.get(id)?;
        let at = self.tick();
        let (tag_id, name) = *[
            ("7781", "VIP"),
            ("7782", "Needs follow-up"),
            ("7790", "Insurance"),
        ]
        .choose(&mut self.rng)
        .unwrap();
        let user = &mut self.healthie.get_mut(id)?.json;
        let tags = user["active_tags"].as_array_mut()?;
        if !tags.iter().any(|t| t["id"] == json!(tag_id)) {
            tags.push(json!({
                "id": tag_id,
                "name": name,
                "created_at": "2023-01-10T09:00:00-05:00",
                "updated_at": "2023-01-10T09:00:00-05:00",
            }));
        }
        user["updated_at"] = json!(healthie_time(at));
        Some(tag_id.to_string())
    }

    /// `mergeClients`: the destination keeps its profile; the source is archived. What Healthie
    /// does to the source is undocumented (reference §4.2); archiving it is this sandbox's guess.
    pub fn merge_healthie(&mut self, source: &str, destination: &str) -> bool {
        if source == destination
            || self.healthie.get(source).is_none()
            || self.healthie.get(destination).is_none()
        {
            return false;
        }
        self.archive_healthie(source);
        let at = self.tick();
        self.healthie.get_mut(destination).expect("checked").json["updated_at"] =
            json!(healthie_time(at));
        true
    }

    /// Changes an IntakeQ client's phone and bumps `LastUpdateDate`.
    pub fn touch_intakeq(&mut self, client_id: u64) -> bool {
        let id = client_id.to_string();
        if self.intakeq.get(&id).is_none() {
            return false;
        }
        let at = self.tick();
        let phone = format_phone(&phone_digits(&mut self.rng, &[617, 212, 404]), 0);
        let c = &mut self.intakeq.get_mut(&id).expect("checked").json;
        c["Phone"] = json!(phone);
        c["MobilePhone"] = json!(phone);
        c["LastUpdateDate"] = json!(epoch_ms(at));
        c["LastActivityDate"] = json!(epoch_ms(at));
        true
    }

    /// Deletes an IntakeQ client (visible to `deletedOnly=true` for about 10 days upstream).
    pub fn delete_intakeq(&mut self, client_id: u64) -> bool {
        let at = self.tick();
        match self.intakeq.get_mut(&client_id.to_string()) {
            Some(r) if r.deleted_at.is_none() => {
                r.deleted_at = Some(at);
                true
            }
            _ => false,
        }
    }

    /// Changes a Hint patient's mobile number and bumps `updated_at`.
    pub fn touch_hint(&mut self, id: &str) -> bool {
        if self.hint.get(id).is_none() {
            return false;
        }
        let at = self.tick();
        let number = phone_digits(&mut self.rng, &[415, 510, 206]);
        let p = &mut self.hint.get_mut(id).expect("checked").json;
        p["phones"] = json!([{"number": number, "type": "mobile", "us_formattable": true}]);
        p["updated_at"] = json!(hint_time(at));
        true
    }

    /// Merges Hint patient `source` into `destination`: `merged_into` points at the survivor.
    pub fn merge_hint(&mut self, source: &str, destination: &str) -> bool {
        let Some(dest) = self.hint.get(destination) else {
            return false;
        };
        let target = json!({"id": destination, "name": dest.json["name"].clone()});
        if source == destination || self.hint.get(source).is_none() {
            return false;
        }
        let at = self.tick();
        let p = &mut self.hint.get_mut(source).expect("checked").json;
        p["merged_into"] = target;
        p["membership_status"] = json!("inactive");
        p["updated_at"] = json!(hint_time(at));
        true
    }

    /// Deletes a Hint patient (`patient.destroyed`).
    pub fn delete_hint(&mut self, id: &str) -> bool {
        let at = self.tick();
        match self.hint.get_mut(id) {
            Some(r) if r.deleted_at.is_none() => {
                r.deleted_at = Some(at);
                true
            }
            _ => false,
        }
    }

    /// Creates a new person with fresh (active) records in the given systems.
    pub fn create_person(&mut self, systems: &[SourceKind]) -> NewPerson {
        let person = self.generate_single(None);
        let mut records = Vec::new();
        let mut ordered: Vec<SourceKind> = systems.to_vec();
        ordered.sort();
        ordered.dedup();
        for system in ordered {
            let at = self.tick();
            records.push(self.create_record(person, system, at, true));
        }
        NewPerson { person, records }
    }

    /// A second record of the same person in the same system (a registration duplicate).
    pub fn add_duplicate(&mut self, of: &SourceKey) -> Option<SourceKey> {
        let person = self.person_of(of)?;
        let at = self.tick();
        Some(self.create_record(person, of.source, at, true))
    }

    /// Systems a new person joins, drawn from the membership shares.
    pub fn draw_systems(&mut self) -> Vec<SourceKind> {
        let membership = self.config.membership.clone();
        membership.draw(&mut self.rng)
    }

    /// The population's own random source, for callers that want decisions tied to its seed.
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }
}

/// IntakeQ's thin list row (`GET /clients` without `includeProfile`): note `ClientNumber`.
pub fn intakeq_summary(profile: &Value) -> Value {
    json!({
        "ClientNumber": profile["ClientId"],
        "Name": profile["Name"],
        "Email": profile["Email"],
        "Phone": profile["Phone"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(seed: u64) -> Population {
        Population::generate(&PopulationConfig {
            people: 400,
            seed,
            ..PopulationConfig::default()
        })
    }

    fn dump(p: &Population) -> String {
        let mut out = String::new();
        for kind in SourceKind::ALL {
            for r in p.table(kind).all() {
                out.push_str(&r.json.to_string());
            }
        }
        out
    }

    #[test]
    fn population_is_deterministic_for_a_seed() {
        let (a, b) = (small(7), small(7));
        assert_eq!(dump(&a), dump(&b));
        assert_eq!(a.ground_truth(), b.ground_truth());
        assert_ne!(dump(&a), dump(&small(8)));
    }

    #[test]
    fn ground_truth_covers_every_record_and_every_person_has_one() {
        let p = small(3);
        assert_eq!(p.persons().len(), 400);
        let records: usize = SourceKind::ALL.iter().map(|k| p.table(*k).len()).sum();
        assert_eq!(p.ground_truth().len(), records);
        for kind in SourceKind::ALL {
            for r in p.table(kind).all() {
                let key = SourceKey::new(kind, r.id.clone());
                let person = p.person_of(&key).expect("every record has a person");
                assert!(p.person(person).unwrap().records.contains(&key));
            }
        }
        assert!(p.persons().iter().all(|x| !x.records.is_empty()));
    }

    #[test]
    fn many_people_are_in_two_or_three_systems() {
        let p = small(11);
        let multi = p
            .persons()
            .iter()
            .filter(|x| {
                let systems: BTreeSet<_> = x.records.iter().map(|k| k.source).collect();
                systems.len() >= 2
            })
            .count();
        assert!(multi > 120, "{multi} of 400 in several systems");
        assert!(!p.ground_truth_pairs().is_empty());
    }

    #[test]
    fn twins_share_surname_birth_date_and_address_but_not_given_name() {
        let p = Population::generate(&PopulationConfig {
            people: 1500,
            seed: 13,
            ..PopulationConfig::default()
        });
        let twins: Vec<&Person> = p.persons().iter().filter(|x| x.twin_of.is_some()).collect();
        assert!(!twins.is_empty());
        for t in twins {
            let other = p.person(t.twin_of.unwrap()).unwrap();
            assert_eq!(other.twin_of, Some(t.id));
            assert_eq!(
                (&t.family_name, t.birth_date, &t.address),
                (&other.family_name, other.birth_date, &other.address)
            );
            assert_ne!(t.given_name, other.given_name);
        }
        let shared_email = p
            .persons()
            .iter()
            .filter(|x| x.household.is_some() && x.email.is_some())
            .any(|x| {
                p.persons()
                    .iter()
                    .any(|y| y.id != x.id && y.household == x.household && y.email == x.email)
            });
        assert!(shared_email, "some family shares an email");
    }

    #[test]
    fn wire_shapes_use_each_apis_names_and_formats() {
        let p = small(5);
        let u = p.healthie_users().next().unwrap();
        assert!(u["id"].is_string());
        assert!(
            u["created_at"].as_str().unwrap().len() == 25,
            "{}",
            u["created_at"]
        );
        assert!(u["locations"].is_array() && u["policies"].is_array());
        let c = p.intakeq_clients().next().unwrap();
        assert!(c["ClientId"].is_u64() && c["DateCreated"].is_i64());
        if let Some(dob) = c["DateOfBirth"].as_i64() {
            assert_ne!(dob % 86_400_000, 0, "not a UTC midnight");
        }
        assert!(p.intakeq_clients().any(|c| c["ParentClientId"].is_u64()));
        let ids: Vec<&str> = p
            .hint_patients()
            .filter_map(|h| h["integration_record_id"].as_str())
            .collect();
        assert_eq!(ids.len(), ids.iter().collect::<BTreeSet<_>>().len());
        let h = p.hint_patients().next().unwrap();
        assert!(h["id"].as_str().unwrap().starts_with("pat-"));
        assert!(h["phones"].is_array());
        assert!(h["updated_at"].as_str().unwrap().contains('.'));
    }

    #[test]
    fn touching_a_healthie_user_bumps_updated_at_and_reports_fields() {
        let mut p = small(9);
        let id = p.healthie_users().next().unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let before = p.healthie_user(&id).unwrap().clone();
        let v = p.version();
        let changed = p.touch_healthie(&id).unwrap();
        let after = p.healthie_user(&id).unwrap();
        assert!(!changed.is_empty() && !changed.contains(&"updated_at".to_string()));
        assert_ne!(before["updated_at"], after["updated_at"]);
        assert!(p.version() > v);
        let created = p.create_person(&[SourceKind::Healthie, SourceKind::Hint]);
        assert_eq!(created.records.len(), 2);
        assert_eq!(p.person_of(&created.records[1]), Some(created.person));
    }

    #[test]
    fn scores_are_perfect_for_the_truth_and_lower_for_a_wrong_pair() {
        let p = small(2);
        let truth: Vec<_> = p.ground_truth_pairs().into_iter().collect();
        let s = p.score_pairs(truth.clone());
        assert_eq!((s.precision, s.recall), (1.0, 1.0));
        let keys: Vec<_> = p.ground_truth().keys().cloned().collect();
        let mut wrong = truth;
        wrong.push((keys[0].clone(), keys[keys.len() - 1].clone()));
        assert!(p.score_pairs(wrong).precision < 1.0);
    }

    #[test]
    fn us_offsets_follow_daylight_saving() {
        let winter = Utc.with_ymd_and_hms(2026, 1, 15, 12, 0, 0).unwrap();
        let summer = Utc.with_ymd_and_hms(2026, 7, 15, 12, 0, 0).unwrap();
        assert_eq!(us_offset(NY, winter).local_minus_utc(), -5 * 3600);
        assert_eq!(us_offset(NY, summer).local_minus_utc(), -4 * 3600);
        assert_eq!(us_offset(PHX, summer).local_minus_utc(), -7 * 3600);
        assert_eq!(healthie_time(summer), "2026-07-15T08:00:00-04:00");
        assert_eq!(hint_time(winter), "2026-01-15T04:00:00.000000-08:00");
    }
}
