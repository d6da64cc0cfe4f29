//! The capacity picture of a sweep, the one an operator plans with: p99 and p99.9 latency
//! against connections, one line per rate and message size, the objective as a line, each
//! line's knee and the largest passing point marked; beside it deliveries/s and server CPU
//! per delivery against connections. One SVG (`id="capacity"`) for the HTML report, and
//! the same marks as text for the terminal.

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::stats::human_us;
use crate::sweep::Point;

/// The measured points of one rate and size, by connections.
#[derive(Debug)]
pub(crate) struct Line<'a> {
    pub(crate) rate: f64,
    pub(crate) size: usize,
    pub(crate) points: Vec<&'a Point>,
}

impl Line<'_> {
    fn label(&self) -> String {
        format!("{} msg/s, {} B", self.rate, self.size)
    }

    /// The knee: the point past which p99 climbs fastest compared with before it, when at
    /// least twice as fast (so a straight line has none). Needs three points.
    #[must_use]
    pub(crate) fn knee(&self) -> Option<&Point> {
        let slope = |a: &Point, b: &Point| {
            (b.p99_us as f64 - a.p99_us as f64) / (b.conns as f64 - a.conns as f64).max(1.0)
        };
        self.points
            .windows(3)
            .filter_map(|w| {
                let after = slope(w[1], w[2]);
                // A flat or falling stretch before counts as a small rise, not a division by 0.
                let before = slope(w[0], w[1]).max(1e-6);
                (after > 0.0 && after >= 2.0 * before).then_some((after / before, w[1]))
            })
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .map(|(_, point)| point)
    }
}

/// The measured points (errors left out) as lines, one per rate and size.
#[must_use]
pub(crate) fn lines(points: &[Point]) -> Vec<Line<'_>> {
    let mut lines: Vec<Line<'_>> = Vec::new();
    for point in points.iter().filter(|point| point.error.is_none()) {
        match lines
            .iter_mut()
            .find(|line| line.rate == point.rate && line.size == point.size)
        {
            Some(line) => line.points.push(point),
            None => lines.push(Line {
                rate: point.rate,
                size: point.size,
                points: vec![point],
            }),
        }
    }
    for line in &mut lines {
        line.points.sort_by_key(|point| point.conns);
    }
    lines
}

/// Each line's knee, for the terminal.
#[must_use]
pub(crate) fn knees_text(points: &[Point]) -> String {
    lines(points)
        .iter()
        .filter_map(|line| {
            line.knee().map(|knee| {
                format!(
                    "knee at {} conns for {} (p99 {}; it climbs at least twice as fast past it)\n",
                    knee.conns,
                    line.label(),
                    human_us(knee.p99_us)
                )
            })
        })
        .collect()
}

fn color(index: usize) -> RGBColor {
    const COLORS: [RGBColor; 6] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(23, 190, 207),
    ];
    COLORS[index % COLORS.len()]
}

type DrawResult<T> = Result<T, Box<dyn std::error::Error>>;

/// The capacity chart as one SVG.
///
/// # Errors
/// Drawing failures.
pub(crate) fn chart(points: &[Point], best: Option<usize>, slo_p99_ms: f64) -> DrawResult<String> {
    let lines = lines(points);
    let best = best.and_then(|index| points.get(index));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 460)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(540);
        let (top, bottom) = right.split_vertically(230);
        latency_panel(&left, &lines, best, slo_p99_ms)?;
        side_panel(&top, &lines, "deliveries per second", "deliveries/s", |p| {
            Some(p.deliveries_per_second)
        })?;
        side_panel(&bottom, &lines, "server CPU per delivery", "ns", |p| {
            p.server_cpu_ns_per_delivery
        })?;
        root.present()?;
    }
    Ok(svg.replacen("<svg ", "<svg id=\"capacity\" ", 1))
}

