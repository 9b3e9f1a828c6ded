//! `herd trace-svg`: a saved trace (`herd up --trace 2> trace.txt`) drawn as a sequence diagram,
//! one lane per server and per client, an arrow per line sent, the loop's turns marked; `herd up
//! --trace-svg FILE` draws the herd it ran.
//!
//! The lines drawn are the data, not the housekeeping: a client's commands and the replies it
//! was sent, the records a server sent its neighbours, and the requests to Google Places and
//! their answers. A record sent (`link Bona > AT ...` in Bailey's trace) is joined to the same
//! record received (`peer Bailey < AT ...` in Bona's), so an arrow runs from the moment one
//! server wrote it to the moment the other read it. Heartbeats, digests and handshakes are left
//! out. Time runs down the page, one row per line drawn, each labelled with its time since the
//! first: a diagram in order of events, not to scale.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;

/// One line of a trace that the diagram uses.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// A turn of server `server`'s loop began.
    Turn { server: String, turn: String },
    /// Server `from` sent `line` to `to` (a neighbour, a client lane, or Places).
    Sent {
        from: String,
        to: String,
        line: String,
    },
    /// Server `at` read `line` from `from`.
    Read {
        at: String,
        from: String,
        line: String,
    },
}

/// One parsed line: its time in microseconds, and the step.
type Timed = (u64, Step);

