//! The link a neighbour dialled to this server: the other half of [`crate::link`].
//!
//! A neighbour's records arrive here, on the connection it dialled, and ours leave on the one we
//! dialled, so neither side ever has to pick one of two crossing connections. A connection
//! becomes a neighbour's inbound link once it has proved who it is ([`crate::conn`] runs the
//! handshake on the client port); the loop then hands it here, one per neighbour. A newer
//! connection from the same neighbour takes the place of the old one, which is stale (the
//! neighbour restarted, or found it dead).
//!
//! ```text
//!            handed over by the loop                 EOF, silent for 5 s, a bad line,
//!   Absent -------------------------> Up -------     or a newer connection from the neighbour
//!     ^                                          '--------------------------------------------.
//!     '---------------------------------------------------------------------------------------'
//! ```
//!
//! Up, it reads records (merged, and flooded on if they are news), heartbeats, and the
//! neighbour's digests, which it compares with our store ([`crate::peer::Comparison`]); it
//! writes only heartbeats and `SYNC`, the request to copy again what keeps differing. Its
//! deadlines, like the dialled link's, live in its state: silence, and the next heartbeat.
//!
//! It reads as a client's connection does ([`crate::conn::Conn::serve`]): until the socket is
//! empty, the high-water mark is reached, or its share of the turn is spent, a larger share than
//! a client's, since one link carries the updates of every client of the herd
//! ([`crate::config::Turn`]). Nothing else holds its lines back: it owes no replies.

use std::time::Instant;

use mio::net::TcpStream;

use crate::conn::{CloseReason, Served, INPUT_HIGH_WATER};
use crate::herd::Herd;
use crate::log::Who;
use crate::peer::{self, Compared, Comparison, PeerLine, Session};
use crate::store::DIGEST_PARTS;
use crate::trace::{self, trace_loop};
use crate::wire::{Fill, Line, OutBuf, Transport, Wire};

/// The link from one neighbour. `S` is its socket: mio's `TcpStream`, or a scripted one in tests.
pub struct Inbound<S = TcpStream> {
    state: State<S>,
    /// Bytes the neighbour has sent on its links, for the metrics.
    pub bytes_received: u64,
    /// When its state last changed, for the metrics.
    pub since: Option<Instant>,
}

// One per neighbour, so the size of the largest state costs nothing worth boxing for.
#[allow(clippy::large_enum_variant)]
enum State<S> {
    /// No connection from the neighbour.
    Absent,
    /// The neighbour's link, connection `id` of the log.
    Up {
        id: u64,
        wire: Wire<S>,
        /// With a herd secret: the keys and counters that every line is checked with.
        session: Option<Session>,
        /// When bytes last came from the neighbour: silence for [`peer::DEAD_AFTER`] closes
        /// the link.
        heard: Instant,
        /// When our last line (a heartbeat, a `SYNC`) was queued: quiet for
        /// [`peer::HEARTBEAT_INTERVAL`] sends `PING`. The neighbour's dialled link hears nothing
        /// else from us, and would find us silent.
        sent: Instant,
        /// The neighbour's store compared with ours.
        comparison: Comparison,
        /// The turn whose share `lines` and `read_bytes` are what is left of.
        turn: u64,
        /// Lines it may still run this turn.
        lines: usize,
        /// Bytes it may still read this turn.
        read_bytes: usize,
    },
}

// Every neighbour has one from the start, `Absent` until the neighbour dials.
impl<S: Transport> Default for Inbound<S> {
    fn default() -> Inbound<S> {
        Inbound {
            state: State::Absent,
            bytes_received: 0,
            since: None,
        }
    }
}

