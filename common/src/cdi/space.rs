//! Kubernetes quantities and CDI's space arithmetic (docs/cdi-contract.md section 1.7), exactly:
//! a controller sizes PVCs with the same formulas, so rounding must agree to the byte.

/// The one "does not fit the volume" error, in CDI's words ("A larger PVC is
/// required"), which users and the controller's logs search for. Raised by the pipeline
/// (declared sizes), the converters (virtual sizes), the writer (data past the limit) and
/// tar unpacking (archive content).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TooLarge {
    /// The image says how large it is, before anything is written.
    #[error("virtual image size {size} is larger than the reported available storage {limit}. A larger PVC is required")]
    Virtual { size: u64, limit: u64 },
    /// Data arrives past the limit (a stream that did not declare its size).
    #[error("image data is at least {at_least} bytes, which is larger than the reported available storage {limit}. A larger PVC is required")]
    Data { at_least: u64, limit: u64 },
    /// Unpacked archive content.
    #[error("archive content is larger than the reported available storage {limit}. A larger PVC is required")]
    Archive { limit: u64 },
}

impl TooLarge {
    pub fn kind(&self) -> crate::ErrorKind {
        crate::ErrorKind::TooLarge
    }
}

/// Refuses a declared size above the volume before anything is written.
pub fn check_fits(size: u64, limit: u64) -> Result<(), TooLarge> {
    if size > limit {
        return Err(TooLarge::Virtual { size, limit });
    }
    Ok(())
}

/// CDI's `DefaultAlignBlockSize`.
pub const ALIGN: u64 = 1 << 20;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuantityError {
    #[error("invalid quantity {0:?}")]
    Invalid(String),
    #[error("quantity {0:?} is out of range")]
    OutOfRange(String),
}

/// Parses a Kubernetes resource quantity (`10Gi`, `1G`, `512Mi`, `1.5Gi`, `2e9`, `1024`)
/// into bytes, rounding fractional bytes up as `Quantity.Value()` does.
pub fn parse_quantity(s: &str) -> Result<u64, QuantityError> {
    let t = s.trim();
    let invalid = || QuantityError::Invalid(s.to_string());
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    if num.is_empty() || num.starts_with('-') {
        return Err(invalid());
    }
    let num = num.strip_prefix('+').unwrap_or(num);
    // Exponent form: 1e9, 1E3
    let (mantissa, exp10): (&str, i32) = if let Some(e) = suffix.strip_prefix(['e', 'E']) {
        (num, e.parse::<i32>().map_err(|_| invalid())?)
    } else {
        (num, 0)
    };
    let mult: u128 = match if exp10 != 0 { "" } else { suffix } {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "m" => return Ok(0), // milli-bytes: sub-byte, CDI never sends these
        _ => return Err(invalid()),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    if int_part.is_empty() && frac_part.is_empty() {
        return Err(invalid());
    }
    if !int_part.chars().all(|c| c.is_ascii_digit())
        || !frac_part.chars().all(|c| c.is_ascii_digit())
    {
        return Err(invalid());
    }
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    let scale = frac_part.len() as i32 - exp10;
    let value: u128 = if digits.is_empty() {
        0
    } else {
        digits
            .parse()
            .map_err(|_| QuantityError::OutOfRange(s.to_string()))?
    };
    let scaled = value
        .checked_mul(mult)
        .ok_or_else(|| QuantityError::OutOfRange(s.to_string()))?;
    let bytes = if scale > 0 {
        let div = 10u128
            .checked_pow(scale as u32)
            .ok_or_else(|| QuantityError::OutOfRange(s.to_string()))?;
        scaled.div_ceil(div)
    } else {
        let mul = 10u128
            .checked_pow((-scale) as u32)
            .ok_or_else(|| QuantityError::OutOfRange(s.to_string()))?;
        scaled
            .checked_mul(mul)
            .ok_or_else(|| QuantityError::OutOfRange(s.to_string()))?
    };
    u64::try_from(bytes).map_err(|_| QuantityError::OutOfRange(s.to_string()))
}

pub fn round_down(v: u64, align: u64) -> u64 {
    v - v % align
}

pub fn round_up(v: u64, align: u64) -> u64 {
    v.div_ceil(align).saturating_mul(align)
}

/// `GetUsableSpace(overhead, avail) = RoundDown(ceil(avail / (1 + overhead)), 1MiB)`.
pub fn usable_space(overhead: f64, avail: u64) -> u64 {
    let overhead = sane_overhead(overhead);
    let usable = (avail as f64 / (1.0 + overhead)).ceil();
    round_down(usable as u64, ALIGN)
}

/// `GetRequiredSpace(overhead, requested) = ceil(RoundUp(requested, 1MiB) * (1 + overhead))`.
pub fn required_space(overhead: f64, requested: u64) -> u64 {
    let overhead = sane_overhead(overhead);
    (round_up(requested, ALIGN) as f64 * (1.0 + overhead)).ceil() as u64
}

/// CDI parses FILESYSTEM_OVERHEAD with `strconv.ParseFloat` and uses 0 on error; a
/// negative or absurd value would make the arithmetic meaningless, so it is clamped.
fn sane_overhead(o: f64) -> f64 {
    if o.is_finite() {
        o.clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// `FILESYSTEM_OVERHEAD` as CDI reads it: a float string, anything unparsable is 0.
pub fn parse_overhead(s: &str) -> f64 {
    s.trim().parse::<f64>().map(sane_overhead).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("10Gi"), Ok(10 << 30));
        assert_eq!(parse_quantity("1G"), Ok(1_000_000_000));
        assert_eq!(parse_quantity("1024"), Ok(1024));
        assert_eq!(parse_quantity("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_quantity("2e9"), Ok(2_000_000_000));
        assert_eq!(parse_quantity("500M"), Ok(500_000_000));
        assert_eq!(parse_quantity(" 64Mi "), Ok(64 << 20));
        assert_eq!(parse_quantity("0.5"), Ok(1));
        assert!(parse_quantity("").is_err());
        assert!(parse_quantity("Gi").is_err());
        assert!(parse_quantity("10Xi").is_err());
        assert!(parse_quantity("-1Gi").is_err());
        assert!(parse_quantity("99999999Ei").is_err());
    }

    #[test]
    fn cdi_arithmetic() {
        // 1Gi with the default 6% overhead: ceil(1073741824/1.06)=1012963986 -> 966 MiB.
        assert_eq!(usable_space(0.06, 1 << 30), 966 << 20);
        assert_eq!(usable_space(0.0, (1 << 30) + 5), 1 << 30);
        assert_eq!(required_space(0.06, 1 << 30), 1_138_166_334);
        assert_eq!(required_space(0.0, 1), ALIGN);
        assert_eq!(parse_overhead("0.06"), 0.06);
        assert_eq!(parse_overhead("bogus"), 0.0);
    }
}
