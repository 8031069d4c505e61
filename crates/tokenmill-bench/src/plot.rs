//! PNG plots of one or more results: latency CDFs, and throughput and
//! latency against load for sweeps.
//!
//! Text is drawn with DejaVu Sans compiled into the binary (see
//! `assets/LICENSE-DejaVuSans.txt`) and registered with plotters' `ab_glyph`
//! renderer, so plots come out the same on a machine with no system fonts
//! (a fresh CI runner) as on a desktop.

use crate::load::Load;
use crate::metrics::RequestRecord;
use crate::report::BenchResult;
use crate::run::LevelResult;
use crate::summary::Distribution;
use crate::{BenchError, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
/// Most points drawn per CDF line: more cannot be told apart at this size.
const CDF_POINTS: usize = 400;

fn register_font() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut failed = false;
    ONCE.call_once(|| {
        failed = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_err();
    });
    if failed {
        return Err(BenchError::Plot {
            path: String::new(),
            message: "the embedded font cannot be read".to_owned(),
        });
    }
    Ok(())
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Plot {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// A file name part from a label: letters, digits, `-` and `_` only.
fn slug(label: &str) -> String {
    let s: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "run".to_owned()
    } else {
        s
    }
}

/// The four latencies, their name and how to read them from a record.
type Metric = (&'static str, fn(&RequestRecord) -> Vec<f64>);

fn ttft(r: &RequestRecord) -> Vec<f64> {
    r.ttft_ms.into_iter().collect()
}
fn tpot(r: &RequestRecord) -> Vec<f64> {
    r.tpot_ms.into_iter().collect()
}
fn itl(r: &RequestRecord) -> Vec<f64> {
    r.itl_ms.clone()
}
fn e2e(r: &RequestRecord) -> Vec<f64> {
    vec![r.e2e_ms]
}

const METRICS: [Metric; 4] = [
    ("time to first token (ms)", ttft),
    ("time per output token (ms)", tpot),
    ("inter-token latency (ms)", itl),
    ("end-to-end latency (ms)", e2e),
];

/// The empirical CDF of `values`, thinned to at most [`CDF_POINTS`] points.
fn cdf(mut values: Vec<f64>) -> Vec<(f64, f64)> {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return Vec::new();
    }
    let step = n.div_ceil(CDF_POINTS).max(1);
    let mut points: Vec<(f64, f64)> = (0..n)
        .step_by(step)
        .map(|i| (values[i], (i + 1) as f64 / n as f64))
        .collect();
    if points.last().map(|p| p.1) != Some(1.0) {
        points.push((values[n - 1], 1.0));
    }
    points
}

/// One PNG with four panels (TTFT, TPOT, ITL, E2E): the CDF of each over the
/// successful requests of every (label, level) given.
pub fn latency_cdfs(path: &Path, title: &str, series: &[(String, &LevelResult)]) -> Result<()> {
    register_font()?;
    let root = BitMapBackend::new(path, (1400, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
    let root = root
        .titled(title, (FAMILY, 26))
        .map_err(|e| plot_error(path, e))?;
    for (panel, (name, read)) in root.split_evenly((2, 2)).iter().zip(METRICS) {
        let lines: Vec<(String, Vec<(f64, f64)>)> = series
            .iter()
            .map(|(label, level)| {
                let values = level
                    .requests
                    .iter()
                    .filter(|r| r.ok)
                    .flat_map(read)
                    .collect();
                (label.clone(), cdf(values))
            })
            .collect();
        let x_max = lines
            .iter()
            .flat_map(|(_, pts)| pts.iter().map(|p| p.0))
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.05;
        let mut chart = ChartBuilder::on(panel)
            .caption(name, (FAMILY, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(0f64..x_max, 0f64..1.0)
            .map_err(|e| plot_error(path, e))?;
        chart
            .configure_mesh()
            .x_desc("ms")
            .y_desc("share of requests")
            .label_style((FAMILY, 14))
            .draw()
            .map_err(|e| plot_error(path, e))?;
        for (i, (label, pts)) in lines.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts, color.stroke_width(2)))
                .map_err(|e| plot_error(path, e))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FAMILY, 14))
            .draw()
            .map_err(|e| plot_error(path, e))?;
    }
    root.present().map_err(|e| plot_error(path, e))
}

/// A value of a level to plot against its load.
type LevelValue = (&'static str, fn(&LevelResult) -> Option<f64>);

fn dist(d: &Option<Distribution>, p99: bool) -> Option<f64> {
    d.as_ref().map(|d| if p99 { d.p99 } else { d.p50 })
}

fn output_tps(l: &LevelResult) -> Option<f64> {
    Some(l.summary.output_throughput)
}
fn request_rps(l: &LevelResult) -> Option<f64> {
    Some(l.summary.request_throughput)
}
fn ttft_p50(l: &LevelResult) -> Option<f64> {
    dist(&l.summary.ttft_ms, false)
}
fn tpot_p50(l: &LevelResult) -> Option<f64> {
    dist(&l.summary.tpot_ms, false)
}
fn e2e_p50(l: &LevelResult) -> Option<f64> {
    dist(&l.summary.e2e_ms, false)
}
fn ttft_p99(l: &LevelResult) -> Option<f64> {
    dist(&l.summary.ttft_ms, true)
}
fn tpot_p99(l: &LevelResult) -> Option<f64> {
    dist(&l.summary.tpot_ms, true)
}
fn e2e_p99(l: &LevelResult) -> Option<f64> {
    dist(&l.summary.e2e_ms, true)
}

const THROUGHPUT: [LevelValue; 2] = [("output tokens/s", output_tps), ("requests/s", request_rps)];

const LATENCY: [LevelValue; 6] = [
    ("TTFT p50 (ms)", ttft_p50),
    ("TPOT p50 (ms)", tpot_p50),
    ("E2E p50 (ms)", e2e_p50),
    ("TTFT p99 (ms)", ttft_p99),
    ("TPOT p99 (ms)", tpot_p99),
    ("E2E p99 (ms)", e2e_p99),
];

/// One PNG of `values` against the load level, a panel per value and a line
/// per labelled sweep.
fn against_load(
    path: &Path,
    title: &str,
    x_desc: &str,
    sweeps: &[(String, Vec<&LevelResult>)],
    values: &[LevelValue],
    grid: (usize, usize),
) -> Result<()> {
    register_font()?;
    let size = (520 * grid.1 as u32, 420 * grid.0 as u32 + 50);
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
    let root = root
        .titled(title, (FAMILY, 26))
        .map_err(|e| plot_error(path, e))?;
    let finite = |x: f64| x.is_finite().then_some(x);
    let x_max = sweeps
        .iter()
        .flat_map(|(_, levels)| levels.iter().filter_map(|l| finite(l.load.level())))
        .fold(1.0f64, f64::max)
        * 1.08;
    for (panel, (name, read)) in root.split_evenly(grid).iter().zip(values) {
        let lines: Vec<(String, Vec<(f64, f64)>)> = sweeps
            .iter()
            .map(|(label, levels)| {
                let pts = levels
                    .iter()
                    .filter_map(|l| Some((finite(l.load.level())?, read(l)?)))
                    .collect();
                (label.clone(), pts)
            })
            .collect();
        let y_max = lines
            .iter()
            .flat_map(|(_, pts)| pts.iter().map(|p| p.1))
            .fold(0.0f64, f64::max)
            .max(1e-3)
            * 1.1;
        let mut chart = ChartBuilder::on(panel)
            .caption(*name, (FAMILY, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(|e| plot_error(path, e))?;
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .label_style((FAMILY, 14))
            .draw()
            .map_err(|e| plot_error(path, e))?;
        for (i, (label, pts)) in lines.into_iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(|e| plot_error(path, e))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(3))
                });
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 4, color.filled())))
                .map_err(|e| plot_error(path, e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font((FAMILY, 14))
            .draw()
            .map_err(|e| plot_error(path, e))?;
    }
    root.present().map_err(|e| plot_error(path, e))
}

