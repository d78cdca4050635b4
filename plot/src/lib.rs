//! The charts' font and the plotting helpers shared by the `tally bench` PNGs, the simulator's
//! and the chaos monkey's figures.
//!
//! ```text
//!  tally-cli (bench, sweep) ─┐
//!  tally-sim (sim.png)      ─┼─▶ register_font (DejaVu Sans, once) ─▶ plotters
//!  tally-chaos (timeline)   ─┘   draw_panel (caption, axes, lines, legend)
//! ```
//! Without a font every chart is still drawn, without its text.
#![forbid(unsafe_code)]

/// Registers DejaVu Sans for plot text, once. False when no font is available (plots are then
/// drawn without text instead of failing).
pub fn register_font() -> bool {
    static FONT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FONT.get_or_init(|| {
        const CANDIDATES: [&str; 2] =
            ["/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "/usr/share/fonts/dejavu/DejaVuSans.ttf"];
        for path in CANDIDATES {
            if let Ok(bytes) = std::fs::read(path) {
                // Registered fonts must live for the whole process; this happens once.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// One line of a plot: its points, colour and legend.
pub type PlotLine<'a> = (Vec<(f64, f64)>, plotters::style::RGBColor, &'a str);

/// A panel's caption, axis names and ranges (from 0).
pub struct Axes<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub x_max: f64,
    pub y_max: f64,
}

/// One chart panel (the bench and sweep PNGs are two of them): caption, axes, lines (with point markers if asked)
/// and a legend. Without a font (`with_text` false) only the lines are drawn.
///
/// # Errors
/// The drawing failure, as text.
pub fn draw_panel(
    area: &plotters::drawing::DrawingArea<plotters::prelude::BitMapBackend<'_>, plotters::coord::Shift>,
    axes: &Axes<'_>,
    lines: Vec<PlotLine<'_>>,
    markers: bool,
    legend: bool,
    with_text: bool,
) -> Result<(), String> {
    use plotters::prelude::*;
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let mut builder = ChartBuilder::on(area);
    builder.margin(15);
    if with_text {
        builder.caption(axes.title, ("sans-serif", 20)).x_label_area_size(35).y_label_area_size(70);
    }
    let mut chart = builder.build_cartesian_2d(0f64..axes.x_max, 0f64..axes.y_max).map_err(|x| e(&x))?;
    let mut mesh = chart.configure_mesh();
    if with_text {
        mesh.x_desc(axes.x_desc).y_desc(axes.y_desc).label_style(("sans-serif", 14));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw().map_err(|x| e(&x))?;
    for (points, color, label) in lines {
        if markers {
            chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled()))).map_err(|x| e(&x))?;
        }
        let drawn = chart.draw_series(LineSeries::new(points, color.stroke_width(2))).map_err(|x| e(&x))?;
        if with_text && legend {
            drawn.label(label).legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if with_text && legend {
        chart
            .configure_series_labels()
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use plotters::prelude::*;

    #[test]
    fn a_panel_is_drawn_with_and_without_text() {
        let dir = tempfile::tempdir().expect("tempdir");
        let with_text = register_font();
        for text in [false, with_text] {
            let path = dir.path().join(format!("panel-{text}.png"));
            {
                let root = BitMapBackend::new(&path, (400, 300)).into_drawing_area();
                root.fill(&WHITE).expect("fill");
                let axes = Axes { title: "t", x_desc: "x", y_desc: "y", x_max: 2.0, y_max: 2.0 };
                let lines = vec![(vec![(0.0, 0.0), (1.0, 1.0)], BLUE, "line")];
                draw_panel(&root, &axes, lines, true, true, text).expect("draw");
                root.present().expect("present");
            }
            let png = std::fs::read(&path).expect("png");
            assert!(png.starts_with(b"\x89PNG"), "{} is not a PNG", path.display());
        }
    }
}
