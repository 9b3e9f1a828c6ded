//! The event loop: one thread, one `mio::Poll`, every socket of the server.
//!
//! [`Server::run`] turns the loop in four phases, after Redis's `aeProcessEvents`:
//!
//! 1. sleep in `poll` until an event or the earliest deadline;
//! 2. read the clock once, then dispatch each event to the state machine its token names;
//! 3. fire the deadlines that have passed (links to redial, Places jobs past their time, idle
//!    clients);
//! 4. `before_sleep`: write what the turn produced, links first (a neighbour hears of
//!    an update before the client that sent it), then clients, free the connections that
//!    closed, and write the log.
//!
//! Handlers never free a connection in the middle of a batch of events: they mark it closed,
//! and phase 4 frees it, so an event later in the same batch cannot find its slot reused.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::event::Event;
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Waker};
use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
use signal_hook_mio::v1_0::Signals;

use crate::config::{resolve, Config};
use crate::conn::{Conn, ConnState, Fill, Role};
use crate::herd::{whatsat_reply, Herd};
use crate::link::Link;
use crate::log::{Log, Who};
use crate::peer::{self, Secret};
use crate::places::pool::{tls_config, PlacesPool};
use crate::reactor::{Registrar, Source, Tokens};
use crate::store::Store;
use crate::trace::{self, trace_loop};

/// How often the connections are checked for idleness. A timer per connection would cost a heap
/// entry per accept; one walk over 10,000 connections a second costs microseconds.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Size of the one read buffer shared by every connection.
const READ_CHUNK: usize = 64 * 1024;
/// A connection's unhandled input stops being read past this (it is waiting on Places, or
/// sending faster than it reads); reading resumes when its lines are handled.
const INPUT_HIGH_WATER: usize = 256 * 1024;

