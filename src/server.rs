//! The event loop: one thread, one `mio::Poll`, every socket of the server.
//!
//! [`Server::run`] turns the loop in four phases, after Redis's `aeProcessEvents`:
//!
//! 1. sleep in `poll` until an event or the earliest deadline (not at all when a connection
//!    still has work from the last turn);
//! 2. read the clock once, then dispatch each event to the state machine its token names, and
//!    serve again the connections whose share of the last turn ran out;
//! 3. fire the deadlines that have passed (links to redial, Places jobs past their time,
//!    heartbeats, and once a second the clients' timeouts);
//! 4. `before_sleep`: write what the turn produced, links first (a neighbour hears of
//!    an update before the client that sent it), then clients, free the connections that
//!    closed, and write the log.
//!
//! The loop owns the machines and their sockets: the accepted connections ([`Conn`]), the links
//! to the neighbours both ways ([`Link`], [`Inbound`]) and the Places pool. The machines return
//! what they want of it ([`Want`], [`Served`], [`Flushed`]); only the loop registers sockets
//! ([`Reactor`]) and frees connections.
//!
//! Handlers never free a connection in the middle of a batch of events: they mark it closed,
//! and phase 4 frees it, so an event later in the same batch cannot find its slot reused.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::event::Event;
use mio::net::TcpListener;
use mio::{Events, Waker};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;

use crate::aof::Aof;
use crate::bytes::escape_into;
use crate::config::{resolve, Config};
use crate::conn::{CloseReason, Conn, Flushed, Readiness, Served};
use crate::herd::{whatsat_reply, Herd};
use crate::inbound::Inbound;
use crate::link::Link;
use crate::log::{Log, Who};
use crate::peer::{self, Secret};
use crate::places::pool::{tls_config, PlacesPool};
use crate::reactor::{Reactor, Source, Want};
use crate::store::Store;
use crate::trace::{self, trace_loop};

/// How often the connections' deadlines are checked. A timer per connection would cost a heap
/// entry per accept; one walk over 10,000 connections a second costs microseconds.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Size of the one read buffer shared by every connection.
const READ_CHUNK: usize = 64 * 1024;
/// Places kept for each neighbour beyond `max_connections`, so that clients filling the server
/// never keep a neighbour out: its new link, and one more while the old one is found dead. A
/// connection in such a place must greet as a neighbour; anything else is told the server is
/// busy. A neighbour's link, once proved, holds no place at all.
const RESERVED_PER_NEIGHBOUR: usize = 2;

pub struct Server {
    reactor: Reactor,
    listener: Option<TcpListener>,
    signals: Signals,
    /// Kept alive for the helper threads that wake the loop.
    _waker: Arc<Waker>,
    /// The accepted connections, by slot; a slot's token is `Source::Conn(slot)`.
    conns: Vec<Option<Conn>>,
    free_slots: Vec<usize>,
    open_conns: usize,
    /// Connections open in the places kept for neighbours, and the order they came in.
    reserved_conns: usize,
    reserved_order: VecDeque<(usize, u64)>,
    /// Slots freed in the middle of a batch of events, reusable from the end of the turn.
    free_later: Vec<usize>,
    /// Connections open from each address.
    per_address: HashMap<IpAddr, usize>,
    next_conn_id: u64,
    /// The link each neighbour dialled to us, by neighbour.
    inbound: Vec<Inbound>,
    /// When the connections' deadlines are next checked.
    sweep_at: Instant,
    /// Connections with something to write or to decide at the end of the turn. A slot may be
    /// listed twice; the second time finds nothing to do.
    to_flush: Vec<usize>,
    /// Connections whose share of the turn ran out with work left, or whose lines held back by
    /// unread replies may run again: served in the next turn, which then comes without sleeping.
    again: Vec<Source>,
    scratch: Vec<u8>,
    herd: Herd,
    /// Where SIGUSR1 writes the store.
    dump_path: PathBuf,
    /// The store's file could not be written at the last try (said once, until it works again).
    disk_failing: bool,
    stopping: bool,
}

