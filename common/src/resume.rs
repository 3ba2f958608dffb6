//! When a resumed download may be spliced onto what was already received. Pure logic
//! over header values, shared by the ranged sources (HTTP now; S3 and GCS later) and
//! fuzzed (`fuzz/fuzz_targets/resume.rs`): splicing two different files into one disk
//! is a success with wrong bytes, the worst outcome there is.
//!
//! The rule: bytes are spliced only when a strong validator of the first response (a
//! strong ETag, or Last-Modified together with the total length) is present and
//! identical in the resumed one, and the resumed range starts where we stopped.
//! Anything else starts the import again from byte 0.

/// What identifies "the same file" across requests. A weak ETag cannot validate a byte
/// range (RFC 9110 13.1.5), and a Last-Modified alone has one-second granularity.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
    /// The whole file's length: Content-Length of a 200, the total of a 206's Content-Range.
    pub total: Option<u64>,
}

/// The header values of one response that matter here.
#[derive(Debug, Clone, Copy, Default)]
pub struct Headers<'a> {
    pub partial: bool,
    pub etag: Option<&'a str>,
    pub last_modified: Option<&'a str>,
    pub content_length: Option<&'a str>,
    pub content_range: Option<&'a str>,
}

impl Validators {
    pub fn of(h: &Headers<'_>) -> Self {
        let total = if h.partial {
            h.content_range
                .and_then(content_range)
                .and_then(|r| r.total)
        } else {
            h.content_length.and_then(|v| v.trim().parse().ok())
        };
        Validators {
            etag: h
                .etag
                .map(str::trim)
                .filter(|e| !e.is_empty() && !e.starts_with("W/"))
                .map(str::to_string),
            last_modified: h
                .last_modified
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            total,
        }
    }

    /// Whether these validators can prove a later response is the same file.
    pub fn strong(&self) -> bool {
        self.etag.is_some() || (self.last_modified.is_some() && self.total.is_some())
    }

    /// What goes in `If-Range`.
    pub fn if_range(&self) -> Option<&str> {
        if !self.strong() {
            return None;
        }
        self.etag.as_deref().or(self.last_modified.as_deref())
    }

    /// Whether `later` is provably the same file: every validator the first response had
    /// is present and identical, and the total length agrees.
    pub fn same_file(&self, later: &Validators) -> bool {
        if !self.strong() {
            return false;
        }
        let same = |a: &Option<String>, b: &Option<String>| a.is_none() || a == b;
        same(&self.etag, &later.etag)
            && same(&self.last_modified, &later.last_modified)
            && (self.total.is_none() || self.total == later.total)
    }
}

/// A parsed `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    pub start: u64,
    pub end: u64,
    pub total: Option<u64>,
}

/// `bytes 100-199/200` -> 100..=199 of 200. Anything malformed, or a range that is
/// inverted or reaches past its total, is `None`.
pub fn content_range(v: &str) -> Option<ContentRange> {
    let v = v.trim().strip_prefix("bytes ")?.trim();
    let (range, total) = v.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = end.trim().parse().ok()?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if end < start || total.is_some_and(|t| end >= t) {
        return None;
    }
    Some(ContentRange { start, end, total })
}

/// How a resumed response continues the download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continue {
    /// A 206 whose body starts at the offset we stopped at.
    Range,
    /// A full body of the same file: skip what was already received.
    Skip,
}

/// Why a resumed response cannot be spliced: the import starts again from byte 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// The first response carried no strong validator: nothing could prove sameness.
    NoValidator,
    /// The resumed range does not start at the offset asked for.
    OtherRange,
    /// The validators (or the length) differ: the file changed.
    Changed,
}

impl Restart {
    pub fn describe(self) -> &'static str {
        match self {
            Restart::NoValidator => "the server sent no strong validator (a strong ETag, or Last-Modified with a length)",
            Restart::OtherRange => "the server answered with a different range",
            Restart::Changed => "its validators differ: the file changed",
        }
    }
}

