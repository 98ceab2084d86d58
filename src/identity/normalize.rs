//! Matching-grade normalisation: names, emails, phones, addresses and sex, plus the placeholder
//! values (test emails, 555-01xx numbers, 1900-01-01, "John Doe") that must carry no weight.
//!
//! These forms are for comparing records, not for display: the canonical row keeps names and
//! addresses as a source gave them.

use chrono::{Datelike, NaiveDate};
use deunicode::deunicode;
use phonenumber::Mode;

use crate::model::Address;

/// Region used to read phone numbers written without a country code.
pub const DEFAULT_REGION: &str = "US";

// ---------------------------------------------------------------------------------------------
// Names

/// Honorifics dropped from the front of a given name.
const TITLES: &[&str] = &["mr", "mrs", "ms", "miss", "mx", "dr", "prof", "rev"];
/// Generational and professional suffixes dropped from the end of a family name.
const SUFFIXES: &[&str] = &["jr", "sr", "ii", "iii", "iv", "md", "phd", "dds", "esq"];
/// Surname particles: part of the full name, but not distinctive on their own.
const PARTICLES: &[&str] = &[
    "de", "del", "della", "la", "le", "los", "las", "van", "von", "der", "den", "da", "di", "du",
    "dos", "das", "y", "e", "st", "ter", "ten", "al", "el", "bin", "ibn", "mac",
];

/// Lowercase ASCII word tokens of a name: accents folded (José -> jose), apostrophes dropped
/// (O'Brien -> obrien), every other non-letter splits (Garcia-Lopez -> garcia, lopez).
pub fn name_tokens(s: &str) -> Vec<String> {
    let folded = deunicode(s).to_lowercase();
    let mut tokens = Vec::new();
    let mut cur = String::new();
    for c in folded.chars() {
        if c.is_ascii_alphabetic() {
            cur.push(c);
        } else if matches!(c, '\'' | '`' | '\u{2019}') {
            // Joined, not split: D'Angelo and DAngelo are one token.
        } else if !cur.is_empty() {
            tokens.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        tokens.push(cur);
    }
    tokens
}

/// A given (or preferred) name ready for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GivenName {
    /// The first word ("mary" for "Mary Ann").
    pub first: String,
    /// All words joined ("maryann"); equal to `first` for one-word names.
    pub joined: String,
}

/// Normalizes a given or preferred name; `None` when nothing usable is left.
pub fn given_name(s: &str) -> Option<GivenName> {
    let mut tokens = name_tokens(s);
    if tokens.len() > 1 && TITLES.contains(&tokens[0].as_str()) {
        tokens.remove(0);
    }
    let first = tokens.first()?.clone();
    Some(GivenName {
        joined: tokens.concat(),
        first,
    })
}

/// A family name ready for comparison.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyName {
    /// All words joined, suffixes dropped: "De La Cruz" and "Delacruz" are both "delacruz".
    pub joined: String,
    /// Distinctive words (no particles, at least two letters): "garcia", "lopez".
    pub tokens: Vec<String>,
}

/// Normalizes a family name; `None` when nothing usable is left.
pub fn family_name(s: &str) -> Option<FamilyName> {
    let mut tokens = name_tokens(s);
    while tokens.len() > 1 && SUFFIXES.contains(&tokens[tokens.len() - 1].as_str()) {
        tokens.pop();
    }
    if tokens.is_empty() {
        return None;
    }
    let mut distinct: Vec<String> = tokens
        .iter()
        .filter(|t| t.len() >= 2 && !PARTICLES.contains(&t.as_str()))
        .cloned()
        .collect();
    if distinct.is_empty() {
        distinct = vec![tokens.concat()];
    }
    distinct.dedup();
    Some(FamilyName {
        joined: tokens.concat(),
        tokens: distinct,
    })
}

/// Given names that stand for "no real name". Compared on the joined form.
const PLACEHOLDER_GIVEN: &[&str] = &[
    "unknown",
    "unk",
    "none",
    "na",
    "nn",
    "noname",
    "fnu",
    "test",
    "testpatient",
    "patient",
    "xxx",
    "xx",
    "x",
    "babyboy",
    "babygirl",
    "baby",
    "infant",
    "newborn",
    "anonymous",
    "anon",
    "notgiven",
    "tbd",
];
/// Family names that stand for "no real name".
const PLACEHOLDER_FAMILY: &[&str] = &[
    "unknown",
    "unk",
    "none",
    "na",
    "nn",
    "noname",
    "lnu",
    "test",
    "testpatient",
    "patient",
    "xxx",
    "xx",
    "x",
    "anonymous",
    "anon",
    "notgiven",
    "tbd",
    "dummy",
];

/// Whether a given name is a placeholder ("Unknown", "Test", "Baby Girl").
pub fn is_placeholder_given(s: &str) -> bool {
    given_name(s).is_none_or(|g| PLACEHOLDER_GIVEN.contains(&g.joined.as_str()))
}

/// Whether a family name is a placeholder ("Unknown", "Test").
pub fn is_placeholder_family(s: &str) -> bool {
    family_name(s).is_none_or(|f| PLACEHOLDER_FAMILY.contains(&f.joined.as_str()))
}

/// Whether a full name is a stock placeholder even though each half could be real
/// ("John Doe", "Jane Doe", "Baby Doe", "Richard Roe").
pub fn is_placeholder_full_name(given: &str, family: &str) -> bool {
    let (Some(g), Some(f)) = (given_name(given), family_name(family)) else {
        return false;
    };
    matches!(
        (g.joined.as_str(), f.joined.as_str()),
        ("john" | "jane" | "baby" | "johnny" | "janie", "doe")
            | ("richard" | "jane", "roe")
            | ("test", _)
            | (_, "test")
    )
}