impl Server {
    /// Binds the server `name` of `config`, ready to run. Prints the line that says so.
    pub fn bind(
        config: &Config,
        name: &str,
        key: Option<String>,
        secret: Option<Secret>,
    ) -> Result<Server, String> {
        let me = config.server(name)?;
        let addr = match &me.listen {
            Some(listen) => resolve(listen, None)?,
            None => resolve(&me.host, Some(me.port))?,
        };
        let mut neighbour_addrs = Vec::new();
        for n in &me.neighbors {
            let other = config.server(n)?;
            neighbour_addrs.push((n.clone(), resolve(&other.host, Some(other.port))?));
        }
        trace::set_server(name);
        let tls = tls_config(config.places.ca_file.as_deref())?;
        let log_path = config.log_path(name);
        let log = Log::open(&log_path)?;
        let reactor = Reactor::new(neighbour_addrs.len(), config.places.pool_size)?;
        let waker = Arc::new(reactor.waker()?);
        let places = key
            .map(|key| PlacesPool::new(&config.places, key, tls, waker.clone()))
            .transpose()?;
        let now = Instant::now();
        let inbound = neighbour_addrs.iter().map(|_| Inbound::default()).collect();
        let links = neighbour_addrs
            .into_iter()
            .map(|(n, a)| Link::new(n, a, now))
            .collect();
        let limits = config.limits.clone();
        let mut herd = Herd::new(name.to_owned(), secret, links, places, log, limits, now);
        herd.log.set_time(SystemTime::now());
        // The store on disk is replayed before the listener opens: nothing is answered from a
        // store that is not whole.
        if let Some(dir) = &config.data_dir {
            let started = Instant::now();
            let (store, cfg) = (&mut herd.store, &config.store);
            let (aof, seen) =
                Aof::open(dir, name, cfg.fsync, cfg.compact_min_bytes, store, &waker)?;
            herd.log.event(
                format_args!("store"),
                format_args!(
                    "replayed {} records of {} into {} clients in {} ms",
                    seen.records,
                    aof.path().display(),
                    herd.store.len(),
                    started.elapsed().as_millis()
                ),
            );
            if seen.cut > 0 {
                herd.log.event(
                    format_args!("store"),
                    format_args!(
                        "cut {} bytes of a torn last record off {}",
                        seen.cut,
                        aof.path().display()
                    ),
                );
            }
            if seen.refused > 0 {
                herd.log.event(
                    format_args!("store"),
                    format_args!("{} records refused: the store is full", seen.refused),
                );
            }
            herd.aof = Some(aof);
        }
        // mio sets SO_REUSEADDR, so a restarted server rebinds its port at once.
        let mut listener =
            TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        let mark = crate::herd::OUTPUT_HIGH_WATER.min(herd.limits.client_output_bytes / 4);
        keep_send_buffers_under(&listener, mark);
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1])
            .map_err(|e| format!("cannot catch signals: {e}"))?;
        reactor.register_readable(&mut listener, Source::Listener)?;
        reactor.register_readable(&mut signals, Source::Signals)?;
        herd.log.event(
            format_args!("server {name}"),
            format_args!("listening on {bound}"),
        );
        if herd.places.is_none() {
            herd.log.event(
                format_args!("server {name}"),
                format_args!("no Places API key: WHATSAT answers REQUEST_DENIED"),
            );
        }
        if herd.secret.is_none() && !me.neighbors.is_empty() {
            let warning = "has neighbours and no herd secret: anyone who can reach its port can \
                           claim to be a neighbour and send records (set HERD_SECRET or secret_file)";
            log::warn!("server {name} {warning}");
            herd.log
                .event(format_args!("server {name}"), format_args!("{warning}"));
        }
        herd.log.flush();
        println!(
            "{name} listening on {bound}, logging to {}",
            log_path.display()
        );
        let _ = io::stdout().flush();
        Ok(Server {
            reactor,
            listener: Some(listener),
            signals,
            _waker: waker,
            conns: Vec::new(),
            free_slots: Vec::new(),
            open_conns: 0,
            reserved_conns: 0,
            reserved_order: VecDeque::new(),
            free_later: Vec::new(),
            per_address: HashMap::new(),
            next_conn_id: 1,
            inbound,
            sweep_at: now + SWEEP_INTERVAL,
            to_flush: Vec::new(),
            again: Vec::new(),
            scratch: vec![0; READ_CHUNK],
            herd,
            dump_path: config.log_dir.join(format!("{name}.store")),
            disk_failing: false,
            stopping: false,
        })
    }

    /// Runs until SIGTERM or SIGINT.
    pub fn run(&mut self) -> Result<(), String> {
        let mut events = Events::with_capacity(1024);
        while !self.stopping {
            let timeout = match self.has_work() {
                true => Some(Duration::ZERO),
                false => {
                    (self.next_deadline()).map(|at| at.saturating_duration_since(Instant::now()))
                }
            };
            if trace::enabled() {
                match timeout {
                    Some(t) => trace_loop!("sleep: up to {} ms (the next deadline)", t.as_millis()),
                    None => trace_loop!("sleep: until an event"),
                }
            }
            if let Err(e) = self.reactor.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(format!("poll failed: {e}"));
                }
            }
            self.begin_turn();
            if trace::enabled() {
                let woken = self.describe(&events);
                trace_loop!("turn {}: woken by {woken}", self.herd.turn);
            }
            for event in events.iter() {
                let source = self.reactor.source(event.token());
                let before = trace::enabled().then(|| self.snapshot(Some(source)));
                self.dispatch(event);
                if let Some(before) = before {
                    before.trace_changes(&self.snapshot(Some(source)));
                }
            }
            let before = trace::enabled().then(|| self.snapshot(None));
            self.serve_again();
            self.fire_deadlines();
            self.before_sleep();
            if let Some(before) = before {
                before.trace_changes(&self.snapshot(None));
            }
        }
        self.shut_down();
        Ok(())
    }

    /// Whether the next turn must come at once: a connection's share ran out with work left, or
    /// a link copying the store wants more of it written.
    fn has_work(&self) -> bool {
        !self.again.is_empty()
            || self.herd.links.iter().any(Link::wants_turn)
            || self.herd.aof.as_ref().is_some_and(Aof::wants_turn)
    }

    /// What woke the loop, for the trace: `c3 readable`, `link Bona writable`, ...
    fn describe(&self, events: &Events) -> String {
        let mut woke: Vec<String> = Vec::new();
        for event in events.iter() {
            let who = match self.reactor.source(event.token()) {
                Source::Listener => "the listener".to_owned(),
                Source::Waker => "the waker (a DNS answer)".to_owned(),
                Source::Signals => "a signal".to_owned(),
                Source::Link(i) => format!("link {}", self.herd.links[i].name),
                Source::Inbound(i) => format!("peer {}", self.herd.links[i].name),
                Source::Places(i) => format!("places#{i}"),
                Source::Conn(slot) => match &self.conns.get(slot) {
                    Some(Some(conn)) => format!("c{}", conn.id),
                    _ => format!("slot {slot} (freed)"),
                },
            };
            let how = match (event.is_readable(), event.is_writable()) {
                (true, true) => "readable+writable",
                (true, false) => "readable",
                (false, true) => "writable",
                (false, false) => "closed",
            };
            woke.push(format!("{who} {how}"));
        }
        match woke.is_empty() {
            true => "nothing: a deadline came, or work left from the last turn".to_owned(),
            false => woke.join(", "),
        }
    }

    /// The states of `source`'s machines (with `None`: of every machine), for the trace to
    /// compare before and after a step.
    fn snapshot(&self, source: Option<Source>) -> trace::Snapshot {
        let all = source.is_none();
        let mut states = Vec::new();
        for (i, link) in self.herd.links.iter().enumerate() {
            if all || source == Some(Source::Link(i)) {
                let state = link.state_name().to_owned();
                states.push((format!("link {} (#{i})", link.name), state));
            }
            if all || source == Some(Source::Inbound(i)) {
                let state = self.inbound[i].state_name().to_owned();
                states.push((format!("peer {} (#{i})", link.name), state));
            }
        }
        if all || matches!(source, Some(Source::Places(_) | Source::Waker)) {
            let slots = self.herd.places.iter().flat_map(|p| p.slot_states());
            for (i, state) in slots.enumerate() {
                states.push((format!("places#{i}"), state.to_owned()));
            }
        }
        for (slot, conn) in self.conns.iter().enumerate() {
            let Some(conn) = conn else { continue };
            if all || source == Some(Source::Conn(slot)) || source == Some(Source::Listener) {
                states.push((format!("c{}", conn.id), conn.state_name().to_owned()));
            }
        }
        trace::Snapshot(states)
    }

    /// Reads the clock, once for the whole turn.
    fn begin_turn(&mut self) {
        let wall = SystemTime::now();
        self.herd.turn += 1;
        self.herd.now = Instant::now();
        self.herd.now_ns = wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        self.herd.log.set_time(wall);
    }

    /// The earliest deadline of anything: a link either way, the Places pool, the sweep.
    fn next_deadline(&self) -> Option<Instant> {
        let links = self.herd.links.iter().filter_map(Link::deadline);
        let inbound = self.inbound.iter().filter_map(Inbound::deadline);
        let places = self.herd.places.as_ref().and_then(PlacesPool::deadline);
        links
            .chain(inbound)
            .chain(places)
            .chain([self.sweep_at])
            .min()
    }

    fn dispatch(&mut self, event: &Event) {
        match self.reactor.source(event.token()) {
            Source::Listener => self.accept(),
            Source::Signals => {
                let herd = &mut self.herd;
                for signal in self.signals.pending() {
                    if signal == SIGUSR1 {
                        dump_store(&herd.store, &self.dump_path, &mut herd.log);
                        continue;
                    }
                    herd.log.event(
                        format_args!("server {}", herd.name),
                        format_args!("signal {signal}: stopping"),
                    );
                    self.stopping = true;
                }
            }
            Source::Waker => {
                if let Some(pool) = &mut self.herd.places {
                    pool.on_wake(self.herd.now, &mut self.herd.log);
                }
                self.after_places();
            }
            Source::Link(i) => {
                let now = self.herd.now;
                let (links, mut cx) = self.herd.links_and_context();
                if let Some(link) = links.get_mut(i) {
                    link.on_ready(now, &mut self.scratch, &mut cx);
                }
            }
            Source::Inbound(i) => {
                let hangup = event.is_read_closed() || event.is_error();
                self.serve_inbound(i, hangup);
            }
            Source::Places(i) => {
                if let Some(pool) = &mut self.herd.places {
                    pool.on_ready(i, self.herd.now, &mut self.herd.log);
                }
                self.after_places();
            }
            Source::Conn(slot) => {
                // WRITABLE too: lines held back while the output was full may run now, and the
                // end of the turn writes what waits.
                let hangup = event.is_read_closed() || event.is_error();
                let ready = Readiness {
                    readable: event.is_readable(),
                    hangup,
                };
                self.serve_conn(slot, ready);
            }
        }
    }

    /// Accepts every pending connection (edge-triggered: until `WouldBlock`).
    fn accept(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            let (mut stream, addr) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, most likely; the connections that wait are taken
                    // when the next one arrives.
                    self.herd
                        .log
                        .event(format_args!("server"), format_args!("accept failed: {e}"));
                    return;
                }
            };
            let id = self.next_conn_id;
            self.next_conn_id += 1;
            let limits = &self.herd.limits;
            let from_there = self.per_address.get(&addr.ip()).copied().unwrap_or(0);
            let full = self.open_conns >= limits.max_connections;
            let reserve = RESERVED_PER_NEIGHBOUR * self.herd.links.len();
            let refusal = if limits.max_connections_per_address != 0
                && from_there >= limits.max_connections_per_address
            {
                Some(format!("{from_there} connections open from there"))
            } else if full && self.reserved_conns >= reserve && !self.evict_a_stranger() {
                Some(format!("{} connections open", self.open_conns))
            } else {
                None
            };
            if let Some(why) = refusal {
                refuse(&mut stream, &mut self.scratch);
                self.herd.log.event(
                    format_args!("c{id}"),
                    format_args!("refused from {addr}: {why}"),
                );
                continue;
            }
            let _ = stream.set_nodelay(true);
            let slot = self.free_slots.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            if full {
                self.reserved_order.push_back((slot, id));
            }
            if let Err(e) = self.reactor.attach(&mut stream, Source::Conn(slot)) {
                self.herd
                    .log
                    .event(format_args!("c{id}"), format_args!("cannot register: {e}"));
                self.free_slots.push(slot);
                continue;
            }
            self.herd
                .log
                .event(format_args!("c{id}"), format_args!("accepted from {addr}"));
            let now = self.herd.now;
            // A place kept for neighbours is held no longer than a handshake takes.
            let wait = match full {
                true => (self.herd.limits.first_line_timeout).min(peer::HANDSHAKE_TIMEOUT),
                false => self.herd.limits.first_line_timeout,
            };
            let until = now + wait;
            self.conns[slot] = Some(Conn::new(id, stream, addr, now, until, full));
            self.open_conns += 1;
            self.reserved_conns += usize::from(full);
            *self.per_address.entry(addr.ip()).or_default() += 1;
        }
    }

    /// Every place kept for neighbours is taken: the connection in one of them that has said
    /// nothing for the longest is told the server is busy and closed, to make room. A neighbour
    /// greets as soon as it connects, so it is never the one; strangers who take the places and
    /// say nothing cannot keep a neighbour out. Returns whether a place was made.
    fn evict_a_stranger(&mut self) -> bool {
        while let Some((slot, id)) = self.reserved_order.pop_front() {
            let Some(Some(conn)) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.id != id || !conn.reserved {
                continue; // gone: its slot holds another
            }
            if !conn.is_silent() {
                // Greeting, or closing: not a stranger's; it keeps its place and its turn.
                self.reserved_order.push_front((slot, id));
                let silent = (self.reserved_order.iter().skip(1)).position(|&(s, i)| {
                    matches!(self.conns.get(s), Some(Some(c)) if c.id == i && c.is_silent())
                });
                let Some(at) = silent.map(|at| at + 1) else {
                    return false;
                };
                let Some((slot, id)) = self.reserved_order.remove(at) else {
                    return false;
                };
                return self.evict(slot, id);
            }
            return self.evict(slot, id);
        }
        false
    }

    /// Closes connection `id` in slot `slot` with `? server busy`, at once; its slot is reused
    /// only after this turn's events (one may still name it).
    fn evict(&mut self, slot: usize, id: u64) -> bool {
        let Some(mut conn) = self.free(slot) else {
            return false;
        };
        // `free` made the slot reusable: not before the end of the turn.
        self.free_slots.pop();
        self.free_later.push(slot);
        refuse(conn.socket(), &mut self.scratch);
        self.herd.log.event(
            format_args!("c{id}"),
            format_args!("closed: {}", CloseReason::Evicted),
        );
        true
    }

    /// Runs connection `slot`: what arrived, or what it holds.
    fn serve_conn(&mut self, slot: usize, ready: Readiness) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let served = conn.serve(ready, &mut self.scratch, &mut self.herd, slot);
        if served == Served::More {
            self.again.push(Source::Conn(slot));
        }
        self.to_flush.push(slot);
        // A WHATSAT may have opened a connection to Places.
        self.register_places();
    }

    /// Runs neighbour `i`'s inbound link; `hangup` when the event said the neighbour closed its
    /// side.
    fn serve_inbound(&mut self, i: usize, hangup: bool) {
        let Some(inbound) = self.inbound.get_mut(i) else {
            return;
        };
        match inbound.serve(hangup, &mut self.scratch, &mut self.herd, i) {
            Ok(Served::More) => self.again.push(Source::Inbound(i)),
            Ok(Served::Done) => {}
            Err(reason) => self.close_inbound(i, reason),
        }
    }

    fn close_inbound(&mut self, i: usize, reason: CloseReason) {
        if let Some(id) = self.inbound.get_mut(i).and_then(Inbound::close) {
            self.herd
                .log
                .event(format_args!("c{id}"), format_args!("closed: {reason}"));
        }
    }

    /// Serves again what ran out of its share in the last turn.
    fn serve_again(&mut self) {
        for source in std::mem::take(&mut self.again) {
            match source {
                Source::Conn(slot) => self.serve_conn(slot, Readiness::HELD),
                Source::Inbound(i) => self.serve_inbound(i, false),
                _ => {}
            }
        }
    }

    /// Registers the sockets the Places pool opened.
    fn register_places(&mut self) {
        let Some(pool) = &mut self.herd.places else {
            return;
        };
        for slot in pool.take_opened() {
            let outcome = match pool.socket(slot) {
                Some(socket) => self.reactor.attach(socket, Source::Places(slot)),
                None => Ok(()),
            };
            if let Err(e) = outcome {
                pool.on_register_failed(slot, &mut self.herd.log, &e.to_string());
            }
        }
    }

    /// After the Places pool has run: registers what it opened, and hands finished jobs to
    /// their connections, which may then run more lines.
    fn after_places(&mut self) {
        self.register_places();
        let Some(pool) = &mut self.herd.places else {
            return;
        };
        for done in std::mem::take(&mut pool.done) {
            let slot = done.owner.slot;
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if conn.id != done.owner.id {
                continue; // the client left; its slot now holds another
            }
            let reply = whatsat_reply(&done.record, &done.body);
            self.herd.log.bytes(Who::Conn(conn.id), '>', &reply);
            conn.deliver(done.job, reply);
            // Lines may wait behind the reply, and input behind a full buffer.
            self.serve_conn(slot, Readiness::HELD);
        }
    }

    fn fire_deadlines(&mut self) {
        let now = self.herd.now;
        let (links, mut cx) = self.herd.links_and_context();
        for (i, link) in links.iter_mut().enumerate() {
            if link.on_timeout(now, &mut cx) == Want::Register {
                let outcome = match link.socket() {
                    Some(socket) => self.reactor.attach(socket, Source::Link(i)),
                    None => Ok(()),
                };
                if let Err(e) = outcome {
                    link.on_register_failed(now, cx.log, &e.to_string());
                }
            }
        }
        for i in 0..self.inbound.len() {
            let due = self.inbound[i].deadline().is_some_and(|at| at <= now);
            if let (true, Err(reason)) = (due, self.inbound[i].on_timeout(now)) {
                self.close_inbound(i, reason);
            }
        }
        if let Some(pool) = &mut self.herd.places {
            if pool.deadline().is_some_and(|at| at <= now) {
                pool.on_timeout(now, &mut self.herd.log);
            }
        }
        self.after_places();
        if self.sweep_at <= now {
            self.sweep_at = now + SWEEP_INTERVAL;
            self.sweep(now);
        }
    }

    /// Once a second: every connection checks its deadlines (see [`Conn::on_timeout`]).
    fn sweep(&mut self, now: Instant) {
        for slot in 0..self.conns.len() {
            if let Some(conn) = &mut self.conns[slot] {
                if conn.on_timeout(now, &self.herd.limits) {
                    self.to_flush.push(slot);
                }
            }
        }
    }

    /// End of the turn: links write first, then clients; closed connections are freed, proved
    /// neighbours handed to their inbound links; the log is written.
    fn before_sleep(&mut self) {
        let herd = &mut self.herd;
        for link in &mut herd.links {
            link.flush(herd.now, &herd.store, &mut herd.log);
        }
        for i in 0..self.inbound.len() {
            if let Err(reason) = self.inbound[i].flush() {
                self.close_inbound(i, reason);
            }
        }
        // The turn's records reach the file (and the disk, with fsync = "always") before the
        // replies that acknowledge them leave.
        self.end_turn_on_disk();
        while let Some(slot) = self.to_flush.pop() {
            self.flush_conn(slot);
        }
        self.free_slots.append(&mut self.free_later);
        self.herd.log.flush();
    }

    /// Writes the turn's records to the store's file. A disk that fails is said once in the
    /// log (and again each time it fails after working), and the server goes on from memory.
    fn end_turn_on_disk(&mut self) {
        let herd = &mut self.herd;
        let Some(aof) = &mut herd.aof else {
            return;
        };
        let mut said: Vec<String> = aof.take_failures();
        match aof.end_turn(&herd.store) {
            Ok(Some(what)) => said.push(what),
            Ok(None) => self.disk_failing = false,
            Err(e) if !self.disk_failing => {
                self.disk_failing = true;
                log::error!("{e}");
                said.push(e);
            }
            Err(_) => {}
        }
        for what in said {
            herd.log
                .event(format_args!("store"), format_args!("{what}"));
        }
    }

    /// Writes connection `slot`'s output and does what that decides: nothing, run the lines it
    /// held back, free it, or hand it to a neighbour's inbound link.
    fn flush_conn(&mut self, slot: usize) {
        let mark = self.herd.output_high_water();
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        match conn.flush(self.herd.now, &self.herd.limits, mark) {
            Flushed::Open => {}
            // Written, but lines wait behind the back-pressure: no event will come for bytes
            // already held, so they run in the next turn, which then comes at once. Not now:
            // this turn's records have already gone to the links and the disk, and an update
            // run now would be acknowledged before it reached either.
            Flushed::Resume => {
                if !self.again.contains(&Source::Conn(slot)) {
                    self.again.push(Source::Conn(slot));
                }
            }
            Flushed::Closed(reason) => {
                self.herd.log.event(
                    format_args!("c{}", conn.id),
                    format_args!("closed: {reason}"),
                );
                self.free(slot);
            }
            Flushed::Peer => {
                if let Some(conn) = self.free(slot) {
                    self.hand_over(conn);
                }
            }
        }
    }

    /// Frees slot `slot`, returning its connection.
    fn free(&mut self, slot: usize) -> Option<Conn> {
        let conn = self.conns.get_mut(slot)?.take()?;
        self.free_slots.push(slot);
        self.open_conns -= 1;
        self.reserved_conns -= usize::from(conn.reserved);
        let ip = conn.addr.ip();
        if let Some(count) = self.per_address.get_mut(&ip) {
            *count -= 1;
            if *count == 0 {
                self.per_address.remove(&ip);
            }
        }
        Some(conn)
    }

    /// A neighbour's connection, proved: it becomes the neighbour's inbound link, on the link's
    /// token. What it read after the proof is run at once: no event will come for it.
    fn hand_over(&mut self, conn: Conn) {
        let id = conn.id;
        let Some((neighbour, session, mut wire)) = conn.into_peer() else {
            return;
        };
        if let Err(e) = self
            .reactor
            .move_to(&mut wire.stream, Source::Inbound(neighbour))
        {
            self.herd.log.event(
                format_args!("c{id}"),
                format_args!("closed: cannot register: {e}"),
            );
            return;
        }
        let now = self.herd.now;
        if let Some(old) = self.inbound[neighbour].adopt(now, id, wire, session) {
            let reason = CloseReason::Replaced(id);
            self.herd
                .log
                .event(format_args!("c{old}"), format_args!("closed: {reason}"));
        }
        self.serve_inbound(neighbour, false);
        if let Err(reason) = self.inbound[neighbour].flush() {
            self.close_inbound(neighbour, reason);
        }
    }

    /// SIGTERM or SIGINT: stop accepting, write what is pending once, write the log.
    fn shut_down(&mut self) {
        self.listener = None;
        let herd = &mut self.herd;
        for link in &mut herd.links {
            link.flush(herd.now, &herd.store, &mut herd.log);
        }
        for inbound in &mut self.inbound {
            let _ = inbound.flush();
        }
        if let Some(aof) = &mut herd.aof {
            if let Err(e) = aof.close(&herd.store) {
                log::error!("{e}");
                herd.log.event(format_args!("store"), format_args!("{e}"));
            }
        }
        let limits = herd.limits.clone();
        for conn in self.conns.iter_mut().flatten() {
            let _ = conn.flush(herd.now, &limits, usize::MAX);
        }
        herd.log.event(
            format_args!("server {}", herd.name),
            format_args!("stopped"),
        );
        herd.log.flush();
    }
}

