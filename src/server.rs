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
//!
//! What an asyncio reader looks for and will not find: a task per connection, and `await`.
//! A connection here is a value in a table ([`Server::conns`]), and "waiting for data" is only
//! the absence of an event for its token. No call down from the loop waits for a socket; a
//! wait is a state of a machine, which a later event or deadline ends. Nothing here runs while a
//! machine is half-way through a step, so no machine needs a lock, and none may block.
//!
//! A connection's slot is its index in that table and, as [`Source::Conn`], its token. A later
//! accept reuses a freed slot, so whatever remembers a connection beyond the current step (a
//! Places job's owner, the order of the places kept for neighbours) keeps the connection's id
//! beside its slot and checks both before it acts.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::event::Event;
use mio::net::TcpListener;
use mio::{Events, Waker};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;

use crate::admin::{self, Admin, AdminConn, Asked, LinkView, Route, StoreFileView, View};
use crate::aof::Aof;
use crate::bytes::escape_into;
use crate::config::{resolve, Config};
use crate::conn::{CloseReason, Conn, Flushed, Readiness, Served};
use crate::herd::{whatsat_reply, Herd};
use crate::inbound::Inbound;
use crate::link::Link;
use crate::log::{Log, Who};
use crate::metrics::LinkCounts;
use crate::peer::{self, Secret};
use crate::places::pool::{tls_config, Owner, PlacesPool};
use crate::protocol;
use crate::reactor::{Reactor, Source, Want};
use crate::store::Store;
use crate::trace::{self, trace_loop};

/// How often the connections' deadlines are checked. A timer per connection would cost a heap
/// entry per accept; one walk over 10,000 connections a second costs microseconds. The price:
/// a connection's deadline is noticed up to this late. The next sweep is always among the
/// deadlines ([`Server::next_deadline`]), so this is also the longest the loop ever sleeps.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// How long after the `everysec` helper's last failed sync the server counts as failing to
/// write its store (`/healthz` says 503): two of the helper's once-a-second tries.
const SYNC_FAILING_FOR: Duration = Duration::from_millis(2500);
/// Size of the one read buffer shared by every connection. One thread serves one socket at a
/// time, so one buffer is enough: each read lands here, and only the bytes that arrived are
/// copied into the connection's own buffer. An idle connection holds no read buffer at all,
/// where one of this size per connection would pin 640 MiB for 10,000 of them.
const READ_CHUNK: usize = 64 * 1024;
/// Places kept for each neighbour beyond `max_connections`, so that clients filling the server
/// never keep a neighbour out: its new link, and one more while the old one is found dead. A
/// connection in such a place must greet as a neighbour; anything else is told the server is
/// busy. A neighbour's link, once proved, holds no place at all. The per-address cap is
/// checked before any of this, so a neighbour that shares its address with clients over that
/// cap is refused like them.
const RESERVED_PER_NEIGHBOUR: usize = 2;