// ---------------------------------------------------------------------------------------------
// Email

/// Trims and lowercases an email; `None` unless it looks like `local@domain.tld`. Nothing else
/// is rewritten: gmail dots and `+tags` are kept, since folding them could merge two people.
pub fn normalize_email(s: &str) -> Option<String> {
    let e = s.trim().to_lowercase();
    let (local, domain) = e.split_once('@')?;
    let ok = !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !e.chars().any(char::is_whitespace);
    ok.then_some(e)
}

/// Local parts (digits and punctuation removed) that mean "no email".
const PLACEHOLDER_EMAIL_LOCAL: &[&str] = &[
    "test",
    "noemail",
    "none",
    "no",
    "na",
    "nomail",
    "noreply",
    "donotreply",
    "donotemail",
    "nobody",
    "null",
    "unknown",
    "email",
    "fake",
    "example",
    "declined",
    "refused",
    "noaddress",
    "patient",
    "noemailprovided",
    "noemailaddress",
    "notprovided",
    "unavailable",
    "optout",
    "noone",
    "nothanks",
    "xxx",
    "x",
    "asdf",
];
/// Domains that are reserved or stand for "no email".
const PLACEHOLDER_EMAIL_DOMAINS: &[&str] = &[
    "example.com",
    "example.org",
    "example.net",
    "test.com",
    "test.org",
    "noemail.com",
    "none.com",
    "nomail.com",
    "no.com",
    "na.com",
    "email.invalid",
    "fake.com",
    "noreply.com",
    "donotreply.com",
    "unknown.com",
    "domain.com",
    "mailinator.com",
];

/// Whether a normalized email is a placeholder (`test@…`, `noemail@…`, `…@example.com`).
pub fn is_placeholder_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return true;
    };
    let alnum: String = local.chars().filter(char::is_ascii_alphanumeric).collect();
    let letters: String = alnum.chars().filter(char::is_ascii_alphabetic).collect();
    let same_char = alnum.len() >= 2 && alnum.bytes().all(|b| b == alnum.as_bytes()[0]);
    alnum.is_empty()
        || same_char
        || PLACEHOLDER_EMAIL_LOCAL.contains(&letters.as_str())
        || PLACEHOLDER_EMAIL_DOMAINS.contains(&domain)
        || [".test", ".example", ".invalid", ".localhost", ".local"]
            .iter()
            .any(|tld| domain.ends_with(tld))
}

// ---------------------------------------------------------------------------------------------
// Phone

/// A phone number in E.164 (`+14155552671`), extension dropped; numbers without a country code
/// are read in `region` (ISO 3166 alpha-2, e.g. `US`). `None` when it is not a valid number.
pub fn phone_e164(raw: &str, region: &str) -> Option<String> {
    // A bulk caller's memo (see [`PhoneMemo`]) answers numbers it has seen in any format.
    if let Some(answer) = MEMO.with(|m| {
        m.borrow()
            .as_ref()
            .and_then(|memo| memo.answer(raw, region))
    }) {
        return answer;
    }
    // Parsing is the costliest step of preparing a record, and the same numbers come back
    // (the records of one person in each system, survivorship, the next resync), often
    // written differently by each system, so answers are remembered per thread: plain inputs
    // by their digits (as [`PhoneMemo`] keys them, packed: about 30 bytes a number, up to
    // [`RECENT_PLAIN`]), others by their text (up to [`RECENT_OTHER`]). The answer depends on
    // these alone.
    thread_local! {
        static RECENT: std::cell::RefCell<Recent> = std::cell::RefCell::new(Recent::default());
    }
    let plain = PhoneMemo::key(raw);
    if let Some(hit) = RECENT.with(|r| r.borrow().get(raw, plain, region)) {
        return hit;
    }
    let answer = parse_e164(raw, region);
    RECENT.with(|r| r.borrow_mut().put(raw, plain, region, &answer));
    answer
}

/// Plain numbers a thread remembers (about 8 MiB).
const RECENT_PLAIN: usize = 1 << 18;
/// Other inputs a thread remembers.
const RECENT_OTHER: usize = 4096;

/// A thread's recent [`phone_e164`] answers for one region.
#[derive(Default)]
struct Recent {
    region: String,
    /// Plain key to packed answer (see [`PhoneMemo::pack`]).
    plain: std::collections::HashMap<u64, u64>,
    other: std::collections::HashMap<String, Option<String>>,
}

impl Recent {
    fn get(&self, raw: &str, plain: Option<u64>, region: &str) -> Option<Option<String>> {
        if region != self.region {
            return None;
        }
        match plain {
            Some(key) => self
                .plain
                .get(&key)
                .map(|&packed| PhoneMemo::unpack(packed)),
            None => self.other.get(raw).cloned(),
        }
    }

    fn put(&mut self, raw: &str, plain: Option<u64>, region: &str, answer: &Option<String>) {
        if region != self.region {
            self.region = region.to_string();
            self.plain.clear();
            self.other.clear();
        }
        match plain.zip(PhoneMemo::pack(answer.as_deref())) {
            Some((key, packed)) => {
                if self.plain.len() >= RECENT_PLAIN {
                    self.plain.clear();
                }
                self.plain.insert(key, packed);
            }
            None => {
                if self.other.len() >= RECENT_OTHER {
                    self.other.clear();
                }
                self.other.insert(raw.to_string(), answer.clone());
            }
        }
    }
}

thread_local! {
    /// The memo [`PhoneMemo::install`] put on this thread, if any.
    static MEMO: std::cell::RefCell<Option<std::sync::Arc<PhoneMemo>>> =
        const { std::cell::RefCell::new(None) };
}