impl<S: Transport> Inbound<S> {
    /// Takes connection `id` as the neighbour's link. Returns the id of the connection it
    /// replaced, if there was one (the loop logs its close).
    ///
    /// The newer connection always wins: a neighbour dials again only when it has given up on
    /// the old one (it restarted, or found the link dead), so the old socket is dropped here,
    /// which closes it, with whatever it held unread. Nothing is lost for good: a link that
    /// comes up sends its whole store first.
    pub fn adopt(
        &mut self,
        now: Instant,
        id: u64,
        wire: Wire<S>,
        session: Option<Session>,
    ) -> Option<u64> {
        let old = match &self.state {
            State::Up { id, .. } => Some(*id),
            State::Absent => None,
        };
        self.since = Some(now);
        self.state = State::Up {
            id,
            wire,
            session,
            heard: now,
            sent: now,
            comparison: Comparison::default(),
            // No turn is numbered this: the first serve gives it a fresh share.
            turn: u64::MAX,
            lines: 0,
            read_bytes: 0,
        };
        old
    }

    /// The link's socket, if it has one.
    pub fn socket(&mut self) -> Option<&mut S> {
        match &mut self.state {
            State::Up { wire, .. } => Some(&mut wire.stream),
            State::Absent => None,
        }
    }

    /// The connection's id, if it has one.
    pub fn id(&self) -> Option<u64> {
        match &self.state {
            State::Up { id, .. } => Some(*id),
            State::Absent => None,
        }
    }

