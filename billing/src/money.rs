//! Exact money.
//!
//! Every amount in billing is an `i64` count of nanocredits
//! (1 credit = 1 USD = 10^9 nanocredits). Floats never appear: a binary float
//! cannot represent 0.1 exactly, and a ledger that drifts by a nanocredit per
//! entry is a ledger that does not balance.
//!
//! Arithmetic is checked and reports [`MoneyError::Overflow`] instead of
//! wrapping or panicking: an overflowing balance is a bug that has to surface
//! as an error, never as a silently wrong number or a crashed worker.
//!
//! The only external representation is a normalised decimal string (see
//! [`Credits`]'s `Display` and serde impls). JSON numbers are refused on input
//! because many clients decode them as double-precision floating point, which
//! loses precision above 2^53 nanocredits (about nine million credits) and
//! mangles fractions.

use std::fmt;
use std::str::FromStr;

use rust_decimal::Decimal;
use rust_decimal::prelude::ToPrimitive;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Nanocredits in one credit (one US dollar).
pub const NANOS_PER_CREDIT: i64 = 1_000_000_000;

/// Nanocredits in one cent.
const NANOS_PER_CENT: i64 = NANOS_PER_CREDIT / 100;

/// Decimal digits of precision below one credit; fixed by the nanocredit unit.
const CREDIT_FRACTION_DIGITS: u32 = 9;

/// Decimal digits of precision below one percent in [`DiscountBps`].
const PERCENT_FRACTION_DIGITS: u32 = 2;

/// Significant integer digits handed to rust_decimal at most. It holds any
/// 28 significant digits exactly, so with at most 9 fractional digits 19
/// integer digits always fit. Every caller's range ends far below 10^19
/// (credits near 9.2·10^9, percentages at 100), so a longer integer part is
/// out of range without being converted, however long the string is.
const MAX_INTEGER_DIGITS: usize = 19;

/// How much of a rejected input is echoed back in [`MoneyError::Malformed`]:
/// enough to recognise it, not enough to let a caller bloat logs or responses.
const MALFORMED_ECHO_MAX_CHARS: usize = 64;

/// Why an amount could not be parsed, constructed or computed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MoneyError {
    /// The text is not a plain decimal number (`-`? digits (`.` digits)?).
    /// Carries the offending input, truncated to 64 characters.
    #[error(
        "malformed amount {0:?}: expected digits, optionally preceded by '-' \
         and optionally followed by '.' and more digits"
    )]
    Malformed(String),
    /// The text has more fractional digits than the context allows.
    #[error("amount has more than {max} fractional digits")]
    TooManyFractionalDigits {
        /// The largest number of fractional digits that was allowed.
        max: u32,
    },
    /// The value is well formed but outside the representable or allowed range.
    #[error("amount is out of range")]
    OutOfRange,
    /// Arithmetic on amounts produced a result outside the representable range.
    #[error("amount arithmetic overflowed")]
    Overflow,
    /// The amount had to be positive (or, for [`Credits::parse_non_negative`],
    /// not negative) and was not.
    #[error("amount must be greater than zero")]
    Negative,
}

impl MoneyError {
    fn malformed(input: &str) -> Self {
        // Truncate by characters, not bytes, so multi-byte input cannot make
        // us split a code point (which would panic).
        Self::Malformed(input.chars().take(MALFORMED_ECHO_MAX_CHARS).collect())
    }
}

/// An amount of money in nanocredits (1 credit = 1 USD = 10^9 nanocredits).
///
/// May be negative (refunds, adjustments, debits). All arithmetic is checked.
/// `Display`, `FromStr` and serde use a normalised decimal string in credits:
/// `"25"`, `"0.5"`, `"-0.000000001"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Credits(i64);

impl Credits {
    /// No money.
    pub const ZERO: Self = Self(0);
    /// The largest representable amount (about 9.2 billion credits).
    pub const MAX: Self = Self(i64::MAX);
    /// The smallest (most negative) representable amount.
    pub const MIN: Self = Self(i64::MIN);

    /// Wraps a raw nanocredit count.
    pub const fn from_nanos(nanos: i64) -> Self {
        Self(nanos)
    }

    /// The raw nanocredit count.
    pub const fn nanos(self) -> i64 {
        self.0
    }