fn max_conns(lines: &[Line<'_>]) -> f64 {
    lines
        .iter()
        .flat_map(|line| line.points.iter().map(|p| p.conns as f64))
        .fold(1.0, f64::max)
        * 1.08
}

fn ms(us: u64) -> f64 {
    (us as f64 / 1000.0).max(0.01)
}

/// p99 (solid) and p99.9 (dashed) against connections, log scale, with the objective, the
/// knees and the largest passing point.
fn latency_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    lines: &[Line<'_>],
    best: Option<&Point>,
    slo_p99_ms: f64,
) -> DrawResult<()> {
    let values = lines.iter().flat_map(|line| {
        line.points
            .iter()
            .flat_map(|p| [ms(p.p99_us), ms(p.p999_us)])
    });
    let (low, high) = values.fold((slo_p99_ms, slo_p99_ms), |(low, high), v| {
        (low.min(v), high.max(v))
    });
    let x_max = max_conns(lines);
    let mut chart = ChartBuilder::on(area)
        .caption(
            "p99 (solid) and p99.9 (dashed) against connections",
            ("sans-serif", 17),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, (low / 2.0..high * 2.0).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc("latency (ms)")
        .draw()?;
    let red = RGBColor(214, 39, 40);
    chart
        .draw_series(DashedLineSeries::new(
            [(0.0, slo_p99_ms), (x_max, slo_p99_ms)],
            8,
            4,
            red.stroke_width(2),
        ))?
        .label(format!("SLO: p99 <= {slo_p99_ms} ms"))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], red.stroke_width(2)));
    for (index, line) in lines.iter().enumerate() {
        let style = color(index);
        let p99: Vec<(f64, f64)> = line
            .points
            .iter()
            .map(|p| (p.conns as f64, ms(p.p99_us)))
            .collect();
        let p999: Vec<(f64, f64)> = line
            .points
            .iter()
            .map(|p| (p.conns as f64, ms(p.p999_us)))
            .collect();
        chart
            .draw_series(LineSeries::new(p99.clone(), style.stroke_width(2)))?
            .label(line.label())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        chart.draw_series(DashedLineSeries::new(p999, 5, 4, style.stroke_width(1)))?;
        chart.draw_series(p99.into_iter().map(|p| Circle::new(p, 3, style.filled())))?;
        if let Some(knee) = line.knee() {
            let at = (knee.conns as f64, ms(knee.p99_us));
            chart.draw_series([Circle::new(at, 9, style.stroke_width(2))])?;
            chart.draw_series([Text::new("knee", at, ("sans-serif", 13).into_font())])?;
        }
    }
    if let Some(best) = best {
        let at = (best.conns as f64, ms(best.p99_us));
        let green = RGBColor(0, 150, 0);
        chart
            .draw_series([Circle::new(at, 7, green.filled())])?
            .label(format!(
                "largest passing: {} conns, {} msg/s, {} B",
                best.conns, best.rate, best.size
            ))
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, green.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

/// One figure per line against connections (points without it left out).
fn side_panel(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    lines: &[Line<'_>],
    caption: &str,
    unit: &str,
    value: impl Fn(&Point) -> Option<f64>,
) -> DrawResult<()> {
    let y_max = lines
        .iter()
        .flat_map(|line| line.points.iter().filter_map(|p| value(p)))
        .fold(1.0, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..max_conns(lines), 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc("connections")
        .y_desc(unit)
        .x_labels(5)
        .y_labels(5)
        .draw()?;
    for (index, line) in lines.iter().enumerate() {
        let style = color(index);
        let series: Vec<(f64, f64)> = line
            .points
            .iter()
            .filter_map(|p| value(p).map(|v| (p.conns as f64, v)))
            .collect();
        chart.draw_series(LineSeries::new(series.clone(), style.stroke_width(2)))?;
        chart.draw_series(
            series
                .into_iter()
                .map(|p| Circle::new(p, 3, style.filled())),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::tests::point;

    fn grid() -> Vec<Point> {
        let mut points = Vec::new();
        for (rate, p99s) in [(5.0, [10, 12, 14, 80]), (20.0, [11, 13, 15, 17])] {
            for (conns, p99_ms) in [1000, 2000, 3000, 4000].into_iter().zip(p99s) {
                let mut p = point(conns, rate, 64, p99_ms * 1000, 0);
                p.error = None;
                p.p999_us = p.p99_us * 2;
                p.deliveries_per_second = conns as f64 * rate;
                p.server_cpu_ns_per_delivery = Some(5000.0);
                points.push(p);
            }
        }
        points
    }

    #[test]
    fn finds_the_knee_where_p99_turns_up_and_none_on_a_straight_line() {
        let points = grid();
        let lines = lines(&points);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].knee().map(|p| p.conns), Some(3000));
        assert!(lines[1].knee().is_none());
        assert_eq!(
            knees_text(&points),
            "knee at 3000 conns for 5 msg/s, 64 B (p99 14.0 ms; it climbs at least twice as \
             fast past it)\n"
        );
    }

    #[test]
    fn chart_has_the_objective_the_knee_the_best_point_and_a_line_per_rate() {
        let points = grid();
        let svg = chart(&points, Some(7), 50.0).unwrap();
        assert!(svg.starts_with("<svg id=\"capacity\" "), "{}", &svg[..80]);
        for text in [
            "SLO: p99 &lt;= 50 ms",
            "knee",
            "largest passing: 4000 conns, 20 msg/s, 64 B",
            "5 msg/s, 64 B",
            "20 msg/s, 64 B",
            "deliveries per second",
            "server CPU per delivery",
            "connections",
        ] {
            assert!(svg.contains(text), "{text}");
        }
        // p99 per line in the latency panel, one per line in each side panel, and the
        // legend's samples: at least 2 x 3.
        assert!(svg.matches("<polyline").count() >= 6);
    }
}