    /// The state's name, for the trace.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Absent => "Absent",
            State::Up { .. } => "Up",
        }
    }

    /// When the link next needs the loop without an event: to send a heartbeat, or to find the
    /// neighbour silent.
    pub fn deadline(&self) -> Option<Instant> {
        match &self.state {
            State::Up { heard, sent, .. } => {
                Some((*heard + peer::DEAD_AFTER).min(*sent + peer::HEARTBEAT_INTERVAL))
            }
            State::Absent => None,
        }
    }

    /// Reads what neighbour `from` wrote and runs its lines, as far as its share of the turn
    /// allows; `hangup` when the event said the neighbour closed its side. Returns the reason
    /// if the link closed.
    ///
    /// Called on the link's events, in the turn after the loop hands the connection over (what
    /// it read after the proof gets no event of its own), and in the next turn when it returned
    /// [`Served::More`]. It always reads: unlike a client's, its input waits on nothing but its
    /// share.
    pub fn serve(
        &mut self,
        hangup: bool,
        scratch: &mut [u8],
        herd: &mut Herd,
        from: usize,
    ) -> Result<Served, CloseReason> {
        let (now, turn) = (herd.now, herd.turn);
        let State::Up {
            id,
            wire,
            session,
            heard,
            sent,
            comparison,
            turn: share_turn,
            lines,
            read_bytes,
        } = &mut self.state
        else {
            return Ok(Served::Done);
        };
        if *share_turn != turn {
            // A new turn: a fresh share. 0 in the configuration means no limit.
            let share = herd.limits.turn.peer();
            let unlimited = |n: usize| if n == 0 { usize::MAX } else { n };
            (*share_turn, *lines, *read_bytes) =
                (turn, unlimited(share.lines), unlimited(share.read_bytes));
        }
        // A record is a little longer than the IAMAT it answers (server name, time
        // difference), and with a secret a line also carries its sequence number and tag, so a
        // peer's lines may be longer than a client's.
        let max_line = 2 * herd.limits.max_line_bytes + 1024;
        let mut read = true;
        let outcome = loop {
            let fill = match read && *read_bytes > 0 {
                true => {
                    // Read no more than the share allows, nor past the high-water mark.
                    let before = wire.reader.buffered();
                    let high = before.saturating_add(*read_bytes).min(INPUT_HIGH_WATER);
                    let fill = wire.reader.fill(&mut wire.stream, scratch, high, hangup);
                    let taken = wire.reader.buffered().saturating_sub(before);
                    *read_bytes = read_bytes.saturating_sub(taken);
                    self.bytes_received += taken as u64;
                    if taken > 0 {
                        *heard = now;
                        trace_loop!("  peer {} read {taken} bytes", herd.links[from].name);
                    }
                    // A failed read closes the link at once; lines still buffered go with it.
                    fill.map_err(|e| CloseReason::ReadFailed(e.to_string()))?
                }
                false => Fill::Drained,
            };
            let before = wire.reader.buffered();
            while *lines > 0 {
                let line = match wire.reader.next_line(max_line) {
                    None => break,
                    // No `?` to a neighbour: a line this long is a broken peer; close.
                    Some(Line::TooLong(prefix)) => {
                        herd.log.bytes(Who::Conn(*id), '<', prefix);
                        return Err(CloseReason::LineTooLong(max_line));
                    }
                    Some(Line::Complete(line)) => line,
                };
                *lines -= 1;
                // With a secret, a line counts only once its tag and sequence number check
                // out; one that fails closes the link (docs/protocol.md section 5).
                let payload = match session {
                    Some(session) => {
                        (session.open(line)).map_err(|e| CloseReason::PeerProtocol(e.to_owned()))?
                    }
                    None => line,
                };
                // Logged once its tag is checked (a forged line never appears as the
                // neighbour's); heartbeats and digests, which come every second or three on
                // every link, only when asked.
                let housekeeping = matches!(
                    payload.split(|&b| b == b' ').next(),
                    Some(b"PING" | b"PARTS" | b"DIGEST")
                );
                if !housekeeping || herd.log_housekeeping {
                    herd.log.bytes(Who::Peer(&herd.links[from].name), '<', line);
                }
                trace_loop!(
                    "  peer {} < {}",
                    herd.links[from].name,
                    trace::shown(payload)
                );
                on_line(
                    now,
                    herd,
                    from,
                    payload,
                    comparison,
                    session,
                    &mut wire.out,
                    sent,
                );
            }
            match fill {
                // The end of the stream closes the link once every line before it has run
                // (the records the neighbour sent before it closed still count); with lines
                // left and the share spent, it waits for the next turn.
                Fill::Eof if wire.reader.buffered() == 0 || *lines > 0 => {
                    break Err(CloseReason::PeerClosed(herd.links[from].name.clone()))
                }
                // Handling made room: the socket may hold more, and will not say so again.
                Fill::Full if wire.reader.buffered() < before && *read_bytes > 0 => read = true,
                _ => break Ok(()),
            }
        };
        wire.reader.compact();
        outcome?;
        // Again next turn only for what no event will bring back: a line held by the share,
        // or bytes left in the socket when the read share ran out.
        let more =
            (*lines == 0 && wire.reader.has_line()) || (wire.reader.is_full() && *read_bytes == 0);
        Ok(if more { Served::More } else { Served::Done })
    }

    /// Fires whatever deadline has passed: a heartbeat to send, or a neighbour gone silent.
    /// Safe to call when none has. Returns the reason if the link closed.
    pub fn on_timeout(&mut self, now: Instant) -> Result<(), CloseReason> {
        let State::Up {
            wire,
            session,
            heard,
            sent,
            ..
        } = &mut self.state
        else {
            return Ok(());
        };
        if *heard + peer::DEAD_AFTER <= now {
            return Err(CloseReason::Silent(peer::DEAD_AFTER));
        }
        // Framed (sealed, with a secret) into the output; the end of the turn writes it.
        if *sent + peer::HEARTBEAT_INTERVAL <= now {
            peer::frame(session.as_mut(), b"PING", wire.out.tail());
            *sent = now;
        }
        Ok(())
    }

    /// Writes what waits (heartbeats, `SYNC`, and after a hand-over our `PROOF`). Called at the
    /// end of every turn, and right after a hand-over. Returns the reason if the write failed,
    /// or if more than `cap` (`peer_output_bytes`) is left unsent: a neighbour that does not read
    /// what its own link is sent is not let grow this server's memory; its link closes, and it
    /// dials again.
    pub fn flush(&mut self, cap: usize) -> Result<(), CloseReason> {
        let State::Up { wire, .. } = &mut self.state else {
            return Ok(());
        };
        (wire.out)
            .write_to(&mut wire.stream)
            .map_err(|e| CloseReason::WriteFailed(e.to_string()))?;
        match wire.out.pending() > cap {
            true => Err(CloseReason::PeerProtocol(format!(
                "over {cap} bytes unsent: the neighbour does not read its link"
            ))),
            false => Ok(()),
        }
    }

    /// Closes the link; returns the id of the connection closed. Dropping the socket closes it
    /// and takes it off the poll; the neighbour's link notices and dials again.
    pub fn close(&mut self, now: Instant) -> Option<u64> {
        let id = self.id();
        self.state = State::Absent;
        self.since = Some(now);
        id
    }
}

