//! Source records packed into one byte buffer for `rebuild`: what survivorship reads (key,
//! fields, status, merge target, times, and the record's phone choice, parsed once), without
//! the raw payload, at a fraction of the memory of `SourceRecord`s. Decoding gives back the
//! record exactly, with a null payload.

use chrono::{DateTime, Datelike, NaiveDate, Utc};

use crate::identity::RecordPhone;
use crate::model::{
    Address, ExternalId, PersonFields, RecordStatus, SourceId, SourceKey, SourceKind, SourceRecord,
};

/// Packed records, addressed by their position.
#[derive(Default)]
pub(super) struct Records {
    bytes: Vec<u8>,
    /// Start of each record in `bytes`; one more entry than records.
    starts: Vec<usize>,
}

impl Records {
    pub(super) fn len(&self) -> usize {
        self.starts.len().saturating_sub(1)
    }

    /// Packs a record with its phone choice ([`crate::identity::record_phone`]).
    pub(super) fn push(&mut self, record: &SourceRecord, phone: Option<&RecordPhone>) {
        if self.starts.is_empty() {
            self.starts.push(0);
        }
        encode(record, &mut self.bytes);
        match phone {
            None => self.bytes.push(0),
            Some(p) => {
                self.bytes.push(if p.real { 2 } else { 1 });
                put_str(&mut self.bytes, &p.value);
            }
        }
        self.starts.push(self.bytes.len());
    }

    /// Appends records another buffer packed (positions continue after this one's).
    pub(super) fn append(&mut self, other: &Records) {
        if self.starts.is_empty() {
            self.starts.push(0);
        }
        let base = self.bytes.len();
        self.bytes.extend_from_slice(&other.bytes);
        self.starts
            .extend(other.starts.iter().skip(1).map(|s| base + s));
    }

    pub(super) fn shrink_to_fit(&mut self) {
        self.bytes.shrink_to_fit();
        self.starts.shrink_to_fit();
    }

    pub(super) fn get(&self, i: usize) -> SourceRecord {
        self.get_with_phone(i).0
    }

    /// The record and the phone choice it was packed with.
    pub(super) fn get_with_phone(&self, i: usize) -> (SourceRecord, Option<RecordPhone>) {
        let mut r = Reader {
            bytes: &self.bytes[self.starts[i]..self.starts[i + 1]],
        };
        let record = decode(&mut r);
        let phone = match r.byte() {
            0 => None,
            tag => Some(RecordPhone {
                value: r.string(),
                real: tag == 2,
            }),
        };
        (record, phone)
    }
}

fn encode(record: &SourceRecord, out: &mut Vec<u8>) {
    let SourceRecord {
        key,
        fields,
        status,
        merged_into,
        source_updated_at,
        fetched_at,
        raw: _,
    } = record;
    out.push(match key.source {
        SourceKind::Healthie => 0,
        SourceKind::Intakeq => 1,
        SourceKind::Hint => 2,
    });
    put_str(out, key.id.as_str());
    out.push(match status {
        RecordStatus::Active => 0,
        RecordStatus::Archived => 1,
        RecordStatus::Deleted => 2,
        RecordStatus::Merged => 3,
        RecordStatus::Missing => 4,
    });
    put_opt(out, merged_into.as_ref().map(|m| m.as_str()));
    match source_updated_at {
        Some(t) => {
            out.push(1);
            put_time(out, t);
        }
        None => out.push(0),
    }
    put_time(out, fetched_at);
    let PersonFields {
        given_name,
        middle_name,
        family_name,
        preferred_name,
        birth_date,
        sex,
        gender_identity,
        email,
        phones,
        address,
        external_ids,
    } = fields;
    for s in [given_name, middle_name, family_name, preferred_name] {
        put_opt(out, s.as_deref());
    }
    match birth_date {
        Some(d) => {
            out.push(1);
            out.extend_from_slice(&d.num_days_from_ce().to_le_bytes());
        }
        None => out.push(0),
    }
    for s in [sex, gender_identity, email] {
        put_opt(out, s.as_deref());
    }
    put_len(out, phones.len());
    for p in phones {
        put_str(out, p);
    }
    let Address {
        line1,
        line2,
        city,
        state,
        postal_code,
        country,
    } = address;
    for s in [line1, line2, city, state, postal_code, country] {
        put_opt(out, s.as_deref());
    }
    put_len(out, external_ids.len());
    for ExternalId { system, value } in external_ids {
        put_str(out, system);
        put_str(out, value);
    }
}

