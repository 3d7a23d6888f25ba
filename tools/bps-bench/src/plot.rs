//! `--plot FILE.svg` (busbw against size, one line per series) and `--compare A.json B.json`.
//!
//! SVG only: plotters sizes text with its built-in estimate and writes it as SVG `<text>` (the
//! viewer picks the font), so drawing reads no font file and needs no fontconfig.

use std::path::Path;

use plotters::prelude::*;

use crate::human;

/// One line of a plot: (bytes, busbw GB/s) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// `4096` → `4K`; sizes between powers of two get one decimal (`6.0K`).
fn size_label(v: f64) -> String {
    if v >= 1.0 && v.fract() == 0.0 && (v as usize).is_power_of_two() {
        return human(v as usize);
    }
    let (d, u) = if v >= (1u64 << 30) as f64 {
        ((1u64 << 30) as f64, "G")
    } else if v >= (1 << 20) as f64 {
        ((1 << 20) as f64, "M")
    } else if v >= 1024.0 {
        (1024.0, "K")
    } else {
        (1.0, "")
    };
    format!("{:.1}{u}", v / d)
}

/// Draw busbw (GB/s) against size (log2 axis) into an SVG file. Points of size 0 are left out
/// (a log axis has no place for them).
pub fn draw(path: &Path, title: &str, series: &[Series]) -> Result<(), String> {
    let series: Vec<Series> = series
        .iter()
        .map(|s| Series {
            name: s.name.clone(),
            points: s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| *x >= 1.0 && y.is_finite())
                .collect(),
        })
        .filter(|s| !s.points.is_empty())
        .collect();
    if series.is_empty() {
        return Err("nothing to plot (no row with a size above 0)".into());
    }
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (mut xmin, mut xmax) = xs.fold((f64::MAX, 0f64), |(a, b), x| (a.min(x), b.max(x)));
    if xmax <= xmin {
        // One size: give the axis an octave on each side.
        xmin /= 2.0;
        xmax *= 2.0;
    }
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(0f64, f64::max);
    let ymax = if ymax > 0.0 { ymax * 1.1 } else { 1.0 };

    let err = |e: &dyn std::fmt::Display| format!("cannot draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d((xmin..xmax).log_scale().base(2.0), 0f64..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("size (bytes, log2)")
        .y_desc("busbw (GB/s)")
        .x_label_formatter(&|v| size_label(*v))
        .y_label_formatter(&|v| format!("{v:.2}"))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(s.points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|p| Circle::new(*p, 3, color.filled())))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// A `--json` result as read back: rows keyed by (dtype, bytes).
struct Run {
    label: String,
    about: String,
    rows: Vec<(String, u64, f64)>,
}

fn read_run(path: &Path) -> Result<Run, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let doc: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    let rows = doc.get("rows").and_then(|r| r.as_array()).ok_or_else(|| {
        format!(
            "{}: no \"rows\" (not a bps-bench --json file?)",
            path.display()
        )
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (Some(bytes), Some(bw)) = (
            r.get("bytes").and_then(|v| v.as_u64()),
            r.get("busbw_gbs").and_then(|v| v.as_f64()),
        ) else {
            continue;
        };
        let dtype = r
            .get("dtype")
            .and_then(|v| v.as_str())
            .unwrap_or("-")
            .to_string();
        out.push((dtype, bytes, bw));
    }
    if out.is_empty() {
        return Err(format!(
            "{}: no row with \"bytes\" and \"busbw_gbs\" (a --pingpong result has no bandwidth)",
            path.display()
        ));
    }
    let s = |k: &str| {
        doc.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or("?")
            .to_string()
    };
    let about = match doc.get("mode").and_then(|v| v.as_str()) {
        Some(m) => format!(
            "{m} {}, commit {}, {}",
            s("transport"),
            s("commit"),
            s("date")
        ),
        None => format!(
            "{} {} workers {} servers, commit {}, {}",
            s("op"),
            doc.get("workers").map_or("?".into(), |v| v.to_string()),
            doc.get("servers").map_or("?".into(), |v| v.to_string()),
            s("commit"),
            s("date")
        ),
    };
    Ok(Run {
        label: path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into(),
        ),
        about,
        rows: out,
    })
}

/// `bps-bench --compare A.json B.json [--plot FILE.svg]`.
pub fn compare(a: &Path, b: &Path, plot: Option<&Path>) -> Result<(), String> {
    let (ra, rb) = (read_run(a)?, read_run(b)?);
    println!("# bps-bench --compare");
    println!("# A = {}: {}", a.display(), ra.about);
    println!("# B = {}: {}", b.display(), rb.about);
    println!(
        "{:>10} {:>6} {:>12} {:>12} {:>8}",
        "size", "type", "A busbw", "B busbw", "B/A"
    );
    println!(
        "{:>10} {:>6} {:>12} {:>12} {:>8}",
        "(B)", "", "(GB/s)", "(GB/s)", ""
    );
    let find = |run: &Run, d: &str, n: u64| {
        run.rows
            .iter()
            .find(|(dd, nn, _)| dd == d && *nn == n)
            .map(|r| r.2)
    };
    let mut keys: Vec<(String, u64)> = Vec::new();
    for (d, n, _) in ra.rows.iter().chain(&rb.rows) {
        if !keys.iter().any(|(kd, kn)| kd == d && kn == n) {
            keys.push((d.clone(), *n));
        }
    }
    let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
    for (d, n) in &keys {
        let (va, vb) = (find(&ra, d, *n), find(&rb, d, *n));
        let ratio = match (va, vb) {
            (Some(x), Some(y)) if x > 0.0 => format!("{:.3}", y / x),
            _ => "-".into(),
        };
        println!(
            "{:>10} {:>6} {:>12} {:>12} {:>8}",
            human(*n as usize),
            d,
            cell(va),
            cell(vb),
            ratio
        );
    }
    if let Some(p) = plot {
        let mut series = Vec::new();
        for run in [&ra, &rb] {
            let mut dtypes: Vec<&str> = Vec::new();
            for (d, _, _) in &run.rows {
                if !dtypes.contains(&d.as_str()) {
                    dtypes.push(d);
                }
            }
            for d in &dtypes {
                series.push(Series {
                    name: if dtypes.len() > 1 {
                        format!("{} ({d})", run.label)
                    } else {
                        run.label.clone()
                    },
                    points: run
                        .rows
                        .iter()
                        .filter(|r| r.0 == *d)
                        .map(|r| (r.1 as f64, r.2))
                        .collect(),
                });
            }
        }
        draw(p, &format!("busbw: {} vs {}", ra.label, rb.label), &series)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels() {
        assert_eq!(size_label(4096.0), "4K");
        assert_eq!(size_label(6144.0), "6.0K");
        assert_eq!(size_label(3.0), "3.0");
        assert_eq!(size_label((64u64 << 20) as f64), "64M");
    }
}
