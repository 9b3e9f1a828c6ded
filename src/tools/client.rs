//! `herd iamat`, `herd whatsat`, `herd send`: a client in the same binary, talking the way the
//! course's test clients do: connect, send one line, half-close, print everything the server
//! sends back until it closes.
//!
//! This is plain blocking I/O on purpose: one request, one answer, nothing to multiplex.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config::{resolve, Config};

/// How long to wait for the server to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for each read of the answer: longer than the server's Places timeout (5 s
/// by default), since a WHATSAT waits on Places before the server answers.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// `SERVER` is a server's name in the configuration, or `HOST:PORT`. A name is looked up
/// first, so a server may be called anything, even something with a colon in it.
pub fn server_address(server: &str, config: Option<&Config>) -> Result<SocketAddr, String> {
    if let Some(config) = config {
        if let Ok(s) = config.server(server) {
            return resolve(&s.host, Some(s.port));
        }
    }
    if server.contains(':') {
        return resolve(server, None);
    }
    match config {
        Some(_) => Err(format!(
            "{server:?} is neither a server of the configuration nor HOST:PORT"
        )),
        None => Err(format!(
            "no herd.toml here or beside the program, so {server:?} must be HOST:PORT \
             (or give --config PATH)"
        )),
    }
}

/// `IAMAT CLIENT LOCATION NOW`, with the current time to the nanosecond.
pub fn iamat_line(client: &str, location: &str) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    format!(
        "IAMAT {client} {location} {}.{:09}",
        now.as_secs(),
        now.subsec_nanos()
    )
}

/// Sends `line` and a newline, half-closes, and returns every byte of the reply. The server
/// answers, sees the end of stream, and closes: reading to the end is how the reply is known
/// to be whole, with no parsing of it here.
pub fn exchange(addr: SocketAddr, line: &str) -> Result<Vec<u8>, String> {
    let mut stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let io = |e: std::io::Error| format!("talking to {addr}: {e}");
    stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
    stream
        .write_all(format!("{line}\n").as_bytes())
        .map_err(io)?;
    stream.shutdown(Shutdown::Write).map_err(io)?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).map_err(io)?;
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iamat_lines_carry_the_time_in_nanoseconds() {
        let line = iamat_line("kiwi", "+34.068930-118.445127");
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(&fields[..3], ["IAMAT", "kiwi", "+34.068930-118.445127"]);
        let (secs, nanos) = fields[3].split_once('.').unwrap();
        assert!(secs.parse::<u64>().unwrap() > 1_600_000_000);
        assert_eq!(nanos.len(), 9);
    }

    #[test]
    fn servers_by_name_or_address() {
        let config = Config::parse(
            "[[server]]\nname = \"Bailey\"\nport = 10000\n",
            std::path::Path::new("."),
        )
        .unwrap();
        assert_eq!(
            server_address("Bailey", Some(&config)).unwrap(),
            "127.0.0.1:10000".parse().unwrap()
        );
        assert_eq!(
            server_address("127.0.0.1:9", None).unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert!(server_address("Nobody", Some(&config)).is_err());
    }
}
