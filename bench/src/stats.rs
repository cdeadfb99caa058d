//! Percentiles over a handful of samples (benchmarks with few runs, such
//! as guest boots) and over many (through `hdrhistogram`).

use std::time::Duration;

use hdrhistogram::Histogram;

/// Latency samples in microseconds.
#[derive(Debug)]
pub struct Samples {
    hist: Histogram<u64>,
}

impl Default for Samples {
    fn default() -> Self {
        Self::new()
    }
}

impl Samples {
    pub fn new() -> Self {
        // Three significant digits, auto-resizing: any latency fits.
        let mut hist = Histogram::new(3).expect("3 significant digits is a valid precision");
        hist.auto(true);
        Samples { hist }
    }

    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        // Auto-resize makes recording infallible for any u64 value.
        let _ = self.hist.record(us);
    }

    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    /// The `q`-quantile (0.0..=1.0) in milliseconds.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_known_samples() {
        let mut s = Samples::new();
        for ms in 1..=100u64 {
            s.record(Duration::from_millis(ms));
        }
        assert_eq!(s.len(), 100);
        let p50 = s.quantile_ms(0.5);
        let p99 = s.quantile_ms(0.99);
        assert!((49.0..=51.0).contains(&p50), "p50 {p50}");
        assert!((98.0..=100.0).contains(&p99), "p99 {p99}");
    }
}
