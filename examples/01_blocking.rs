//! Step 1: a blocking line server, and why the herd does not use one.
//!
//! Every line a client sends comes back upper-cased: `hello` is answered `HELLO`. The server
//! uses only `std::net`, and every call blocks: `accept` until a client comes, `read` until it
//! sends, `write` until the kernel takes the bytes.
//!
//! Run it and talk to it from two terminals:
//!
//! ```text
//! cargo run --release --example 01_blocking               # one client at a time
//! cargo run --release --example 01_blocking -- --threads  # a thread per client
//! nc 127.0.0.1 7001                                       # in two other terminals
//! ```
//!
//! (`--port N` listens elsewhere; `--port 0` takes a free port, and the first line printed
//! says which.) Without `--threads`, the second `nc` connects (the kernel completes the
//! handshake and queues it) but hears nothing until the first one quits: the one thread is
//! blocked in `read` on the first client, and a client that types nothing stalls everyone. With
//! `--threads`, both are served, at the price of a thread, its stack and a scheduler's attention
//! per client, and of locks around anything they share (the herd shares its store with every
//! connection, and holds tens of thousands of them).
//!
//! The asyncio equivalent is what asyncio replaces: Python's `socketserver.TCPServer`, and
//! `ThreadingTCPServer` for `--threads`. The next step, `02_poll`, serves every client from one
//! thread without ever blocking on one of them.

use std::error::Error;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::thread;

/// The port humans connect to, unless `--port` says otherwise.
const DEFAULT_PORT: u16 = 7001;

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.get(args.iter().position(|a| a == flag)? + 1);
    let port = value("--port").map_or(Ok(DEFAULT_PORT), |v| v.parse())?;
    let threads = args.iter().any(|a| a == "--threads");
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port))?;
    println!("listening on {}", listener.local_addr()?);
    io::stdout().flush()?;
    loop {
        // Blocks until a client connects.
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("accept failed: {e}");
                continue;
            }
        };
        eprintln!("{peer}: connected");
        if threads {
            // Each client gets its own thread, which may block on it alone.
            thread::spawn(move || serve(stream));
        } else {
            // The only thread serves this client until it leaves; the others wait in the
            // listener's queue, unaccepted.
            serve(stream);
        }
    }
}

/// Answers each line of `stream` until the client closes its side.
fn serve(stream: TcpStream) {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |a| a.to_string());
    let outcome = upper_case_lines(stream);
    match outcome {
        Ok(()) => eprintln!("{peer}: closed"),
        Err(e) => eprintln!("{peer}: {e}"),
    }
}

fn upper_case_lines(stream: TcpStream) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        // Blocks until a whole line, or the end of the stream, has arrived. Nothing else
        // happens on this thread meanwhile.
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        line.make_ascii_uppercase();
        // Blocks until the kernel has taken every byte: a client that never reads would
        // stall the server here too.
        writer.write_all(&line)?;
    }
}
