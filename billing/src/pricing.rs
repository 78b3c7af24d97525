//! Usage pricing: token counts × per-million prices → an exact charge.
//!
//! The charge is computed as one exact rational in `i128` and rounded up to a
//! whole nanocredit exactly once, at the very end. Rounding each part (prompt,
//! completion, discount) separately would make the total depend on how the
//! bill happens to be split, and would let many tiny requests each gain or
//! lose a fraction of a nanocredit. Rounding up (never down) means usage is
//! never given away by truncation; the bias is below one nanocredit per
//! request.

use crate::money::{Credits, DiscountBps, MoneyError};

/// Largest token count accepted per field per request.
///
/// Far above any real model's context or output (so it never rejects genuine
/// usage), it rejects absurd or corrupted input early with a precise error,
/// and it bounds the intermediate arithmetic: with at most 10^8 tokens and a
/// price of at most `i64::MAX` nanocredits, the whole computation provably
/// fits in `i128` (checked at compile time below).
pub const TOKENS_MAX: i64 = 100_000_000;

/// Prices are quoted per this many tokens.
const TOKENS_PER_PRICE_UNIT: i128 = 1_000_000;

/// Basis points in 100 %.
const BPS_PER_WHOLE: i128 = 10_000;

// The largest possible net numerator is two maximal products (tokens × price)
// with no discount, times 10 000. Fail the build if raising TOKENS_MAX ever
// makes that overflow `i128`, so the unchecked `i128` arithmetic in
// `usage_cost` stays sound.
const _: () = {
    let max_product = TOKENS_MAX as i128 * i64::MAX as i128;
    assert!(max_product <= i128::MAX / 2 / BPS_PER_WHOLE);
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
/// evaluated exactly in `i128` with a single ceiling division. The display
/// parts are `prompt_cost = ceil(prompt_tokens·pp / 10^6)`, likewise
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

    // Exact amounts in millionths of a nanocredit. Plain `i128` arithmetic is
    // sound: every operand is bounded by TOKENS_MAX and i64::MAX, and the
    // compile-time assertion above proves the largest result fits.
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
