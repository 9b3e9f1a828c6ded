//! The table the bench prints: one [`Row`] per figure, with its unit, which way is better, its
//! targets and notes; the table as aligned text and as Markdown; and the number formats.

use std::fmt::Write as _;

use crate::bench::Pair;

/// Which way a figure is better; orients the ratio so that above 1 means the herd is better.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// What a value counts; every value is kept in the unit named here.
#[derive(Clone, Copy)]
pub enum Unit {
    /// Requests per second.
    PerSecond,
    /// A duration, in microseconds.
    Micros,
    /// Memory, in bytes, shown in MiB.
    MiB,
    /// Memory, in bytes.
    Bytes,
    Count,
}

impl Unit {
    pub fn format(self, value: f64) -> String {
        match self {
            Unit::PerSecond => fmt_rate(value),
            Unit::Micros => fmt_micros(value),
            Unit::MiB if value % (1024.0 * 1024.0) == 0.0 => {
                format!("{:.0} MiB", value / (1024.0 * 1024.0)) // a round target, "64 MiB"
            }
            Unit::MiB => format!("{:.1} MiB", value / (1024.0 * 1024.0)),
            Unit::Bytes => format!("{} B", fmt_count(value)),
            Unit::Count => fmt_count(value),
        }
    }
}

/// A target of issue 3, item 4, for the herd's figure.
#[derive(Clone, Copy)]
pub enum Goal {
    /// At least this many times better than the prototype.
    Times(f64),
    AtLeast(f64),
    AtMost(f64),
    Below(f64),
}

/// One line of the table.
pub struct Row {
    pub figure: String,
    pub unit: Unit,
    pub better: Better,
    pub values: Pair,
    pub goals: Vec<Goal>,
    /// The short label of this figure in the chart, if it is one of the main figures.
    pub chart: Option<&'static str>,
    pub notes: Vec<String>,
}

impl Row {
    pub fn new(figure: impl Into<String>, unit: Unit, better: Better, values: Pair) -> Row {
        Row {
            figure: figure.into(),
            unit,
            better,
            values,
            goals: Vec::new(),
            chart: None,
            notes: Vec::new(),
        }
    }

    pub fn goal(mut self, goal: Goal) -> Row {
        self.goals.push(goal);
        self
    }

    pub fn chart(mut self, label: &'static str) -> Row {
        self.chart = Some(label);
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.notes.push(note.into());
        self
    }

    /// How many times better the herd is: above 1, the herd wins.
    pub fn ratio(&self) -> Option<f64> {
        let (herd, prototype) = (self.values.herd?, self.values.prototype?);
        let ratio = match self.better {
            Better::Higher => herd / prototype,
            Better::Lower => prototype / herd,
        };
        ratio.is_finite().then_some(ratio)
    }

    /// The targets, each with ✓ or ✗ (? when the figure is missing).
    pub fn target(&self) -> String {
        let checks: Vec<String> = self
            .goals
            .iter()
            .map(|goal| {
                let (text, met) = match *goal {
                    Goal::Times(x) => (format!("≥ {x}×"), self.ratio().map(|r| r >= x)),
                    Goal::AtLeast(v) => (
                        format!("≥ {}", self.unit.format(v)),
                        self.values.herd.map(|h| h >= v),
                    ),
                    Goal::AtMost(v) => (
                        format!("≤ {}", self.unit.format(v)),
                        self.values.herd.map(|h| h <= v),
                    ),
                    Goal::Below(v) => (
                        format!("< {}", self.unit.format(v)),
                        self.values.herd.map(|h| h < v),
                    ),
                };
                let mark = match met {
                    Some(true) => "✓",
                    Some(false) => "✗",
                    None => "?",
                };
                format!("{text} {mark}")
            })
            .collect();
        checks.join(", ")
    }
}

/// The one table the bench prints.
#[derive(Default)]
pub struct Table {
    pub rows: Vec<Row>,
}

impl Table {
    const HEADER: [&'static str; 5] = ["figure", "herd", "prototype", "ratio", "target"];

    /// The cells of every row, with footnote numbers on figures that have notes, and the
    /// footnotes.
    fn cells(&self) -> (Vec<[String; 5]>, Vec<String>) {
        let mut footnotes = Vec::new();
        let rows = self
            .rows
            .iter()
            .map(|row| {
                let mut figure = row.figure.clone();
                for note in &row.notes {
                    footnotes.push(note.clone());
                    let _ = write!(figure, " [{}]", footnotes.len());
                }
                let value = |v: Option<f64>| v.map_or("—".to_string(), |v| row.unit.format(v));
                [
                    figure,
                    value(row.values.herd),
                    value(row.values.prototype),
                    row.ratio().map_or("—".to_string(), fmt_ratio),
                    row.target(),
                ]
            })
            .collect();
        (rows, footnotes)
    }

    /// Aligned columns, for the terminal.
    pub fn to_text(&self) -> String {
        let (rows, footnotes) = self.cells();
        let width = |i: usize| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([Self::HEADER[i].len()])
                .max()
                .unwrap_or(0)
        };
        let widths: Vec<usize> = (0..5).map(width).collect();
        let line = |cells: [&str; 5]| {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                // The figure and the target read left to right; numbers line up on the right.
                if i == 0 || i == 4 {
                    let _ = write!(out, "{cell}{}  ", " ".repeat(pad));
                } else {
                    let _ = write!(out, "{}{cell}  ", " ".repeat(pad));
                }
            }
            out.trim_end().to_string() + "\n"
        };
        let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        let mut out = line(Self::HEADER);
        out.push_str(&line(std::array::from_fn(|i| dashes[i].as_str())));
        for row in &rows {
            out.push_str(&line(row.each_ref().map(String::as_str)));
        }
        for (i, note) in footnotes.iter().enumerate() {
            let _ = writeln!(out, "[{}] {note}", i + 1);
        }
        out
    }

    pub fn to_markdown(&self) -> String {
        let (rows, footnotes) = self.cells();
        let mut out =
            String::from("| figure | herd | prototype | ratio | target |\n|---|--:|--:|--:|---|\n");
        for row in &rows {
            let _ = writeln!(out, "| {} |", row.join(" | "));
        }
        if !footnotes.is_empty() {
            out.push('\n');
            for (i, note) in footnotes.iter().enumerate() {
                let _ = writeln!(out, "[{}] {note}  ", i + 1);
            }
        }
        out
    }
}

pub fn fmt_count(value: f64) -> String {
    if !value.is_finite() {
        return "—".to_string();
    }
    let negative = value < 0.0;
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if negative {
        format!("-{out}")
    } else {
        out
    }
}

pub fn fmt_rate(per_second: f64) -> String {
    if per_second < 100.0 {
        format!("{per_second:.1}/s")
    } else {
        format!("{}/s", fmt_count(per_second))
    }
}

pub fn fmt_micros(us: f64) -> String {
    if !us.is_finite() {
        "—".to_string()
    } else if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 1_000_000.0 && us % 1_000.0 == 0.0 {
        format!("{:.0} ms", us / 1e3) // a round target, "50 ms"
    } else if us < 1_000_000.0 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

pub fn fmt_ratio(ratio: f64) -> String {
    if ratio >= 10.0 {
        format!("{ratio:.0}×")
    } else if ratio >= 1.0 {
        format!("{ratio:.1}×")
    } else {
        format!("{ratio:.2}×")
    }
}
