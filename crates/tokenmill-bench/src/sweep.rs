//! Several load levels, one after another, with the same workload.
//!
//! Every level sends the same requests (the same seed): only the load
//! changes, so the curves of throughput and latency against load compare like
//! with like.

use crate::load::Load;
use std::str::FromStr;

/// A list of levels: `concurrency=1,2,4,8` or `request-rate=1,2,4,inf`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sweep {
    /// The levels, in the order given.
    pub levels: Vec<Load>,
}

impl Sweep {
    /// Applies `--max-concurrency` to request-rate levels.
    pub fn with_max_concurrency(mut self, max: Option<usize>) -> Self {
        for level in &mut self.levels {
            if let Load::RequestRate {
                max_concurrency, ..
            } = level
            {
                *max_concurrency = max;
            }
        }
        self
    }
}

impl FromStr for Sweep {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, values) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected concurrency=1,2,4 or request-rate=1,2,4"))?;
        let values: Vec<&str> = values
            .split(',')
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Err(format!("{s:?}: no levels"));
        }
        let levels = match kind.trim() {
            "concurrency" => values
                .iter()
                .map(|v| match v.parse::<usize>() {
                    Ok(c) if c > 0 => Ok(Load::Concurrency { concurrency: c }),
                    _ => Err(format!("concurrency {v:?}: expected a whole number from 1")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            "request-rate" | "request_rate" | "rate" => values
                .iter()
                .map(|v| {
                    let rate = if *v == "inf" {
                        f64::INFINITY
                    } else {
                        v.parse::<f64>().unwrap_or(f64::NAN)
                    };
                    if rate > 0.0 {
                        Ok(Load::RequestRate {
                            rate,
                            max_concurrency: None,
                        })
                    } else {
                        Err(format!(
                            "request rate {v:?}: expected a positive number or inf"
                        ))
                    }
                })
                .collect::<Result<Vec<_>, _>>()?,
            other => {
                return Err(format!(
                    "cannot sweep {other:?}: use concurrency or request-rate"
                ))
            }
        };
        Ok(Sweep { levels })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweeps_parse() {
        let s: Sweep = "concurrency=1,2, 4,8".parse().unwrap();
        assert_eq!(
            s.levels,
            [1, 2, 4, 8]
                .map(|c| Load::Concurrency { concurrency: c })
                .to_vec()
        );
        let r: Sweep = "request-rate=0.5,inf".parse().unwrap();
        let r = r.with_max_concurrency(Some(3));
        assert_eq!(
            r.levels,
            vec![
                Load::RequestRate {
                    rate: 0.5,
                    max_concurrency: Some(3)
                },
                Load::RequestRate {
                    rate: f64::INFINITY,
                    max_concurrency: Some(3)
                }
            ]
        );
        for bad in [
            "concurrency",
            "concurrency=",
            "concurrency=0",
            "concurrency=x",
            "rate=-1",
            "batch=1",
        ] {
            assert!(bad.parse::<Sweep>().is_err(), "{bad:?}");
        }
    }
}