fn decode(r: &mut Reader<'_>) -> SourceRecord {
    let source = match r.byte() {
        0 => SourceKind::Healthie,
        1 => SourceKind::Intakeq,
        _ => SourceKind::Hint,
    };
    let id = r.string();
    let status = match r.byte() {
        0 => RecordStatus::Active,
        1 => RecordStatus::Archived,
        2 => RecordStatus::Deleted,
        3 => RecordStatus::Merged,
        _ => RecordStatus::Missing,
    };
    let merged_into = r.opt().map(SourceId);
    let source_updated_at = (r.byte() == 1).then(|| r.time());
    let fetched_at = r.time();
    let given_name = r.opt();
    let middle_name = r.opt();
    let family_name = r.opt();
    let preferred_name = r.opt();
    let birth_date = (r.byte() == 1).then(|| {
        let days = i32::from_le_bytes(r.take(4).try_into().expect("four bytes"));
        NaiveDate::from_num_days_from_ce_opt(days).expect("an encoded date")
    });
    let sex = r.opt();
    let gender_identity = r.opt();
    let email = r.opt();
    let phones = (0..r.len()).map(|_| r.string()).collect();
    let address = Address {
        line1: r.opt(),
        line2: r.opt(),
        city: r.opt(),
        state: r.opt(),
        postal_code: r.opt(),
        country: r.opt(),
    };
    let external_ids = (0..r.len())
        .map(|_| ExternalId {
            system: r.string(),
            value: r.string(),
        })
        .collect();
    SourceRecord {
        key: SourceKey::new(source, id),
        fields: PersonFields {
            given_name,
            middle_name,
            family_name,
            preferred_name,
            birth_date,
            sex,
            gender_identity,
            email,
            phones,
            address,
            external_ids,
        },
        status,
        merged_into,
        source_updated_at,
        fetched_at,
        raw: serde_json::Value::Null,
    }
}

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let low = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(low);
            return;
        }
        out.push(low | 0x80);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

/// `None` as length 0, `Some(s)` as the length of `s` plus one.
fn put_opt(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            put_len(out, s.len() + 1);
            out.extend_from_slice(s.as_bytes());
        }
    }
}

fn put_time(out: &mut Vec<u8>, t: &DateTime<Utc>) {
    out.extend_from_slice(&t.timestamp().to_le_bytes());
    out.extend_from_slice(&t.timestamp_subsec_nanos().to_le_bytes());
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        head
    }

    fn byte(&mut self) -> u8 {
        self.take(1)[0]
    }

    fn len(&mut self) -> usize {
        let mut n = 0usize;
        let mut shift = 0;
        loop {
            let b = self.byte();
            n |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return n;
            }
            shift += 7;
        }
    }

    fn text(&mut self, n: usize) -> String {
        String::from_utf8(self.take(n).to_vec()).expect("encoded from a string")
    }

    fn string(&mut self) -> String {
        let n = self.len();
        self.text(n)
    }

    fn opt(&mut self) -> Option<String> {
        match self.len() {
            0 => None,
            n => Some(self.text(n - 1)),
        }
    }

    fn time(&mut self) -> DateTime<Utc> {
        let secs = i64::from_le_bytes(self.take(8).try_into().expect("eight bytes"));
        let nanos = u32::from_le_bytes(self.take(4).try_into().expect("four bytes"));
        DateTime::from_timestamp(secs, nanos).expect("an encoded time")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn records_come_back_as_they_went_in_without_payload() {
        let full = SourceRecord {
            key: SourceKey::new(SourceKind::Hint, "pat-ü1".to_string()),
            fields: PersonFields {
                given_name: Some("Zoë".into()),
                middle_name: None,
                family_name: Some("x".repeat(300)),
                preferred_name: Some(String::new()),
                birth_date: Some(NaiveDate::from_ymd_opt(1901, 2, 3).unwrap()),
                sex: Some("female".into()),
                gender_identity: None,
                email: Some("z@example.com".into()),
                phones: vec!["+1 555 0100".into(), "5550101".into()],
                address: Address {
                    line1: Some("1 Main St".into()),
                    city: Some("Springfield".into()),
                    country: Some("US".into()),
                    ..Default::default()
                },
                external_ids: vec![ExternalId {
                    system: "mrn".into(),
                    value: "42".into(),
                }],
            },
            status: RecordStatus::Merged,
            merged_into: Some(SourceId("pat-2".into())),
            source_updated_at: Some(Utc.timestamp_opt(1_700_000_000, 123_456_789).unwrap()),
            fetched_at: Utc.timestamp_opt(-5, 7).unwrap(),
            raw: serde_json::json!({"id": "pat-ü1"}),
        };
        let bare = SourceRecord {
            key: SourceKey::new(SourceKind::Healthie, "7".to_string()),
            fields: PersonFields::default(),
            status: RecordStatus::Active,
            merged_into: None,
            source_updated_at: None,
            fetched_at: Utc.timestamp_opt(0, 0).unwrap(),
            raw: serde_json::Value::Null,
        };
        let phone = RecordPhone {
            value: "+15550100".into(),
            real: false,
        };
        let mut first = Records::default();
        first.push(&full, Some(&phone));
        let mut records = Records::default();
        records.push(&bare, None);
        records.append(&first);
        records.append(&Records::default());
        assert_eq!(records.len(), 2);
        assert_eq!(records.get_with_phone(0), (bare, None));
        let mut expected = full;
        expected.raw = serde_json::Value::Null;
        assert_eq!(records.get(1), expected);
        assert_eq!(records.get_with_phone(1).1, Some(phone));
    }
}