/// One line of neighbour `from`'s, opened: a record to merge (and flood if it is news), a
/// heartbeat, or the digests of the neighbour's store and of its parts.
#[allow(clippy::too_many_arguments)]
fn on_line(
    now: Instant,
    herd: &mut Herd,
    from: usize,
    payload: &[u8],
    comparison: &mut Comparison,
    session: &mut Option<Session>,
    out: &mut OutBuf,
    sent: &mut Instant,
) {
    match peer::parse_line(payload) {
        // Merged, and flooded to every other neighbour if it changed the store.
        Some(PeerLine::Record(record)) => herd.merge_record(record, from),
        // Nothing to do: its arrival already moved `heard`.
        Some(PeerLine::Ping) => {}
        // Kept until the `DIGEST` that follows them decides what differs.
        Some(PeerLine::Parts { first, digests }) => comparison.parts(first, &digests),
        // Digests faster than a correct neighbour sends them are not compared (or answered).
        Some(PeerLine::Digest { .. }) if comparison.too_soon(now) => {}
        Some(PeerLine::Digest { count, digest }) => {
            // While our link is still copying our store to the neighbour, its store lacks some
            // of ours: not a difference to act on.
            let copying = herd.links[from].copying();
            let Compared::Resync(parts) = comparison.digest(count, digest, &herd.store, copying)
            else {
                return;
            };
            // Still different: each side sends the other what differs.
            let what = match &parts {
                None => "the whole store".to_string(),
                Some(set) => format!("{} of {} parts", set.len(), DIGEST_PARTS),
            };
            herd.log.event(
                format_args!("peer {}", herd.links[from].name),
                format_args!(
                    "stores differ ({count} records, {digest:016x}; here {}, {:016x}): resyncing {what} both ways",
                    herd.store.len(),
                    herd.store.digest()
                ),
            );
            peer::frame(
                session.as_mut(),
                &peer::sync_line(parts.as_ref()),
                out.tail(),
            );
            *sent = now;
            herd.links[from].resync(&herd.store, parts);
        }
        // `SYNC` travels the other way, on the link we dialled; anything else is no peer line.
        // Either is logged and ignored.
        Some(PeerLine::Sync(_)) | None => herd.log.event(
            format_args!("peer {}", herd.links[from].name),
            format_args!("ignored a line an inbound link does not carry"),
        ),
    }
}

#[cfg(test)]
mod tests {
    //! The inbound link driven with scripted sockets and an explicit `now`.

    use std::net::SocketAddr;

    use super::*;
    use crate::config::Limits;
    use crate::link::Link;
    use crate::log::Log;
    use crate::peer::Secret;
    use crate::store::Store;
    use crate::wire::script::{Script, Step};

    fn herd() -> Herd {
        let now = Instant::now();
        let bona = Link::new("Bona".into(), SocketAddr::from(([127, 0, 0, 1], 9)), now);
        let mut herd = Herd::new(
            "Test".into(),
            None,
            vec![bona],
            None,
            Log::discard(),
            Limits::default(),
            now,
        );
        herd.turn = 1;
        herd
    }

