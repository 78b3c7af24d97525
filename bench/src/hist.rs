//! A small log-linear latency histogram in microseconds: exact below 128 µs, then 128
//! sub-buckets per power of two (under 0.8 % relative error). Cheap to record into
//! (one index computation and an increment) and to merge; one per task, merged at the end.

/// Sub-buckets per power of two, as a bit count.
const SUB_BITS: u32 = 7;
const SUB: u64 = 1 << SUB_BITS;
/// Values above 2^40 µs (about 12 days) are clamped.
const TOP_EXP: u32 = 40;
const BUCKETS: usize = (SUB + (TOP_EXP - SUB_BITS + 1) as u64 * SUB) as usize;

#[derive(Clone, Debug, Default)]
pub struct Histogram {
    /// Allocated on the first record, so idle histograms cost nothing.
    counts: Vec<u32>,
    total: u64,
    max_us: u64,
}

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Summary {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

fn index(us: u64) -> usize {
    let us = us.min((1u64 << (TOP_EXP + 1)) - 1);
    if us < SUB {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros(); // >= SUB_BITS
    let shift = exp - SUB_BITS;
    let mantissa = (us >> shift) - SUB; // 0..SUB
    (SUB + u64::from(shift) * SUB + mantissa) as usize
}

/// The middle of a bucket's range, in µs.
fn value_of(idx: usize) -> f64 {
    let idx = idx as u64;
    if idx < SUB {
        return idx as f64;
    }
    let shift = (idx - SUB) / SUB;
    let mantissa = (idx - SUB) % SUB;
    let low = (SUB + mantissa) << shift;
    let width = 1u64 << shift;
    low as f64 + (width as f64 - 1.0) / 2.0
}

impl Histogram {
    pub fn record_us(&mut self, us: u64) {
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
        }
        let i = index(us);
        self.counts[i] = self.counts[i].saturating_add(1);
        self.total += 1;
        self.max_us = self.max_us.max(us);
    }

    pub fn record(&mut self, elapsed: std::time::Duration) {
        self.record_us(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }

    pub fn merge(&mut self, other: &Histogram) {
        if other.counts.is_empty() {
            return;
        }
        if self.counts.is_empty() {
            self.counts = vec![0; BUCKETS];
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        self.total += other.total;
        self.max_us = self.max_us.max(other.max_us);
    }

    pub fn count(&self) -> u64 {
        self.total
    }

    /// The value at quantile `q` (0..=1), in µs; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return value_of(i).min(self.max_us as f64);
            }
        }
        self.max_us as f64
    }

    /// p50, p99 and max in milliseconds (3 decimals).
    pub fn summary_ms(&self) -> Summary {
        let ms = |us: f64| us.round() / 1000.0;
        Summary {
            p50: ms(self.quantile_us(0.50)),
            p99: ms(self.quantile_us(0.99)),
            max: ms(self.max_us as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_close() {
        let mut last = 0;
        for us in [
            0u64,
            1,
            127,
            128,
            129,
            255,
            256,
            1000,
            12_345,
            1_000_000,
            1 << 40,
        ] {
            let i = index(us);
            assert!(i >= last);
            last = i;
            let v = value_of(i);
            assert!(
                (v - us as f64).abs() <= us as f64 / 100.0 + 1.0,
                "{us} -> {v}"
            );
        }
        assert!(index(u64::MAX) < BUCKETS);
    }

    #[test]
    fn quantiles() {
        let mut h = Histogram::default();
        for us in 1..=1000 {
            h.record_us(us);
        }
        assert!((h.quantile_us(0.5) - 500.0).abs() < 5.0);
        assert!((h.quantile_us(0.99) - 990.0).abs() < 10.0);
        assert_eq!(h.summary_ms().max, 1.0);
    }
}