/// Refuses a connection past `max_connections` with `? server busy`, without destroying that
/// line: the write side is shut after it, and what the client already sent is read and dropped
/// (closing a socket with unread input would reset it, and the reset would take the line with
/// it). Input still to come may yet reset it; a refused connection gets no slot to linger in.
fn refuse(stream: &mut mio::net::TcpStream, scratch: &mut [u8]) {
    let _ = stream.write(b"? server busy\n");
    let _ = stream.shutdown(std::net::Shutdown::Write);
    for _ in 0..4 {
        match stream.read(scratch) {
            Ok(n) if n > 0 => {}
            _ => break,
        }
    }
}

/// Keeps the send buffer of every accepted connection under a client's high-water mark, so
/// that what the kernel holds for a client that does not read counts toward the mark, and a
/// write that could not take everything (which the mark waits for) comes before the mark is
/// reached. Set on the listener, whose connections take it over: no system call per accept.
/// Linux doubles the size asked for, for its bookkeeping; a quarter of the mark is asked.
fn keep_send_buffers_under(listener: &TcpListener, mark: usize) {
    use std::os::fd::AsRawFd;
    let size = libc::c_int::try_from(mark / 4).unwrap_or(libc::c_int::MAX);
    // SAFETY: setsockopt reads one int through the pointer, which is valid for its size.
    unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Writes every record, sorted, under a first line with their count and digest, so that the
/// stores of a herd can be compared (`kill -USR1`, then compare the `.store` files). Bytes a
/// client sent are escaped as in the log, so a client id cannot forge a line or a terminal
/// escape in it; the file is its owner's alone. Written beside and renamed into place, so a
/// reader never sees half a file. It blocks the loop for as long as the write takes: an
/// operator's (or a test's) request, not a hot path.
fn dump_store(store: &Store, path: &Path, log: &mut Log) {
    let mut lines: Vec<&[u8]> = (0..store.len())
        .filter_map(|i| store.at(i).map(|r| &*r.line))
        .collect();
    lines.sort_unstable();
    let mut text = format!(
        "# {} records, digest {:016x}\n",
        store.len(),
        store.digest()
    )
    .into_bytes();
    for line in lines {
        escape_into(&mut text, line);
        text.push(b'\n');
    }
    let partial = path.with_extension("store.partial");
    let outcome = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&partial)
        .and_then(|mut file| file.write_all(&text))
        .and_then(|()| std::fs::rename(&partial, path));
    let what = match outcome {
        Ok(()) => format!("{} records written to {}", store.len(), path.display()),
        Err(e) => format!("cannot write {}: {e}", path.display()),
    };
    log.event(format_args!("store"), format_args!("{what}"));
}
