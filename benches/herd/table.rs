//! The table the bench prints: one [`Row`] per figure, with its unit, which way is better, its
//! targets and notes; the table as aligned text and as Markdown; and the number formats.

use std::fmt::Write as _;

use crate::bench::{highest, lowest};
use crate::stacks::{Figures, PerStack, Stack};

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
    /// A share, in percent.
    Percent,
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
            Unit::Percent => format!("{value:.0}%"),
        }
    }
}

/// A target for the herd's figure.
#[derive(Clone, Copy)]
pub enum Goal {
    /// At least this many times better than the prototype.
    Times(f64),
    AtLeast(f64),
    AtMost(f64),
    Below(f64),
    /// On a row with a reference ([`Versus`]): at least this many times as good as it (0.95:
    /// within 5%).
    OfReference(f64),
}

/// The reference a herd-only row is compared with: the same figure, measured in the same run
/// in alternation, without the thing the row is about (no greedy connection, the budget off,
/// the store in memory only).
#[derive(Clone, Debug)]
pub struct Versus {
    /// What the reference is, in a few words ("alone", "budget off", "memory only").
    pub label: String,
    /// Its figure, chosen over the rounds as the row's own is.
    pub value: Option<f64>,
    /// Its figure in each round, in round order.
    pub rounds: Vec<f64>,
}

/// One line of the table.
pub struct Row {
    pub figure: String,
    pub unit: Unit,
    pub better: Better,
    pub values: Figures,
    /// Each stack's figure in each round, in round order: the noise beside each ratio.
    pub rounds: PerStack<Vec<f64>>,
    /// Whether the stacks' figures are comparable: false where the herd's column holds
    /// something else (a bare server's ceiling, the fake Places alone), so no ratio is printed.
    pub compare: bool,
    /// On a herd-only row, what the herd's figure is compared with instead of another stack.
    pub versus: Option<Versus>,
    pub goals: Vec<Goal>,
    /// The short label of this figure in the chart, if it is one of the main figures.
    pub chart: Option<&'static str>,
    pub notes: Vec<String>,
}

