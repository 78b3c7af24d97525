//! Usage pricing: token counts × per-million prices → an exact charge.
//!
//! The charge is computed exactly with `rust_decimal` and rounded up to a
//! whole nanocredit exactly once, at the very end. Rounding each part (prompt,
//! completion, discount) separately would make the total depend on how the
//! bill happens to be split, and would let many tiny requests each gain or
//! lose a fraction of a nanocredit. Rounding up (never down) means usage is
//! never given away by truncation; the bias is below one nanocredit per
//! request. Only the results become `i64` nanocredit [`Credits`] again.

use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};

use crate::money::{Credits, DiscountBps, MoneyError};

/// Largest token count accepted per field per request.
///
/// Far above any real model's context or output (so it never rejects genuine
/// usage), it rejects absurd or corrupted input early with a precise error,
/// and it bounds the intermediate arithmetic: with at most 10^8 tokens and a
/// price of at most `i64::MAX` nanocredits, every intermediate value fits in
/// `rust_decimal` exactly (checked at compile time below).
pub const TOKENS_MAX: i64 = 100_000_000;

/// Prices are quoted per this many tokens.
const TOKENS_PER_PRICE_UNIT: i64 = 1_000_000;

/// Basis points in 100 %.
const BPS_PER_WHOLE: u16 = 10_000;

/// The largest mantissa `rust_decimal` holds, 2^96 − 1.
const DECIMAL_MANTISSA_MAX: i128 = (1 << 96) - 1;

// rust_decimal's checked operations fail only when the integer part
// overflows; a result with more significant digits than the mantissa holds is
// silently rounded instead. The largest mantissa in `usage_cost` is the sum of
// two maximal products (tokens × price, in millionths of a nanocredit). Fail
// the build if raising TOKENS_MAX ever makes that too big, so that nothing in
// `usage_cost` is ever rounded except on purpose.
const _: () = {
    let max_product = TOKENS_MAX as i128 * i64::MAX as i128;
    assert!(max_product <= DECIMAL_MANTISSA_MAX / 2);
};

/// A model's prices, in credits per million tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TokenPrice {
    /// Price of one million prompt (input) tokens.
    pub prompt_per_million: Credits,
    /// Price of one million completion (output) tokens.
    pub completion_per_million: Credits,
}

impl TokenPrice {
    /// Builds a price from two decimal strings in credits per million tokens
    /// (e.g. `"0.15"`, `"0.6"`), as found in configuration. Negative prices
    /// are rejected with [`MoneyError::Negative`]; zero (a free model) is fine.
    pub fn parse(
        prompt_per_million: &str,
        completion_per_million: &str,
    ) -> Result<Self, MoneyError> {
        Ok(Self {
            prompt_per_million: Credits::parse_non_negative(prompt_per_million)?,
            completion_per_million: Credits::parse_non_negative(completion_per_million)?,
        })
    }
}

/// The charge for one request, split for display.
///
/// Invariant: `prompt_cost + completion_cost - discount == total`, exactly,
/// with every field non-negative. `total` is the amount actually charged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CostBreakdown {
    /// Prompt tokens at list price, rounded up to a whole nanocredit.
    pub prompt_cost: Credits,
    /// Completion tokens at list price, rounded up to a whole nanocredit.
    pub completion_cost: Credits,
    /// Whatever makes the parts add up: the volume discount plus any rounding
    /// saved by rounding the sum once instead of each part (so it can be a
    /// nanocredit or so even with no discount).
    pub discount: Credits,
    /// The amount to charge.
    pub total: Credits,
}

/// Why a usage charge could not be computed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PricingError {
    /// A token count was negative or above [`TOKENS_MAX`].
    #[error("{field} must be between 0 and {max}, got {value}")]
    TokensOutOfRange {
        /// The offending field, as named in the API (`promptTokens` or
        /// `completionTokens`).
        field: &'static str,
        /// The rejected count.
        value: i64,
        /// The largest count allowed ([`TOKENS_MAX`]).
        max: i64,
    },
    /// A configured price was below zero.
    #[error("token price must not be negative")]
    NegativePrice,
    /// The charge (or one of its display parts) does not fit in [`Credits`].
    #[error("usage cost does not fit in the credits range")]
    Overflow,
}