    /// `credits` whole credits; [`MoneyError::OutOfRange`] if that many
    /// nanocredits do not fit in an `i64`.
    pub fn from_whole_credits(credits: i64) -> Result<Self, MoneyError> {
        credits
            .checked_mul(NANOS_PER_CREDIT)
            .map(Self)
            .ok_or(MoneyError::OutOfRange)
    }

    /// `cents` hundredths of a credit (e.g. from a card payment);
    /// [`MoneyError::OutOfRange`] if it does not fit.
    pub fn from_cents(cents: i64) -> Result<Self, MoneyError> {
        cents
            .checked_mul(NANOS_PER_CENT)
            .map(Self)
            .ok_or(MoneyError::OutOfRange)
    }

    /// The amount in cents, or `None` unless it is a whole number of cents.
    ///
    /// Deliberately does not round: deciding which way to round when charging
    /// a card is a business decision the caller must make explicitly.
    pub const fn to_cents_exact(self) -> Option<i64> {
        if self.0 % NANOS_PER_CENT == 0 {
            Some(self.0 / NANOS_PER_CENT)
        } else {
            None
        }
    }

    /// `self + rhs`, or [`MoneyError::Overflow`].
    pub fn checked_add(self, rhs: Self) -> Result<Self, MoneyError> {
        self.0
            .checked_add(rhs.0)
            .map(Self)
            .ok_or(MoneyError::Overflow)
    }

    /// `self - rhs`, or [`MoneyError::Overflow`].
    pub fn checked_sub(self, rhs: Self) -> Result<Self, MoneyError> {
        self.0
            .checked_sub(rhs.0)
            .map(Self)
            .ok_or(MoneyError::Overflow)
    }

    /// `-self`, or [`MoneyError::Overflow`] for [`Credits::MIN`], whose
    /// negation is not representable.
    pub fn checked_neg(self) -> Result<Self, MoneyError> {
        self.0.checked_neg().map(Self).ok_or(MoneyError::Overflow)
    }

    /// The sum of `amounts`, or [`MoneyError::Overflow`] if the sum does not
    /// fit.
    ///
    /// Accumulates in `i128`, so only the final result has to fit: the outcome
    /// does not depend on the order of the items (e.g. `[MAX, 1, -1]` is `MAX`).
    /// There is deliberately no `impl Sum`, which could not report overflow.
    pub fn checked_sum<I: IntoIterator<Item = Credits>>(amounts: I) -> Result<Self, MoneyError> {
        let mut total: i128 = 0;
        for amount in amounts {
            // Cannot realistically overflow (it would take 2^64 items), but
            // checking costs nothing and keeps the "never wrap" promise total.
            total = total
                .checked_add(i128::from(amount.0))
                .ok_or(MoneyError::Overflow)?;
        }
        i64::try_from(total)
            .map(Self)
            .map_err(|_| MoneyError::Overflow)
    }

    /// Whether the amount is below zero.
    pub const fn is_negative(self) -> bool {
        self.0 < 0
    }

    /// Whether the amount is exactly zero.
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Whether the amount is above zero.
    pub const fn is_positive(self) -> bool {
        self.0 > 0
    }

    /// Parses a decimal amount of credits with at most 9 fractional digits.
    ///
    /// The grammar is strict: an optional leading `-`, one or more ASCII
    /// digits, then optionally `.` followed by one or more ASCII digits. No
    /// `+`, whitespace, exponent, digit separators, or bare `.5` / `5.`.
    /// Leading zeros are allowed and `"-0"` is zero.
    ///
    /// Errors: [`MoneyError::Malformed`] for grammar violations,
    /// [`MoneyError::TooManyFractionalDigits`] for more than 9 fractional
    /// digits, [`MoneyError::OutOfRange`] if the value does not fit.
    pub fn parse(s: &str) -> Result<Self, MoneyError> {
        Self::parse_with_max_fraction_digits(s, CREDIT_FRACTION_DIGITS)
    }

    /// Like [`Credits::parse`], but allows at most `max_digits` fractional
    /// digits (e.g. 2 for user-entered purchase amounts, which must be whole
    /// cents). `max_digits` above 9 is treated as 9, since nanocredits cannot
    /// hold more precision. Too many digits yields
    /// [`MoneyError::TooManyFractionalDigits`] carrying the effective limit.
    pub fn parse_with_max_fraction_digits(s: &str, max_digits: u32) -> Result<Self, MoneyError> {
        let max = max_digits.min(CREDIT_FRACTION_DIGITS);
        let credits = parse_decimal(s, max)?;
        // At most 9 fractional digits, so the product is a whole number of
        // nanocredits; `to_i64` is `None` for anything outside the i64 range.
        credits
            .checked_mul(Decimal::from(NANOS_PER_CREDIT))
            .and_then(|nanos| nanos.to_i64())
            .map(Self)
            .ok_or(MoneyError::OutOfRange)
    }