impl Row {
    pub fn new(figure: impl Into<String>, unit: Unit, better: Better, values: Figures) -> Row {
        Row {
            figure: figure.into(),
            unit,
            better,
            values,
            rounds: PerStack::default(),
            compare: true,
            versus: None,
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

    /// Each stack's figure round by round, for the noise beside the ratios.
    pub fn rounds(mut self, rounds: PerStack<Vec<f64>>) -> Row {
        self.rounds = rounds;
        self
    }

    /// No ratio: the herd's column holds something the other columns are not (see `compare`).
    pub fn apart(mut self) -> Row {
        self.compare = false;
        self
    }

    /// A herd-only row compared with `versus` rather than with the other stacks.
    pub fn versus(mut self, versus: Versus) -> Row {
        self.versus = Some(versus);
        self
    }

    /// `herd` against `other`, oriented so that above 1 the herd is better.
    fn oriented(&self, herd: f64, other: f64) -> Option<f64> {
        let ratio = match self.better {
            Better::Higher => herd / other,
            Better::Lower => other / herd,
        };
        ratio.is_finite().then_some(ratio)
    }

    /// How many times better the herd is than the prototype, what the targets speak of: above
    /// 1, the herd wins. On a row with a reference, how many times better than the reference.
    pub fn ratio(&self) -> Option<f64> {
        match &self.versus {
            Some(versus) => self.oriented(self.values[Stack::Herd]?, versus.value?),
            None => self.ratio_to(Stack::Prototype),
        }
    }

    /// How many times better the herd is than `other`: above 1, the herd wins. None on a row
    /// whose figures are not comparable, or that has a reference instead.
    pub fn ratio_to(&self, other: Stack) -> Option<f64> {
        if !self.compare || self.versus.is_some() {
            return None;
        }
        self.oriented(self.values[Stack::Herd]?, self.values[other]?)
    }

    /// The lowest and highest of the round-by-round ratios of the herd against `other` (or the
    /// row's reference, when `other` is the prototype and the row has one): round `i` of one
    /// against round `i` of the other. None with fewer than two rounds.
    pub fn ratio_range(&self, other: Stack) -> Option<(f64, f64)> {
        let theirs: &[f64] = match &self.versus {
            Some(versus) if other == Stack::Prototype => &versus.rounds,
            Some(_) => return None,
            None if self.compare => &self.rounds[other],
            None => return None,
        };
        let ours = &self.rounds[Stack::Herd];
        let ratios: Vec<f64> = ours
            .iter()
            .zip(theirs)
            .filter_map(|(&herd, &other)| self.oriented(herd, other))
            .collect();
        if ratios.len() < 2 {
            return None;
        }
        Some((lowest(&ratios)?, highest(&ratios)?))
    }

    /// The ratio cell: the ratio, and the noise seen over the rounds (`12× (10–13)`).
    fn ratio_cell(&self, other: Stack) -> String {
        let ratio = if other == Stack::Prototype {
            self.ratio()
        } else {
            self.ratio_to(other)
        };
        let Some(ratio) = ratio else {
            return "—".to_string();
        };
        let shown = fmt_ratio(ratio);
        match self.ratio_range(other) {
            Some((low, high)) => {
                let (low, high) = (fmt_ratio(low), fmt_ratio(high));
                if low == high && low == shown {
                    shown
                } else {
                    let (low, high) = (low.trim_end_matches('×'), high.trim_end_matches('×'));
                    format!("{shown} ({low}–{high})")
                }
            }
            None => shown,
        }
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
                        self.values[Stack::Herd].map(|h| h >= v),
                    ),
                    Goal::AtMost(v) => (
                        format!("≤ {}", self.unit.format(v)),
                        self.values[Stack::Herd].map(|h| h <= v),
                    ),
                    Goal::Below(v) => (
                        format!("< {}", self.unit.format(v)),
                        self.values[Stack::Herd].map(|h| h < v),
                    ),
                    Goal::OfReference(x) => (
                        format!(
                            "≥ {}× {}",
                            fmt_ratio(x).trim_end_matches('×'),
                            self.versus.as_ref().map_or("", |v| v.label.as_str())
                        ),
                        self.ratio().map(|r| r >= x),
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

/// The one table the bench prints: the figure, a column per stack, the herd's ratio to the
/// prototype (and to the baseline, when there is one), and the targets.
pub struct Table {
    /// The stacks' columns, in this order.
    stacks: Vec<Stack>,
    pub rows: Vec<Row>,
}

impl Table {
    pub fn new(stacks: &[Stack]) -> Table {
        Table {
            stacks: stacks.to_vec(),
            rows: Vec::new(),
        }
    }

    /// The stacks' columns, in order.
    pub fn stacks(&self) -> &[Stack] {
        &self.stacks
    }

    /// The ratio columns, each the herd against another stack: `ratio` against the prototype
    /// on asyncio's default loop (what the targets speak of; on a herd-only row, against the
    /// row's reference), then `vs uvloop`, `vs node` and `vs baseline` for the stacks the run
    /// has.
    fn comparisons(&self) -> Vec<(String, Stack)> {
        let mut columns = vec![("ratio".to_string(), Stack::Prototype)];
        for &stack in &self.stacks {
            if !matches!(stack, Stack::Herd | Stack::Prototype) {
                columns.push((format!("vs {stack}"), stack));
            }
        }
        columns
    }

    /// The column headers: the figure, the stacks, the ratios, the target.
    fn header(&self) -> Vec<String> {
        let mut header = vec!["figure".to_string()];
        header.extend(self.stacks.iter().map(|s| s.label().to_string()));
        header.extend(self.comparisons().into_iter().map(|(name, _)| name));
        header.push("target".to_string());
        header
    }

    /// The cells of every row, in the header's order, with footnote numbers on figures that
    /// have notes, and the footnotes.
    fn cells(&self) -> (Vec<Vec<String>>, Vec<String>) {
        let comparisons = self.comparisons();
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
                let mut cells = vec![figure];
                cells.extend(self.stacks.iter().map(|&stack| value(row.values[stack])));
                cells.extend(comparisons.iter().map(|&(_, other)| row.ratio_cell(other)));
                cells.push(row.target());
                cells
            })
            .collect();
        (rows, footnotes)
    }

    /// Aligned columns, for the terminal.
    pub fn to_text(&self) -> String {
        let header = self.header();
        let (rows, footnotes) = self.cells();
        let last = header.len() - 1;
        let widths: Vec<usize> = (0..header.len())
            .map(|i| {
                rows.iter()
                    .map(|r| r[i].chars().count())
                    .chain([header[i].chars().count()])
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let line = |cells: &[String]| {
            let mut out = String::new();
            for (i, cell) in cells.iter().enumerate() {
                let pad = widths[i].saturating_sub(cell.chars().count());
                // The figure and the target read left to right; numbers line up on the right.
                if i == 0 || i == last {
                    let _ = write!(out, "{cell}{}  ", " ".repeat(pad));
                } else {
                    let _ = write!(out, "{}{cell}  ", " ".repeat(pad));
                }
            }
            out.trim_end().to_string() + "\n"
        };
        let dashes: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
        let mut out = line(&header);
        out.push_str(&line(&dashes));
        for row in &rows {
            out.push_str(&line(row));
        }
        for (i, note) in footnotes.iter().enumerate() {
            let _ = writeln!(out, "[{}] {note}", i + 1);
        }
        out
    }

    pub fn to_markdown(&self) -> String {
        let header = self.header();
        let (rows, footnotes) = self.cells();
        let mut out = format!("| {} |\n|---|", header.join(" | "));
        out.push_str(&"--:|".repeat(header.len() - 2));
        out.push_str("---|\n");
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

/// `a`, `a and b`, `a, b and c`.
pub fn and_list(items: &[String]) -> String {
    match items {
        [] => String::new(),
        [one] => one.clone(),
        [rest @ .., last] => format!("{} and {last}", rest.join(", ")),
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
    } else if us < 999.5 {
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
    } else if ratio > 0.0 {
        // Two significant digits: 0.95×, 0.0041×.
        let decimals = (1 - ratio.log10().floor() as i32).max(2) as usize;
        format!("{ratio:.decimals$}×")
    } else {
        format!("{ratio:.2}×")
    }
}