/// Computes the charge for `prompt_tokens` and `completion_tokens` at `price`
/// with a volume `discount`.
///
/// With `pp`/`cp` the prices in nanocredits per million tokens and `bps` the
/// discount:
///
/// ```text
/// total = ceil((prompt_tokens·pp + completion_tokens·cp) · (10_000 − bps)
///              / (1_000_000 · 10_000))
/// ```
///
/// evaluated exactly with a single rounding up. The display parts are
/// `prompt_cost = ceil(prompt_tokens·pp / 10^6)`, likewise
/// `completion_cost`, and `discount = prompt_cost + completion_cost − total`,
/// so the parts always add up.
///
/// Errors: [`PricingError::TokensOutOfRange`] for counts outside
/// `0..=TOKENS_MAX` (prompt checked first), [`PricingError::NegativePrice`],
/// and [`PricingError::Overflow`] if `total`, either part, or their sum does
/// not fit in [`Credits`] — the whole breakdown must be representable, even
/// when a 100 % discount would make the total itself zero.
pub fn usage_cost(
    price: TokenPrice,
    prompt_tokens: i64,
    completion_tokens: i64,
    discount: DiscountBps,
) -> Result<CostBreakdown, PricingError> {
    check_tokens("promptTokens", prompt_tokens)?;
    check_tokens("completionTokens", completion_tokens)?;
    if price.prompt_per_million.is_negative() || price.completion_per_million.is_negative() {
        return Err(PricingError::NegativePrice);
    }

    // Exact amounts in nanocredits, with up to 6 fractional digits.
    let prompt_exact = list_cost(prompt_tokens, price.prompt_per_million)?;
    let completion_exact = list_cost(completion_tokens, price.completion_per_million)?;
    let gross_exact = prompt_exact
        .checked_add(completion_exact)
        .ok_or(PricingError::Overflow)?;

    let net = discounted_rounded_up(gross_exact, discount).ok_or(PricingError::Overflow)?;
    let total = to_credits(net)?;
    let prompt_cost = to_credits(round_up(prompt_exact))?;
    let completion_cost = to_credits(round_up(completion_exact))?;
    // Requiring the gross to fit keeps the breakdown checkable with ordinary
    // `Credits` arithmetic by whoever displays or stores it.
    let gross_cost = prompt_cost
        .checked_add(completion_cost)
        .map_err(|_| PricingError::Overflow)?;
    let discount = gross_cost
        .checked_sub(total)
        .map_err(|_| PricingError::Overflow)?;
    // ceil(g·(1−d)) ≤ ceil(g) ≤ ceil(p) + ceil(c), so this cannot fail.
    debug_assert!(!discount.is_negative(), "negative discount {discount}");

    Ok(CostBreakdown {
        prompt_cost,
        completion_cost,
        discount,
        total,
    })
}

fn check_tokens(field: &'static str, value: i64) -> Result<(), PricingError> {
    if (0..=TOKENS_MAX).contains(&value) {
        Ok(())
    } else {
        Err(PricingError::TokensOutOfRange {
            field,
            value,
            max: TOKENS_MAX,
        })
    }
}

/// `tokens` at `per_million`, exactly, in nanocredits.
fn list_cost(tokens: i64, per_million: Credits) -> Result<Decimal, PricingError> {
    Decimal::from(tokens)
        .checked_mul(Decimal::from(per_million.nanos()))
        .and_then(|cost| cost.checked_div(Decimal::from(TOKENS_PER_PRICE_UNIT)))
        .ok_or(PricingError::Overflow)
}

/// `ceil(nanos × (10 000 − bps) / 10 000)`, exactly.
///
/// The exact product can need 29 significant digits (19 integer ones plus
/// 6 + 4 fractional ones), one more than `rust_decimal` holds, and rounding
/// it to fit can cross a whole nanocredit: it would then charge one
/// nanocredit less than the exact ceiling. So the whole nanocredits and the
/// rest are multiplied separately, which keeps both products exact, and only
/// the fractions of a nanocredit (each below one) are added before rounding
/// up once.
fn discounted_rounded_up(nanos: Decimal, discount: DiscountBps) -> Option<Decimal> {
    let share =
        Decimal::from(BPS_PER_WHOLE - discount.bps()).checked_div(Decimal::from(BPS_PER_WHOLE))?;
    let whole = nanos.trunc().checked_mul(share)?;
    let rest = nanos.fract().checked_mul(share)?;
    let fractions = round_up(whole.fract().checked_add(rest)?);
    whole.trunc().checked_add(fractions)
}