/// Answers of [`phone_e164`] for one region, shared by threads that parse many numbers (a
/// rebuild's load) and kept only while the caller holds it: the same number comes back from
/// several systems, often written differently.
///
/// Only plain inputs are remembered, by their digits and whether they start with `+`: ASCII
/// digits, spaces, `-`, `.`, `(` and `)`, at most 17 digits, and `+` only first. A `+` number
/// with `-`, `.` or parentheses but no space is left out (it may be read as an RFC 3966
/// number, whose country code ends at the first separator). Anything else (letters, so an
/// extension, `#`, `/`, non-ASCII) is parsed as usual. The `phonenumber` crate strips these
/// separators before reading the digits, so a plain input's answer depends on its key alone;
/// a test compares both paths over many formats.
pub struct PhoneMemo {
    region: String,
    /// Key (see [`PhoneMemo::key`]) to answer: 0 for `None`, else the E.164 digits and their
    /// count (see [`PhoneMemo::pack`]).
    answers: std::sync::Mutex<std::collections::HashMap<u64, u64>>,
}

/// A value installed in a thread-local slot; the slot's previous value is put back on drop.
pub struct Installed<T: 'static> {
    slot: &'static std::thread::LocalKey<std::cell::RefCell<Option<std::sync::Arc<T>>>>,
    previous: Option<std::sync::Arc<T>>,
}

impl<T: 'static> Installed<T> {
    fn new(
        slot: &'static std::thread::LocalKey<std::cell::RefCell<Option<std::sync::Arc<T>>>>,
        value: &std::sync::Arc<T>,
    ) -> Self {
        let previous = slot.with(|s| s.borrow_mut().replace(value.clone()));
        Installed { slot, previous }
    }
}

impl<T: 'static> Drop for Installed<T> {
    fn drop(&mut self) {
        let previous = self.previous.take();
        self.slot.with(|s| *s.borrow_mut() = previous);
    }
}

/// Restores a thread's previous memo when dropped.
pub type PhoneMemoGuard = Installed<PhoneMemo>;

impl PhoneMemo {
    /// An empty memo for numbers read in `region` (calls for another region pass it by).
    pub fn new(region: &str) -> std::sync::Arc<Self> {
        std::sync::Arc::new(PhoneMemo {
            region: region.to_string(),
            answers: std::sync::Mutex::new(std::collections::HashMap::new()),
        })
    }

    /// Makes [`phone_e164`] on this thread consult and fill the memo until the guard drops.
    pub fn install(self: &std::sync::Arc<Self>) -> PhoneMemoGuard {
        Installed::new(&MEMO, self)
    }

