//! The contract's scalars. Money is only ever a string on the wire: a JSON number is
//! refused (a float would already have lost the exact value before we saw it).

use async_graphql::{InputValueError, InputValueResult, Scalar, ScalarType, Value};
use billing::{Credits, DiscountBps};

/// An exact amount of credits as a decimal string (at most 9 fractional digits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreditsScalar(pub Credits);

#[Scalar(name = "Credits")]
impl ScalarType for CreditsScalar {
    fn parse(value: Value) -> InputValueResult<Self> {
        match value {
            Value::String(s) => Credits::parse(&s)
                .map(Self)
                .map_err(InputValueError::custom),
            other => Err(InputValueError::custom(format!(
                "Credits must be a decimal string such as \"12.5\", not {}",
                kind(&other)
            ))),
        }
    }

    fn to_value(&self) -> Value {
        Value::String(self.0.to_string())
    }
}

impl From<Credits> for CreditsScalar {
    fn from(c: Credits) -> Self {
        Self(c)
    }
}

/// An exact non-money decimal (a percentage).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecimalScalar(pub DiscountBps);

#[Scalar(name = "Decimal")]
impl ScalarType for DecimalScalar {
    fn parse(value: Value) -> InputValueResult<Self> {
        match value {
            Value::String(s) => DiscountBps::parse_percent(&s)
                .map(Self)
                .map_err(InputValueError::custom),
            other => Err(InputValueError::custom(format!(
                "Decimal must be a decimal string such as \"12.5\", not {}",
                kind(&other)
            ))),
        }
    }

    fn to_value(&self) -> Value {
        Value::String(self.0.to_string())
    }
}

/// A 64-bit count as a JSON number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BigInt(pub i64);

#[Scalar(name = "BigInt")]
impl ScalarType for BigInt {
    fn parse(value: Value) -> InputValueResult<Self> {
        match &value {
            Value::Number(n) => n
                .as_i64()
                .map(Self)
                .ok_or_else(|| InputValueError::custom("BigInt must be an integer")),
            other => Err(InputValueError::custom(format!(
                "BigInt must be a number, not {}",
                kind(other)
            ))),
        }
    }

    fn to_value(&self) -> Value {
        Value::Number(self.0.into())
    }
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Boolean(_) => "a boolean",
        Value::Binary(_) => "binary",
        Value::Enum(_) => "an enum",
        Value::List(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credits_are_strings_only_and_normalised() {
        let parse = |v: Value| <CreditsScalar as ScalarType>::parse(v).map(|c| c.0);
        assert_eq!(
            parse(Value::String("0.50".into())).ok(),
            Some(Credits::from_nanos(500_000_000))
        );
        assert!(
            parse(Value::Number(serde_json::Number::from(5))).is_err(),
            "a JSON number is refused"
        );
        assert!(
            parse(Value::String("1.0000000001".into())).is_err(),
            "10 fractional digits"
        );
        assert!(parse(Value::String("1e3".into())).is_err());
        assert!(
            parse(Value::String("99999999999".into())).is_err(),
            "out of range"
        );
        assert_eq!(
            CreditsScalar(Credits::from_nanos(1_500_000_000)).to_value(),
            Value::String("1.5".into())
        );
        let pct = |v: &str| {
            <DecimalScalar as ScalarType>::parse(Value::String(v.into())).map(|d| d.0.bps())
        };
        assert_eq!(pct("12.5").ok(), Some(1250));
        assert!(pct("100.01").is_err());
    }
}
