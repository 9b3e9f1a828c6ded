//! The report: the machine the figures were measured on, the chart of the main figures (SVG),
//! `results.md`, and where they are written.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::bench::{highest, Bench};
use crate::config::manifest_dir;
use crate::process::Proc;
use crate::stacks::{Stack, Stacks};
use crate::table::{and_list, fmt_ratio, Better, Goal, Row, Table};
use crate::RATIOS;

/// What the figures were measured on.
pub struct Machine {
    /// Logical CPUs (`processor` entries of `/proc/cpuinfo`).
    pub cpus: usize,
    /// The CPU's model name, as `/proc/cpuinfo` gives it.
    model: String,
    pub kernel: String,
    python: String,
    /// uvloop's version in the uvloop stack's environment, when the run has that stack.
    uvloop: Option<String>,
    /// `node --version`, when the run has the node stack.
    node: Option<String>,
    commit: String,
    /// When the bench ran, UTC.
    date: String,
}

/// Runs a short command and returns its trimmed stdout, or "" if it fails.
fn command_output(program: &str, args: &[&str]) -> String {
    let mut command = Command::new(program);
    command.args(args).current_dir(manifest_dir());
    match Proc::spawn(program, &mut command) {
        Ok(mut proc) => proc
            .finish(Duration::from_secs(10))
            .map(|out| out.trim().to_string())
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

impl Machine {
    pub fn detect(stacks: &Stacks) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
            .map_or("unknown CPU".to_string(), |(_, m)| m.trim().to_string());
        let cpus = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or("unknown".to_string(), |k| k.trim().to_string());
        let python = command_output("python3", &["--version"]);
        let uvloop = stacks.uvloop_python().map(|python| {
            let python = python.to_string_lossy();
            let code = "import uvloop; print(uvloop.__version__)";
            command_output(&python, &["-c", code])
        });
        let node = stacks
            .list()
            .contains(&Stack::Node)
            .then(|| command_output("node", &["--version"]));
        let commit = command_output("git", &["describe", "--always", "--dirty"]);
        let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
        Machine {
            cpus,
            model,
            kernel,
            python,
            uvloop,
            node,
            commit,
            date,
        }
    }

    /// The CPU (model and count) and the kernel.
    pub fn describe(&self) -> String {
        format!(
            "CPU: {} × {} ({} logical CPUs), Linux {}",
            self.cpus, self.model, self.cpus, self.kernel
        )
    }

    /// The runtimes the stacks ran on.
    pub fn runtimes(&self) -> String {
        let mut parts = vec![self.python.clone()];
        if let Some(uvloop) = &self.uvloop {
            parts.push(format!("uvloop {uvloop}"));
        }
        if let Some(node) = &self.node {
            parts.push(format!("Node.js {node}"));
        }
        parts.join(", ")
    }
}

/// Escapes text for SVG.
fn xml(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A horizontal grouped bar chart of the main figures: per figure, a bar per stack on the
/// figure's own linear scale (the figures have different units), each labelled with its value,
/// and on the right how many times better the herd is than the prototype on asyncio's default
/// loop.
pub fn chart_svg(bench: &Bench, table: &Table, machine: &Machine) -> String {
    let cpus = &bench.cpus;
    const WIDTH: f64 = 1000.0;
    const LABEL_END: f64 = 330.0;
    const BAR_X: f64 = 340.0;
    const BAR_MAX: f64 = 400.0;
    const RATIO_END: f64 = 980.0;
    const TOP: f64 = 100.0;
    /// A bar and the gap below it; a figure's group is one step per stack and a margin.
    const BAR_STEP: f64 = 20.0;
    const GROUP_MARGIN: f64 = 14.0;

    let stacks = table.stacks();
    let group = GROUP_MARGIN + BAR_STEP * stacks.len() as f64;
    let rows: Vec<&Row> = table.rows.iter().filter(|r| r.chart.is_some()).collect();
    let height = TOP + group * rows.len() as f64 + 30.0;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" \
         viewBox=\"0 0 {WIDTH} {height}\" font-family=\"Helvetica, Arial, sans-serif\" \
         font-size=\"13\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>"
    );
    let _ = writeln!(
        svg,
        "<text x=\"20\" y=\"30\" font-size=\"18\" font-weight=\"bold\">herd (Rust, mio) vs \
         the same protocol on asyncio, uvloop and Node.js — {}</text>",
        xml(&format!("{} × {}", machine.cpus, machine.model))
    );
    let _ = writeln!(
        svg,
        "<text x=\"20\" y=\"52\" fill=\"#555\" font-size=\"12\">{}</text>",
        xml(&format!(
            "Linux {}, {} · logging on · {} · cargo bench --bench herd",
            machine.kernel,
            machine.runtimes(),
            match (cpus.server, cpus.client) {
                (Some(s), Some(c)) => format!("servers on CPU {s}, load on CPU {c}"),
                _ => "one CPU, nothing pinned".to_string(),
            }
        ))
    );
    // The legend: a swatch and a label per stack, each entry about 8 px a character wide.
    let mut x = 20.0;
    for stack in stacks {
        let label = stack.label();
        let _ = write!(
            svg,
            "<rect x=\"{x}\" y=\"66\" width=\"14\" height=\"14\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"78\">{label}</text>",
            stack.colour(),
            x + 20.0
        );
        x += 48.0 + 8.0 * label.len() as f64;
    }
    let _ = writeln!(
        svg,
        "<text x=\"{x}\" y=\"78\" fill=\"#555\" font-size=\"12\">each figure on its own scale; \
         right: how many times better the herd is than asyncio</text>"
    );
    for (i, row) in rows.iter().enumerate() {
        let y = TOP + group * i as f64;
        let direction = match row.better {
            Better::Higher => "higher is better",
            Better::Lower => "lower is better",
        };
        let _ = writeln!(
            svg,
            "<text x=\"{LABEL_END}\" y=\"{}\" text-anchor=\"end\" font-weight=\"bold\">{}</text>\
             <text x=\"{LABEL_END}\" y=\"{}\" text-anchor=\"end\" fill=\"#666\" \
             font-size=\"11\">{direction}</text>",
            y + 17.0,
            xml(row.chart.unwrap_or_default()),
            y + 33.0
        );
        let values: Vec<f64> = stacks
            .iter()
            .map(|&stack| row.values[stack].unwrap_or(0.0))
            .collect();
        let scale = highest(&values).filter(|m| *m > 0.0).unwrap_or(1.0);
        for (k, &stack) in stacks.iter().enumerate() {
            let (value, colour) = (row.values[stack], stack.colour());
            let bar_y = y + 4.0 + BAR_STEP * k as f64;
            let length = value.map_or(0.0, |v| (BAR_MAX * v / scale).max(2.0));
            let text = value.map_or("not measured".to_string(), |v| row.unit.format(v));
            let _ = writeln!(
                svg,
                "<rect x=\"{BAR_X}\" y=\"{bar_y}\" width=\"{length:.1}\" height=\"17\" \
                 fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{}\">{}</text>",
                BAR_X + length + 6.0,
                bar_y + 13.0,
                xml(&text)
            );
        }
        if let Some(ratio) = row.ratio() {
            let (colour, words) = if ratio >= 1.0 {
                ("#1b7837", format!("{} better", fmt_ratio(ratio)))
            } else {
                ("#b2182b", format!("{} (worse)", fmt_ratio(ratio)))
            };
            let _ = writeln!(
                svg,
                "<text x=\"{RATIO_END}\" y=\"{}\" text-anchor=\"end\" font-weight=\"bold\" \
                 font-size=\"15\" fill=\"{colour}\">{}</text>",
                y + 24.0,
                xml(&words)
            );
        }
        for goal in &row.goals {
            if let Goal::Times(times) = goal {
                let _ = writeln!(
                    svg,
                    "<text x=\"{RATIO_END}\" y=\"{}\" text-anchor=\"end\" fill=\"#666\" \
                     font-size=\"11\">target ≥ {times}×</text>",
                    y + 39.0
                );
            }
        }
        let _ = writeln!(
            svg,
            "<line x1=\"20\" x2=\"{RATIO_END}\" y1=\"{y2}\" y2=\"{y2}\" stroke=\"#ddd\"/>",
            y2 = y + group - 6.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// `results.md`: how the figures were made, the table, every run, and any problem.
pub fn results_markdown(bench: &Bench, table: &Table, machine: &Machine, took: Duration) -> String {
    let mut md =
        String::from("# herd vs the same protocol in Python (asyncio, uvloop) and Node.js\n\n");
    let _ = writeln!(md, "- {}", machine.describe());
    let _ = writeln!(md, "- Runtimes: {}", machine.runtimes());
    let _ = writeln!(md, "- Date: {}", machine.date);
    let mut options = Vec::new();
    if bench.plan.smoke {
        options.push("--smoke".to_string());
    }
    let others: Vec<String> = bench
        .stacks
        .list()
        .iter()
        .filter(|s| !matches!(s, Stack::Herd | Stack::Baseline))
        .map(|s| s.to_string())
        .collect();
    if others.len() < 3 {
        options.push(format!("--stacks {}", others.join(",")));
    }
    if let Some(baseline) = bench.stacks.baseline() {
        options.push(format!("--baseline {}", baseline.display()));
    }
    let _ = writeln!(
        md,
        "- Command: `cargo bench --bench herd{}` (commit {}, took {})",
        if options.is_empty() {
            String::new()
        } else {
            format!(" -- {}", options.join(" "))
        },
        if machine.commit.is_empty() {
            "unknown"
        } else {
            &machine.commit
        },
        fmt_minutes(took)
    );
    for &stack in bench.stacks.list() {
        let on = match bench.event_loop(stack) {
            Some(event_loop) => format!(" (its log: the `{event_loop}` event loop)"),
            None => String::new(),
        };
        let _ = writeln!(md, "- `{stack}`: {}{on}", stack.describe());
    }
    let _ = writeln!(
        md,
        "- {}; logging on; every comparison with the store in memory only (data_dir = \"\").",
        bench.cpus.describe()
    );
    let _ = writeln!(
        md,
        "- Each figure is the better of {} rounds, {} run in alternation on freshly started \
         servers, the order turned by one each round; memory is measured once, start-up is a \
         median. {RATIOS}",
        bench.plan.rounds,
        and_list(&labels(bench.stacks.list())),
    );
    if let Some(baseline) = baseline_note(bench) {
        let _ = writeln!(md, "- {baseline}");
    }
    if let Some(disturbed) = bench.disturbance() {
        let _ = writeln!(md, "- {disturbed}");
    }
    md.push('\n');
    md.push_str("![herd vs the prototypes](herd-vs-prototype.svg)\n\n");
    md.push_str(&table.to_markdown());
    md.push_str("\n## Every run\n\n");
    for run in bench.runs.borrow().iter() {
        let _ = writeln!(md, "- {run}");
    }
    let problems = bench.problems.borrow();
    if !problems.is_empty() {
        md.push_str("\n## Problems\n\n");
        for problem in problems.iter() {
            let _ = writeln!(md, "- {problem}");
        }
    }
    md
}

/// The stacks' labels, in order.
fn labels(stacks: &[Stack]) -> Vec<String> {
    stacks.iter().map(|s| s.label().to_string()).collect()
}

/// What the baseline column is, when the run has one.
pub fn baseline_note(bench: &Bench) -> Option<String> {
    let baseline = bench.stacks.baseline()?;
    Some(format!(
        "The baseline column is another build of the herd, `{} serve`, run in the same \
         alternation; vs baseline above 1: this build is better on that row, below 1: it is \
         slower",
        baseline.display()
    ))
}

pub fn fmt_minutes(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 60 {
        format!("{} min {} s", s / 60, s % 60)
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Writes `results.md` and the chart into `dir`.
pub fn write_results(dir: &Path, markdown: &str, svg: &str) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    for (name, text) in [("results.md", markdown), ("herd-vs-prototype.svg", svg)] {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