    /// How many numbers are remembered.
    pub fn len(&self) -> usize {
        self.answers.lock().expect("phone memo lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The answer for a plain input; `None` when the input is not plain or the region differs
    /// (the caller then parses as usual).
    fn answer(&self, raw: &str, region: &str) -> Option<Option<String>> {
        if region != self.region {
            return None;
        }
        let key = Self::key(raw)?;
        if let Some(&packed) = self.answers.lock().expect("phone memo lock").get(&key) {
            return Some(Self::unpack(packed));
        }
        let answer = parse_e164(raw, region);
        if let Some(packed) = Self::pack(answer.as_deref()) {
            self.answers
                .lock()
                .expect("phone memo lock")
                .insert(key, packed);
        }
        Some(answer)
    }

    /// The digits as a number, their count (leading zeros count) and a bit for a leading `+`;
    /// `None` for anything but a plain input.
    fn key(raw: &str) -> Option<u64> {
        let s = raw.trim_matches(|c: char| c.is_ascii_whitespace());
        let (plus, rest) = match s.strip_prefix('+') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (mut value, mut count) = (0u64, 0u64);
        let (mut space, mut other_separator) = (false, false);
        for b in rest.bytes() {
            match b {
                b'0'..=b'9' => {
                    count += 1;
                    if count > 17 {
                        return None;
                    }
                    value = value * 10 + u64::from(b - b'0');
                }
                b' ' => space = true,
                b'-' | b'.' | b'(' | b')' => other_separator = true,
                _ => return None,
            }
        }
        if count == 0 || (plus && other_separator && !space) {
            return None;
        }
        Some(value | (count << 57) | (u64::from(plus) << 62))
    }

    /// `+` and up to 17 digits as their value and count; 0 for `None`; `None` when it does not
    /// fit (then it is not remembered).
    fn pack(answer: Option<&str>) -> Option<u64> {
        let Some(e164) = answer else { return Some(0) };
        let digits = e164.strip_prefix('+')?;
        if digits.is_empty() || digits.len() > 17 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let value: u64 = digits.parse().ok()?;
        Some(value | ((digits.len() as u64) << 57))
    }

    fn unpack(packed: u64) -> Option<String> {
        if packed == 0 {
            return None;
        }
        let count = (packed >> 57) as usize;
        let value = packed & ((1 << 57) - 1);
        Some(format!("+{value:0count$}"))
    }
}

/// Compiled patterns the `phonenumber` crate keeps: its default of 100 is fewer than reading a
/// North American number can use (about 115: the US patterns, then the leading digits of every
/// other `+1` region), so a full cache evicts and compiles patterns again number after number.
const PHONE_PATTERNS_CACHED: usize = 256;

fn parse_e164(raw: &str, region: &str) -> Option<String> {
    static CACHE_SIZE: std::sync::Once = std::sync::Once::new();
    CACHE_SIZE.call_once(|| {
        if let Ok(mut cache) = phonenumber::metadata::DATABASE.cache().lock() {
            cache.set_capacity(PHONE_PATTERNS_CACHED);
        }
    });
    PHONE_DATABASE.with(|db| match db.borrow().as_deref() {
        Some(own) => parse_e164_with(&own.0, raw, region),
        None => parse_e164_with(&phonenumber::metadata::DATABASE, raw, region),
    })
}

fn parse_e164_with(
    database: &phonenumber::metadata::Database,
    raw: &str,
    region: &str,
) -> Option<String> {
    let region = region
        .trim()
        .to_ascii_uppercase()
        .parse::<phonenumber::country::Id>()
        .ok();
    let number = phonenumber::parse_with(database, region, raw).ok()?;
    if !phonenumber::is_valid_with(database, &number) {
        return None;
    }
    Some(
        phonenumber::format_with(database, &number)
            .mode(Mode::E164)
            .to_string(),
    )
}

/// libphonenumber's metadata, the same version as the `phonenumber` crate's built-in copy (see
/// `assets/phonenumber/README.md`).
const PHONE_METADATA: &str = include_str!("../../assets/phonenumber/PhoneNumberMetadata.xml");

/// A phone metadata database of its own: the `phonenumber` crate keeps compiled patterns in one
/// cache behind one lock per database, so threads parsing with the built-in one take turns
/// (two threads together were slower than one). A thread that installs one of these parses
/// with it instead, at the same time as the others, with the same answers. Reading the
/// metadata takes about 0.15 s, so it pays only for many numbers.
pub struct PhoneDatabase(phonenumber::metadata::Database);

/// Restores a thread's previous database when dropped.
pub type PhoneDatabaseGuard = Installed<PhoneDatabase>;

impl PhoneDatabase {
    /// Reads the bundled metadata.
    pub fn new() -> std::sync::Arc<Self> {
        let database = phonenumber::metadata::Database::parse(PHONE_METADATA)
            .expect("the bundled phone metadata reads");
        if let Ok(mut cache) = database.cache().lock() {
            cache.set_capacity(PHONE_PATTERNS_CACHED);
        }
        std::sync::Arc::new(PhoneDatabase(database))
    }

    /// Makes [`phone_e164`] on this thread parse with this database until the guard drops.
    pub fn install(self: &std::sync::Arc<Self>) -> PhoneDatabaseGuard {
        Installed::new(&PHONE_DATABASE, self)
    }
}

thread_local! {
    /// The database [`PhoneDatabase::install`] put on this thread, if any.
    static PHONE_DATABASE: std::cell::RefCell<Option<std::sync::Arc<PhoneDatabase>>> =
        const { std::cell::RefCell::new(None) };
}

/// Whether a phone (raw or E.164) is an obvious placeholder: one repeated digit, a counting
/// run (1234567890), or a North American fictional number (555-01xx, 555-1212).
pub fn is_placeholder_phone(phone: &str) -> bool {
    let digits: String = phone.chars().filter(char::is_ascii_digit).collect();
    if digits.len() < 7 {
        return true;
    }
    // National part: drop the North American country code when present.
    let national = match digits.strip_prefix('1') {
        Some(rest) if digits.len() == 11 => rest,
        _ => digits.as_str(),
    };
    let first = national.as_bytes()[0];
    let counting = [
        "1234567890",
        "0123456789",
        "9876543210",
        "123456789",
        "1234567",
    ];
    if national.bytes().all(|b| b == first) || counting.iter().any(|c| national.ends_with(c)) {
        return true;
    }
    if national.len() == 10 {
        let (exchange, line) = (&national[3..6], &national[6..]);
        if exchange == "555" && (line.starts_with("01") || line == "1212" || line == "5555") {
            return true;
        }
        // Line numbers 0000 and exchanges 000 are never assigned.
        if line == "0000" || exchange == "000" {
            return true;
        }
    }
    false
}

// ---------------------------------------------------------------------------------------------
// Birth date

/// Whether a birth date is a placeholder: 1900-01-01, 1901-01-01, or any date before 1900.
pub fn is_placeholder_birth_date(d: NaiveDate) -> bool {
    d.year() < 1900 || (d.month() == 1 && d.day() == 1 && (d.year() == 1900 || d.year() == 1901))
}

// ---------------------------------------------------------------------------------------------
// Sex

/// Maps a free-text sex to `male`, `female`, `other` or `unknown`. Values that describe a
/// gender identity rather than a sex (transgender, non-binary) map to `other`.
pub fn normalize_sex(s: &str) -> &'static str {
    let v: String = deunicode(s)
        .to_lowercase()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    match v.as_str() {
        "m" | "male" | "man" | "boy" | "masculine" | "cismale" | "cisman" => "male",
        "f" | "female" | "woman" | "girl" | "feminine" | "cisfemale" | "ciswoman" => "female",
        ""
        | "u"
        | "unk"
        | "unknown"
        | "na"
        | "none"
        | "notspecified"
        | "unspecified"
        | "notknown"
        | "declined"
        | "declinetoanswer"
        | "declinetostate"
        | "prefernottosay"
        | "prefernottoanswer"
        | "choosenottodisclose"
        | "notrecorded"
        | "asku"
        | "unkn" => "unknown",
        _ => "other",
    }
}

// ---------------------------------------------------------------------------------------------
// Address

/// An address reduced to what identifies a household.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddressKey {
    /// Street line with standard abbreviations, unit removed: "123 n main st".
    pub line1: Option<String>,
    /// Unit number without its designator: "4b" for "Apt. 4B" or "#4B".
    pub unit: Option<String>,
    pub city: Option<String>,
    /// US ZIP cut to 5 digits; other postal codes lowercased without spaces.
    pub zip: Option<String>,
}

/// Words that introduce a unit number.
#[rustfmt::skip]
const UNIT_DESIGNATORS: &[&str] = &[
    "apt", "apartment", "unit", "ste", "suite", "#", "rm", "room", "fl", "floor", "bldg",
    "building", "lot", "spc", "space", "trlr", "dept", "department", "box",
];