/// Reads the steps of a trace; lines it does not draw are skipped.
fn parse(trace: &str) -> Vec<Timed> {
    let mut steps = Vec::new();
    // Accepted connections that greeted as neighbours: their lines are a handshake, not a client's.
    let mut peers: Vec<(String, String)> = Vec::new();
    for line in trace.lines() {
        let mut words = line.trim_start().splitn(3, ' ');
        let (Some(time), Some(server), Some(rest)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Ok(time) = time.parse::<u64>() else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(turn) = rest.strip_prefix("turn ") {
            let turn = turn.split(':').next().unwrap_or_default().to_owned();
            steps.push((
                time,
                Step::Turn {
                    server: server.to_owned(),
                    turn,
                },
            ));
            continue;
        }
        let mut parts = rest.splitn(3, ' ');
        let (Some(who), Some(dir), Some(text)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let (who, dir, text) = match (who, dir) {
            ("link" | "peer" | "places", name) => {
                let mut more = text.splitn(2, ' ');
                match (more.next(), more.next()) {
                    (Some(d @ ("<" | ">")), Some(text)) => (format!("{who} {name}"), d, text),
                    _ => continue,
                }
            }
            (who, d @ ("<" | ">")) => (who.to_owned(), d, text),
            _ => continue,
        };
        if !is_data(text) || text.is_empty() {
            if text.starts_with("PEER ") && who.starts_with('c') {
                peers.push((server.to_owned(), who));
            }
            continue;
        }
        let me = server.to_owned();
        let step = match (who.split_once(' '), dir) {
            (Some(("link", to)), ">") => Step::Sent {
                from: me,
                to: to.to_owned(),
                line: text.to_owned(),
            },
            (Some(("peer", from)), "<") => Step::Read {
                at: me,
                from: from.to_owned(),
                line: text.to_owned(),
            },
            (Some(("places", _)), ">") => Step::Sent {
                from: me,
                to: "Places".into(),
                line: text.to_owned(),
            },
            (Some(("places", _)), "<") => Step::Read {
                at: me,
                from: "Places".into(),
                line: text.to_owned(),
            },
            (None, dir) if who.starts_with('c') => {
                if peers.contains(&(server.to_owned(), who.clone())) {
                    continue;
                }
                // A reply is one arrow, labelled with its first line: the lines of a
                // WHATSAT's JSON body that follow its `AT` line are not messages of their own.
                if dir == ">" && !text.starts_with("AT ") && !text.starts_with("? ") {
                    continue;
                }
                let lane = format!("{who}@{server}");
                match dir {
                    "<" => Step::Read {
                        at: me,
                        from: lane,
                        line: text.to_owned(),
                    },
                    _ => Step::Sent {
                        from: me,
                        to: lane,
                        line: text.to_owned(),
                    },
                }
            }
            _ => continue,
        };
        steps.push((time, step));
    }
    steps.sort_by_key(|(time, _)| *time);
    steps
}

/// Whether a traced line is data: not a heartbeat, a digest, a handshake or a count of bytes.
fn is_data(text: &str) -> bool {
    let verb = text.split(' ').next().unwrap_or_default();
    !matches!(
        verb,
        "PING" | "PARTS" | "DIGEST" | "SYNC" | "PEER" | "CHALLENGE" | "PROOF" | "read" | "..."
    )
}

/// An arrow: from lane `from` at row `start` to lane `to` at row `end`, labelled.
struct Arrow {
    from: usize,
    to: usize,
    start: usize,
    end: usize,
    label: String,
}

/// The diagram of `trace`, as an SVG document.
pub fn draw(trace: &str) -> String {
    let steps = parse(trace);
    let t0 = (steps.iter())
        .find(|(_, step)| !matches!(step, Step::Turn { .. }))
        .map_or(0, |(t, _)| *t);
    // Lanes in the order their names first appear. A server's `turn` line comes before the
    // lines of its clients, so a client's lane usually follows its server's.
    let mut lanes: Vec<String> = Vec::new();
    let lane = |name: &str, lanes: &mut Vec<String>| -> usize {
        match lanes.iter().position(|l| l == name) {
            Some(i) => i,
            None => {
                lanes.push(name.to_owned());
                lanes.len() - 1
            }
        }
    };
    let mut rows: Vec<(u64, String)> = Vec::new();
    let mut arrows: Vec<Arrow> = Vec::new();
    let mut turns: Vec<(usize, usize, String)> = Vec::new();
    // The turn each server is in, marked at its first line drawn: turns that drew nothing
    // (heartbeats, digests) are left out.
    let mut turn_of: HashMap<String, String> = HashMap::new();
    // Records sent and not yet read, by (sender, receiver), oldest first.
    let mut in_flight: HashMap<(String, String), VecDeque<(String, usize)>> = HashMap::new();
    for (time, step) in &steps {
        let row = rows.len();
        let acting = match step {
            Step::Turn { server, turn } => {
                lane(server, &mut lanes);
                turn_of.insert(server.clone(), turn.clone());
                continue;
            }
            Step::Sent { from, .. } => from,
            Step::Read { at, .. } => at,
        };
        if let Some(turn) = turn_of.remove(acting) {
            turns.push((lane(acting, &mut lanes), row, turn));
        }
        match step {
            Step::Turn { .. } => continue,
            Step::Sent { from, to, line } if !is_client(to) && to != "Places" => {
                lane(from, &mut lanes);
                let queue = in_flight.entry((from.clone(), to.clone())).or_default();
                queue.push_back((line.clone(), row));
                rows.push((*time, format!("{from} wrote")));
                continue;
            }
            Step::Read { at, from, line } if !is_client(from) && from != "Places" => {
                let queue = in_flight.entry((from.clone(), at.clone())).or_default();
                let start = match queue.iter().position(|(l, _)| l == line) {
                    Some(i) => queue.remove(i).map_or(row, |(_, r)| r),
                    None => row,
                };
                let (f, t) = (lane(from, &mut lanes), lane(at, &mut lanes));
                arrows.push(Arrow {
                    from: f,
                    to: t,
                    start,
                    end: row,
                    label: line.clone(),
                });
            }
            Step::Sent { from, to, line } => {
                let (f, t) = (lane(from, &mut lanes), lane(to, &mut lanes));
                arrows.push(Arrow {
                    from: f,
                    to: t,
                    start: row,
                    end: row,
                    label: line.clone(),
                });
            }
            Step::Read { at, from, line } => {
                let (f, t) = (lane(from, &mut lanes), lane(at, &mut lanes));
                arrows.push(Arrow {
                    from: f,
                    to: t,
                    start: row,
                    end: row,
                    label: line.clone(),
                });
            }
        }
        rows.push((*time, String::new()));
    }
    // Records written and never read (the trace ended first): drawn to the receiver at once.
    for ((from, to), queue) in in_flight {
        for (line, row) in queue {
            let (f, t) = (lane(&from, &mut lanes), lane(&to, &mut lanes));
            arrows.push(Arrow {
                from: f,
                to: t,
                start: row,
                end: row,
                label: line,
            });
        }
    }
    render(&lanes, &rows, &arrows, &turns, t0)
}

/// Whether `lane` is a client's (`c3@Bailey`): client lines are drawn where they happen, not
/// paired like records between servers.
fn is_client(lane: &str) -> bool {
    lane.starts_with('c') && lane.contains('@')
}

/// Width of a lane, in SVG user units (pixels).
const LANE: usize = 170;
/// Height of a row: one line drawn.
const ROW: usize = 22;
/// Room above the first row, for the lanes' names.
const TOP: usize = 60;
/// Room left of the first lane, for the times.
const LEFT: usize = 90;

/// The SVG document: lanes, the time of each row, the turn marks, then the arrows on top.
fn render(
    lanes: &[String],
    rows: &[(u64, String)],
    arrows: &[Arrow],
    turns: &[(usize, usize, String)],
    t0: u64,
) -> String {
    let width = LEFT + LANE * lanes.len().max(1) + 40;
    let height = TOP + ROW * (rows.len() + 1) + 20;
    let x = |lane: usize| LEFT + LANE * lane + LANE / 2;
    let y = |row: usize| TOP + ROW * row + ROW / 2;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" \
         viewBox=\"0 0 {width} {height}\" font-family=\"monospace\" font-size=\"11\">"
    );
    svg.push_str(
        "<defs><marker id=\"head\" markerWidth=\"8\" markerHeight=\"8\" refX=\"8\" refY=\"4\" \
         orient=\"auto\"><path d=\"M0,0 L8,4 L0,8 z\" fill=\"#333\"/></marker></defs>\n",
    );
    let _ = writeln!(
        svg,
        "<rect x=\"0\" y=\"0\" width=\"{width}\" height=\"{height}\" fill=\"white\"/>"
    );
    for (i, name) in lanes.iter().enumerate() {
        let (cx, bottom) = (x(i), height - 10);
        let _ = writeln!(
            svg,
            "<g class=\"lane\"><text x=\"{cx}\" y=\"30\" text-anchor=\"middle\" \
             font-weight=\"bold\">{}</text><line x1=\"{cx}\" y1=\"40\" x2=\"{cx}\" \
             y2=\"{bottom}\" stroke=\"#999\" stroke-dasharray=\"4 3\"/></g>",
            escape(name)
        );
    }
    for (row, (time, _)) in rows.iter().enumerate() {
        let micros = time.saturating_sub(t0);
        let _ = writeln!(
            svg,
            "<text x=\"8\" y=\"{}\" fill=\"#666\">+{}.{:03} ms</text>",
            y(row) + 4,
            micros / 1000,
            micros % 1000
        );
    }
    for (lane, row, turn) in turns {
        let (cx, cy) = (x(*lane), TOP + ROW * row);
        let _ = writeln!(
            svg,
            "<g class=\"turn\"><line x1=\"{}\" y1=\"{cy}\" x2=\"{}\" y2=\"{cy}\" \
             stroke=\"#c60\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\" fill=\"#c60\" \
             font-size=\"9\">turn {}</text></g>",
            cx - 10,
            cx + 10,
            cx + 12,
            cy + 3,
            escape(turn)
        );
    }
    for arrow in arrows {
        let (x1, y1, x2, y2) = (x(arrow.from), y(arrow.start), x(arrow.to), y(arrow.end));
        let label: String = arrow.label.chars().take(44).collect();
        // Level arrows are labelled in the middle; a slanted one where it leaves its sender,
        // on the side it goes to, so that the labels of crossing arrows do not sit together.
        let (lx, ly, anchor) = match (y1 == y2, x2 >= x1) {
            (true, _) => ((x1 + x2) / 2, y1 - 3, "middle"),
            (false, true) => (x1 + 6, y1 - 3, "start"),
            (false, false) => (x1 - 6, y1 - 3, "end"),
        };
        let _ = writeln!(
            svg,
            "<g class=\"arrow\"><line x1=\"{x1}\" y1=\"{y1}\" x2=\"{x2}\" y2=\"{y2}\" \
             stroke=\"#333\" marker-end=\"url(#head)\"/><text x=\"{lx}\" y=\"{ly}\" \
             text-anchor=\"{anchor}\" font-size=\"9\">{}</text></g>",
            escape(&label)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

/// Text made safe for an SVG document.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRACE: &str = "\
    1000 Bailey turn 1: woken by c3 readable
    1002 Bailey   c3 read 58 bytes
    1003 Bailey   c3 < IAMAT kiwi +1+1 5
    1004 Bailey   store kiwi: stored
    1005 Bailey   link Bona > AT Bailey +0.1 kiwi +1+1 5
    1006 Bailey   link Bona > PING
    1010 Bailey   c3 > AT Bailey +0.1 kiwi +1+1 5
    1020 Bona turn 7: woken by peer Bailey readable
    1021 Bona   peer Bailey < AT Bailey +0.1 kiwi +1+1 5
    1022 Bona   c1 < PEER herd/1 Clark 00ff
    1023 Bona   c1 > CHALLENGE 00ff
    1030 Bona   c2 < WHATSAT kiwi 10 1
    1031 Bona   places #1 > GET /maps/api/place/nearbysearch/json?location=1,1&radius=10000
    1090 Bona   places #1 < 3000 bytes
    1091 Bona   c2 > AT Bailey +0.1 kiwi +1+1 5
    1091 Bona   c2 > {
    1091 Bona   c2 >    \"results\" : [
    1091 Bona   c2 > ... and 9 more lines
";

    #[test]
    fn a_lane_per_server_and_client_and_an_arrow_per_line_of_data() {
        let svg = draw(TRACE);
        assert!(svg.starts_with("<svg ") && svg.ends_with("</svg>\n"));
        let lanes: Vec<&str> = svg
            .split("<g class=\"lane\">")
            .skip(1)
            .filter_map(|g| g.split("font-weight=\"bold\">").nth(1))
            .filter_map(|t| t.split('<').next())
            .collect();
        assert_eq!(lanes, ["Bailey", "c3@Bailey", "Bona", "c2@Bona", "Places"]);
        // The IAMAT, its reply, the record (one arrow, written to read), the WHATSAT, the
        // request, the answer and the reply (one arrow, however many lines its body has): the
        // heartbeat and the handshake are left out.
        assert_eq!(svg.matches("<g class=\"arrow\">").count(), 7);
        assert_eq!(svg.matches("<g class=\"turn\">").count(), 2);
        assert!(svg.contains("IAMAT kiwi +1+1 5"));
    }

    #[test]
    fn text_is_escaped() {
        assert_eq!(escape("a<b>&\"c\""), "a&lt;b&gt;&amp;&quot;c&quot;");
        let svg = draw("1 A   c1 < bad<tag>&\n");
        assert!(svg.contains("bad&lt;tag&gt;&amp;"));
        assert!(!svg.contains("<tag>"));
    }
}