/// One server of the herd: its loop, every socket it has, and the machines that own them.
/// [`Server::bind`] makes it, [`Server::run`] turns its loop until a signal stops it.
pub struct Server {
    /// The poll, and the only code that registers a socket or reads a token.
    reactor: Reactor,
    /// `None` once stopping: dropping the listener closes the port, so no connection is
    /// accepted that would not be served.
    listener: Option<TcpListener>,
    /// The signals the server handles, delivered as readiness of one source (a pipe the
    /// signal handler writes to), so a signal is handled between events like any event, never
    /// inside a handler that interrupted the loop.
    signals: Signals,
    /// Kept alive for the helper threads that wake the loop.
    _waker: Arc<Waker>,
    /// The accepted connections, by slot; a slot's token is `Source::Conn(slot)`.
    conns: Vec<Option<Conn>>,
    /// Slots free for the next accept. The table never shrinks: a slot once made is reused.
    free_slots: Vec<usize>,
    /// Accepted connections open, counted against `max_connections`.
    open_conns: usize,
    /// Connections open in the places kept for neighbours, and the order they came in.
    reserved_conns: usize,
    /// `(slot, id)` of each connection that took a place kept for neighbours, oldest first,
    /// for [`Server::evict_a_stranger`]. An entry whose slot is empty or holds another id is
    /// stale: it is dropped when eviction meets it at the front.
    reserved_order: VecDeque<(usize, u64)>,
    /// Slots freed in the middle of a batch of events, reusable from the end of the turn.
    free_later: Vec<usize>,
    /// Connections open from each address.
    per_address: HashMap<IpAddr, usize>,
    /// The next connection's id. Ids are never reused: `c7` names one connection in the log
    /// for the life of the process, and an id beside a slot tells a connection from a later
    /// one in the same slot.
    next_conn_id: u64,
    /// The link each neighbour dialled to us, by neighbour.
    inbound: Vec<Inbound>,
    /// The admin endpoint, when configured.
    admin: Option<Admin>,
    /// Where the admin endpoint's address is written for `herd status`, while it runs.
    admin_file: Option<PathBuf>,
    /// Each dialled link's state at the end of the last turn, and since when, for the metrics.
    link_seen: Vec<(&'static str, Instant)>,
    /// When the server started, and when this turn's poll returned.
    started: Instant,
    turn_began: Instant,
    /// When the connections' deadlines are next checked.
    sweep_at: Instant,
    /// Connections with something to write or to decide at the end of the turn. A slot may be
    /// listed twice; the second time finds nothing to do.
    to_flush: Vec<usize>,
    /// Connections whose share of the turn ran out with work left, or whose lines held back by
    /// unread replies may run again: served in the next turn, which then comes without
    /// sleeping. Each at most once ([`Server::serve_later`]).
    again: Vec<Source>,
    /// What `again` holds, so that a connection served twice in a turn is not listed twice
    /// (listed twice, it would be served twice a turn from then on, and more with each event).
    listed_again: HashSet<Source>,
    /// The one read buffer ([`READ_CHUNK`] bytes), lent to whichever machine is reading.
    scratch: Vec<u8>,
    /// Everything the machines share: the store, the dialled links, the Places pool, the log.
    herd: Herd,
    /// Where SIGUSR1 writes the store.
    dump_path: PathBuf,
    /// Why the store's file could not take a turn's records: the server stops at once, before
    /// that turn's replies leave ([`Server::end_turn_on_disk`]).
    disk_failed: Option<String>,
    /// When the `everysec` helper last said a sync failed: it tries once a second while there is
    /// something to sync, so a failure in the last [`SYNC_FAILING_FOR`] means it is failing now.
    sync_failed_at: Option<Instant>,
    /// Set by SIGTERM or SIGINT: the turn under way ends as usual (its `before_sleep` writes
    /// what it produced), and then the loop stops.
    stopping: bool,
}

impl Server {
    /// Binds the server `name` of `config`, ready to run. Prints the line that says so.
    ///
    /// Everything that may block is done here, before the loop turns: resolving the listen
    /// address and the neighbours' (DNS blocks; they are not looked up again, so a neighbour
    /// that moves needs a restart), reading the CA file, opening the log, replaying the store's
    /// file. The ready line comes last, once the port is open: the tests wait for it and read
    /// the address from it. Fails with the reason as text, for `main` to print.
    pub fn bind(
        config: &Config,
        name: &str,
        key: Option<String>,
        secret: Option<Secret>,
        admin: Option<&str>,
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
        // Before anything is traced: every trace line carries the server's name.
        trace::set_server(name);
        let tls = tls_config(config.places.ca_file.as_deref())?;
        let log_path = config.log_path(name);
        let mut log = Log::open(&log_path)?;
        log.rotate_at(config.log_max_bytes, config.log_keep);
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
        herd.log_housekeeping = config.log_housekeeping;
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
        // The same mark as `Herd::output_high_water`, the back-pressure mark of every client.
        let mark = crate::herd::OUTPUT_HIGH_WATER.min(herd.limits.client_output_bytes / 4);
        keep_send_buffers_under(&listener, mark);
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP])
            .map_err(|e| format!("cannot catch signals: {e}"))?;
        reactor.register_readable(&mut listener, Source::Listener)?;
        reactor.register_readable(&mut signals, Source::Signals)?;
        let admin = match admin.or(me.admin.as_deref()) {
            Some(at) => {
                let mut admin = Admin::bind(resolve(at, None)?)?;
                reactor.register_readable(&mut admin.listener, Source::AdminListener)?;
                Some(admin)
            }
            None => None,
        };
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
        // The log is otherwise written at the end of a turn: the start-up lines need not wait.
        herd.log.flush();
        // `herd status` finds an admin endpoint in this file (written before the ready line,
        // so that whoever waits for that line finds the file), or in the configuration.
        let admin_file = admin.as_ref().map(|admin| {
            let path = config.log_dir.join(format!("{name}.admin"));
            let _ = std::fs::write(&path, format!("{}\n", admin.addr));
            path
        });
        // Said on standard output for whoever started it (`herd up` waits for it), and not
        // `println!`, which panics when standard output is closed: a daemon's may be.
        let mut stdout = io::stdout().lock();
        let _ = writeln!(
            stdout,
            "{name} listening on {bound}, logging to {}",
            log_path.display()
        );
        if let Some(admin) = &admin {
            let _ = writeln!(stdout, "{name} admin endpoint on http://{}", admin.addr);
        }
        let _ = stdout.flush();
        drop(stdout);
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
            link_seen: herd.links.iter().map(|l| (l.state_name(), now)).collect(),
            admin,
            admin_file,
            started: now,
            turn_began: now,
            sweep_at: now + SWEEP_INTERVAL,
            to_flush: Vec::new(),
            again: Vec::new(),
            listed_again: HashSet::new(),
            scratch: vec![0; READ_CHUNK],
            herd,
            dump_path: config.log_dir.join(format!("{name}.store")),
            disk_failed: None,
            sync_failed_at: None,
            stopping: false,
        })
    }

    /// Runs until SIGTERM or SIGINT. Each pass of the `while` is one turn, in the four phases
    /// of the module docs. Fails only when the poll itself fails: then the server can hear of
    /// nothing, and stopping is all that is left.
    pub fn run(&mut self) -> Result<(), String> {
        // More ready sockets than this are not lost: the kernel keeps the rest for the next
        // poll, which then returns at once.
        let mut events = Events::with_capacity(1024);
        while !self.stopping {
            // Work left from the last turn announces itself with no event (its bytes are
            // already read), so the poll must not sleep on it. Otherwise sleep until the
            // earliest deadline, which always exists: the sweep is one.
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
            // Interrupted: a signal came during the wait. mio has cleared `events`, so this turn
            // has none, which is harmless (every step below is safe when nothing is due), and
            // the signal's pipe is readable: the next poll reports it.
            if let Err(e) = self.reactor.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(format!("poll failed: {e}"));
                }
            }
            // The clock is read once, after the sleep: every machine sees the same `now` this
            // turn, so a deadline cannot pass between two steps of one turn.
            self.begin_turn();
            self.herd.metrics.events += events.iter().count() as u64;
            if trace::enabled() {
                let woken = self.describe(&events);
                trace_loop!("turn {}: woken by {woken}", self.herd.turn);
            }
            // Phase 2. An event may name a connection evicted earlier in this batch: its slot
            // is empty, not yet reused (`free_later`), and the event does nothing.
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
            // The turn's work, its sleep left out: how long an event may wait behind a turn.
            let took = Instant::now().saturating_duration_since(self.turn_began);
            self.herd.metrics.turns += 1;
            self.herd.metrics.turn_seconds.observe(took.as_secs_f64());
        }
        // The store's file failed: the log says so and is written, and nothing else is; the
        // turn's replies, unsent, go with the connections when the server is dropped.
        if let Some(why) = self.disk_failed.take() {
            self.say_stopped(format_args!(
                "stopped: {why}; no answer of this turn was sent"
            ));
            return Err(format!("{why}: stopped before this turn's answers left"));
        }
        self.shut_down();
        Ok(())
    }

    /// Whether the next turn must come at once: a connection's or an inbound link's share ran
    /// out with work left, a Places answer waits to be handed over, a link copying the store
    /// wants more of it written, or a compaction of the store's file has more slices to copy.
    /// None of these will raise an event.
    fn has_work(&self) -> bool {
        !self.again.is_empty()
            || self.places_done()
            || self.herd.places.as_ref().is_some_and(PlacesPool::has_more)
            || self.herd.links.iter().any(Link::wants_turn)
            || self.herd.aof.as_ref().is_some_and(Aof::wants_turn)
    }

    /// What woke the loop, for the trace: `c3 readable`, `link Bona writable`, ...
    fn describe(&self, events: &Events) -> String {
        let mut woke: Vec<String> = Vec::new();
        for event in events.iter() {
            let who = match self.reactor.source(event.token()) {
                Source::Listener => "the listener".to_owned(),
                // Or the fsync helper's report of a failed sync: the waker serves both.
                Source::Waker => "the waker (a DNS answer)".to_owned(),
                Source::Signals => "a signal".to_owned(),
                Source::AdminListener => "the admin listener".to_owned(),
                Source::Admin(i) => format!("admin#{i}"),
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

    /// Reads the clock, once for the whole turn. `now` is what every deadline is compared
    /// with; the wall clock gives the receive time written into this turn's `AT` lines, and the
    /// log's time stamp, so every line a turn logs carries the same time.
    fn begin_turn(&mut self) {
        let wall = SystemTime::now();
        self.herd.turn += 1;
        self.herd.now = Instant::now();
        self.turn_began = self.herd.now;
        self.herd.now_ns = wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        self.herd.log.set_time(wall);
    }

    /// The earliest deadline of anything: a link either way, the Places pool, an admin
    /// connection, the sweep. Each machine answers for itself from its state, so a machine that
    /// changes state has moved its deadline with no timer to cancel. Client connections are not
    /// asked one by one: the sweep stands for all of them.
    fn next_deadline(&self) -> Option<Instant> {
        let links = self.herd.links.iter().filter_map(Link::deadline);
        let inbound = self.inbound.iter().filter_map(Inbound::deadline);
        let places = self.herd.places.as_ref().and_then(PlacesPool::deadline);
        let admin = self.admin.as_ref().and_then(Admin::deadline);
        links
            .chain(inbound)
            .chain(places)
            .chain(admin)
            .chain([self.sweep_at])
            .min()
    }

    /// Phase 2: hands one event to what its token names. Readiness is edge-triggered, so each
    /// handler reads (or accepts) until the socket would block or its share is spent: the
    /// kernel will not report bytes that are already there a second time. A client's replies
    /// and a link's output are not written here but at the end of the turn
    /// ([`Server::before_sleep`]), so all that one turn produced for a socket leaves in one
    /// write, and WRITABLE needs no handler of its own.
    fn dispatch(&mut self, event: &Event) {
        match self.reactor.source(event.token()) {
            Source::Listener => self.accept(),
            Source::AdminListener => self.accept_admin(),
            Source::Admin(i) => self.serve_admin(i),
            Source::Signals => {
                let herd = &mut self.herd;
                // Every signal pending, not one: the pipe raises no new edge for the others.
                for signal in self.signals.pending() {
                    if signal == SIGUSR1 {
                        dump_store(&herd.store, &self.dump_path, &mut herd.log);
                        continue;
                    }
                    if signal == SIGHUP {
                        // logrotate's convention: the file was moved away; write a new one.
                        // Flushed first, so what this turn logged before the signal ends the
                        // old file.
                        herd.log.flush();
                        let what = match herd.log.reopen() {
                            Ok(()) => "SIGHUP: log file opened again".to_owned(),
                            Err(e) => format!("SIGHUP: {e}"),
                        };
                        herd.log
                            .event(format_args!("server {}", herd.name), format_args!("{what}"));
                        continue;
                    }
                    herd.log.event(
                        format_args!("server {}", herd.name),
                        format_args!("signal {signal}: stopping"),
                    );
                    // The loop ends after this turn, whose writes still happen.
                    self.stopping = true;
                }
            }
            // A helper thread finished something: the look-up of the Places host, which may
            // start the jobs queued behind it. (A failed sync that the fsync helper reports
            // is read at the end of the turn, by `end_turn_on_disk`.)
            Source::Waker => {
                if let Some(pool) = &mut self.herd.places {
                    pool.on_wake(self.herd.now, &mut self.herd.log);
                }
                self.after_places();
            }
            // One method for both readiness kinds: the link's state says what the event means
            // (a connect that ended, lines to read).
            Source::Link(i) => {
                let now = self.herd.now;
                let hangup = event.is_read_closed() || event.is_error();
                let (links, mut cx) = self.herd.links_and_context();
                if let Some(link) = links.get_mut(i) {
                    link.on_ready(now, hangup, &mut self.scratch, &mut cx);
                }
            }
            // `hangup`: the neighbour closed its side, so the link reads on to the end of the
            // stream (a short read would otherwise end the read, and the end of stream, which
            // arrived before it, raises no new edge).
            Source::Inbound(i) => {
                let hangup = event.is_read_closed() || event.is_error();
                self.serve_inbound(i, hangup);
            }
            // A step of slot `i`'s HTTPS exchange. It may finish a job, and the pool then starts
            // queued jobs, which may open sockets for the loop to register.
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

    /// Accepts every pending connection (edge-triggered: until `WouldBlock`), and decides for
    /// each whether it stays. An address over its cap is refused. Past `max_connections`, the
    /// newcomer takes one of the places kept for neighbours ([`RESERVED_PER_NEIGHBOUR`]) while
    /// one is free, else the place of the stranger silent longest in one
    /// ([`Server::evict_a_stranger`]), else it is refused. A refused connection is told
    /// `? server busy` and never gets a slot.
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
            // An id even for a connection about to be refused: the log's line names it.
            let id = self.next_conn_id;
            self.next_conn_id += 1;
            let limits = &self.herd.limits;
            let host = crate::herd::host_key(addr.ip());
            let from_there = self.per_address.get(&host).copied().unwrap_or(0);
            let over_address = limits.max_connections_per_address != 0
                && from_there >= limits.max_connections_per_address;
            // Clients may share a neighbour's address (a herd on one machine, or behind one
            // NAT): past the cap from there, the newcomer may still be the neighbour itself.
            let there = addr.ip().to_canonical();
            let neighbour_there =
                (self.herd.links.iter()).any(|l| l.addr().ip().to_canonical() == there);
            // Every client place is taken (here, or for its address): this one can only have a
            // place kept for neighbours.
            let full = self.open_conns >= limits.max_connections || over_address;
            let reserve = RESERVED_PER_NEIGHBOUR * self.herd.links.len();
            let refusal = if over_address && !neighbour_there {
                Some(format!("{from_there} connections open from there"))
            } else if full && self.reserved_conns >= reserve && !self.evict_a_stranger() {
                Some(format!("{} connections open", self.open_conns))
            } else {
                None
            };
            if let Some(why) = refusal {
                self.herd.metrics.refused += 1;
                refuse(&mut stream, &mut self.scratch);
                self.herd.log.event(
                    format_args!("c{id}"),
                    format_args!("refused from {addr}: {why}"),
                );
                continue;
            }
            // A turn's replies leave in one write already; Nagle's algorithm would only hold
            // a small reply back until the client acknowledged the one before it.
            let _ = stream.set_nodelay(true);
            let slot = self.free_slots.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            if full {
                // Entries of connections gone since are dropped first, so the queue holds no
                // more than the places it stands for.
                let conns = &self.conns;
                (self.reserved_order)
                    .retain(|&(s, i)| matches!(conns.get(s), Some(Some(c)) if c.id == i));
                self.reserved_order.push_back((slot, id));
            }
            // Should this fail, the socket is dropped (closed) and its slot given back; nothing
            // was counted yet, and the entry just queued for eviction is stale.
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
            // The counts below are what `free` undoes.
            self.conns[slot] = Some(Conn::new(id, stream, addr, now, until, full));
            self.herd.metrics.accepted += 1;
            self.open_conns += 1;
            self.reserved_conns += usize::from(full);
            *self.per_address.entry(host).or_default() += 1;
        }
    }

    /// Every place kept for neighbours is taken: the oldest connection in one of them that has
    /// not proved itself a neighbour ([`Conn::is_stranger`]: silent, told the server is busy, or
    /// greeted as a neighbour without a proof yet) is told the server is busy and closed, to
    /// make room. A neighbour greets as soon as it connects and proves itself a round trip
    /// later, so until then it is among the newest; strangers who take the places, whether they
    /// say nothing or claim a neighbour's name, cannot keep a neighbour out unless they open
    /// as many connections as there are places within its round trip. Returns whether a place
    /// was made.
    ///
    /// Called from [`Server::accept`], in the middle of a batch of events: hence [`Self::evict`].
    fn evict_a_stranger(&mut self) -> bool {
        while let Some((slot, id)) = self.reserved_order.pop_front() {
            let Some(Some(conn)) = self.conns.get_mut(slot) else {
                continue;
            };
            if conn.id != id || !conn.reserved {
                continue; // gone: its slot holds another
            }
            if !conn.is_stranger() {
                // A proved neighbour, handed over at the end of this turn: it keeps its place
                // and its turn at the front; the oldest stranger behind it goes.
                self.reserved_order.push_front((slot, id));
                let silent = (self.reserved_order.iter().skip(1)).position(|&(s, i)| {
                    matches!(self.conns.get(s), Some(Some(c)) if c.id == i && c.is_stranger())
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
    /// only after this turn's events (one may still name it). At once, not by marking it closed
    /// for the end of the turn: the newcomer needs its place now, in the same accept.
    fn evict(&mut self, slot: usize, id: u64) -> bool {
        let Some(mut conn) = self.free(slot) else {
            return false;
        };
        // `free` made the slot reusable (it pushed it last): not before the end of the turn.
        self.free_slots.pop();
        self.free_later.push(slot);
        refuse(conn.socket(), &mut self.scratch);
        self.herd.metrics.closed[CloseReason::Evicted.kind()] += 1;
        self.herd.log.event(
            format_args!("c{id}"),
            format_args!("closed: {}", CloseReason::Evicted),
        );
        true
    }

    /// Runs connection `slot`: what arrived, or what it holds. Called for its events, for the
    /// rest of its work in the next turn ([`Server::serve_again`]), and whenever something that
    /// held its lines back lets go (a Places reply, room in its output): no event would come
    /// for lines it has already read. Always listed for the end of the turn, which writes its
    /// replies and decides whether it stays: the one place a connection is freed, an eviction
    /// aside.
    fn serve_conn(&mut self, slot: usize, ready: Readiness) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let served = conn.serve(ready, &mut self.scratch, &mut self.herd, slot);
        if served == Served::More {
            self.serve_later(Source::Conn(slot));
        }
        self.to_flush.push(slot);
        // A WHATSAT may have opened a connection to Places.
        self.register_places();
    }

    /// Runs neighbour `i`'s inbound link; `hangup` when the event said the neighbour closed its
    /// side. Unlike a client, a link that fails is closed at once: no reply is owed on it, and
    /// a later event of the batch with its token finds the link absent and does nothing (a new
    /// connection takes the token only at the end of the turn, in [`Server::hand_over`]).
    fn serve_inbound(&mut self, i: usize, hangup: bool) {
        let Some(inbound) = self.inbound.get_mut(i) else {
            return;
        };
        match inbound.serve(hangup, &mut self.scratch, &mut self.herd, i) {
            Ok(Served::More) => self.serve_later(Source::Inbound(i)),
            Ok(Served::Done) => {}
            Err(reason) => self.close_inbound(i, reason),
        }
    }

    /// Closes neighbour `i`'s inbound link for `reason`, counted and logged. Dropping the
    /// socket takes it out of the poll; the neighbour finds its link dead and dials again.
    fn close_inbound(&mut self, i: usize, reason: CloseReason) {
        let now = self.herd.now;
        self.herd.metrics.closed[reason.kind()] += 1;
        if let Some(id) = self
            .inbound
            .get_mut(i)
            .and_then(|inbound| inbound.close(now))
        {
            self.herd
                .log
                .event(format_args!("c{id}"), format_args!("closed: {reason}"));
        }
    }

    /// Lists `source` to be served in the next turn, once however often it asks.
    fn serve_later(&mut self, source: Source) {
        if self.listed_again.insert(source) {
            self.again.push(source);
        }
    }

    /// Serves again what ran out of its share in the last turn: with no event, as what it
    /// holds (or what the socket still holds past the share) raises none. Each gets this
    /// turn's share, counted with anything this turn's events already had it do, and may list
    /// itself again. A slot listed here is not checked against its connection's id: if the
    /// connection closed and an accept reused the slot, the newcomer is served once with
    /// nothing to do.
    fn serve_again(&mut self) {
        // Taken first: what runs out again now is listed for the next turn, not this one.
        self.listed_again.clear();
        for source in std::mem::take(&mut self.again) {
            match source {
                Source::Conn(slot) => self.serve_conn(slot, Readiness::HELD),
                Source::Inbound(i) => self.serve_inbound(i, false),
                Source::Admin(i) => self.serve_admin(i),
                _ => {}
            }
        }
        // Places exchanges that read their step of the last turn, with more perhaps waiting.
        if let Some(pool) = &mut self.herd.places {
            for i in pool.take_more() {
                pool.on_ready(i, self.herd.now, &mut self.herd.log);
            }
        }
        // Answers finished at the end of the last turn (or just now), after its deliveries.
        if self.places_done() {
            self.after_places();
        }
    }

    /// Registers the sockets the Places pool opened: the pool opens them, but only the loop
    /// touches the poll. A connect that has already finished is not missed: registering a
    /// socket that is ready reports it at the next poll.
    fn register_places(&mut self) {
        let Some(pool) = &mut self.herd.places else {
            return;
        };
        for slot in pool.take_opened() {
            let outcome = match pool.socket(slot) {
                Some(socket) => self.reactor.attach(socket, Source::Places(slot)),
                // The slot let go of its socket already: nothing to register.
                None => Ok(()),
            };
            if let Err(e) = outcome {
                pool.on_register_failed(slot, &mut self.herd.log, &e.to_string());
            }
        }
    }

    /// After the Places pool has run: registers what it opened, and hands finished jobs to
    /// their connections, which may then run more lines. Called after each of the pool's
    /// events and wake-ups, and once every turn by [`Server::fire_deadlines`]. A job that
    /// finishes while this runs (a WHATSAT among the lines a reply released, failed at once
    /// because too many wait) stays in `done` for the next call: the next turn's deadlines, at
    /// the latest, which may be a sleep away.
    fn after_places(&mut self) {
        self.register_places();
        // Serving a connection again may finish more jobs at once (a WHATSAT refused because
        // the queue is full, or whose connect failed on the spot): until none is left.
        loop {
            let finished = match &mut self.herd.places {
                Some(pool) if !pool.done.is_empty() => std::mem::take(&mut pool.done),
                _ => return,
            };
            for done in finished {
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
    }

    /// Whether the Places pool has answers no one has been handed yet.
    fn places_done(&self) -> bool {
        self.herd
            .places
            .as_ref()
            .is_some_and(|pool| !pool.done.is_empty())
    }

    /// Phase 3: fires whatever deadline has passed. Each machine is asked, rather than taking
    /// an empty batch of events to mean that a timer fired: every `on_timeout` is safe to call
    /// when nothing is due, and a poll may return early. It comes after the events on purpose:
    /// a neighbour that greeted us in this turn's events has made our link to it due now
    /// ([`Link::on_neighbour_greeted`]), and the link dials in this same turn.
    fn fire_deadlines(&mut self) {
        let now = self.herd.now;
        let (links, mut cx) = self.herd.links_and_context();
        for (i, link) in links.iter_mut().enumerate() {
            // A link that dialled hands its new socket to the loop to register.
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
        // Whether or not the pool had a deadline: jobs that failed as they were submitted this
        // turn (too many waiting) are delivered here, and the sockets of jobs the pool started
        // are registered.
        self.after_places();
        if self.sweep_at <= now {
            self.sweep_at = now + SWEEP_INTERVAL;
            self.sweep(now);
        }
        if let Some(admin) = &mut self.admin {
            for conn in admin.conns.iter_mut().flatten() {
                conn.on_timeout(now);
            }
        }
    }

    /// Once a second: every connection checks its deadlines (see [`Conn::on_timeout`]). One
    /// that closes is listed for the end of the turn, which frees it.
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
    ///
    /// Phase 4, Redis's `beforeSleep`. The order carries promises:
    ///
    /// 1. the dialled links, so a neighbour has an update before the client that sent it reads
    ///    its `AT` (docs/protocol.md section 5); a link copying the store adds a batch of it;
    /// 2. the inbound links' heartbeats and `SYNC` requests;
    /// 3. the store's file, so that with `fsync = "always"` an acknowledged IAMAT is on disk;
    /// 4. the clients, last. Each write decides whether the connection stays, runs the lines it
    ///    held back, is freed, or is handed to its neighbour's inbound link.
    ///
    /// Lines run during step 4 (those a write released, a neighbour's first lines after its
    /// hand-over) come after steps 1 and 3: the records they make wait for the next turn's
    /// writes, while a client's `AT` for one of them leaves at once.
    fn before_sleep(&mut self) {
        let herd = &mut self.herd;
        for link in &mut herd.links {
            link.flush(herd.now, &herd.store, &mut herd.log);
        }
        let cap = herd.limits.peer_output_bytes;
        for i in 0..self.inbound.len() {
            if let Err(reason) = self.inbound[i].flush(cap) {
                self.close_inbound(i, reason);
            }
        }
        // The turn's records reach the file (and the disk, with fsync = "always") before the
        // replies that acknowledge them leave; if they cannot, no reply leaves.
        self.end_turn_on_disk();
        if self.disk_failed.is_some() {
            self.stopping = true;
            return;
        }
        // A connection that runs lines here lists itself again, and is written again before
        // the list is empty.
        while let Some(slot) = self.to_flush.pop() {
            self.flush_conn(slot);
        }
        // Evicted slots: no event of this turn, and no write, can name them any more.
        self.free_slots.append(&mut self.free_later);
        self.flush_admin();
        let now = self.herd.now;
        // Sampled once a turn, for the admin endpoint's time in state: a state entered and
        // left within one turn is not seen.
        for (link, seen) in self.herd.links.iter().zip(&mut self.link_seen) {
            if link.state_name() != seen.0 {
                *seen = (link.state_name(), now);
            }
        }
        // Last, so that it takes everything the turn logged, its writes included.
        self.herd.log.flush();
    }

    /// Writes the turn's records to the store's file. A write that fails (a full disk), or with
    /// `fsync = "always"` a sync that fails, sets [`Server::disk_failed`]: the loop then stops
    /// before the turn's replies leave, since each one says its record is kept, and Redis stops
    /// for the same reason. The neighbours have the records already, and give them back when
    /// the server starts again. A failed sync that the `everysec` helper reports is logged each
    /// time it comes, and makes `/healthz` answer 503 for a while ([`Server::unhealthy`]): the
    /// records are in the kernel's cache, and survive the server.
    fn end_turn_on_disk(&mut self) {
        let herd = &mut self.herd;
        let Some(aof) = &mut herd.aof else {
            return;
        };
        let mut said: Vec<String> = aof.take_failures();
        if !said.is_empty() {
            self.sync_failed_at = Some(herd.now);
        }
        match aof.end_turn(&herd.store) {
            // Written (and news for the log: a compaction begun, finished or given up).
            Ok(what) => said.extend(what),
            Err(e) => self.disk_failed = Some(e),
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
        // Empty: listed twice, and freed the first time.
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        match conn.flush(self.herd.now, &self.herd.limits, mark) {
            // Staying: what it could not write waits for the next turn (a WRITABLE event, or
            // more replies, brings it back here).
            Flushed::Open => {}
            // Written, but lines wait behind the back-pressure: no event will come for bytes
            // already held, so they run in the next turn, which then comes at once. Not now:
            // this turn's records have already gone to the links and the disk, and an update
            // run now would be acknowledged before it reached either.
            Flushed::Resume => self.serve_later(Source::Conn(slot)),
            // Closed (by its own lines, by a deadline of the sweep, or by this write): counted,
            // logged, freed. Dropping the socket takes it out of the poll.
            Flushed::Closed(reason) => {
                self.herd.metrics.closed[reason.kind()] += 1;
                self.herd.log.event(
                    format_args!("c{}", conn.id),
                    format_args!("closed: {reason}"),
                );
                self.free(slot);
            }
            // Proved a neighbour: freed here (it holds no client place any more), its socket
            // handed over.
            Flushed::Peer => {
                if let Some(conn) = self.free(slot) {
                    self.hand_over(conn);
                }
            }
        }
    }

    /// Frees slot `slot`, returning its connection: undoes what [`Server::accept`] counted.
    /// The slot is reusable at once, so a caller in the middle of a batch of events must hold
    /// it back ([`Server::evict`]).
    fn free(&mut self, slot: usize) -> Option<Conn> {
        let conn = self.conns.get_mut(slot)?.take()?;
        if let Some(pool) = &mut self.herd.places {
            pool.forget(Owner { slot, id: conn.id });
        }
        self.free_slots.push(slot);
        self.open_conns -= 1;
        self.reserved_conns -= usize::from(conn.reserved);
        let host = crate::herd::host_key(conn.addr.ip());
        if let Some(count) = self.per_address.get_mut(&host) {
            *count -= 1;
            if *count == 0 {
                self.per_address.remove(&host);
            }
        }
        Some(conn)
    }

    /// A neighbour's connection, proved: it becomes the neighbour's inbound link, on the link's
    /// token. What it read after the proof runs in the next turn: no event will come for it.
    fn hand_over(&mut self, conn: Conn) {
        let id = conn.id;
        let Some((neighbour, session, mut wire)) = conn.into_peer() else {
            return;
        };
        // The same socket under the link's token: its readiness is reported afresh there.
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
        // A newer connection from the neighbour wins: the old one is stale (the neighbour
        // restarted, or found it dead), and is closed by being dropped.
        if let Some(old) = self.inbound[neighbour].adopt(now, id, wire, session) {
            let reason = CloseReason::Replaced(id);
            self.herd
                .log
                .event(format_args!("c{old}"), format_args!("closed: {reason}"));
        }
        // What it read after its proof runs in the next turn, which comes at once: no event will
        // come for those bytes, and this turn has written its links and its file already, so
        // records merged now would wait a whole turn to be flooded and stored.
        self.serve_later(Source::Inbound(neighbour));
        // Written now: this turn's inbound writes (step 2 of `before_sleep`) are already past.
        if let Err(reason) = self.inbound[neighbour].flush(self.herd.limits.peer_output_bytes) {
            self.close_inbound(neighbour, reason);
        }
    }

    /// The last of a stop: the log's `stopped` line, the log written, the admin file removed.
    fn say_stopped(&mut self, how: std::fmt::Arguments) {
        let herd = &mut self.herd;
        herd.log
            .event(format_args!("server {}", herd.name), format_args!("{how}"));
        herd.log.flush();
        if let Some(path) = &self.admin_file {
            let _ = std::fs::remove_file(path);
        }
    }

    /// SIGTERM or SIGINT: stop accepting, write what is pending once, write the log.
    ///
    /// Once: a socket that would block is not waited for, so a client or neighbour that reads
    /// slowly may miss the end of what was owed. The store's file, by contrast, is written and
    /// synced whatever `fsync` says. The order is the end of a turn's: links, store, clients.
    fn shut_down(&mut self) {
        // Closes the port: a connection made from now on is refused by the kernel.
        self.listener = None;
        let herd = &mut self.herd;
        for link in &mut herd.links {
            link.flush(herd.now, &herd.store, &mut herd.log);
        }
        for inbound in &mut self.inbound {
            let _ = inbound.flush(usize::MAX);
        }
        if let Some(aof) = &mut herd.aof {
            if let Err(e) = aof.close(&herd.store) {
                log::error!("{e}");
                herd.log.event(format_args!("store"), format_args!("{e}"));
            }
        }
        let limits = herd.limits.clone();
        // What each decides is ignored: nothing more runs, and every socket closes when the
        // server is dropped.
        for conn in self.conns.iter_mut().flatten() {
            let _ = conn.flush(herd.now, &limits, usize::MAX);
        }
        self.say_stopped(format_args!("stopped"));
    }

    /// Accepts admin connections into free slots. The slots are few and fixed because each has
    /// its own token in the layout ([`crate::reactor::Tokens`]); with none free, the connections
    /// that wait stay in the kernel's accept queue, and [`Server::flush_admin`] comes back here
    /// when a slot frees (no event would: their edge has passed). Stops at `WouldBlock`, as every
    /// accept must, and at any other error too: the admin endpoint is not worth a log line per
    /// failure.
    fn accept_admin(&mut self) {
        let now = self.herd.now;
        let Some(admin) = &mut self.admin else {
            return;
        };
        while let Some(slot) = admin.conns.iter().position(Option::is_none) {
            let mut stream = match admin.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self
                .reactor
                .attach(&mut stream, Source::Admin(slot))
                .is_ok()
            {
                admin.conns[slot] = Some(AdminConn::new(stream, now));
            }
        }
    }

    /// An admin connection's readiness: a request may be whole. It is answered from the
    /// loop's state as it is at this point of the turn; the response is written at the end of
    /// the turn ([`Server::flush_admin`]).
    fn serve_admin(&mut self, slot: usize) {
        let asked = match self.admin.as_mut().and_then(|a| a.conns[slot].as_mut()) {
            Some(conn) => conn.on_readable(self.herd.now, &mut self.scratch),
            None => return,
        };
        let Asked::Route { route, keep_alive } = asked else {
            return;
        };
        let (status, kind, body) = match route {
            Route::Metrics => (
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                admin::render_metrics(&self.view()),
            ),
            Route::Status => (200, "application/json", admin::render_status(&self.view())),
            Route::Health => match self.unhealthy() {
                None => (200, "text/plain", "ok\n".to_owned()),
                Some(why) => (503, "text/plain", format!("{why}\n")),
            },
        };
        if let Some(conn) = self.admin.as_mut().and_then(|a| a.conns[slot].as_mut()) {
            conn.reply(self.herd.now, status, kind, body.as_bytes(), keep_alive);
        }
    }

    /// Why the server is not healthy, if it is not: what `/healthz` answers 503 with.
    fn unhealthy(&self) -> Option<&'static str> {
        if self.stopping {
            Some("stopping")
        } else if (self.sync_failed_at)
            .is_some_and(|at| self.herd.now.saturating_duration_since(at) < SYNC_FAILING_FOR)
        {
            Some("the store's file cannot be written")
        } else if self.herd.log.failing() {
            Some("the log cannot be written")
        } else {
            None
        }
    }

    /// Writes the admin connections' responses; frees those that closed. All of them, every
    /// turn: there are at most [`admin::MAX_CONNECTIONS`], and no list of the ones with work
    /// is worth keeping.
    ///
    /// A connection whose response went out may already hold its next request (pipelined), and
    /// no event will come for bytes already read: it is answered here, a few requests a turn
    /// at most, and served again next turn if more wait. A slot freed lets a connection
    /// waiting in the accept queue in.
    fn flush_admin(&mut self) {
        /// Requests one admin connection has answered in one turn, at most.
        const PER_TURN: usize = 8;
        let now = self.herd.now;
        let mut freed = false;
        for slot in 0..admin::MAX_CONNECTIONS {
            for _ in 0..PER_TURN {
                let Some(conn) = self.admin.as_mut().and_then(|a| a.conns[slot].as_mut()) else {
                    break;
                };
                conn.flush(now);
                if !conn.has_input() {
                    break;
                }
                self.serve_admin(slot);
            }
            let Some(admin) = &mut self.admin else {
                return;
            };
            match &admin.conns[slot] {
                Some(conn) if conn.is_closed() => {
                    admin.conns[slot] = None;
                    freed = true;
                }
                Some(conn) if conn.has_input() => self.serve_later(Source::Admin(slot)),
                _ => {}
            }
        }
        if freed {
            self.accept_admin();
        }
    }

    /// What the admin endpoint shows, gathered from the loop's machines.
    fn view(&self) -> View<'_> {
        let now = self.herd.now;
        let mut links = Vec::new();
        for (i, link) in self.herd.links.iter().enumerate() {
            // A dialled link keeps no time of its own: the loop's sample of it does.
            let (state, since) = self.link_seen[i];
            links.push(LinkView {
                neighbour: link.name.clone(),
                direction: "out",
                state,
                up: state == "Up",
                seconds_in_state: now.saturating_duration_since(since).as_secs_f64(),
            });
            let inbound = &self.inbound[i];
            let since = inbound.since.unwrap_or(self.started);
            links.push(LinkView {
                neighbour: link.name.clone(),
                direction: "in",
                state: inbound.state_name(),
                up: inbound.id().is_some(),
                seconds_in_state: now.saturating_duration_since(since).as_secs_f64(),
            });
        }
        let link_counts = (self.herd.links.iter().zip(&self.inbound))
            .map(|(link, inbound)| LinkCounts {
                bytes_received: inbound.bytes_received,
                ..link.counts
            })
            .collect();
        let store_file = self.herd.aof.as_ref().map(|aof| StoreFileView {
            stats: aof.stats,
            bytes: aof.len(),
            sync_seconds: aof.sync_seconds.clone(),
            helper: aof.helper_syncs().map(|(n, us)| (n, us as f64 / 1e6)),
        });
        View {
            name: &self.herd.name,
            metrics: &self.herd.metrics,
            records: self.herd.store.len(),
            digest: self.herd.store.digest(),
            clients_connected: self.open_conns,
            links,
            link_counts,
            places: self.herd.places.as_ref().map(|p| &p.counts),
            places_slots_busy: (self.herd.places.iter())
                .flat_map(|p| p.slot_states())
                .filter(|s| matches!(*s, "Connecting" | "Exchanging"))
                .count(),
            store_file,
            uptime: now.saturating_duration_since(self.started).as_secs_f64(),
        }
    }
}

/// Refuses a connection past `max_connections` with `? server busy`, without destroying that
/// line: the write side is shut after it, and what the client already sent is read and dropped
/// (closing a socket with unread input would reset it, and the reset would take the line with
/// it). Input still to come may yet reset it; a refused connection gets no slot to linger in.
fn refuse(stream: &mut mio::net::TcpStream, scratch: &mut [u8]) {
    let _ = stream.write(protocol::BUSY);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // A few reads at most: a client that keeps sending cannot hold the loop here.
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