/// Writes every plot `results` call for into `dir`, and returns their
/// paths: a latency CDF per result (a line per level), and, when a result
/// has several levels, throughput and latency against the load with a line
/// per result.
pub fn write_plots(dir: &Path, results: &[BenchResult]) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io(dir, e))?;
    let mut written = Vec::new();
    for r in results {
        let path = dir.join(format!("latency_cdf_{}.png", slug(&r.label)));
        let series: Vec<(String, &LevelResult)> =
            r.levels.iter().map(|l| (l.load.to_string(), l)).collect();
        latency_cdfs(&path, &format!("{}: latency CDFs", r.label), &series)?;
        written.push(path);
    }
    for (kind, x_desc, pick) in [
        (
            "concurrency",
            "concurrent requests",
            is_concurrency as fn(&Load) -> bool,
        ),
        ("request_rate", "requests per second offered", is_rate),
    ] {
        let sweeps: Vec<(String, Vec<&LevelResult>)> = results
            .iter()
            .map(|r| {
                let levels: Vec<&LevelResult> = r.levels.iter().filter(|l| pick(&l.load)).collect();
                (r.label.clone(), levels)
            })
            .filter(|(_, levels)| levels.len() > 1)
            .collect();
        if sweeps.is_empty() {
            continue;
        }
        let path = dir.join(format!("throughput_vs_{kind}.png"));
        against_load(
            &path,
            &format!("throughput against {x_desc}"),
            x_desc,
            &sweeps,
            &THROUGHPUT,
            (1, 2),
        )?;
        written.push(path);
        let path = dir.join(format!("latency_vs_{kind}.png"));
        against_load(
            &path,
            &format!("latency against {x_desc}"),
            x_desc,
            &sweeps,
            &LATENCY,
            (2, 3),
        )?;
        written.push(path);
    }
    Ok(written)
}