pub struct Server {
    poll: Poll,
    tokens: Tokens,
    listener: Option<TcpListener>,
    signals: Signals,
    /// Kept alive for the helper threads that wake the loop.
    _waker: Arc<Waker>,
    conns: Vec<Option<Conn>>,
    free_slots: Vec<usize>,
    open_conns: usize,
    next_conn_id: u64,
    /// When the connections are next checked for idleness.
    sweep_at: Instant,
    /// Connections with something to write or to decide, for the end of the turn.
    dirty: Vec<usize>,
    scratch: Vec<u8>,
    herd: Herd,
    /// Where SIGUSR1 writes the store.
    dump_path: PathBuf,
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
        let tls = tls_config(config.places.ca_file.as_deref())?;
        let log_path = config.log_path(name);
        let mut log = Log::open(&log_path)?;
        let poll = Poll::new().map_err(|e| format!("cannot create the poll: {e}"))?;
        let tokens = Tokens::new(neighbour_addrs.len(), config.places.pool_size);
        let waker = Arc::new(
            Waker::new(poll.registry(), tokens.token(Source::Waker))
                .map_err(|e| format!("cannot create the waker: {e}"))?,
        );
        let places = key
            .map(|key| PlacesPool::new(&config.places, key, tls, waker.clone()))
            .transpose()?;
        // mio sets SO_REUSEADDR, so a restarted server rebinds its port at once.
        let mut listener =
            TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        let mut signals = Signals::new([SIGTERM, SIGINT, SIGUSR1])
            .map_err(|e| format!("cannot catch signals: {e}"))?;
        let registry = poll.registry();
        registry
            .register(
                &mut listener,
                tokens.token(Source::Listener),
                Interest::READABLE,
            )
            .and_then(|()| {
                registry.register(
                    &mut signals,
                    tokens.token(Source::Signals),
                    Interest::READABLE,
                )
            })
            .map_err(|e| format!("cannot register with the poll: {e}"))?;
        let now = Instant::now();
        let links = neighbour_addrs
            .into_iter()
            .enumerate()
            .map(|(i, (n, a))| Link::new(n, i, a, now))
            .collect();
        log.set_time(SystemTime::now());
        log.event(
            format_args!("server {name}"),
            format_args!("listening on {bound}"),
        );
        if places.is_none() {
            log.event(
                format_args!("server {name}"),
                format_args!("no Places API key: WHATSAT answers REQUEST_DENIED"),
            );
        }
        log.flush();
        println!(
            "{name} listening on {bound}, logging to {}",
            log_path.display()
        );
        let _ = io::stdout().flush();
        Ok(Server {
            poll,
            tokens,
            listener: Some(listener),
            signals,
            _waker: waker,
            conns: Vec::new(),
            free_slots: Vec::new(),
            open_conns: 0,
            next_conn_id: 1,
            sweep_at: now + SWEEP_INTERVAL,
            dirty: Vec::new(),
            scratch: vec![0; READ_CHUNK],
            herd: Herd::new(
                name.to_owned(),
                secret,
                links,
                places,
                log,
                config.limits.clone(),
                now,
            ),
            dump_path: config.log_dir.join(format!("{name}.store")),
            stopping: false,
        })
    }

    /// Runs until SIGTERM or SIGINT.
    pub fn run(&mut self) -> Result<(), String> {
        let mut events = Events::with_capacity(1024);
        let mut turn: u64 = 0;
        while !self.stopping {
            let timeout = self
                .next_deadline()
                .map(|at| at.saturating_duration_since(Instant::now()));
            if trace::enabled() {
                let name = &self.herd.name;
                match timeout {
                    Some(t) => trace_loop!(
                        "{name} sleep: up to {} ms (the next deadline)",
                        t.as_millis()
                    ),
                    None => trace_loop!("{name} sleep: until an event"),
                }
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(format!("poll failed: {e}"));
                }
            }
            self.begin_turn();
            turn += 1;
            if trace::enabled() {
                trace_loop!(
                    "{} turn {turn}: woken by {}",
                    self.herd.name,
                    self.describe(&events)
                );
            }
            for event in events.iter() {
                let source = self.tokens.source(event.token());
                let before = trace::enabled().then(|| self.snapshot(Some(source)));
                self.dispatch(event);
                if let Some(before) = before {
                    before.trace_changes(&self.herd.name, &self.snapshot(Some(source)));
                }
            }
            let before = trace::enabled().then(|| self.snapshot(None));
            self.fire_deadlines();
            self.before_sleep();
            if let Some(before) = before {
                before.trace_changes(&self.herd.name, &self.snapshot(None));
            }
        }
        self.shut_down();
        Ok(())
    }

    /// What woke the loop, for the trace: `c3 readable`, `link Bona writable`, ...
    fn describe(&self, events: &Events) -> String {
        let mut woke: Vec<String> = Vec::new();
        for event in events.iter() {
            let who = match self.tokens.source(event.token()) {
                Source::Listener => "the listener".to_owned(),
                Source::Waker => "the waker (a DNS answer)".to_owned(),
                Source::Signals => "a signal".to_owned(),
                Source::Link(i) => format!("link {}", self.herd.links[i].name),
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
            true => "nothing: a deadline came".to_owned(),
            false => woke.join(", "),
        }
    }

    /// The states of `source`'s machines (with `None`: of the links, the Places slots and the
    /// connections), for the trace to compare before and after a step.
    fn snapshot(&self, source: Option<Source>) -> trace::Snapshot {
        let mut states = Vec::new();
        let links = self.herd.links.iter().enumerate();
        for (i, link) in links.filter(|(i, _)| source.map_or(true, |s| s == Source::Link(*i))) {
            states.push((
                format!("link {} (#{i})", link.name),
                link.state_name().to_owned(),
            ));
        }
        if source.map_or(true, |s| matches!(s, Source::Places(_) | Source::Waker)) {
            for (i, state) in self
                .herd
                .places
                .iter()
                .flat_map(|p| p.slot_states())
                .enumerate()
            {
                states.push((format!("places#{i}"), state.to_owned()));
            }
        }
        for (slot, conn) in self.conns.iter().enumerate() {
            if let Some(conn) = conn {
                if source.map_or(true, |s| s == Source::Conn(slot) || s == Source::Listener) {
                    states.push((format!("c{}", conn.id), conn.state_name()));
                }
            }
        }
        trace::Snapshot(states)
    }

    /// Reads the clock, once for the whole turn.
    fn begin_turn(&mut self) {
        let wall = SystemTime::now();
        self.herd.now = Instant::now();
        self.herd.now_ns = wall
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        self.herd.log.set_time(wall);
    }

    /// The earliest deadline of anything: a link, the Places pool, a connection's reminder.
    fn next_deadline(&self) -> Option<Instant> {
        let links = self.herd.links.iter().filter_map(Link::deadline);
        let places = self.herd.places.as_ref().and_then(PlacesPool::deadline);
        links.chain(places).chain([self.sweep_at]).min()
    }

    fn dispatch(&mut self, event: &Event) {
        let registrar = Registrar::new(self.poll.registry(), self.tokens);
        let herd = &mut self.herd;
        let now = herd.now;
        match self.tokens.source(event.token()) {
            Source::Listener => self.accept(),
            Source::Signals => {
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
                if let Some(pool) = &mut herd.places {
                    pool.on_wake(herd.now, &registrar, &mut herd.log);
                }
                self.deliver_places();
            }
            Source::Link(i) => {
                let (links, mut cx) = herd.links_and_context();
                if let Some(link) = links.get_mut(i) {
                    link.on_ready(now, &mut self.scratch, &mut cx);
                }
            }
            Source::Places(i) => {
                if let Some(pool) = &mut herd.places {
                    pool.on_ready(i, herd.now, &registrar, &mut herd.log);
                }
                self.deliver_places();
            }
            Source::Conn(slot) => {
                // WRITABLE too: lines held back while the output was full may run now, and the
                // end of the turn writes what waits.
                let hangup = event.is_read_closed() || event.is_error();
                self.service_conn(slot, event.is_readable(), hangup);
                self.mark_dirty(slot);
            }
        }
    }

    /// Accepts every pending connection (edge-triggered: until `WouldBlock`).
    fn accept(&mut self) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
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
            if self.open_conns >= self.herd.limits.max_connections {
                let _ = stream.write(b"? server busy\n");
                self.herd.log.event(
                    format_args!("c{id}"),
                    format_args!("refused from {addr}: {} connections open", self.open_conns),
                );
                continue;
            }
            let _ = stream.set_nodelay(true);
            let slot = self.free_slots.pop().unwrap_or_else(|| {
                self.conns.push(None);
                self.conns.len() - 1
            });
            let registrar = Registrar::new(self.poll.registry(), self.tokens);
            if let Err(e) = registrar.attach(&mut stream, Source::Conn(slot)) {
                self.herd
                    .log
                    .event(format_args!("c{id}"), format_args!("cannot register: {e}"));
                self.free_slots.push(slot);
                continue;
            }
            self.herd
                .log
                .event(format_args!("c{id}"), format_args!("accepted from {addr}"));
            self.conns[slot] = Some(Conn::new(id, stream, addr, self.herd.now));
            self.open_conns += 1;
        }
    }

    /// Reads what connection `slot` sent and runs its lines, until its socket would block or
    /// it must wait: on Places, or on a client that has not read its replies yet. `readable`
    /// when the kernel said there are bytes; `hangup` when it said the client closed its side.
    /// Returns whether it left output to write.
    fn service_conn(&mut self, slot: usize, readable: bool, hangup: bool) -> bool {
        let registrar = Registrar::new(self.poll.registry(), self.tokens);
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        let mut read = readable || hangup || conn.reader.is_full();
        while conn.state == ConnState::Open {
            let fill = if read {
                conn.reader.fill(
                    &mut conn.stream,
                    &mut self.scratch,
                    INPUT_HIGH_WATER,
                    hangup,
                )
            } else {
                Ok(Fill::Drained)
            };
            let before = conn.reader.buffered();
            self.herd.process(conn, slot, &registrar);
            match fill {
                // Handling made room: the socket may hold more, and will not say so again.
                Ok(Fill::Full) if conn.reader.buffered() < before => read = true,
                Ok(_) => break,
                Err(e) => conn.set_state(ConnState::Closed(format!("read failed: {e}"))),
            }
        }
        if read {
            conn.last_active = self.herd.now;
        }
        // The line deadline runs from the first byte of a line whose end has not come.
        conn.partial_since = match conn.reader.waiting_for_newline() {
            true => conn.partial_since.or(Some(self.herd.now)),
            false => None,
        };
        conn.out.pending() > 0
    }

    fn mark_dirty(&mut self, slot: usize) {
        if let Some(Some(conn)) = self.conns.get_mut(slot) {
            if !conn.dirty {
                conn.dirty = true;
                self.dirty.push(slot);
            }
        }
    }

    /// Hands finished Places jobs to their connections, which may then run more lines.
    fn deliver_places(&mut self) {
        let Some(pool) = &mut self.herd.places else {
            return;
        };
        for done in std::mem::take(&mut pool.done) {
            let (slot, id) = done.owner;
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if conn.id != id {
                continue; // the client left; its slot now holds another
            }
            let reply = whatsat_reply(&done.record, &done.body);
            self.herd.log.bytes(Who::Conn(id), '>', &reply);
            conn.replies.complete(&mut conn.out, done.job, reply);
            // Lines may wait behind the reply, and input behind a full buffer.
            self.service_conn(slot, false, false);
            self.mark_dirty(slot);
        }
    }

    fn fire_deadlines(&mut self) {
        let now = self.herd.now;
        let registrar = Registrar::new(self.poll.registry(), self.tokens);
        let herd = &mut self.herd;
        let (links, mut cx) = herd.links_and_context();
        for link in links {
            link.on_timeout(now, &registrar, &mut cx);
        }
        if let Some(pool) = &mut herd.places {
            if pool.deadline().is_some_and(|at| at <= now) {
                pool.on_timeout(now, &registrar, &mut herd.log);
            }
        }
        self.deliver_places();
        if self.sweep_at <= now {
            self.sweep_at = now + SWEEP_INTERVAL;
            self.sweep(now);
        }
    }

    /// Once a second: closes the connections past a limit of time (a line not finished in
    /// time, replies left unread over the soft limit too long, a client idle with nothing
    /// pending, a peer link silent, a peer not authenticated in time), and sends heartbeats on
    /// inbound peer links that have been quiet.
    fn sweep(&mut self, now: Instant) {
        let limits = self.herd.limits.clone();
        let idle = limits.idle_timeout;
        let past = |since: Option<Instant>, limit: Duration| {
            since.is_some_and(|at| now.saturating_duration_since(at) >= limit)
        };
        for slot in 0..self.conns.len() {
            let Some(conn) = &mut self.conns[slot] else {
                continue;
            };
            let quiet = now.saturating_duration_since(conn.last_active);
            let close = match &mut conn.role {
                _ if past(conn.partial_since, limits.line_timeout) => Some(format!(
                    "a line not finished within {} ms",
                    limits.line_timeout.as_millis()
                )),
                _ if past(conn.over_soft_since, limits.client_output_soft_time) => Some(format!(
                    "over {} bytes of replies unread for {} ms: the client does not read",
                    limits.client_output_soft_bytes,
                    limits.client_output_soft_time.as_millis()
                )),
                Role::Peer(_) if quiet >= peer::DEAD_AFTER => {
                    Some(format!("silent for {} s", peer::DEAD_AFTER.as_secs()))
                }
                Role::Peer(side)
                    if now.saturating_duration_since(side.last_sent)
                        >= peer::HEARTBEAT_INTERVAL =>
                {
                    peer::frame(side.session.as_mut(), b"PING", conn.out.tail());
                    side.last_sent = now;
                    self.mark_dirty(slot);
                    None
                }
                Role::Peer(_) => None,
                Role::Challenged { until, .. } if *until <= now => Some(format!(
                    "did not authenticate within {} s",
                    peer::HANDSHAKE_TIMEOUT.as_secs()
                )),
                Role::Challenged { .. } => None,
                Role::Client | Role::Undecided => {
                    (!idle.is_zero() && quiet >= idle && conn.replies.is_empty())
                        .then(|| format!("idle for {} ms", idle.as_millis()))
                }
            };
            if let Some(reason) = close {
                if let Some(conn) = &mut self.conns[slot] {
                    conn.set_state(ConnState::Closed(reason));
                }
                self.mark_dirty(slot);
            }
        }
    }

    /// End of the turn: links write first, then clients; closed connections are freed; the log
    /// is written.
    fn before_sleep(&mut self) {
        let herd = &mut self.herd;
        for link in &mut herd.links {
            link.flush(herd.now, &herd.store, &mut herd.log);
        }
        for slot in std::mem::take(&mut self.dirty) {
            // All written, but lines wait behind the back-pressure: no event will come for
            // bytes already held, so run them now and write again.
            while self.write_conn(slot) && self.service_conn(slot, false, false) {}
        }
        self.herd.log.flush();
    }

    /// Writes connection `slot`'s output, and frees it if it is done. Returns whether it has
    /// written everything while lines it already holds are waiting to run.
    fn write_conn(&mut self, slot: usize) -> bool {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        conn.dirty = false;
        conn.flush(self.herd.limits.client_output_bytes);
        conn.over_soft_since = match conn.out.pending() > self.herd.limits.client_output_soft_bytes
        {
            true => conn.over_soft_since.or(Some(self.herd.now)),
            false => None,
        };
        if let ConnState::Closed(reason) = &conn.state {
            self.herd.log.event(
                format_args!("c{}", conn.id),
                format_args!("closed: {reason}"),
            );
            self.conns[slot] = None;
            self.free_slots.push(slot);
            self.open_conns -= 1;
            return false;
        }
        let held = conn.reader.buffered() > 0 || conn.reader.is_full();
        conn.out.pending() == 0 && held && conn.state == ConnState::Open
    }

    /// SIGTERM or SIGINT: stop accepting, write what is pending once, write the log.
    fn shut_down(&mut self) {
        self.listener = None;
        let herd = &mut self.herd;
        for link in &mut herd.links {
            link.flush(herd.now, &herd.store, &mut herd.log);
        }
        for conn in self.conns.iter_mut().flatten() {
            conn.flush(usize::MAX);
        }
        herd.log.event(
            format_args!("server {}", herd.name),
            format_args!("stopped"),
        );
        herd.log.flush();
    }
}

/// Writes every record, sorted, under a first line with their count and digest, so that the
/// stores of a herd can be compared (`kill -USR1`, then compare the `.store` files). Written
/// beside and renamed into place, so a reader never sees half a file. It blocks the loop for
/// as long as the write takes: an operator's (or a test's) request, not a hot path.
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
        text.extend_from_slice(line);
        text.push(b'\n');
    }
    let partial = path.with_extension("store.partial");
    let outcome = std::fs::write(&partial, &text).and_then(|()| std::fs::rename(&partial, path));
    let what = match outcome {
        Ok(()) => format!("{} records written to {}", store.len(), path.display()),
        Err(e) => format!("cannot write {}: {e}", path.display()),
    };
    log.event(format_args!("store"), format_args!("{what}"));
}