/// USPS street suffix and directional abbreviations (and a few common words).
fn street_abbreviation(word: &str) -> &str {
    match word {
        "street" | "str" | "saint" => "st",
        "avenue" | "av" | "aven" | "avn" => "ave",
        "road" => "rd",
        "boulevard" | "boul" | "blv" => "blvd",
        "drive" | "drv" => "dr",
        "lane" => "ln",
        "court" => "ct",
        "place" => "pl",
        "terrace" => "ter",
        "circle" | "circ" => "cir",
        "highway" | "hiway" => "hwy",
        "parkway" | "pkway" => "pkwy",
        "square" => "sq",
        "trail" => "trl",
        "expressway" => "expy",
        "freeway" => "fwy",
        "crossing" => "xing",
        "point" => "pt",
        "mount" => "mt",
        "fort" => "ft",
        "north" => "n",
        "south" => "s",
        "east" => "e",
        "west" => "w",
        "northeast" => "ne",
        "northwest" => "nw",
        "southeast" => "se",
        "southwest" => "sw",
        other => other,
    }
}

/// Street lines that stand for "no address".
const PLACEHOLDER_LINE1: &[&str] = &[
    "unknown",
    "none",
    "na",
    "n a",
    "homeless",
    "no address",
    "general delivery",
    "not given",
    "declined",
    "test",
    "xxx",
    "123 fake st",
];

/// Normalizes an address for matching: case, accents, punctuation, street abbreviations, unit
/// split from the street line (line2 read as a unit), ZIP to 5 digits.
pub fn normalize_address(a: &Address) -> AddressKey {
    let joined = [a.line1.as_deref(), a.line2.as_deref()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" , ");
    let (line1, unit) = split_street(&joined);
    let line1 = line1.filter(|l| !PLACEHOLDER_LINE1.contains(&l.as_str()));
    let city = a
        .city
        .as_deref()
        .map(|c| name_tokens(c).join(" "))
        .filter(|c| !c.is_empty());
    let zip = a
        .postal_code
        .as_deref()
        .and_then(|z| normalize_zip(z, a.country.as_deref()));
    AddressKey {
        line1,
        unit,
        city,
        zip,
    }
}

/// ZIP+4 and ZIP to five digits; other postal codes lowercased with spaces removed.
pub fn normalize_zip(postal_code: &str, country: Option<&str>) -> Option<String> {
    let compact: String = postal_code
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_lowercase();
    let us = country.is_none_or(|c| {
        matches!(
            c.trim().to_ascii_lowercase().as_str(),
            "" | "us" | "usa" | "united states" | "united states of america"
        )
    });
    if us && compact.len() >= 5 && compact.bytes().all(|b| b.is_ascii_digit()) {
        let zip = &compact[..5];
        return (zip != "00000" && zip != "99999").then(|| zip.to_string());
    }
    (!compact.is_empty()).then_some(compact)
}