fn is_concurrency(l: &Load) -> bool {
    matches!(l, Load::Concurrency { .. })
}

fn is_rate(l: &Load) -> bool {
    matches!(l, Load::RequestRate { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cdfs_are_thinned_and_end_at_one() {
        let pts = cdf((1..=1000).rev().map(f64::from).collect());
        assert!(pts.len() <= CDF_POINTS + 1);
        assert_eq!(pts.first().copied(), Some((1.0, 0.001)));
        assert_eq!(pts.last().copied(), Some((1000.0, 1.0)));
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
        assert!(cdf(vec![f64::NAN]).is_empty());
    }

    fn level(concurrency: usize, scale: f64) -> LevelResult {
        use crate::metrics::TokenSource;
        use crate::summary::Summary;
        let requests: Vec<RequestRecord> = (0..20)
            .map(|i| RequestRecord {
                index: i,
                ok: true,
                error: None,
                response_id: None,
                start_s: i as f64 * 0.1,
                ttft_ms: Some(scale * (50.0 + i as f64)),
                e2e_ms: scale * (500.0 + 3.0 * i as f64),
                tpot_ms: Some(scale * 10.0),
                itl_ms: vec![scale * 9.0, scale * 11.0],
                expected_prompt_tokens: Some(16),
                max_tokens: 3,
                prompt_tokens: Some(16),
                usage_completion_tokens: Some(3),
                output_tokens: 3,
                output_tokens_source: TokenSource::Usage,
                content_chunks: 3,
                token_mismatch: None,
                finish_reason: None,
            })
            .collect();
        LevelResult {
            load: Load::Concurrency { concurrency },
            warmup_requests: 0,
            warmup_failed: 0,
            summary: Summary::of(&requests, 2.0 * scale, None),
            requests,
        }
    }

    #[test]
    fn plots_are_drawn_with_the_embedded_font() {
        let dir = tempfile::tempdir().unwrap();
        let series = [
            ("c=1".to_owned(), &level(1, 1.0)),
            ("c=4".to_owned(), &level(4, 2.0)),
        ];
        let path = dir.path().join("cdf.png");
        latency_cdfs(&path, "test", &series).unwrap();
        let sweeps = vec![("a".to_owned(), vec![series[0].1, series[1].1])];
        let sweep_path = dir.path().join("sweep.png");
        against_load(&sweep_path, "test", "clients", &sweeps, &LATENCY, (2, 3)).unwrap();
        for p in [path, sweep_path] {
            let bytes = std::fs::read(&p).unwrap();
            assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{}", p.display());
            assert!(
                bytes.len() > 10_000,
                "{} is {} bytes",
                p.display(),
                bytes.len()
            );
        }
    }

    #[test]
    fn slugs_are_safe_file_names() {
        assert_eq!(slug("llama.cpp c=1"), "llama_cpp_c_1");
        assert_eq!(slug(""), "run");
    }
}
