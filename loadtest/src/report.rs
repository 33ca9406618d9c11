//! Results as a table, as JSON, and as an SVG chart of latency percentiles and throughput.

use crate::run::Outcome;
use serde_json::json;

pub const QUANTILES: [(f64, &str); 5] = [
    (0.5, "p50"),
    (0.9, "p90"),
    (0.99, "p99"),
    (0.999, "p99.9"),
    (1.0, "max"),
];

fn statuses(o: &Outcome) -> String {
    let mut parts: Vec<String> = o
        .by_status
        .iter()
        .map(|(s, n)| format!("{s}:{n}"))
        .collect();
    if o.transport_errors > 0 {
        parts.push(format!("transport-errors:{}", o.transport_errors));
    }
    parts.join(" ")
}

/// One line per labelled outcome.
pub fn table(rows: &[(String, &Outcome)]) -> String {
    let mut s = format!("{:<24} {:>10} {:>9}", "run", "req/s", "requests");
    for (_, q) in QUANTILES {
        s.push_str(&format!(" {:>9}", format!("{q} ms")));
    }
    s.push_str(&format!(" {:>8}  statuses\n", "gen cpu"));
    for (label, o) in rows {
        s.push_str(&format!(
            "{label:<24} {:>10.0} {:>9}",
            o.throughput(),
            o.requests
        ));
        for (q, _) in QUANTILES {
            s.push_str(&format!(" {:>9.3}", o.percentile_ms(q)));
        }
        s.push_str(&format!(
            " {:>7.0}%  {}\n",
            o.generator_load() * 100.0,
            statuses(o)
        ));
    }
    for (label, o) in rows {
        if let (Some(us), Some(load)) = (o.server_cpu_per_request_us(), o.server_load()) {
            s.push_str(&format!(
                "{label}: server CPU {us:.2} µs per request ({:.0} % of a core)\n",
                load * 100.0
            ));
        }
        if let Some(threads) = o.server_threads_cpu_per_request_us() {
            let busy: Vec<String> = threads
                .iter()
                .filter(|(_, us)| **us >= 0.05)
                .map(|(name, us)| format!("{name} {us:.2}"))
                .collect();
            s.push_str(&format!(
                "{label}: by thread, µs per request: {}\n",
                busy.join(", ")
            ));
        }
    }
    s
}

pub fn to_json(label: &str, o: &Outcome) -> serde_json::Value {
    let mut pct = serde_json::Map::new();
    for (q, name) in QUANTILES {
        pct.insert(format!("{name}_ms"), json!(o.percentile_ms(q)));
    }
    json!({
        "label": label,
        "requests": o.requests,
        "seconds": o.elapsed.as_secs_f64(),
        "throughput_rps": o.throughput(),
        "latency": pct,
        "statuses": o.by_status.iter().map(|(s, n)| (s.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "transport_errors": o.transport_errors,
        "generator_cpu_cores": o.generator_load(),
        "server_cpu_us_per_request": o.server_cpu_per_request_us(),
        "server_threads_cpu_us_per_request": o.server_threads_cpu_per_request_us(),
        "server_cpu_cores": o.server_load(),
    })
}

/// Grouped bars of the latency percentiles (log scale) per run, with each run's throughput.
pub fn svg(title: &str, rows: &[(String, &Outcome)]) -> String {
    let (w, h, left, top, bottom) = (820.0, 420.0, 70.0, 50.0, 90.0);
    let plot_h = h - top - bottom;
    let colors = [
        "#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2",
    ];
    let max_ms = rows
        .iter()
        .map(|(_, o)| o.percentile_ms(1.0))
        .fold(0.01_f64, f64::max);
    let (lo, hi) = (0.01_f64.log10(), max_ms.log10().ceil().max(0.0));
    let y = |ms: f64| top + plot_h * (1.0 - (ms.max(0.01).log10() - lo) / (hi - lo));
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{left}\" y=\"24\" font-size=\"15\">{}</text>\n",
        escape(title)
    );
    let mut decade = lo;
    while decade <= hi + 1e-9 {
        let ms = 10f64.powf(decade);
        let yy = y(ms);
        s.push_str(&format!(
            "<line x1=\"{left}\" x2=\"{}\" y1=\"{yy:.1}\" y2=\"{yy:.1}\" stroke=\"#ddd\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{} ms</text>\n",
            w - 20.0,
            left - 6.0,
            yy + 4.0,
            ms
        ));
        decade += 1.0;
    }
    let groups = rows.len().max(1) as f64;
    let group_w = (w - left - 20.0) / groups;
    let bar_w = group_w * 0.8 / QUANTILES.len() as f64;
    for (g, (label, o)) in rows.iter().enumerate() {
        let gx = left + group_w * g as f64 + group_w * 0.1;
        for (i, (q, name)) in QUANTILES.iter().enumerate() {
            let ms = o.percentile_ms(*q);
            let x = gx + bar_w * i as f64;
            let yy = y(ms);
            s.push_str(&format!(
                "<rect x=\"{x:.1}\" y=\"{yy:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\"><title>{} {name}: {ms:.3} ms</title></rect>\n",
                bar_w * 0.9,
                (top + plot_h - yy).max(0.0),
                colors[i % colors.len()],
                escape(label)
            ));
        }
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555\">{:.0} req/s</text>\n",
            gx + group_w * 0.4,
            top + plot_h + 18.0,
            escape(label),
            gx + group_w * 0.4,
            top + plot_h + 34.0,
            o.throughput()
        ));
    }
    for (i, (_, name)) in QUANTILES.iter().enumerate() {
        let x = left + 80.0 * i as f64;
        s.push_str(&format!(
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"12\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            h - 30.0,
            colors[i % colors.len()],
            x + 16.0,
            h - 20.0
        ));
    }
    s.push_str("</svg>\n");
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
