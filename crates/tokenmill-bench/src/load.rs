//! How hard requests are sent: a fixed number of clients, or arrivals at a
//! rate.
//!
//! With a fixed concurrency, each of N clients sends its next request as
//! soon as its last one ends (a closed loop: the server's speed sets the
//! request rate). With a request rate, arrivals follow a Poisson process, as
//! independent users would (an open loop: requests keep coming whether or not
//! the server keeps up, so queueing shows in the latencies). The arrival times
//! are drawn from a seed, so two runs at the same rate send at the same
//! moments.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::fmt;

/// A load level.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Load {
    /// This many clients, each sending one request after another.
    Concurrency {
        /// Clients.
        concurrency: usize,
    },
    /// Poisson arrivals at `rate` requests per second (infinite: all at
    /// once), with at most `max_concurrency` in flight when given (arrivals
    /// beyond it wait for a free slot).
    RequestRate {
        /// Mean arrivals per second; infinite is written as `null` in JSON
        /// (which has no infinity).
        #[serde(with = "rate_json")]
        rate: f64,
        /// Most requests in flight.
        max_concurrency: Option<usize>,
    },
}

impl Load {
    /// The level's number on a sweep's x axis: clients, or requests per
    /// second.
    pub fn level(&self) -> f64 {
        match *self {
            Load::Concurrency { concurrency } => concurrency as f64,
            Load::RequestRate { rate, .. } => rate,
        }
    }
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Load::Concurrency { concurrency } => write!(f, "concurrency {concurrency}"),
            Load::RequestRate {
                rate,
                max_concurrency,
            } => {
                if rate.is_infinite() {
                    write!(f, "all at once")?;
                } else {
                    write!(f, "{rate} req/s")?;
                }
                if let Some(m) = max_concurrency {
                    write!(f, " (at most {m} in flight)")?;
                }
                Ok(())
            }
        }
    }
}

/// An infinite rate as JSON `null`, and back.
mod rate_json {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(rate: &f64, s: S) -> Result<S::Ok, S::Error> {
        if rate.is_finite() {
            s.serialize_f64(*rate)
        } else {
            s.serialize_none()
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::INFINITY))
    }
}

/// Arrival times of a Poisson process: seconds after the start, increasing.
///
/// The gaps between arrivals are exponential with mean `1 / rate`, drawn by
/// inversion (`-ln(1 - U) / rate`). An infinite rate puts every arrival at 0.
#[derive(Debug)]
pub struct PoissonArrivals {
    rng: StdRng,
    rate: f64,
    now: f64,
}

impl PoissonArrivals {
    /// Arrivals at `rate` per second (must be positive), from `seed`.
    pub fn new(rate: f64, seed: u64) -> Self {
        PoissonArrivals {
            rng: StdRng::seed_from_u64(seed ^ 0x6172_7269_7661_6c73),
            rate,
            now: 0.0,
        }
    }
}

impl Iterator for PoissonArrivals {
    type Item = f64;

    fn next(&mut self) -> Option<f64> {
        if self.rate.is_infinite() {
            return Some(0.0);
        }
        let u: f64 = self.rng.random();
        self.now += -(1.0 - u).ln() / self.rate;
        Some(self.now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_are_seeded_increasing_and_at_the_rate() {
        let a: Vec<f64> = PoissonArrivals::new(4.0, 9).take(20_000).collect();
        let b: Vec<f64> = PoissonArrivals::new(4.0, 9).take(20_000).collect();
        let c: Vec<f64> = PoissonArrivals::new(4.0, 10).take(20_000).collect();
        assert_eq!(a, b, "same seed, same arrivals");
        assert_ne!(a, c);
        assert!(a.windows(2).all(|w| w[1] >= w[0]));
        // 20,000 arrivals at 4/s take about 5,000 s.
        let rate = a.len() as f64 / a[a.len() - 1];
        assert!((rate - 4.0).abs() < 0.1, "rate {rate}");
        // Exponential gaps: the standard deviation equals the mean (1/4 s).
        let gaps: Vec<f64> = std::iter::once(a[0])
            .chain(a.windows(2).map(|w| w[1] - w[0]))
            .collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let std = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64).sqrt();
        assert!((mean - 0.25).abs() < 0.01, "mean gap {mean}");
        assert!((std - 0.25).abs() < 0.015, "gap std {std}");
        // Memoryless: about e^-1 of the gaps are longer than the mean.
        let long = gaps.iter().filter(|g| **g > 0.25).count() as f64 / gaps.len() as f64;
        assert!(
            (long - (-1f64).exp()).abs() < 0.02,
            "share over the mean {long}"
        );
    }

    #[test]
    fn an_infinite_rate_survives_json() {
        let load = Load::RequestRate {
            rate: f64::INFINITY,
            max_concurrency: Some(2),
        };
        let text = serde_json::to_string(&load).unwrap();
        assert_eq!(
            text,
            r#"{"mode":"request_rate","rate":null,"max_concurrency":2}"#
        );
        assert_eq!(serde_json::from_str::<Load>(&text).unwrap(), load);
    }

    #[test]
    fn an_infinite_rate_sends_everything_at_once() {
        let a: Vec<f64> = PoissonArrivals::new(f64::INFINITY, 1).take(5).collect();
        assert_eq!(a, vec![0.0; 5]);
    }
}