/// Rounds an amount of nanocredits up to a whole nanocredit.
fn round_up(nanos: Decimal) -> Decimal {
    nanos.round_dp_with_strategy(0, RoundingStrategy::ToPositiveInfinity)
}

/// A whole number of nanocredits as [`Credits`], or
/// [`PricingError::Overflow`] if it does not fit.
fn to_credits(nanos: Decimal) -> Result<Credits, PricingError> {
    debug_assert!(nanos.fract().is_zero(), "not whole nanocredits: {nanos}");
    nanos
        .to_i64()
        .map(Credits::from_nanos)
        .ok_or(PricingError::Overflow)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::money::NANOS_PER_CREDIT;

    fn n(nanos: i64) -> Credits {
        Credits::from_nanos(nanos)
    }

    fn price(prompt_nanos: i64, completion_nanos: i64) -> TokenPrice {
        TokenPrice {
            prompt_per_million: n(prompt_nanos),
            completion_per_million: n(completion_nanos),
        }
    }

    fn bps(b: i32) -> DiscountBps {
        DiscountBps::new(b).unwrap()
    }

    fn breakdown(prompt: i64, completion: i64, discount: i64, total: i64) -> CostBreakdown {
        CostBreakdown {
            prompt_cost: n(prompt),
            completion_cost: n(completion),
            discount: n(discount),
            total: n(total),
        }
    }

    /// Deterministic xorshift64 so the property loop needs no extra dependency.
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

        /// Uniform-ish in `0..=max` (modulo bias is irrelevant here).
        fn upto(&mut self, max: i64) -> i64 {
            let bound = max.unsigned_abs() + 1;
            (self.next() % bound).cast_signed()
        }
    }

    /// The hand-rolled `i128` implementation that `usage_cost` replaced (its
    /// arithmetic unchanged), the reference it must match bit for bit.
    fn usage_cost_reference(
        price: TokenPrice,
        prompt_tokens: i64,
        completion_tokens: i64,
        discount: DiscountBps,
    ) -> Result<CostBreakdown, PricingError> {
        const TOKENS_PER_PRICE_UNIT: i128 = 1_000_000;
        const BPS_PER_WHOLE: i128 = 10_000;
        /// `ceil(numerator / denominator)` for `numerator >= 0`, `denominator > 0`.
        fn ceil_div(numerator: i128, denominator: i128) -> i128 {
            debug_assert!(numerator >= 0 && denominator > 0);
            numerator / denominator + i128::from(numerator % denominator != 0)
        }
        fn to_credits(nanos: i128) -> Result<Credits, PricingError> {
            i64::try_from(nanos)
                .map(Credits::from_nanos)
                .map_err(|_| PricingError::Overflow)
        }

        check_tokens("promptTokens", prompt_tokens)?;
        check_tokens("completionTokens", completion_tokens)?;
        if price.prompt_per_million.is_negative() || price.completion_per_million.is_negative() {
            return Err(PricingError::NegativePrice);
        }
        let prompt_exact = i128::from(prompt_tokens) * i128::from(price.prompt_per_million.nanos());
        let completion_exact =
            i128::from(completion_tokens) * i128::from(price.completion_per_million.nanos());
        let gross_exact = prompt_exact + completion_exact;
        let net_numerator = gross_exact * (BPS_PER_WHOLE - i128::from(discount.bps()));
        let total = to_credits(ceil_div(
            net_numerator,
            TOKENS_PER_PRICE_UNIT * BPS_PER_WHOLE,
        ))?;
        let prompt_cost = to_credits(ceil_div(prompt_exact, TOKENS_PER_PRICE_UNIT))?;
        let completion_cost = to_credits(ceil_div(completion_exact, TOKENS_PER_PRICE_UNIT))?;
        let gross_cost = prompt_cost
            .checked_add(completion_cost)
            .map_err(|_| PricingError::Overflow)?;
        let discount = gross_cost
            .checked_sub(total)
            .map_err(|_| PricingError::Overflow)?;
        Ok(CostBreakdown {
            prompt_cost,
            completion_cost,
            discount,
            total,
        })
    }

    /// `x^-1 mod m` for `x` coprime to `m` (extended Euclid).
    fn mod_inverse(x: i128, m: i128) -> i128 {
        let (mut r0, mut r1, mut t0, mut t1) = (m, x.rem_euclid(m), 0_i128, 1_i128);
        while r1 != 0 {
            let q = r0 / r1;
            (r0, r1) = (r1, r0 - q * r1);
            (t0, t1) = (t1, t0 - q * t1);
        }
        assert_eq!(r0, 1, "{x} is not invertible mod {m}");
        t0.rem_euclid(m)
    }

    /// A request whose exact discounted charge is a whole number of
    /// nanocredits above 7.9·10^18 plus `r`·10^-10 (`r` in 1..=4): 29
    /// significant digits, so a single rounded `rust_decimal` product would
    /// lose the tail and charge one nanocredit less than the exact ceiling.
    fn beyond_28_digits(rng: &mut XorShift) -> (TokenPrice, i64, i64, DiscountBps) {
        const UNIT: i128 = 10_000_000_000; // 10^6 (per million) × 10^4 (bps)
        // A share of 90–99.99 % not divisible by 2 or 5, so it is invertible.
        let share = loop {
            let share = 9_000 + rng.upto(999);
            if share % 2 != 0 && share % 5 != 0 {
                break i128::from(share);
            }
        };
        let prompt_price = 8_900_000_000_000_000_000 + rng.upto(300_000_000_000_000_000);
        let r = 1 + i128::from(rng.upto(3));
        // prompt: 10^6 tokens × prompt_price; completion: one token at the
        // price that makes the exact numerator ≡ r (mod 10^10).
        let completion_price =
            (r * mod_inverse(share, UNIT) - 1_000_000 * i128::from(prompt_price)).rem_euclid(UNIT);
        let completion_price = i64::try_from(completion_price).unwrap();
        let discount = bps(i32::try_from(10_000 - share).unwrap());
        (
            price(prompt_price, completion_price),
            1_000_000,
            1,
            discount,
        )
    }

    /// A token count, mostly in range, sometimes at or beyond its limits.
    fn tokens(rng: &mut XorShift) -> i64 {
        match rng.next() % 16 {
            0 => 0,
            1 => TOKENS_MAX,
            2 => TOKENS_MAX - rng.upto(10),
            3 => [-1, TOKENS_MAX + 1, i64::MIN, i64::MAX, -rng.upto(i64::MAX)]
                [(rng.next() % 5) as usize],
            _ => {
                let magnitude = 10_i64.pow((rng.next() % 9) as u32);
                rng.upto(magnitude)
            }
        }
    }

    /// A price in nanocredits per million: any magnitude (so mostly nine
    /// fractional digits of a credit), zero, near `i64::MAX`, or negative.
    fn price_nanos(rng: &mut XorShift) -> i64 {
        match rng.next() % 16 {
            0 => 0,
            1 => i64::MAX - rng.upto(1_000),
            2 => -1 - rng.upto(i64::MAX - 1),
            3 => rng.upto(10_000) * NANOS_PER_CREDIT + 1 + rng.upto(NANOS_PER_CREDIT - 2),
            _ => {
                let magnitude = 10_i64.pow((rng.next() % 19) as u32);
                rng.upto(magnitude)
            }
        }
    }

    /// A price that puts `tokens` of it within a few nanocredits of
    /// `i64::MAX`, where the range checks decide.
    fn near_overflow_price(rng: &mut XorShift, tokens: i64) -> i64 {
        let exact = i128::from(i64::MAX) * 1_000_000 / i128::from(tokens.max(1));
        let price = exact + i128::from(rng.upto(2_000)) - 1_000;
        i64::try_from(price.clamp(0, i128::from(i64::MAX))).unwrap()
    }

    fn discount(rng: &mut XorShift) -> DiscountBps {
        match rng.next() % 8 {
            0 => DiscountBps::ZERO,
            1 => DiscountBps::FULL,
            2 => bps(1),
            3 => bps(9_999),
            _ => bps(i32::try_from(rng.upto(10_000)).unwrap()),
        }
    }

    #[test]
    fn usage_cost_matches_reference() {
        const CASES: u32 = 300_000;
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        let (mut ok, mut overflow, mut negative, mut tokens_bad, mut deep) = (0, 0, 0, 0, 0);
        for i in 0..CASES {
            let (p, pt, ct, d) = match i % 8 {
                // Exact results that need 29 significant digits.
                0 => beyond_28_digits(&mut rng),
                // Both parts near the top of the range.
                1 => {
                    let (pt, ct) = (1 + rng.upto(TOKENS_MAX - 1), 1 + rng.upto(TOKENS_MAX - 1));
                    let pp = near_overflow_price(&mut rng, pt);
                    let cp = match rng.next() % 3 {
                        0 => near_overflow_price(&mut rng, ct),
                        1 => near_overflow_price(&mut rng, ct) / 2,
                        _ => rng.upto(1_000),
                    };
                    (price(pp, cp), pt, ct, discount(&mut rng))
                }
                _ => {
                    let p = price(price_nanos(&mut rng), price_nanos(&mut rng));
                    (p, tokens(&mut rng), tokens(&mut rng), discount(&mut rng))
                }
            };
            let expected = usage_cost_reference(p, pt, ct, d);
            assert_eq!(
                usage_cost(p, pt, ct, d),
                expected,
                "case {i}: {p:?}, {pt} + {ct} tokens, {d:?}"
            );
            match expected {
                Ok(cost) if cost.total.nanos() > 7_922_816_251_426_433_759 => deep += 1,
                Ok(_) => ok += 1,
                Err(PricingError::Overflow) => overflow += 1,
                Err(PricingError::NegativePrice) => negative += 1,
                Err(PricingError::TokensOutOfRange { .. }) => tokens_bad += 1,
            }
        }
        // Every kind of outcome must have been compared many times over.
        for (kind, count) in [
            ("ok", ok),
            ("ok above 2^96 × 10^-10", deep),
            ("overflow", overflow),
            ("negative price", negative),
            ("tokens out of range", tokens_bad),
        ] {
            assert!(count > 10_000, "only {count} {kind} cases");
        }
    }

    #[test]
    fn discounted_cost_beyond_28_digits_is_exact() {
        // 10^6 tokens at 8 499 150 000 000 009 900.99… nanocredits per million
        // and 0.01 % off: the exact charge is 8 499 150 000 000 009 899 plus
        // 10^-10 nanocredits. Multiplying in one rust_decimal operation
        // would round that tail away and charge …899.
        let p = price(8_500_000_000_000_000_123, 9_776_989_999);
        let cost = usage_cost(p, 1_000_000, 1, bps(1)).unwrap();
        assert_eq!(cost.total, n(8_499_150_000_000_009_900));
        assert_eq!(Ok(cost), usage_cost_reference(p, 1_000_000, 1, bps(1)));
    }

    #[test]
    fn decimal_mantissa_max_is_rust_decimals() {
        assert_eq!(Decimal::MAX.mantissa(), DECIMAL_MANTISSA_MAX);
    }

    #[test]
    fn zero_tokens_cost_nothing() {
        let p = TokenPrice::parse("3", "15").unwrap();
        assert_eq!(
            usage_cost(p, 0, 0, DiscountBps::ZERO),
            Ok(breakdown(0, 0, 0, 0))
        );
        assert_eq!(usage_cost(p, 0, 0, bps(1250)), Ok(breakdown(0, 0, 0, 0)));
    }

    #[test]
    fn one_token_at_fifteen_cents_per_million() {
        let p = TokenPrice::parse("0.15", "0").unwrap();
        assert_eq!(
            usage_cost(p, 1, 0, DiscountBps::ZERO),
            Ok(breakdown(150, 0, 0, 150))
        );
    }

    #[test]
    fn fractional_nanocredit_rounds_up_by_one() {
        // 3 tokens at 1 nanocredit per million = 0.000003 nanocredits → 1.
        let p = price(1, 1);
        assert_eq!(
            usage_cost(p, 3, 0, DiscountBps::ZERO),
            Ok(breakdown(1, 0, 0, 1))
        );
        assert_eq!(
            usage_cost(p, 0, 3, DiscountBps::ZERO),
            Ok(breakdown(0, 1, 0, 1))
        );
        // Exactly one nanocredit is not rounded further.
        assert_eq!(
            usage_cost(p, 1_000_000, 0, DiscountBps::ZERO),
            Ok(breakdown(1, 0, 0, 1))
        );
        // One token more is a fraction above → one nanocredit more.
        assert_eq!(
            usage_cost(p, 1_000_001, 0, DiscountBps::ZERO),
            Ok(breakdown(2, 0, 0, 2))
        );
    }

    #[test]
    fn rounding_happens_once_on_the_sum() {
        // Each part is half a nanocredit: per-part ceilings give 1 + 1 = 2,
        // but the exact sum is exactly 1 and is charged as 1.
        let p = price(1, 1);
        let cost = usage_cost(p, 500_000, 500_000, DiscountBps::ZERO).unwrap();
        assert_eq!(cost, breakdown(1, 1, 1, 1));
        // Same with tiny parts: 10^-6 + 10^-6 nanocredits → 1, not 2.
        assert_eq!(
            usage_cost(p, 1, 1, DiscountBps::ZERO),
            Ok(breakdown(1, 1, 1, 1))
        );
        // The discount is applied before the single rounding too: 7 nanos at
        // 12.5 % off is exactly 6.125 → 7. Rounding the discount on its own
        // (0.875 → 1) would have charged 6.
        let p = price(1_000_000, 0); // 1 nanocredit per token
        assert_eq!(usage_cost(p, 7, 0, bps(1250)), Ok(breakdown(7, 0, 0, 7)));
        assert_eq!(usage_cost(p, 8, 0, bps(1250)), Ok(breakdown(8, 0, 1, 7)));
    }

    #[test]
    fn twelve_and_a_half_percent_discount() {
        // 1000 prompt tokens at $0.15/M = 150 000 nanos, 1000 completion
        // tokens at $0.60/M = 600 000 nanos; 750 000 × 0.875 = 656 250.
        let p = TokenPrice::parse("0.15", "0.6").unwrap();
        let discount = DiscountBps::parse_percent("12.5").unwrap();
        assert_eq!(
            usage_cost(p, 1000, 1000, discount),
            Ok(breakdown(150_000, 600_000, 93_750, 656_250))
        );
    }

    #[test]
    fn full_discount_is_free() {
        let p = TokenPrice::parse("2.5", "10").unwrap();
        assert_eq!(
            usage_cost(p, 1_000_000, 500_000, DiscountBps::FULL),
            Ok(breakdown(2_500_000_000, 5_000_000_000, 7_500_000_000, 0))
        );
    }

    #[test]
    fn token_limits() {
        let p = price(1_000_000_000, 1_000_000_000);
        let max_cost = 100 * 1_000_000_000;
        assert_eq!(
            usage_cost(p, TOKENS_MAX, TOKENS_MAX, DiscountBps::ZERO),
            Ok(breakdown(max_cost, max_cost, 0, 2 * max_cost))
        );
        let over = |field, value| {
            Err(PricingError::TokensOutOfRange {
                field,
                value,
                max: TOKENS_MAX,
            })
        };
        assert_eq!(
            usage_cost(p, TOKENS_MAX + 1, 0, DiscountBps::ZERO),
            over("promptTokens", TOKENS_MAX + 1)
        );
        assert_eq!(
            usage_cost(p, 0, TOKENS_MAX + 1, DiscountBps::ZERO),
            over("completionTokens", TOKENS_MAX + 1)
        );
        assert_eq!(
            usage_cost(p, -1, 0, DiscountBps::ZERO),
            over("promptTokens", -1)
        );
        assert_eq!(
            usage_cost(p, 0, -1, DiscountBps::ZERO),
            over("completionTokens", -1)
        );
        assert_eq!(
            usage_cost(p, i64::MIN, 0, DiscountBps::ZERO),
            over("promptTokens", i64::MIN)
        );
        assert_eq!(
            usage_cost(p, 0, i64::MAX, DiscountBps::ZERO),
            over("completionTokens", i64::MAX)
        );
        // The prompt field is reported first when both are bad.
        assert_eq!(
            usage_cost(p, -1, -1, DiscountBps::ZERO),
            over("promptTokens", -1)
        );
        assert_eq!(
            PricingError::TokensOutOfRange {
                field: "promptTokens",
                value: -1,
                max: TOKENS_MAX
            }
            .to_string(),
            "promptTokens must be between 0 and 100000000, got -1"
        );
    }

    #[test]
    fn negative_prices_rejected() {
        assert_eq!(
            usage_cost(price(-1, 0), 1, 1, DiscountBps::ZERO),
            Err(PricingError::NegativePrice)
        );
        assert_eq!(
            usage_cost(price(0, i64::MIN), 0, 0, DiscountBps::ZERO),
            Err(PricingError::NegativePrice)
        );
        assert_eq!(TokenPrice::parse("-0.15", "1"), Err(MoneyError::Negative));
        assert_eq!(
            TokenPrice::parse("0.15", "1e3"),
            Err(MoneyError::Malformed("1e3".to_owned()))
        );
    }

    #[test]
    fn huge_prices_overflow_instead_of_panicking() {
        let max = i64::MAX;
        // 10^6 tokens at MAX per million is exactly MAX: fits.
        assert_eq!(
            usage_cost(price(max, 0), 1_000_000, 0, DiscountBps::ZERO),
            Ok(breakdown(max, 0, 0, max))
        );
        // One more token does not.
        assert_eq!(
            usage_cost(price(max, 0), 1_000_001, 0, DiscountBps::ZERO),
            Err(PricingError::Overflow)
        );
        assert_eq!(
            usage_cost(price(max, max), TOKENS_MAX, TOKENS_MAX, DiscountBps::ZERO),
            Err(PricingError::Overflow)
        );
        // Each part fits but their sum does not.
        assert_eq!(
            usage_cost(price(max, max), 1_000_000, 1_000_000, DiscountBps::ZERO),
            Err(PricingError::Overflow)
        );
        // Even a 50 % discount bringing the total back into range does not
        // help: the breakdown must be representable.
        assert_eq!(
            usage_cost(price(max, max), 1_000_000, 1_000_000, bps(5000)),
            Err(PricingError::Overflow)
        );
        assert_eq!(
            usage_cost(price(max, max), TOKENS_MAX, TOKENS_MAX, DiscountBps::FULL),
            Err(PricingError::Overflow)
        );
    }

    #[test]
    fn breakdown_adds_up_property() {
        let mut rng = XorShift(0xD1B5_4A32_D192_ED03);
        let mut ok = 0;
        for i in 0..20_000_u32 {
            // Vary the magnitude of prices so both tiny (fractional-nanocredit)
            // and overflowing cases occur.
            let price_max = 10_i64.pow(rng.next() as u32 % 19);
            let p = price(rng.upto(price_max), rng.upto(price_max));
            let tokens_max = if i % 2 == 0 { TOKENS_MAX } else { 10_000 };
            let (pt, ct) = (rng.upto(tokens_max), rng.upto(tokens_max));
            let discount = match i % 4 {
                0 => DiscountBps::ZERO,
                1 => DiscountBps::FULL,
                _ => bps(i32::try_from(rng.upto(10_000)).unwrap()),
            };
            let cost = match usage_cost(p, pt, ct, discount) {
                Ok(cost) => cost,
                Err(PricingError::Overflow) => continue,
                Err(e) => panic!("unexpected {e:?}"),
            };
            ok += 1;
            let recomposed = cost
                .prompt_cost
                .checked_add(cost.completion_cost)
                .and_then(|g| g.checked_sub(cost.discount))
                .unwrap();
            assert_eq!(recomposed, cost.total, "{cost:?}");
            assert!(
                !cost.discount.is_negative() && !cost.total.is_negative(),
                "{cost:?}"
            );

            // Independently check that total is the ceiling of the exact net:
            // total·10^10 ≥ N > (total − 1)·10^10.
            let numerator = (i128::from(pt) * i128::from(p.prompt_per_million.nanos())
                + i128::from(ct) * i128::from(p.completion_per_million.nanos()))
                * (10_000 - i128::from(discount.bps()));
            let total = i128::from(cost.total.nanos());
            assert!(total * 10_000_000_000 >= numerator, "{cost:?}");
            assert!(
                (total - 1) * 10_000_000_000 < numerator || total == 0,
                "{cost:?}"
            );
            if discount == DiscountBps::FULL {
                assert_eq!(cost.total, Credits::ZERO);
            }
        }
        // Make sure the loop did not just skip everything as overflow.
        assert!(ok > 10_000, "only {ok} cases computed");
    }
}