    /// [`Credits::parse`], additionally rejecting amounts below zero with
    /// [`MoneyError::Negative`]. Zero is accepted.
    pub fn parse_non_negative(s: &str) -> Result<Self, MoneyError> {
        let amount = Self::parse(s)?;
        if amount.is_negative() {
            return Err(MoneyError::Negative);
        }
        Ok(amount)
    }

    /// [`Credits::parse`], additionally rejecting zero and negative amounts
    /// with [`MoneyError::Negative`].
    pub fn parse_positive(s: &str) -> Result<Self, MoneyError> {
        let amount = Self::parse(s)?;
        if !amount.is_positive() {
            return Err(MoneyError::Negative);
        }
        Ok(amount)
    }
}

impl FromStr for Credits {
    type Err = MoneyError;

    /// Same as [`Credits::parse`].
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Credits {
    /// Normalised decimal credits: no exponent, no trailing fractional zeros,
    /// no trailing `.`, `-` for negatives, `"0"` for zero. Round-trips through
    /// [`Credits::parse`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_decimal(f, Decimal::new(self.0, CREDIT_FRACTION_DIGITS))
    }
}

impl Serialize for Credits {
    /// Serialises as the normalised decimal string (see `Display`).
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Credits {
    /// Deserialises only from a string in the [`Credits::parse`] grammar; a
    /// number is rejected because it may already have passed through a float.
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CreditsVisitor;

        impl Visitor<'_> for CreditsVisitor {
            type Value = Credits;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an amount of credits as a decimal string, e.g. \"12.5\"")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Credits, E> {
                Credits::parse(v).map_err(E::custom)
            }
        }

        deserializer.deserialize_str(CreditsVisitor)
    }
}

/// A volume discount as a fraction of 10 000 (basis points):
/// 0 = no discount, 1 250 = 12.5 %, 10 000 = everything free.
///
/// Always within `0..=10_000`; the constructors enforce it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DiscountBps(u16);

impl DiscountBps {
    /// Basis points in 100 %.
    const MAX_BPS: u16 = 10_000;

    /// No discount.
    pub const ZERO: Self = Self(0);
    /// A 100 % discount.
    pub const FULL: Self = Self(Self::MAX_BPS);

    /// `bps` basis points; [`MoneyError::OutOfRange`] outside `0..=10_000`.
    pub fn new(bps: i32) -> Result<Self, MoneyError> {
        u16::try_from(bps)
            .ok()
            .filter(|&bps| bps <= Self::MAX_BPS)
            .map(Self)
            .ok_or(MoneyError::OutOfRange)
    }

    /// The discount in basis points, `0..=10_000`.
    pub const fn bps(self) -> u16 {
        self.0
    }

    /// Parses a percentage such as `"12.5"` (= 1 250 bps).
    ///
    /// Same strict grammar as [`Credits::parse`], with at most 2 fractional
    /// digits ([`MoneyError::TooManyFractionalDigits`] `{ max: 2 }` otherwise;
    /// a basis point is the finest unit). Values outside `0..=100`, including
    /// any negative value, are [`MoneyError::OutOfRange`]; `"-0"` is zero, as
    /// it is for [`Credits`].
    pub fn parse_percent(s: &str) -> Result<Self, MoneyError> {
        let percent = parse_decimal(s, PERCENT_FRACTION_DIGITS)?;
        // `parse_decimal` gives "-0" no sign, so this is exactly "below zero".
        if percent.is_sign_negative() {
            return Err(MoneyError::OutOfRange);
        }
        // At most 2 fractional digits, so this is a whole number of basis points.
        percent
            .checked_mul(Decimal::ONE_HUNDRED)
            .and_then(|bps| bps.to_u16())
            .filter(|&bps| bps <= Self::MAX_BPS)
            .map(Self)
            .ok_or(MoneyError::OutOfRange)
    }
}