    fn adopted(herd: &Herd, steps: &[Step], session: Option<Session>) -> Inbound<Script> {
        let mut inbound = Inbound::default();
        let old = inbound.adopt(herd.now, 3, Wire::new(Script::reading(steps)), session);
        assert_eq!(old, None);
        inbound
    }

    fn lines(text: &str) -> Step {
        Step::Data(text.as_bytes().to_vec())
    }

    fn serve(inbound: &mut Inbound<Script>, herd: &mut Herd) -> Result<Served, CloseReason> {
        inbound.serve(false, &mut [0; 4096], herd, 0)
    }

    fn written(inbound: &mut Inbound<Script>) -> String {
        let _ = inbound.flush(usize::MAX);
        let out = inbound
            .socket()
            .map(|s| s.output.clone())
            .unwrap_or_default();
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn up_merges_the_records_it_reads_and_ignores_what_is_not_one() {
        let mut herd = herd();
        let mut inbound = adopted(
            &herd,
            &[lines(
                "AT Bona +0.000000001 k +1+1 5\nAT Bona +1 bad +1+1 5\nPING\n",
            )],
            None,
        );
        assert_eq!(serve(&mut inbound, &mut herd), Ok(Served::Done));
        assert_eq!(
            herd.store.get(b"k"),
            Some(&b"AT Bona +0.000000001 k +1+1 5"[..])
        );
        assert_eq!(herd.store.len(), 1);
        assert_eq!(
            written(&mut inbound),
            "",
            "an inbound link writes only PING and SYNC"
        );
    }

    #[test]
    fn up_at_the_end_of_the_stream_closes() {
        let mut herd = herd();
        let mut inbound = adopted(&herd, &[Step::Eof], None);
        assert_eq!(
            serve(&mut inbound, &mut herd),
            Err(CloseReason::PeerClosed("Bona".into()))
        );
    }

    #[test]
    fn up_and_quiet_sends_a_heartbeat_and_silent_for_five_seconds_closes() {
        let herd = herd();
        let mut inbound = adopted(&herd, &[], None);
        assert_eq!(
            inbound.deadline(),
            Some(herd.now + peer::HEARTBEAT_INTERVAL)
        );
        assert_eq!(
            inbound.on_timeout(herd.now + peer::HEARTBEAT_INTERVAL),
            Ok(())
        );
        assert_eq!(written(&mut inbound), "PING\n");
        assert_eq!(
            inbound.on_timeout(herd.now + peer::DEAD_AFTER),
            Err(CloseReason::Silent(peer::DEAD_AFTER))
        );
    }

    /// The `PARTS` and `DIGEST` lines of Bona's store holding one record `k`, which ours has not.
    fn digests_of_a_store_that_differs() -> String {
        let mut theirs = Store::default();
        theirs.merge(b"k", 5, b"AT Bona +0.000000001 k +1+1 5");
        peer::store_lines(&theirs)
            .iter()
            .map(|l| format!("{}\n", String::from_utf8_lossy(l)))
            .collect()
    }

    #[test]
    fn stores_that_keep_differing_are_resynchronised_by_asking_for_the_parts_that_differ() {
        let mut herd = herd();
        let digests = digests_of_a_store_that_differs();
        let mut inbound = adopted(&herd, &[lines(&digests)], None);
        let _ = serve(&mut inbound, &mut herd);
        assert_eq!(written(&mut inbound), "", "once may be updates in flight");
        herd.now += peer::DIGEST_INTERVAL;
        inbound
            .socket()
            .expect("up")
            .input
            .push_back(lines(&digests));
        let _ = serve(&mut inbound, &mut herd);
        let text = written(&mut inbound);
        let part = crate::store::part_of(b"k");
        let mut set = peer::PartSet::default();
        set.insert(part);
        let want = format!(
            "{}\n",
            String::from_utf8_lossy(&peer::sync_line(Some(&set)))
        );
        assert_eq!(
            text, want,
            "twice in a row: the part that differs, asked for"
        );
    }

    #[test]
    fn digests_faster_than_a_neighbour_sends_them_are_not_compared_and_unread_output_is_capped() {
        let mut herd = herd();
        let digests = digests_of_a_store_that_differs();
        // Ten rounds of differing digests at once: the first is compared, the rest come too
        // soon, so nothing is asked for.
        let mut inbound = adopted(&herd, &[lines(&digests.repeat(10))], None);
        let _ = serve(&mut inbound, &mut herd);
        assert_eq!(written(&mut inbound), "", "compared once: no SYNC yet");
        // As many again, once a correct neighbour's interval has passed: one SYNC, no more.
        herd.now += peer::DIGEST_INTERVAL;
        herd.turn += 1;
        let socket = inbound.socket().expect("up");
        socket.input.push_back(lines(&digests.repeat(10)));
        socket.room = Some(0); // and the neighbour reads nothing
        let _ = serve(&mut inbound, &mut herd);
        let mut set = peer::PartSet::default();
        set.insert(crate::store::part_of(b"k"));
        let sync = peer::sync_line(Some(&set)).len() + 1;
        assert!(inbound.flush(sync).is_ok(), "one SYNC waits, no more");
        assert!(
            matches!(inbound.flush(sync - 1), Err(CloseReason::PeerProtocol(_))),
            "more unsent than the cap closes the link"
        );
    }

    #[test]
    fn a_line_that_fails_its_tag_closes_the_link() {
        let mut herd = herd();
        let secret = Secret::new(b"0123456789abcdef0123");
        let (nd, na) = (&b"0011"[..], &b"2233"[..]);
        let session = Session::new(&secret, nd, na, false);
        let mut sender = Session::new(&secret, nd, na, true);
        let mut good = Vec::new();
        peer::frame(
            Some(&mut sender),
            b"AT Bona +0.000000001 k +1+1 5",
            &mut good,
        );
        let mut forged = good.clone();
        forged[3] ^= 1;
        let mut inbound = adopted(&herd, &[Step::Data(forged)], Some(session));
        assert!(matches!(
            serve(&mut inbound, &mut herd),
            Err(CloseReason::PeerProtocol(_))
        ));
        assert!(herd.store.is_empty());
        let mut inbound = adopted(
            &herd,
            &[Step::Data(good)],
            Some(Session::new(&secret, nd, na, false)),
        );
        assert_eq!(serve(&mut inbound, &mut herd), Ok(Served::Done));
        assert_eq!(herd.store.len(), 1);
    }

    #[test]
    fn a_link_whose_share_of_the_turn_is_spent_is_served_again_with_no_new_event() {
        let mut herd = herd();
        herd.limits.turn.lines = 1; // a neighbour's share: PEER_SHARE lines
        let share = crate::config::Turn::PEER_SHARE;
        let records: String = (0..2 * share + 4)
            .map(|i| format!("AT Bona +0.000000001 c{i:03} +1+1 5\n"))
            .collect();
        let mut inbound = adopted(&herd, &[lines(&records)], None);
        assert_eq!(serve(&mut inbound, &mut herd), Ok(Served::More));
        assert_eq!(herd.store.len(), share);
        herd.turn += 1;
        assert_eq!(serve(&mut inbound, &mut herd), Ok(Served::More));
        herd.turn += 1;
        assert_eq!(serve(&mut inbound, &mut herd), Ok(Served::Done));
        assert_eq!(herd.store.len(), 2 * share + 4);
    }

    #[test]
    fn a_newer_connection_from_the_neighbour_takes_the_old_ones_place() {
        let herd = herd();
        let mut inbound = adopted(&herd, &[], None);
        let old = inbound.adopt(herd.now, 9, Wire::new(Script::reading(&[])), None);
        assert_eq!((old, inbound.id()), (Some(3), Some(9)));
    }
}
