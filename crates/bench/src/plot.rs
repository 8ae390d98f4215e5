//! SVG plots of TTFT (mean and p90) and output-token throughput against request rate, one
//! point per stage, one colour per run.
//!
//! The x value of a stage is its requested rate (`load_summary.requested_rate`); for
//! `concurrent` stages, whose "requested rate" is inference-perf's `num_requests`, the achieved
//! `requests_per_sec` is used instead.

use plotters::prelude::*;

use crate::error::BenchError;
use crate::metrics::LifecycleSummary;
use crate::report::SavedRun;
use crate::runner::RunResult;

/// One stage of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotPoint {
    /// Stage index.
    pub stage_id: usize,
    /// x: request rate (req/s).
    pub rate: f64,
    /// Mean TTFT (s).
    pub ttft_mean: Option<f64>,
    /// p90 TTFT (s).
    pub ttft_p90: Option<f64>,
    /// Output tokens per second.
    pub output_tokens_per_sec: f64,
}

/// The points of one run.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotSeries {
    /// Legend label.
    pub label: String,
    /// Points sorted by rate.
    pub points: Vec<PlotPoint>,
}

impl PlotSeries {
    /// Builds a series from per-stage summaries.
    pub fn from_stages<'a>(
        label: &str,
        stages: impl IntoIterator<Item = (usize, &'a LifecycleSummary)>,
    ) -> Self {
        let mut points: Vec<PlotPoint> = stages
            .into_iter()
            .map(|(stage_id, s)| {
                let ls = &s.load_summary;
                let rate = match (ls.concurrency, ls.requested_rate) {
                    (None, Some(r)) => r,
                    _ => s.successes.throughput.requests_per_sec,
                };
                let ttft = s.successes.latency.time_to_first_token.as_ref();
                PlotPoint {
                    stage_id,
                    rate,
                    ttft_mean: ttft.map(|t| t.mean),
                    ttft_p90: ttft.and_then(|t| t.percentile(90.0)),
                    output_tokens_per_sec: s.successes.throughput.output_tokens_per_sec,
                }
            })
            .collect();
        points.sort_by(|a, b| a.rate.total_cmp(&b.rate).then(a.stage_id.cmp(&b.stage_id)));
        Self {
            label: label.to_owned(),
            points,
        }
    }
}

impl RunResult {
    /// The run's plot series.
    pub fn plot_series(&self) -> PlotSeries {
        PlotSeries::from_stages(
            &self.label,
            self.stages.iter().map(|s| (s.stage_id, &s.summary)),
        )
    }
}

impl SavedRun {
    /// The saved run's plot series.
    pub fn plot_series(&self) -> PlotSeries {
        PlotSeries::from_stages(&self.label, self.stages.iter().map(|(i, s)| (*i, s)))
    }
}

/// Renders the two-panel SVG.
pub fn render_svg(series: &[PlotSeries]) -> Result<String, BenchError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1280, 520)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let (left, right) = root.split_horizontally(640);
        let x_max = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.rate))
            .fold(0.0f64, f64::max);
        let x_range = 0.0..nice_max(x_max);

        let ttft_max = series
            .iter()
            .flat_map(|s| s.points.iter().flat_map(|p| [p.ttft_mean, p.ttft_p90]))
            .flatten()
            .fold(0.0f64, f64::max);
        let mut chart = ChartBuilder::on(&left)
            .caption("Time to first token vs request rate", ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x_range.clone(), 0.0..nice_max(ttft_max))
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("request rate (req/s)")
            .y_desc("TTFT (s)")
            .draw()
            .map_err(plot_err)?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let mean: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter_map(|p| Some((p.rate, p.ttft_mean?)))
                .collect();
            let p90: Vec<(f64, f64)> = s
                .points
                .iter()
                .filter_map(|p| Some((p.rate, p.ttft_p90?)))
                .collect();
            chart
                .draw_series(LineSeries::new(mean.clone(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(format!("{} mean", s.label))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    mean.iter()
                        .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                )
                .map_err(plot_err)?;
            chart
                .draw_series(DashedLineSeries::new(
                    p90.clone(),
                    6,
                    4,
                    color.stroke_width(1),
                ))
                .map_err(plot_err)?
                .label(format!("{} p90", s.label))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(1))
                });
            chart
                .draw_series(
                    p90.iter()
                        .map(|&(x, y)| TriangleMarker::new((x, y), 4, color.filled())),
                )
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;

        let tput_max = series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.output_tokens_per_sec))
            .fold(0.0f64, f64::max);
        let mut chart = ChartBuilder::on(&right)
            .caption(
                "Output token throughput vs request rate",
                ("sans-serif", 20),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range, 0.0..nice_max(tput_max))
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("request rate (req/s)")
            .y_desc("output tokens/s")
            .draw()
            .map_err(plot_err)?;
        for (i, s) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .map(|p| (p.rate, p.output_tokens_per_sec))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(s.label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(
                    pts.iter()
                        .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                )
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Renders and writes the SVG to `path`.
pub fn write_svg(series: &[PlotSeries], path: &std::path::Path) -> Result<(), BenchError> {
    let svg = render_svg(series)?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| BenchError::io("cannot create directory", parent, e))?;
    }
    std::fs::write(path, svg).map_err(|e| BenchError::io("cannot write", path, e))
}

fn nice_max(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v * 1.1
    } else {
        1.0
    }
}

fn plot_err<E: std::fmt::Display>(e: E) -> BenchError {
    BenchError::Plot(e.to_string())
}