/// Splits a street line into (street, unit).
fn split_street(s: &str) -> (Option<String>, Option<String>) {
    let folded = deunicode(s).to_lowercase();
    // '#' is a unit marker; commas end a part (a unit part may follow); other punctuation
    // disappears, hyphens join (123-B -> 123b).
    let mut words: Vec<String> = Vec::new();
    let mut cur = String::new();
    for c in folded.chars() {
        match c {
            c if c.is_ascii_alphanumeric() => cur.push(c),
            '-' | '\'' | '.' => {
                if c == '.' && !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            '#' | ',' => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
                words.push(c.to_string());
            }
            _ => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    // "p o box" and "post office box" -> "po box".
    let mut merged: Vec<String> = Vec::with_capacity(words.len());
    let mut i = 0;
    while i < words.len() {
        let pair = (words[i].as_str(), words.get(i + 1).map(String::as_str));
        match pair {
            ("p", Some("o")) | ("post", Some("office")) => {
                merged.push("po".into());
                i += 2;
            }
            _ => {
                merged.push(words[i].clone());
                i += 1;
            }
        }
    }

    let mut street: Vec<String> = Vec::new();
    let mut unit: Vec<String> = Vec::new();
    let mut in_unit = false;
    for (pos, w) in merged.iter().enumerate() {
        if w == "," {
            // After a comma, a bare number or a designator is a unit (line2 "4B").
            in_unit = false;
            let next = merged.get(pos + 1).map(String::as_str);
            if let Some(next) = next {
                if !street.is_empty()
                    && (UNIT_DESIGNATORS.contains(&next)
                        || next.bytes().any(|b| b.is_ascii_digit()))
                    && !(next == "box" && street.last().is_some_and(|l| l == "po"))
                {
                    in_unit = true;
                }
            }
            continue;
        }
        let is_designator = UNIT_DESIGNATORS.contains(&w.as_str())
            && !(w == "box" && street.last().is_some_and(|l| l == "po"))
            && !street.is_empty();
        if is_designator {
            in_unit = true;
            continue;
        }
        if in_unit {
            unit.push(w.clone());
        } else {
            street.push(street_abbreviation(w).to_string());
        }
    }
    let street = (!street.is_empty()).then(|| street.join(" "));
    let unit = (!unit.is_empty()).then(|| unit.concat());
    (street, unit)
}

// ---------------------------------------------------------------------------------------------
// Phonetic code

/// American Soundex of a normalized (ASCII lowercase) word: "robert" -> "r163".
pub fn soundex(word: &str) -> Option<String> {
    fn code(c: u8) -> u8 {
        match c {
            b'b' | b'f' | b'p' | b'v' => b'1',
            b'c' | b'g' | b'j' | b'k' | b'q' | b's' | b'x' | b'z' => b'2',
            b'd' | b't' => b'3',
            b'l' => b'4',
            b'm' | b'n' => b'5',
            b'r' => b'6',
            b'h' | b'w' => b'h',
            _ => b'0', // vowels and y
        }
    }
    let bytes: Vec<u8> = word.bytes().filter(u8::is_ascii_lowercase).collect();
    let (&first, rest) = bytes.split_first()?;
    let mut out = vec![first];
    let mut last = code(first);
    for &c in rest {
        let k = code(c);
        match k {
            // h and w do not separate letters with the same code.
            b'h' => continue,
            b'0' => last = b'0',
            _ => {
                if k != last {
                    out.push(k);
                }
                last = k;
            }
        }
        if out.len() == 4 {
            break;
        }
    }
    while out.len() < 4 {
        out.push(b'0');
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(y: i32, m: u32, d: u32) -> NaiveDate {
        NaiveDate::from_ymd_opt(y, m, d).unwrap()
    }

    #[test]
    fn names_fold_case_accents_and_punctuation() {
        let cases: &[(&str, &[&str])] = &[
            ("José", &["jose"]),
            ("  MARY-ann ", &["mary", "ann"]),
            ("O'Brien", &["obrien"]),
            ("D’Angelo", &["dangelo"]),
            ("Zoë", &["zoe"]),
            ("St. John", &["st", "john"]),
            ("Nguyễn", &["nguyen"]),
            ("", &[]),
        ];
        for (input, want) in cases {
            assert_eq!(name_tokens(input), *want, "{input}");
        }
    }

    #[test]
    fn family_names_keep_tokens_for_multi_part_surnames() {
        let f = family_name("García-López").unwrap();
        assert_eq!(f.joined, "garcialopez");
        assert_eq!(f.tokens, vec!["garcia", "lopez"]);
        let f = family_name("de la Cruz").unwrap();
        assert_eq!(f.joined, "delacruz");
        assert_eq!(f.tokens, vec!["cruz"]);
        assert_eq!(family_name("Delacruz").unwrap().joined, "delacruz");
        let f = family_name("Smith Jr.").unwrap();
        assert_eq!(f.joined, "smith");
        assert_eq!(family_name("Van Der Berg").unwrap().tokens, vec!["berg"]);
        assert!(family_name("--").is_none());
    }

    #[test]
    fn given_names_drop_titles_and_join_words() {
        let g = given_name("Dr. Mary Ann").unwrap();
        assert_eq!(g.first, "mary");
        assert_eq!(g.joined, "maryann");
        assert_eq!(given_name("Dr").unwrap().first, "dr");
    }

    #[test]
    fn placeholder_names_are_recognised() {
        assert!(is_placeholder_given("Unknown"));
        assert!(is_placeholder_given("Baby Girl"));
        assert!(is_placeholder_given("TEST"));
        assert!(is_placeholder_given("  "));
        assert!(!is_placeholder_given("Robert"));
        assert!(is_placeholder_family("UNKNOWN"));
        assert!(!is_placeholder_family("Doe"));
        assert!(is_placeholder_full_name("John", "Doe"));
        assert!(is_placeholder_full_name("Jane", "DOE"));
        assert!(is_placeholder_full_name("Test", "Patient"));
        assert!(!is_placeholder_full_name("Mary", "Doe"));
        assert!(!is_placeholder_full_name("John", "Smith"));
    }

    #[test]
    fn emails_are_trimmed_and_lowercased_only() {
        let cases = [
            (
                "  Jane.Doe+clinic@Gmail.COM ",
                Some("jane.doe+clinic@gmail.com"),
            ),
            ("j.d@gmail.com", Some("j.d@gmail.com")),
            ("no-at-sign", None),
            ("a@b", None),
            ("a b@c.com", None),
            ("@c.com", None),
            ("a@@c.com", None),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_email(input).as_deref(), want, "{input}");
        }
    }

    #[test]
    fn placeholder_emails_are_recognised() {
        for e in [
            "test@gmail.com",
            "noemail@clinic.com",
            "no.email123@yahoo.com",
            "none@none.com",
            "someone@example.com",
            "jane@test.com",
            "x@x.com",
            "aaaa@gmail.com",
            "jane@clinic.test",
            "0000@gmail.com",
            "...@gmail.com",
        ] {
            assert!(is_placeholder_email(e), "{e}");
        }
        for e in [
            "jane.doe@gmail.com",
            "bob@clinic.com",
            "testa.rossi@gmail.com",
            "12345678@qq.com",
        ] {
            assert!(!is_placeholder_email(e), "{e}");
        }
    }

    #[test]
    fn phones_become_e164_without_extension() {
        let cases = [
            ("(415) 555-2671", "US", Some("+14155552671")),
            ("415.555.2671 ext. 12", "US", Some("+14155552671")),
            ("4155552671x99", "us", Some("+14155552671")),
            ("+1 415 555 2671", "US", Some("+14155552671")),
            ("1-415-555-2671", "US", Some("+14155552671")),
            ("+44 20 7946 0958", "US", Some("+442079460958")),
            ("020 7946 0958", "GB", Some("+442079460958")),
            ("555-1234", "US", None),
            ("1234567890", "US", None),
            ("0000000000", "US", None),
            ("not a phone", "US", None),
            ("", "US", None),
        ];
        for (raw, region, want) in cases {
            assert_eq!(phone_e164(raw, region).as_deref(), want, "{raw}");
        }
    }

    /// Every way the tests below write a number: separators, parentheses, a country code with
    /// and without `+`, and inputs the memo must leave to the parser (extensions, letters,
    /// slashes, RFC 3966 forms).
    fn phone_formats(area: u32, exchange: u32, line: u32) -> Vec<String> {
        let (a, e, l) = (area, exchange, line);
        vec![
            format!("{a}{e:03}{l:04}"),
            format!("({a}) {e:03}-{l:04}"),
            format!("({a}){e:03}-{l:04}"),
            format!("{a}-{e:03}-{l:04}"),
            format!("{a}.{e:03}.{l:04}"),
            format!("{a} {e:03} {l:04}"),
            format!("  {a}{e:03}{l:04} "),
            format!("1{a}{e:03}{l:04}"),
            format!("1-{a}-{e:03}-{l:04}"),
            format!("1 ({a}) {e:03} {l:04}"),
            format!("+1{a}{e:03}{l:04}"),
            format!("+1 {a} {e:03} {l:04}"),
            format!("+1 ({a}) {e:03}-{l:04}"),
            format!("+1-{a}-{e:03}-{l:04}"),
            format!("+1.{a}.{e:03}.{l:04}"),
            format!("+1({a}){e:03}{l:04}"),
            format!("+{a}{e:03}{l:04}"),
            format!("+{a} {e:03} {l:04}"),
            format!("+{a}-{e:03}-{l:04}"),
            format!("011 44 {a}{e:03}{l:04}"),
            format!("0{a}{e:03}{l:04}"),
            format!("00{a}{e:03}{l:04}"),
            format!("{a}{e:03}{l:04} ext. 12"),
            format!("{a}{e:03}{l:04}x9"),
            format!("{a}-{e:03}-{l:04} #12"),
            format!("{a}/{e:03}/{l:04}"),
            format!("tel:+1-{a}-{e:03}-{l:04}"),
            format!("{e:03}-{l:04}"),
            format!("{l:04}"),
            format!("{a}{e:03}{l:04}{l:04}"),
            format!("(({a})) {e:03}--{l:04}."),
            format!("{a}{e:03}{l:04}{l:04}{l:04}{l:04}"),
        ]
    }

    #[test]
    fn phone_memo_answers_as_the_parser_does() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut numbers: Vec<(u32, u32, u32)> = (0..150)
            .map(|_| {
                (
                    rng.gen_range(200..1000),
                    rng.gen_range(0..1000),
                    rng.gen_range(0..10_000),
                )
            })
            .collect();
        // Valid numbers, a fictional one, a London one (read with a `+`), a toll-free one.
        numbers.extend([
            (415, 555, 2671),
            (212, 555, 123),
            (207, 946, 958),
            (800, 555, 199),
        ]);
        let mut inputs: Vec<String> = numbers
            .iter()
            .flat_map(|&(a, e, l)| phone_formats(a, e, l))
            .collect();
        inputs.extend(
            [
                "+44 20 7946 0958",
                "+442079460958",
                "020 7946 0958",
                "+0",
                "+",
                "",
                "-",
                "()",
            ]
            .map(String::from),
        );
        for region in ["US", "GB"] {
            let memo = PhoneMemo::new(region);
            let _installed = memo.install();
            // Twice: the second pass answers from the memo.
            for pass in 0..2 {
                for raw in &inputs {
                    for asked in [region, "US", "GB"] {
                        assert_eq!(
                            phone_e164(raw, asked),
                            parse_e164(raw, asked),
                            "{raw} in {asked}, pass {pass}"
                        );
                    }
                }
            }
            assert!(!memo.is_empty());
        }
        // Without a memo, the thread's recent answers (by digits for plain inputs) too.
        for pass in 0..2 {
            for raw in &inputs {
                for asked in ["US", "GB", "US"] {
                    assert_eq!(
                        phone_e164(raw, asked),
                        parse_e164(raw, asked),
                        "{raw} in {asked}, pass {pass}, no memo"
                    );
                }
            }
        }
        // Uninstalled when the guard dropped: nothing is remembered any more.
        let memo = PhoneMemo::new("US");
        drop(memo.install());
        phone_e164("(415) 555-2671", "US");
        assert!(memo.is_empty());
    }

    #[test]
    fn phone_database_copy_reads_like_the_crate() {
        use rand::{Rng, SeedableRng};
        let copy = PhoneDatabase::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut inputs: Vec<String> = (0..60)
            .flat_map(|_| {
                phone_formats(
                    rng.gen_range(200..1000),
                    rng.gen_range(0..1000),
                    rng.gen_range(0..10_000),
                )
            })
            .collect();
        // Numbers of other countries: known valid ones, then random digits after each code.
        inputs.extend(
            [
                "+44 20 7946 0958",
                "+49 30 901820",
                "+33 1 42 68 53 00",
                "+61 2 9374 4000",
                "+81 3-3224-9999",
                "+91 11 2301 2113",
                "+55 11 3091-3000",
                "+52 55 5128 0000",
                "+27 21 480 7911",
                "+353 1 896 1000",
            ]
            .map(String::from),
        );
        for code in [
            1, 7, 27, 33, 34, 39, 44, 49, 52, 55, 61, 64, 81, 86, 91, 234, 353,
        ] {
            for _ in 0..20 {
                let len = rng.gen_range(6..12);
                let digits: String = (0..len)
                    .map(|_| char::from(b'0' + rng.gen_range(0..10u8)))
                    .collect();
                inputs.push(format!("+{code} {digits}"));
                inputs.push(digits);
            }
        }
        let mut valid = 0;
        for raw in &inputs {
            for region in ["US", "GB", "DE", "AU", "IN", "BR"] {
                let crate_answer = parse_e164_with(&phonenumber::metadata::DATABASE, raw, region);
                assert_eq!(
                    parse_e164_with(&copy.0, raw, region),
                    crate_answer,
                    "{raw} in {region}"
                );
                valid += usize::from(crate_answer.is_some());
            }
        }
        assert!(
            valid > 1_000,
            "only {valid} valid answers: the comparison says little"
        );
        // Installed, `phone_e164` parses with the copy; uninstalled, with the crate's own.
        let installed = copy.install();
        assert!(PHONE_DATABASE.with(|d| d.borrow().is_some()));
        assert_eq!(
            phone_e164("020 7946 0958", "GB").as_deref(),
            Some("+442079460958")
        );
        drop(installed);
        assert!(PHONE_DATABASE.with(|d| d.borrow().is_none()));
    }

    #[test]
    fn phone_memo_keys_only_plain_inputs() {
        let key = PhoneMemo::key;
        assert_eq!(key("(415) 555-2671"), key("415.555.2671"));
        assert_eq!(key("415 555 2671 "), key("4155552671"));
        assert_eq!(key("+1 415 555 2671"), key("+14155552671"));
        assert_ne!(key("+14155552671"), key("14155552671"));
        assert_ne!(key("04155552671"), key("4155552671"));
        for raw in [
            "+1-415-555-2671",
            "4155552671 x9",
            "415/555/2671",
            "tel:4155552671",
            "1+4155552671",
            "123456789012345678",
            "",
            "+",
        ] {
            assert_eq!(key(raw), None, "{raw}");
        }
        for e164 in ["+14155552671", "+442079460958", "+390612345678"] {
            assert_eq!(
                PhoneMemo::unpack(PhoneMemo::pack(Some(e164)).unwrap()).as_deref(),
                Some(e164)
            );
        }
        assert_eq!(PhoneMemo::unpack(PhoneMemo::pack(None).unwrap()), None);
    }

    #[test]
    fn placeholder_phones_are_recognised() {
        for p in [
            "+12125550123",
            "(212) 555-0199",
            "+12125551212",
            "1111111111",
            "+19999999999",
            "1234567890",
            "+11234567890",
            "555",
        ] {
            assert!(is_placeholder_phone(p), "{p}");
        }
        for p in ["+14155552671", "+12125550200", "+442079460958"] {
            assert!(!is_placeholder_phone(p), "{p}");
        }
    }

    #[test]
    fn placeholder_birth_dates_are_recognised() {
        assert!(is_placeholder_birth_date(date(1900, 1, 1)));
        assert!(is_placeholder_birth_date(date(1901, 1, 1)));
        assert!(is_placeholder_birth_date(date(1850, 6, 1)));
        assert!(!is_placeholder_birth_date(date(1901, 1, 2)));
        assert!(!is_placeholder_birth_date(date(1980, 1, 1)));
    }

    #[test]
    fn sex_maps_to_four_values() {
        let cases = [
            ("M", "male"),
            ("Male", "male"),
            (" female ", "female"),
            ("F", "female"),
            ("Woman", "female"),
            ("intersex", "other"),
            ("Non-binary", "other"),
            ("Transgender female", "other"),
            ("", "unknown"),
            ("U", "unknown"),
            ("Prefer not to say", "unknown"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_sex(input), want, "{input}");
        }
    }

    fn addr(line1: &str, line2: Option<&str>, zip: &str) -> Address {
        Address {
            line1: Some(line1.into()),
            line2: line2.map(Into::into),
            city: Some("Springfield".into()),
            state: Some("IL".into()),
            postal_code: Some(zip.into()),
            country: None,
        }
    }

    #[test]
    fn addresses_use_standard_abbreviations_and_split_units() {
        let cases = [
            (
                addr("123 North Main Street", None, "62704-1234"),
                "123 n main st",
                None,
                "62704",
            ),
            (
                addr("123 N. Main St., Apt. 4B", None, "62704"),
                "123 n main st",
                Some("4b"),
                "62704",
            ),
            (
                addr("123 n main st #4b", None, "62704"),
                "123 n main st",
                Some("4b"),
                "62704",
            ),
            (
                addr("123 Main Street", Some("Suite 200"), "62704"),
                "123 main st",
                Some("200"),
                "62704",
            ),
            (
                addr("123 Main Street", Some("4B"), "62704"),
                "123 main st",
                Some("4b"),
                "62704",
            ),
            (
                addr("500 Sunset Boulevard Unit 7", None, "90028"),
                "500 sunset blvd",
                Some("7"),
                "90028",
            ),
            (
                addr("P.O. Box 77", None, "62704"),
                "po box 77",
                None,
                "62704",
            ),
            (
                addr("9 Elm Avenue", None, "02134"),
                "9 elm ave",
                None,
                "02134",
            ),
        ];
        for (input, line1, unit, zip) in cases {
            let key = normalize_address(&input);
            assert_eq!(key.line1.as_deref(), Some(line1), "{input:?}");
            assert_eq!(key.unit.as_deref(), unit, "{input:?}");
            assert_eq!(key.zip.as_deref(), Some(zip), "{input:?}");
        }
        assert_eq!(
            normalize_zip("K1A 0B6", Some("CA")).as_deref(),
            Some("k1a0b6")
        );
        assert_eq!(
            normalize_address(&addr("Unknown", None, "00000")),
            AddressKey {
                city: Some("springfield".into()),
                ..AddressKey::default()
            }
        );
    }

    #[test]
    fn soundex_codes_match_the_standard() {
        let cases = [
            ("robert", "r163"),
            ("rupert", "r163"),
            ("ashcraft", "a261"),
            ("tymczak", "t522"),
            ("pfister", "p236"),
            ("smith", "s530"),
            ("smyth", "s530"),
            ("lee", "l000"),
        ];
        for (input, want) in cases {
            assert_eq!(soundex(input).as_deref(), Some(want), "{input}");
        }
        assert_eq!(soundex(""), None);
    }
}
