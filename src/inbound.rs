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

use std::time::Instant;

use mio::net::TcpStream;

use crate::conn::{CloseReason, Served, INPUT_HIGH_WATER};
use crate::herd::Herd;
use crate::log::Who;
use crate::peer::{self, Compared, Comparison, PeerLine, Session};
use crate::store::DIGEST_PARTS;
use crate::wire::{Fill, Line, OutBuf, Transport, Wire};

/// The link from one neighbour. `S` is its socket: mio's `TcpStream`, or a scripted one in tests.
pub struct Inbound<S = TcpStream> {
    state: State<S>,
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
        /// When the neighbour last wrote, and when we last did.
        heard: Instant,
        sent: Instant,
        /// The neighbour's store compared with ours.
        comparison: Comparison,
        /// The turn whose share `lines` and `read_bytes` are what is left of.
        turn: u64,
        lines: usize,
        read_bytes: usize,
    },
}

impl<S: Transport> Default for Inbound<S> {
    fn default() -> Inbound<S> {
        Inbound {
            state: State::Absent,
        }
    }
}

impl<S: Transport> Inbound<S> {
    /// Takes connection `id` as the neighbour's link. Returns the id of the connection it
    /// replaced, if there was one (the loop logs its close).
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
        self.state = State::Up {
            id,
            wire,
            session,
            heard: now,
            sent: now,
            comparison: Comparison::default(),
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
            let share = herd.limits.turn.peer();
            let unlimited = |n: usize| if n == 0 { usize::MAX } else { n };
            (*share_turn, *lines, *read_bytes) =
                (turn, unlimited(share.lines), unlimited(share.read_bytes));
        }
        // A record is a little longer than the IAMAT it answers (server name, time
        // difference), so a peer's lines may be longer than a client's.
        let max_line = 2 * herd.limits.max_line_bytes + 1024;
        let mut read = true;
        let outcome = loop {
            let fill = match read && *read_bytes > 0 {
                true => {
                    let before = wire.reader.buffered();
                    let high = before.saturating_add(*read_bytes).min(INPUT_HIGH_WATER);
                    let fill = wire.reader.fill(&mut wire.stream, scratch, high, hangup);
                    let taken = wire.reader.buffered().saturating_sub(before);
                    *read_bytes = read_bytes.saturating_sub(taken);
                    if taken > 0 {
                        *heard = now;
                    }
                    fill.map_err(|e| CloseReason::ReadFailed(e.to_string()))?
                }
                false => Fill::Drained,
            };
            let before = wire.reader.buffered();
            while *lines > 0 {
                let line = match wire.reader.next_line(max_line) {
                    None => break,
                    Some(Line::TooLong(prefix)) => {
                        herd.log.bytes(Who::Conn(*id), '<', prefix);
                        return Err(CloseReason::LineTooLong(max_line));
                    }
                    Some(Line::Complete(line)) => line,
                };
                *lines -= 1;
                let name = &herd.links[from].name;
                herd.log.bytes(Who::Peer(name), '<', line);
                let payload = match session {
                    Some(session) => {
                        (session.open(line)).map_err(|e| CloseReason::PeerProtocol(e.to_owned()))?
                    }
                    None => line,
                };
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
        if *sent + peer::HEARTBEAT_INTERVAL <= now {
            peer::frame(session.as_mut(), b"PING", wire.out.tail());
            *sent = now;
        }
        Ok(())
    }

    /// Writes what waits (heartbeats, `SYNC`). Returns the reason if the write failed.
    pub fn flush(&mut self) -> Result<(), CloseReason> {
        match &mut self.state {
            State::Up { wire, .. } => (wire.out)
                .write_to(&mut wire.stream)
                .map_err(|e| CloseReason::WriteFailed(e.to_string())),
            State::Absent => Ok(()),
        }
    }

    /// Closes the link; returns the id of the connection closed.
    pub fn close(&mut self) -> Option<u64> {
        let id = self.id();
        self.state = State::Absent;
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
        Some(PeerLine::Record(record)) => herd.merge_record(record, from),
        Some(PeerLine::Ping) => {}
        Some(PeerLine::Parts { first, digests }) => comparison.parts(first, &digests),
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
        Some(PeerLine::Sync(_)) | None => herd.log.event(
            format_args!("peer {}", herd.links[from].name),
            format_args!("ignored a line an inbound link does not carry"),
        ),
    }
}