impl fmt::Display for DiscountBps {
    /// Normalised percentage without the `%` sign: 1 250 → `"12.5"`,
    /// 0 → `"0"`, 10 000 → `"100"`, 5 → `"0.05"`. Round-trips through
    /// [`DiscountBps::parse_percent`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_decimal(f, Decimal::new(i64::from(self.0), PERCENT_FRACTION_DIGITS))
    }
}

/// Parses `s` in the strict grammar shared by every amount: `-`? digits
/// (`.` digits)?, with at most `max_fraction_digits` (at most 9) digits after
/// the point. rust_decimal's own parsers are more lenient (`+`, `_`, `.5`,
/// `5.`, exponents), so the text is checked here and rust_decimal only
/// converts what passed. `"-0"` comes back as plain zero, without a sign.
///
/// Errors, in this order: [`MoneyError::Malformed`],
/// [`MoneyError::TooManyFractionalDigits`], and [`MoneyError::OutOfRange`]
/// for more than [`MAX_INTEGER_DIGITS`] significant integer digits. The
/// caller checks its own range.
fn parse_decimal(s: &str, max_fraction_digits: u32) -> Result<Decimal, MoneyError> {
    let (negative, unsigned) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (integer, fraction) = match unsigned.split_once('.') {
        Some((integer, fraction)) => (integer, Some(fraction)),
        None => (unsigned, None),
    };
    // `is_ascii_digit` rather than `char::is_numeric`: other scripts'
    // digits must not sneak in.
    let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
    // A second '.' ends up in `fraction` and fails the digit check.
    if !digits(integer) || fraction.is_some_and(|f| !digits(f)) {
        return Err(MoneyError::malformed(s));
    }
    // Precision is judged on the text, so trailing zeros count. The limit is
    // at most 9, so the cast is lossless on every target.
    if fraction.map_or(0, str::len) > max_fraction_digits as usize {
        return Err(MoneyError::TooManyFractionalDigits {
            max: max_fraction_digits,
        });
    }
    // Leading zeros are not significant and do not count towards the range;
    // skip them but keep one integer digit, so "000.5" is converted as "0.5".
    let zeros = integer.len() - integer.trim_start_matches('0').len();
    if integer.len() - zeros > MAX_INTEGER_DIGITS {
        return Err(MoneyError::OutOfRange);
    }
    let significant = &unsigned[zeros.min(integer.len() - 1)..];
    // Cannot fail: at most 28 plain digits, which rust_decimal holds exactly.
    // Should it ever, the value is too big for it, hence out of range.
    let mut value = Decimal::from_str_exact(significant).map_err(|_| MoneyError::OutOfRange)?;
    value.set_sign_negative(negative && !value.is_zero());
    Ok(value)
}

