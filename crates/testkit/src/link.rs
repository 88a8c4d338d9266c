//! A slow link in user space, for tests and benchmarks that need a registry far away: this
//! machine has no `netem`. [`DelayLine`] relays TCP on loopback to a peer; each direction's
//! bytes reach the other side half a round trip after they arrived (per connection, order
//! kept), and, when a rate is set, no faster than that rate, shared by every connection going
//! that way as on one link. A new connection's first bytes wait one more round trip, as TCP's
//! handshake makes them (the peer is connected at once: only the client sees the link).

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the link does to the bytes crossing it.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkShape {
    /// The round trip: each direction delays by half of it.
    pub rtt: Duration,
    /// Bits per second towards the client (from the peer), when limited.
    pub down_bits: Option<f64>,
    /// Bits per second towards the peer, when limited.
    pub up_bits: Option<f64>,
}

/// One direction of the link: when it is next free to send (its queue), and its rate.
struct Wire {
    rate_bits: Option<f64>,
    free_at: Mutex<Instant>,
}

impl Wire {
    fn new(rate_bits: Option<f64>) -> Arc<Self> {
        Arc::new(Self {
            rate_bits,
            free_at: Mutex::new(Instant::now()),
        })
    }

    /// When `len` bytes that arrived at `at` have left the sending end.
    fn send(&self, at: Instant, len: usize) -> Instant {
        let Some(rate) = self.rate_bits else {
            return at;
        };
        let mut free = self.free_at.lock().unwrap_or_else(|p| p.into_inner());
        let done = (*free).max(at) + Duration::from_secs_f64(len as f64 * 8.0 / rate);
        *free = done;
        done
    }
}

/// A TCP relay to `peer` that behaves as a link with a round trip and rates; stops listening
/// when dropped (connections already made go on until either side closes).
#[derive(Debug)]
pub struct DelayLine {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicU64>,
}

/// Bytes read at once from either side.
const READ: usize = 64 << 10;
/// Reads in flight per direction and connection (the link's buffer: 4 MiB).
const IN_FLIGHT: usize = 64;

impl DelayLine {
    pub fn start(peer: SocketAddr, shape: LinkShape) -> DelayLine {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (down, up) = (Wire::new(shape.down_bits), Wire::new(shape.up_bits));
        let half = shape.rtt / 2;
        let stopped = stop.clone();
        let connections = Arc::new(AtomicU64::new(0));
        let opened_count = connections.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = client else { continue };
                opened_count.fetch_add(1, Ordering::Relaxed);
                let opened = Instant::now();
                let Ok(server) = TcpStream::connect_timeout(&peer, Duration::from_secs(10)) else {
                    continue;
                };
                for s in [&client, &server] {
                    let _ = s.set_nodelay(true);
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                carry(client, server, up.clone(), half, opened + shape.rtt);
                carry(s2, c2, down.clone(), half, opened);
            }
        });
        DelayLine {
            addr,
            stop,
            connections,
        }
    }

    /// Connections made through the line so far (each paid a round trip before its first
    /// bytes).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, as a registry host is named.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accepting thread so that it sees the flag.
        let _ = TcpStream::connect(self.addr);
    }
}

/// Bytes read from one side and when to release them to the other; `None`: the end.
type Bytes = Option<(Instant, Vec<u8>)>;

/// Bytes from `from` to `to` over `wire`, each released `delay` after it left the sending end,
/// which sends nothing before `not_before`; the end of the stream is passed on after the last
/// bytes.
fn carry(
    mut from: TcpStream,
    mut to: TcpStream,
    wire: Arc<Wire>,
    delay: Duration,
    not_before: Instant,
) {
    let (tx, rx): (SyncSender<Bytes>, Receiver<Bytes>) = sync_channel(IN_FLIGHT);
    let reader_side = from.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; READ];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(n) => {
                    // The handshake holds this connection's bytes only: the wire is taken
                    // when they arrived, as other connections' bytes meanwhile go on.
                    let at = wire.send(Instant::now(), n).max(not_before) + delay;
                    if tx.send(Some((at, buf[..n].to_vec()))).is_err() {
                        return;
                    }
                }
            }
        }
    });
    std::thread::spawn(move || {
        for item in rx {
            let Some((at, bytes)) = item else {
                let _ = to.shutdown(Shutdown::Write);
                return;
            };
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if to.write_all(&bytes).is_err() {
                // The other end is gone: so is this direction's source.
                let _ = reader_side.shutdown(Shutdown::Both);
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that sends back whatever it reads.
    fn echo() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut out = conn.try_clone().unwrap();
                    let _ = std::io::copy(&mut &conn, &mut out);
                });
            }
        });
        addr
    }

    #[test]
    fn one_byte_there_and_back_takes_one_round_trip() {
        let rtt = Duration::from_millis(20);
        let line = DelayLine::start(
            echo(),
            LinkShape {
                rtt,
                ..LinkShape::default()
            },
        );
        let mut started = Instant::now();
        let mut conn = TcpStream::connect(line.addr()).unwrap();
        conn.set_nodelay(true).unwrap();
        let mut byte = [0u8];
        for n in 0..5 {
            conn.write_all(b"x").unwrap();
            conn.read_exact(&mut byte).unwrap();
            let took = started.elapsed();
            // The first exchange pays for the connection's handshake too.
            let expected = if n == 0 { rtt * 2 } else { rtt };
            assert!(
                took >= expected && took <= expected.mul_f64(1.1),
                "exchange {n}: a byte there and back took {took:?} through a {rtt:?} link \
                 (expected {expected:?})"
            );
            started = Instant::now();
        }
        assert_eq!(line.connections(), 1, "one connection, counted once");
    }

    #[test]
    fn bytes_come_down_at_the_links_rate() {
        let line = DelayLine::start(
            echo(),
            LinkShape {
                rtt: Duration::from_millis(2),
                down_bits: Some(100e6),
                up_bits: None,
            },
        );
        let conn = TcpStream::connect(line.addr()).unwrap();
        let total = 4 << 20;
        let mut writer = conn.try_clone().unwrap();
        let sent = std::thread::spawn(move || writer.write_all(&vec![7u8; total]));
        let started = Instant::now();
        let mut got = vec![0u8; total];
        (&conn).read_exact(&mut got).unwrap();
        let took = started.elapsed().as_secs_f64();
        sent.join().unwrap().unwrap();
        // 4 MiB at 100 Mbit/s: 0.336 s.
        let expected = total as f64 * 8.0 / 100e6;
        assert!(
            took >= expected && took <= expected * 1.1 + 0.01,
            "4 MiB took {took:.3} s down a 100 Mbit/s link (expected {expected:.3} s)"
        );
        assert!(got.iter().all(|&b| b == 7));
    }
}
