//! The idiomatic tokio uppercase echo: the baseline forkpool is compared against in
//! `bench/compare.sh`. A task per connection on the multi-thread runtime, a `BufReader` and a
//! `BufWriter` around each half of the socket, `read_until(b'\n')`, uppercase, write, and flush
//! only when no more input is already buffered (so pipelined requests share one write).
//!
//! It is deliberately what a Rust user would write first, not a tuned server: no buffer
//! pooling, default 8 KiB buffers, default runtime (one worker thread per CPU).
//!
//! Usage: `tokio-echo ADDR` (e.g. `127.0.0.1:0`); prints `listening on ADDR` once bound.

use std::io;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};

#[tokio::main]
async fn main() -> io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7878".to_string());
    let listener = TcpListener::bind(&addr).await?;
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // EMFILE and friends: keep serving the connections already open.
            Err(err) => {
                eprintln!("accept: {err}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            if let Err(err) = serve(stream).await {
                if err.kind() != io::ErrorKind::ConnectionReset {
                    eprintln!("connection: {err}");
                }
            }
        });
    }
}

/// Echoes each line of `stream` back uppercased until the peer closes.
async fn serve(stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let (read, write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut writer = BufWriter::new(write);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await? == 0 {
            writer.flush().await?;
            return Ok(());
        }
        uppercase(&mut line);
        writer.write_all(&line).await?;
        if reader.buffer().is_empty() {
            writer.flush().await?;
        }
    }
}

/// Uppercases `line` as `str::to_uppercase` would for valid UTF-8 (ASCII in place, the rest
/// through `to_uppercase`); bytes that are not valid UTF-8 are passed through unchanged.
fn uppercase(line: &mut Vec<u8>) {
    if line.is_ascii() {
        line.make_ascii_uppercase();
        return;
    }
    let mut upper = Vec::with_capacity(line.len());
    for chunk in line.utf8_chunks() {
        upper.extend_from_slice(chunk.valid().to_uppercase().as_bytes());
        upper.extend_from_slice(chunk.invalid());
    }
    *line = upper;
}