/// Writes `value` as a normalised decimal: no exponent, no trailing
/// fractional zeros, no trailing `.`, `"0"` for zero.
///
/// Through `write!` rather than `Display::fmt(&value, f)`, so that format
/// flags such as `{:.2}` are ignored as they always were: an amount shown
/// must never be a rounded one.
fn write_decimal(f: &mut fmt::Formatter<'_>, value: Decimal) -> fmt::Result {
    write!(f, "{}", value.normalize())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Credits, MoneyError> {
        Credits::parse(s)
    }

    fn n(nanos: i64) -> Credits {
        Credits::from_nanos(nanos)
    }

    /// Deterministic xorshift64 so property loops need no extra dependency.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            let mut x = self.0;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0 = x;
            x
        }
    }

    #[test]
    fn display_examples() {
        assert_eq!(n(25_000_000_000).to_string(), "25");
        assert_eq!(n(500_000_000).to_string(), "0.5");
        assert_eq!(n(150).to_string(), "0.00000015");
        assert_eq!(n(-1).to_string(), "-0.000000001");
        assert_eq!(n(0).to_string(), "0");
        assert_eq!(n(1).to_string(), "0.000000001");
        assert_eq!(n(1_000_000_001).to_string(), "1.000000001");
        assert_eq!(n(-2_500_000_000).to_string(), "-2.5");
        assert_eq!(Credits::MAX.to_string(), "9223372036.854775807");
        assert_eq!(Credits::MIN.to_string(), "-9223372036.854775808");
    }

    #[test]
    fn parse_examples() {
        assert_eq!(p("25"), Ok(n(25_000_000_000)));
        assert_eq!(p("0.5"), Ok(n(500_000_000)));
        assert_eq!(p("0.00000015"), Ok(n(150)));
        assert_eq!(p("-0.000000001"), Ok(n(-1)));
        assert_eq!(p("007.5"), Ok(n(7_500_000_000)));
        assert_eq!(p("-0"), Ok(Credits::ZERO));
        assert_eq!(p("-0.000"), Ok(Credits::ZERO));
        assert_eq!(p("0"), Ok(Credits::ZERO));
        assert_eq!(p("1.000000000"), Ok(n(NANOS_PER_CREDIT)));
        assert_eq!(p("0.123456789"), Ok(n(123_456_789)));
        assert_eq!("12.34".parse::<Credits>(), Ok(n(12_340_000_000)));
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "", "-", "+1", " 1", "1 ", "1\n", "1e5", "1E5", ".5", "-.5", "5.", "-5.", "1_000",
            "1,5", "1.2.3", "--1", "-+1", "1-", "0x10", "abc", "١٢", "1.5a", "NaN", "inf", ".",
        ] {
            assert_eq!(p(bad), Err(MoneyError::malformed(bad)), "input {bad:?}");
        }
    }

    #[test]
    fn malformed_echo_is_truncated_by_chars() {
        let long = "x".repeat(1000);
        assert_eq!(p(&long), Err(MoneyError::Malformed("x".repeat(64))));
        // Multi-byte characters must not be split (which would panic).
        let euros = "€".repeat(100);
        assert_eq!(p(&euros), Err(MoneyError::Malformed("€".repeat(64))));
    }

    #[test]
    fn fractional_digit_limit() {
        assert_eq!(p("0.000000001"), Ok(n(1)));
        assert_eq!(
            p("0.0000000001"),
            Err(MoneyError::TooManyFractionalDigits { max: 9 })
        );
        // Trailing zeros still count: precision is judged on the text.
        assert_eq!(
            p("1.0000000000"),
            Err(MoneyError::TooManyFractionalDigits { max: 9 })
        );
        assert_eq!(
            MoneyError::TooManyFractionalDigits { max: 9 }.to_string(),
            "amount has more than 9 fractional digits"
        );
    }

    #[test]
    fn parse_with_max_fraction_digits() {
        let two = |s| Credits::parse_with_max_fraction_digits(s, 2);
        assert_eq!(two("10"), Ok(n(10_000_000_000)));
        assert_eq!(two("10.5"), Ok(n(10_500_000_000)));
        assert_eq!(two("10.99"), Ok(n(10_990_000_000)));
        assert_eq!(
            two("10.999"),
            Err(MoneyError::TooManyFractionalDigits { max: 2 })
        );
        assert_eq!(
            two("10.9999999999"),
            Err(MoneyError::TooManyFractionalDigits { max: 2 })
        );
        assert_eq!(two("10."), Err(MoneyError::malformed("10.")));
        assert_eq!(
            Credits::parse_with_max_fraction_digits("1.5", 0),
            Err(MoneyError::TooManyFractionalDigits { max: 0 })
        );
        assert_eq!(
            Credits::parse_with_max_fraction_digits("1", 0),
            Ok(n(NANOS_PER_CREDIT))
        );
        // Limits beyond nanocredit precision are clamped to 9.
        assert_eq!(
            Credits::parse_with_max_fraction_digits("0.0000000001", 20),
            Err(MoneyError::TooManyFractionalDigits { max: 9 })
        );
    }

    #[test]
    fn range_boundaries() {
        assert_eq!(p("9223372036.854775807"), Ok(Credits::MAX));
        assert_eq!(p("9223372036.854775808"), Err(MoneyError::OutOfRange));
        assert_eq!(p("-9223372036.854775808"), Ok(Credits::MIN));
        assert_eq!(p("-9223372036.854775809"), Err(MoneyError::OutOfRange));
        assert_eq!(p("9223372037"), Err(MoneyError::OutOfRange));
        assert_eq!(p("-9223372037"), Err(MoneyError::OutOfRange));
        assert_eq!(p("9223372036"), Ok(n(9_223_372_036_000_000_000)));
        assert_eq!(p("-9223372036"), Ok(n(-9_223_372_036_000_000_000)));
        // Leading zeros do not count towards the range.
        assert_eq!(p("0009223372036.854775807"), Ok(Credits::MAX));
    }

    #[test]
    fn huge_inputs_are_out_of_range_not_panics() {
        let huge = format!("1{}", "0".repeat(1000));
        assert_eq!(p(&huge), Err(MoneyError::OutOfRange));
        assert_eq!(p(&format!("-{huge}")), Err(MoneyError::OutOfRange));
        assert_eq!(p(&format!("{huge}.5")), Err(MoneyError::OutOfRange));
        assert_eq!(p(&"9".repeat(1000)), Err(MoneyError::OutOfRange));
        // A thousand zeros is still just zero.
        assert_eq!(p(&"0".repeat(1000)), Ok(Credits::ZERO));
    }

    #[test]
    fn long_inputs_around_rust_decimal_precision() {
        // Leading zeros are skipped before conversion, however many there are.
        let zeros = "0".repeat(40);
        assert_eq!(p(&format!("{zeros}9223372036.854775807")), Ok(Credits::MAX));
        assert_eq!(p(&format!("-{zeros}0.000000001")), Ok(n(-1)));
        assert_eq!(p(&format!("{zeros}.5")), Ok(n(500_000_000)));
        // 28 significant digits convert exactly and are then out of range;
        // longer integer parts are out of range without conversion.
        assert_eq!(
            p("9999999999999999999.999999999"),
            Err(MoneyError::OutOfRange)
        );
        assert_eq!(p(&"9".repeat(20)), Err(MoneyError::OutOfRange));
        assert_eq!(
            p(&format!("-{}", "9".repeat(29))),
            Err(MoneyError::OutOfRange)
        );
        // The fractional digit limit is still reported first.
        assert_eq!(
            p(&format!("{}.0000000001", "9".repeat(30))),
            Err(MoneyError::TooManyFractionalDigits { max: 9 })
        );
        let pct = DiscountBps::parse_percent;
        assert_eq!(pct(&format!("{zeros}100.00")), Ok(DiscountBps::FULL));
        assert_eq!(pct("-0.00"), Ok(DiscountBps::ZERO));
        assert_eq!(pct(&"1".repeat(25)), Err(MoneyError::OutOfRange));
    }

    #[test]
    fn checked_arithmetic() {
        assert_eq!(n(2).checked_add(n(3)), Ok(n(5)));
        assert_eq!(n(2).checked_sub(n(3)), Ok(n(-1)));
        assert_eq!(n(2).checked_neg(), Ok(n(-2)));
        assert_eq!(Credits::MAX.checked_add(n(1)), Err(MoneyError::Overflow));
        assert_eq!(Credits::MIN.checked_add(n(-1)), Err(MoneyError::Overflow));
        assert_eq!(Credits::MIN.checked_sub(n(1)), Err(MoneyError::Overflow));
        assert_eq!(
            Credits::ZERO.checked_sub(Credits::MIN),
            Err(MoneyError::Overflow)
        );
        assert_eq!(Credits::MIN.checked_neg(), Err(MoneyError::Overflow));
        assert_eq!(Credits::MAX.checked_neg(), Ok(n(-i64::MAX)));
        assert_eq!(Credits::MAX.checked_sub(Credits::MAX), Ok(Credits::ZERO));
    }

    #[test]
    fn checked_sum() {
        assert_eq!(Credits::checked_sum([]), Ok(Credits::ZERO));
        assert_eq!(Credits::checked_sum([n(1), n(2), n(-4)]), Ok(n(-1)));
        assert_eq!(
            Credits::checked_sum([Credits::MAX, n(1)]),
            Err(MoneyError::Overflow)
        );
        assert_eq!(
            Credits::checked_sum([Credits::MIN, n(-1)]),
            Err(MoneyError::Overflow)
        );
        // Only the total has to fit, so order does not matter.
        assert_eq!(
            Credits::checked_sum([Credits::MAX, n(1), n(-1)]),
            Ok(Credits::MAX)
        );
        assert_eq!(
            Credits::checked_sum(vec![Credits::MAX; 4].into_iter().chain([Credits::MIN; 4])),
            Ok(n(-4))
        );
    }

    #[test]
    fn predicates_and_ordering() {
        assert!(n(-1).is_negative() && !n(0).is_negative() && !n(1).is_negative());
        assert!(n(0).is_zero() && !n(1).is_zero());
        assert!(n(1).is_positive() && !n(0).is_positive());
        assert_eq!(n(3).min(n(-3)), n(-3));
        assert_eq!(n(3).max(n(-3)), n(3));
        assert_eq!(Credits::default(), Credits::ZERO);
    }

    #[test]
    fn whole_credits_and_cents() {
        assert_eq!(Credits::from_whole_credits(25), Ok(n(25_000_000_000)));
        assert_eq!(Credits::from_whole_credits(-1), Ok(n(-NANOS_PER_CREDIT)));
        assert_eq!(
            Credits::from_whole_credits(9_223_372_036),
            Ok(n(9_223_372_036_000_000_000))
        );
        assert_eq!(
            Credits::from_whole_credits(9_223_372_037),
            Err(MoneyError::OutOfRange)
        );
        assert_eq!(
            Credits::from_whole_credits(i64::MIN),
            Err(MoneyError::OutOfRange)
        );

        assert_eq!(Credits::from_cents(1999), Ok(n(19_990_000_000)));
        assert_eq!(Credits::from_cents(-5), Ok(n(-50_000_000)));
        assert_eq!(Credits::from_cents(i64::MAX), Err(MoneyError::OutOfRange));

        assert_eq!(n(19_990_000_000).to_cents_exact(), Some(1999));
        assert_eq!(n(-50_000_000).to_cents_exact(), Some(-5));
        assert_eq!(Credits::ZERO.to_cents_exact(), Some(0));
        assert_eq!(n(19_990_000_001).to_cents_exact(), None);
        assert_eq!(n(1).to_cents_exact(), None);
        assert_eq!(n(-1).to_cents_exact(), None);
        assert_eq!(Credits::MIN.to_cents_exact(), None);
        assert_eq!(Credits::MAX.to_cents_exact(), None);
        for cents in [0, 1, -1, 42, 123_456_789, -987_654_321] {
            assert_eq!(
                Credits::from_cents(cents).unwrap().to_cents_exact(),
                Some(cents)
            );
        }
    }

    #[test]
    fn sign_restricted_parsing() {
        assert_eq!(Credits::parse_non_negative("0"), Ok(Credits::ZERO));
        assert_eq!(Credits::parse_non_negative("-0"), Ok(Credits::ZERO));
        assert_eq!(Credits::parse_non_negative("1.5"), Ok(n(1_500_000_000)));
        assert_eq!(
            Credits::parse_non_negative("-0.000000001"),
            Err(MoneyError::Negative)
        );
        assert_eq!(
            Credits::parse_non_negative("x"),
            Err(MoneyError::malformed("x"))
        );

        assert_eq!(Credits::parse_positive("0.000000001"), Ok(n(1)));
        assert_eq!(Credits::parse_positive("0"), Err(MoneyError::Negative));
        assert_eq!(Credits::parse_positive("-0"), Err(MoneyError::Negative));
        assert_eq!(Credits::parse_positive("-3"), Err(MoneyError::Negative));
        assert_eq!(
            Credits::parse_positive("0.0000000001"),
            Err(MoneyError::TooManyFractionalDigits { max: 9 })
        );
        assert_eq!(
            MoneyError::Negative.to_string(),
            "amount must be greater than zero"
        );
    }

    #[test]
    fn serde_uses_strings_only() {
        assert_eq!(serde_json::to_string(&n(500_000_000)).unwrap(), "\"0.5\"");
        assert_eq!(
            serde_json::to_string(&Credits::MIN).unwrap(),
            "\"-9223372036.854775808\""
        );
        assert_eq!(
            serde_json::from_str::<Credits>("\"0.5\"").unwrap(),
            n(500_000_000)
        );
        assert_eq!(
            serde_json::from_str::<Credits>("\"-0.000000001\"").unwrap(),
            n(-1)
        );
        // Numbers are refused outright, integer or not.
        assert!(serde_json::from_str::<Credits>("5").is_err());
        assert!(serde_json::from_str::<Credits>("0.5").is_err());
        assert!(serde_json::from_str::<Credits>("-1").is_err());
        assert!(serde_json::from_str::<Credits>("null").is_err());
        // Strings must follow the strict grammar.
        let err = serde_json::from_str::<Credits>("\"5.\"").unwrap_err();
        assert!(err.to_string().contains("malformed amount"), "{err}");
        let err = serde_json::from_str::<Credits>("\"0.0000000001\"").unwrap_err();
        assert!(
            err.to_string().contains("more than 9 fractional digits"),
            "{err}"
        );
        assert!(serde_json::from_str::<Credits>("\" 1\"").is_err());
        // Round trip inside a struct.
        let v: Vec<Credits> = serde_json::from_str("[\"1\",\"-2.25\"]").unwrap();
        assert_eq!(v, [n(NANOS_PER_CREDIT), n(-2_250_000_000)]);
        assert_eq!(serde_json::to_string(&v).unwrap(), "[\"1\",\"-2.25\"]");
    }

    #[test]
    fn format_parse_round_trip_property() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let edges = [
            0,
            1,
            -1,
            i64::MAX,
            i64::MIN,
            i64::MAX - 1,
            i64::MIN + 1,
            NANOS_PER_CREDIT,
        ];
        for i in 0..5000_u32 {
            let raw = rng.next();
            // Mix full-range values with small ones, which have more
            // interesting fractional parts (leading/trailing zeros).
            let x = match i % 3 {
                0 => raw.cast_signed(),
                1 => raw.cast_signed() % 10_000_000_000,
                _ => raw.cast_signed() % 1000 * 1_000_000,
            };
            for v in [x].into_iter().chain(edges) {
                let s = n(v).to_string();
                assert_eq!(p(&s), Ok(n(v)), "round trip of {v} via {s:?}");
                assert!(
                    !s.ends_with('0') || !s.contains('.'),
                    "not normalised: {s:?}"
                );
                assert!(!s.ends_with('.'), "not normalised: {s:?}");
            }
        }
    }

    #[test]
    fn discount_new() {
        assert_eq!(DiscountBps::new(0), Ok(DiscountBps::ZERO));
        assert_eq!(DiscountBps::new(10_000), Ok(DiscountBps::FULL));
        assert_eq!(DiscountBps::new(1250).map(DiscountBps::bps), Ok(1250));
        assert_eq!(DiscountBps::new(10_001), Err(MoneyError::OutOfRange));
        assert_eq!(DiscountBps::new(-1), Err(MoneyError::OutOfRange));
        assert_eq!(DiscountBps::new(i32::MIN), Err(MoneyError::OutOfRange));
        assert_eq!(DiscountBps::new(i32::MAX), Err(MoneyError::OutOfRange));
        assert_eq!(DiscountBps::new(65_536), Err(MoneyError::OutOfRange));
        assert_eq!(DiscountBps::default(), DiscountBps::ZERO);
    }

    #[test]
    fn discount_parse_percent() {
        let pct = DiscountBps::parse_percent;
        fn bps(s: &str) -> Result<u16, MoneyError> {
            DiscountBps::parse_percent(s).map(DiscountBps::bps)
        }
        assert_eq!(bps("12.5"), Ok(1250));
        assert_eq!(bps("0"), Ok(0));
        assert_eq!(bps("-0"), Ok(0));
        assert_eq!(bps("0.01"), Ok(1));
        assert_eq!(bps("0.05"), Ok(5));
        assert_eq!(bps("100"), Ok(10_000));
        assert_eq!(bps("100.00"), Ok(10_000));
        assert_eq!(bps("099.99"), Ok(9_999));
        assert_eq!(bps("100.01"), Err(MoneyError::OutOfRange));
        assert_eq!(bps("101"), Err(MoneyError::OutOfRange));
        assert_eq!(bps("-0.01"), Err(MoneyError::OutOfRange));
        assert_eq!(bps("-5"), Err(MoneyError::OutOfRange));
        assert_eq!(bps(&"9".repeat(1000)), Err(MoneyError::OutOfRange));
        assert_eq!(
            bps("12.345"),
            Err(MoneyError::TooManyFractionalDigits { max: 2 })
        );
        assert_eq!(
            bps("0.000"),
            Err(MoneyError::TooManyFractionalDigits { max: 2 })
        );
        for bad in ["", "+5", "5%", " 5", ".5", "5.", "1e1", "12,5", "-"] {
            assert_eq!(pct(bad), Err(MoneyError::malformed(bad)), "input {bad:?}");
        }
    }

    #[test]
    fn discount_display_round_trips() {
        let show = |bps| DiscountBps::new(bps).unwrap().to_string();
        assert_eq!(show(1250), "12.5");
        assert_eq!(show(0), "0");
        assert_eq!(show(10_000), "100");
        assert_eq!(show(5), "0.05");
        assert_eq!(show(1), "0.01");
        assert_eq!(show(1234), "12.34");
        for bps in 0..=10_000 {
            let d = DiscountBps::new(bps).unwrap();
            assert_eq!(DiscountBps::parse_percent(&d.to_string()), Ok(d));
        }
    }
}