/// Whether a successful (2xx) resumed response may continue a download that stopped at
/// `offset`, whose first response had `first` and `first_len` (its Content-Length).
pub fn judge(
    first: &Validators,
    first_len: Option<u64>,
    offset: u64,
    later: &Headers<'_>,
) -> Result<Continue, Restart> {
    if !first.strong() {
        return Err(Restart::NoValidator);
    }
    let v = Validators::of(later);
    if later.partial {
        let range = later.content_range.and_then(content_range);
        if range.map(|r| r.start) != Some(offset) {
            return Err(Restart::OtherRange);
        }
        // A server that ignores If-Range answers 206 from whatever it has now.
        return if first.same_file(&v) {
            Ok(Continue::Range)
        } else {
            Err(Restart::Changed)
        };
    }
    let later_len = later
        .content_length
        .and_then(|v| v.trim().parse::<u64>().ok());
    if first.same_file(&v) && later_len == first_len {
        Ok(Continue::Skip)
    } else {
        Err(Restart::Changed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_ranges() {
        let r = content_range("bytes 100-199/200").expect("range");
        assert_eq!((r.start, r.end, r.total), (100, 199, Some(200)));
        assert_eq!(content_range("bytes 5-9/*").and_then(|r| r.total), None);
        assert_eq!(content_range("bytes */200"), None);
        assert_eq!(content_range("bytes 9-5/200"), None);
        assert_eq!(content_range("bytes 0-200/200"), None);
        assert_eq!(content_range("bytes 0-1/x"), None);
    }

    const LM: &str = "Mon, 01 Jan 2024 00:00:00 GMT";

    fn full<'a>(etag: Option<&'a str>, lm: Option<&'a str>, len: &'a str) -> Headers<'a> {
        Headers {
            partial: false,
            etag,
            last_modified: lm,
            content_length: Some(len),
            content_range: None,
        }
    }

    fn part<'a>(etag: Option<&'a str>, lm: Option<&'a str>, range: &'a str) -> Headers<'a> {
        Headers {
            partial: true,
            etag,
            last_modified: lm,
            content_length: None,
            content_range: Some(range),
        }
    }

    #[test]
    fn weak_etags_and_bare_dates_do_not_validate() {
        let weak = Validators::of(&Headers {
            etag: Some("W/\"x\""),
            ..Default::default()
        });
        assert!(!weak.strong());
        assert_eq!(weak.if_range(), None);
        let lm = Validators::of(&Headers {
            last_modified: Some(LM),
            ..Default::default()
        });
        assert!(!lm.strong());
        let lm = Validators::of(&full(None, Some(LM), "10"));
        assert!(lm.strong());
        assert_eq!(lm.if_range(), Some(LM));
        assert!(!Validators::default().strong());
    }

    #[test]
    fn only_an_identical_strong_validator_splices() {
        let first = Validators::of(&full(Some("\"a\""), None, "100"));
        let j = |h: Headers<'_>| judge(&first, Some(100), 50, &h);
        assert_eq!(
            j(part(Some("\"a\""), None, "bytes 50-99/100")),
            Ok(Continue::Range)
        );
        assert_eq!(
            j(part(Some("\"b\""), None, "bytes 50-99/100")),
            Err(Restart::Changed)
        );
        assert_eq!(
            j(part(Some("W/\"a\""), None, "bytes 50-99/100")),
            Err(Restart::Changed)
        );
        assert_eq!(
            j(part(Some("\"a\""), None, "bytes 50-149/150")),
            Err(Restart::Changed)
        );
        assert_eq!(
            j(part(None, None, "bytes 50-99/100")),
            Err(Restart::Changed)
        );
        assert_eq!(
            j(part(Some("\"a\""), None, "bytes 40-99/100")),
            Err(Restart::OtherRange)
        );
        assert_eq!(j(full(Some("\"a\""), None, "100")), Ok(Continue::Skip));
        assert_eq!(j(full(Some("\"a\""), None, "101")), Err(Restart::Changed));
        let by_date = Validators::of(&full(None, Some(LM), "100"));
        let later = |lm| part(None, Some(lm), "bytes 50-99/100");
        assert_eq!(
            judge(&by_date, Some(100), 50, &later(LM)),
            Ok(Continue::Range)
        );
        assert_eq!(
            judge(
                &by_date,
                Some(100),
                50,
                &later("Tue, 02 Jan 2024 00:00:00 GMT")
            ),
            Err(Restart::Changed)
        );
        let none = Validators::default();
        assert_eq!(
            judge(&none, Some(100), 50, &full(None, None, "100")),
            Err(Restart::NoValidator)
        );
    }
}
